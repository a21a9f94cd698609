"""Batch personalisation: the concepts manifest, the batch's plan (shards), and what became of each concept.

The manifest is YAML, at a local path or an `s3://` URI:

    concepts:
      - images: s3://oneword-data/concepts/my-cat/   # folder or prefix of 3-5 photos
        token: "<my-cat>"
        init_word: cat
        name: my-cat          # optional: registered-model name (default: from the token)
        n_vectors: 1          # optional
        templates: object     # optional: object, style, toyworld or a file (default: the model's profile)
        learning_rate: 0.002  # optional: this concept's base LR (default: the batch's learning_rate)

A bare list of entries (without `concepts:`) is read too. A relative local `images` path is relative to the
manifest's own folder, so a manifest and its photos move together.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import yaml
from pydantic import Field, ValidationError, field_validator

from oneword import storage
from oneword.config import BatchConfig, ConceptSpec
from oneword.errors import OnewordError
from oneword.templates import SETS as TEMPLATE_SETS

log = logging.getLogger(__name__)

UNCHANGED_SUFFIX = " (unchanged)"  # a run's answer for a version registered before from the same training

# What a cluster run trains at most by default: past it, its Argo workflow may outgrow the size Argo can keep.
RUN_LIMIT = BatchConfig.model_fields["max_concepts_per_run"].default
# In a recorded plan: the concept changed, and was left to the manifest's next runs; its value, how many runs in a
# row have left it. With UNTOLD_KEY: whether it changed could not be told (the lookup said why in its log).
DEFERRED_KEY, UNTOLD_KEY = "deferred", "untold"
ONE_OFF_KEY = "one_off"  # in a run's plan: the run was limited to some concepts (only_concepts), no night's
JUDGED_KEY = "judged"  # set by the lookup (`oneword.unchanged`) on a concept it found changed


def this_run_takes(
    todo: list[dict], most: int, waited: dict[str, int] | None = None
) -> tuple[list[dict], dict[str, int]]:
    """Split the concepts a batch run must train into those it trains and those it leaves to the manifest's next
    runs, at most `most` now (0 or less: all). Those the lookup found changed (`JUDGED_KEY`) come before those it
    could not tell of (which may well be unchanged: a registry that did not answer, a single-file checkpoint);
    then those that the runs before left most often in a row (`waited`, by name), then the manifest's order:
    every concept is trained in time, even behind concepts that fail night after night (a concept trained, or
    failed, waits anew).

    Returns:
        The concepts to train now, in the manifest's order; and the others, each with the runs in a row that
        have now left it.
    """
    waited = waited or {}
    if most <= 0 or len(todo) <= most:
        return list(todo), {}
    # stable: the manifest's order among equals
    first = sorted(todo, key=lambda c: (not c.get(JUDGED_KEY), -waited.get(c["name"], 0)))
    taken = {c["name"] for c in first[:most]}
    later = {c["name"]: waited.get(c["name"], 0) + 1 for c in todo if c["name"] not in taken}
    return [c for c in todo if c["name"] in taken], later


def runs_needed(n: int, most: int) -> str | None:
    """What a manifest whose runs must train `n` concepts, `most` a run, is told; None when one run takes them."""
    if most <= 0 or n <= most:
        return None
    return (f"{n} concepts to train: a run trains {most} of them (max_concepts_per_run) and leaves the others to "
            f"the next runs of the manifest, {-(-n // most)} runs in all; `oneword submit --concepts-manifest` "
            f"starts them together")  # fmt: skip


def over_the_limit(most: int) -> str | None:
    """The warning for a run limit above what a KFP run on Argo is known to carry (`RUN_LIMIT`); None if not."""
    if 0 < most <= RUN_LIMIT:
        return None
    said = "no limit" if most <= 0 else f"{most} concepts"
    return (
        f"max_concepts_per_run={most} ({said}): a KFP run on Argo that trains more than about {RUN_LIMIT} concepts "
        "may outgrow the size Argo can keep of it and end in error (docs/deploy.md, 'How many concepts in one run')"
    )


class ConceptEntry(ConceptSpec):
    """One concept of a batch: what to learn (`ConceptSpec`), from which photos, under which name."""

    images: str = Field(description="folder or s3:// prefix of the concept's photos")
    name: str = Field("", description="registered-model name (default: from the token)")

    @field_validator("images")
    @classmethod
    def _somewhere(cls, value: str) -> str:
        if not value.strip():  # "" would be the working folder, whatever it holds
            raise ValueError("is empty: give the folder or s3:// prefix of the concept's photos")
        return value


def content_key(images: str) -> str:
    """A fingerprint of the photos' content (not of their folder's name), recorded in the batch's plan and in
    `preprocess`'s output: which photos a run found.

    Local files are hashed; objects under an `s3://` prefix are named by key, size and ETag (a listing, not a
    download). New photos under an old prefix give a new key.
    """
    h = hashlib.sha256()
    if storage.is_s3(images):
        try:
            objects = storage.list_objects(images)
        except OnewordError as e:  # one concept's missing bucket or empty prefix must not stop the batch's plan
            log.warning("%s: %s (its preprocess step will fail alone)", images, e.message)
            return ""
        for key, size, etag in objects:
            h.update(f"{key}\0{size}\0{etag}\n".encode())
    else:
        folder = Path(images)
        if not folder.is_dir():
            return ""  # preprocess reports the missing folder, with the concept's name, where it runs
        for f in sorted(p for p in folder.rglob("*") if p.is_file()):
            h.update(os.fsencode(f.relative_to(folder)) + b"\0")  # a name in another encoding than UTF-8 too
            with open(f, "rb") as data:  # read in blocks: a phone's video beside the photos may take gigabytes
                h.update(hashlib.file_digest(data, "sha256").digest())
    return "sha256:" + h.hexdigest()


def plan_concepts(entries: list[ConceptEntry], only: Sequence[str] = (), source: str = "the manifest") -> list[dict]:
    """What each concept of a batch runs with: its entry, its registered-model name and its photos' content key.

    Args:
        entries: the manifest's concepts.
        only: names of the concepts to plan (`BatchConfig.only_concepts`), in the manifest's order; empty: all.
        source: the manifest, as an error names it.

    Raises:
        OnewordError: if two concepts would register under one name, or `only` names a concept the manifest has not.
    """
    names = concept_names(entries)
    taken = set(chosen(names, only, source))
    return [
        {**e.model_dump(exclude_none=True), "name": name, "content_key": content_key(e.images)}
        for e, name in zip(entries, names)
        if name in taken
    ]


def concept_names(entries: list[ConceptEntry]) -> list[str]:
    """The registered-model name of each concept of a manifest.

    Raises:
        OnewordError: if two concepts would register under one name.
    """
    from oneword.registry import concept_name

    names = [concept_name(e.token, e.name) for e in entries]
    if dupes := sorted({n for n in names if names.count(n) > 1}):
        raise OnewordError(f"concepts {dupes} would register under one name", hint="give each a distinct `name`")
    return names


def chosen(names: list[str], only: Sequence[str], source: str = "the manifest") -> list[str]:
    """The names of a manifest's concepts (`names`) that a run takes: those in `only`, in the manifest's order;
    every one if `only` is empty.

    Raises:
        OnewordError: `only` names a concept the manifest does not hold (with the names it may have meant).
    """
    only = [only] if isinstance(only, str) else only  # one name, as a dashboard or an API caller may send it
    if missing := [n for n in dict.fromkeys(only) if n not in names]:
        close = list(dict.fromkeys(m for n in missing for m in difflib.get_close_matches(n, names, n=1)))
        raise OnewordError(
            f"only_concepts (--only-concepts) names {', '.join(map(repr, missing))}, which {source} does not hold",
            hint=(f"did you mean {', '.join(map(repr, close))}? " if close else "")
            + "a concept's name is its manifest `name`, else its token without <> (`oneword batch MANIFEST --dry-run` "
            "lists them)",
        )
    return [n for n in names if not only or n in only]


def split_runs(names: list[str], most: int) -> list[list[str]]:
    """`names` in runs of at most `most` concepts each (0 or less: one run), in order."""
    if most <= 0 or len(names) <= most:
        return [list(names)]
    return [names[i : i + most] for i in range(0, len(names), most)]


def spec_of(concept: dict) -> ConceptSpec:
    """What a planned concept (`plan_concepts`) trains: its `ConceptSpec` fields, without its photos and name."""
    return ConceptSpec(**{k: concept[k] for k in ConceptSpec.model_fields if concept.get(k) is not None})


def shard(concepts: list[dict], concepts_per_shard: int = 1) -> list[list[dict]]:
    """Group planned concepts into shards (one GPU training job each) of at most `concepts_per_shard`."""
    k = max(1, concepts_per_shard)
    return [concepts[i : i + k] for i in range(0, len(concepts), k)]


def load_concepts_manifest(source: str) -> list[ConceptEntry]:
    """Read and validate a concepts manifest (path or `s3://` URI).

    Returns:
        The entries, in file order.

    Raises:
        OnewordError: naming the entry and field at fault, or a duplicated token or name.
    """
    return parse_concepts_manifest(read_concepts_manifest(source), source)


def read_concepts_manifest(source: str) -> str:
    """The text of a concepts manifest at a path or an `s3://` URI."""
    if storage.is_s3(source):
        with tempfile.TemporaryDirectory() as d:
            return read_text(storage.download_file(source, Path(d) / "manifest.yaml"), source)
    p = Path(source)
    if not p.is_file():
        raise OnewordError(f"concepts manifest {source} not found", hint="pass a YAML file or s3:// URI")
    return read_text(p, source)


def read_text(path: Path, source: str | None = None, what: str = "concepts manifest") -> str:
    """A YAML file's text: UTF-8 (with or without a byte-order mark), or UTF-16 with its mark (what some Windows
    editors save); anything else is an error naming the file (`source`, default `path`) and the byte."""
    data = Path(path).read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise OnewordError(
            f"{what} {source or path} is not UTF-8 text (byte {data[e.start]:#04x} at position {e.start})",
            hint="save it as UTF-8 (an editor's 'Save with encoding' or `iconv -t UTF-8`)",
        ) from e


def manifest_items(data: object, source: str, what: str = "concepts manifest") -> object:
    """The concepts a parsed manifest lists: the list under `concepts:`, or the file's own list. A key beside
    `concepts:` (a setting such as `steps:`, which a manifest does not hold) and a `concepts:` written as a
    mapping are errors, not ignored."""
    if not isinstance(data, dict):
        return data
    if "concepts" in data and (beside := [str(k) for k in data if k != "concepts"]):
        raise OnewordError(
            f"{what} {source} has {', '.join(map(repr, beside))} beside `concepts:`, which it does not read",
            hint="settings go to the run (`oneword batch --help`), or under each concept where it has that field",
        )
    items = data.get("concepts")
    if isinstance(items, dict):
        raise OnewordError(
            f"the `concepts:` of {what} {source} is a mapping, not a list",
            hint="write each concept as a list item: `- images: ...`, with token and init_word under it",
        )
    return items


# what a manifest entry may hold beside its three required fields, as errors say it
ENTRY_HINT = f"optional: {', '.join(f for f, info in ConceptEntry.model_fields.items() if not info.is_required())}; " \
    "see k8s/examples/concepts.yaml"  # fmt: skip


def parse_yaml(text: str, source: str, what: str = "concepts manifest"):
    """`text`, the YAML file at `source`, parsed; a syntax error names the file and the line, where PyYAML says
    `"<unicode string>", line 3, column 4` in five lines."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        why = getattr(e, "problem", None) or str(e).splitlines()[0]
        begun = getattr(e, "context_mark", None)  # where what it was reading began: an unclosed quote's line
        during = f" ({e.context}" if getattr(e, "context", None) else ""
        if during and begun is not None and mark is not None and begun.line != mark.line:
            during += f" that begins at line {begun.line + 1}, column {begun.column + 1}"
        during += ")" if during else ""
        raise OnewordError(
            f"{what} {source} is not valid YAML{where}: {why}{during}",
            hint="check the indentation and the quotes on that line and the one before it",
        ) from e


def field_problems(err: ValidationError, fields: Iterable[str] = tuple(ConceptEntry.model_fields)) -> list[str]:
    """A manifest entry's validation errors, one phrase each, naming the field (and the one meant, for a typo,
    among `fields`)."""
    fields = list(fields)
    out = []
    for item in err.errors():
        field = ".".join(str(p) for p in item["loc"])
        if item["type"] == "extra_forbidden":
            close = difflib.get_close_matches(field, fields, n=1)
            out.append(f"unknown field {field!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        elif item["type"] == "invalid_key":
            out.append(f"key {item['input']!r} is not a field's name (YAML reads an unquoted yes, no, on or off as "
                       "true or false, and digits as a number)")  # fmt: skip
        elif item["type"] == "missing":
            out.append(f"missing field {field!r}")
        elif item["type"] == "value_error":  # a validator's own message, which says the value
            out.append(f"{field}: {item['msg'].removeprefix('Value error, ')}")
        else:
            out.append(f"{field}: {item['msg']} (got {item.get('input')!r})")
    return out


def parse_concepts_manifest(text: str, source: str) -> list[ConceptEntry]:
    """Validate the text of the concepts manifest at `source` (`load_concepts_manifest`), which its errors name
    and which relative image paths are relative to."""
    from oneword.tokens import clashing_entries, vector_tokens  # torch and a tokenizer: not for a report

    data = parse_yaml(text, source) or {}
    items = manifest_items(data, source)
    if not items or not isinstance(items, list):
        keys = [str(k) for k in data] if isinstance(data, dict) and "concepts" not in data else []
        raise OnewordError(
            f"concepts manifest {source} lists no concepts"
            + (f": it has no `concepts:` key, but {', '.join(map(repr, keys))}" if keys else ""),
            hint="write a list under `concepts:` (see k8s/examples/concepts.yaml)",
        )
    from oneword.registry import concept_name

    # every entry's problems, told at once and in the file's order: a long manifest is fixed in one go
    entries, problems = {}, []  # problems: (the first entry it is about, message, hint)
    tokens, names = {}, {}  # of every entry that gives them, a broken one's too: its clash is told now, not later
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            problems.append((i, f"concept #{i + 1} of {source} is {item!r}, not a mapping of fields",
                             f"write `- images: ...`, with token and init_word under it ({ENTRY_HINT})"))  # fmt: skip
            continue
        if isinstance(item.get("token"), str):
            vectors = item.get("n_vectors", 1)
            tokens[i] = (item["token"], vectors if isinstance(vectors, int) and vectors > 0 else 1)
            with contextlib.suppress(OnewordError):  # told below, for a valid entry
                names[i] = concept_name(item["token"], item["name"] if isinstance(item.get("name"), str) else "")
        try:
            e = ConceptEntry.model_validate(item)  # a key YAML reads as a number or a boolean is a field error too
        except ValidationError as err:
            label = f"#{i + 1}" + (f" ({item['token']})" if i in tokens else "")
            problems.append((i, f"concept {label} of {source}: {'; '.join(field_problems(err))}",
                             f"each needs images, token and init_word ({ENTRY_HINT})"))  # fmt: skip
            continue
        try:
            concept_name(e.token, e.name)
        except OnewordError as err:
            problems.append((i, f"concept #{i + 1} of {source}: {err.message}",
                             "give it a `name:` of letters, digits, '_', '.' and '-'"))  # fmt: skip
            continue
        local = {"images": e.images}
        if e.templates and e.templates not in TEMPLATE_SETS:  # a file of templates
            local["templates"] = e.templates
        entries[i] = e.model_copy(update={k: _beside(source, v) for k, v in local.items() if not storage.is_s3(v)})
    told: set[frozenset[int]] = set()  # pairs told of already: two concepts with one token share a name too

    def shared(what: str, values: dict[int, str]) -> None:
        for v in dict.fromkeys(x for x in values.values() if list(values.values()).count(x) > 1):
            sharing = [i for i, x in values.items() if x == v]
            pairs = {frozenset((i, j)) for i in sharing for j in sharing if i < j}
            if not pairs <= told:
                told.update(pairs)
                own = f"give each concept its own {what}" + (" (set `name:`)" if what == "name" else "")
                at = " and ".join(f"#{i + 1}" for i in sharing)
                problems.append((sharing[0], f"concepts {at} of {source} share the {what} {v!r}", own))

    shared("token", {i: t for i, (t, _) in tokens.items()})
    for i, (a, na) in tokens.items():  # shard-mates, or concepts in one prompt, whose tokens a prompt confuses
        for j, (b, nb) in tokens.items():
            if j > i and a != b and clashing_entries(vector_tokens(a, na), vector_tokens(b, nb)):
                told.add(frozenset((i, j)))
                problems.append((
                    i,
                    f"concepts #{i + 1} and #{j + 1} of {source}: their tokens {a!r} and {b!r} cannot be told apart "
                    "in a prompt (the same but for case, or NAME and NAME_1, which diffusers reads as one "
                    "concept's two vectors)",
                    "give each concept its own token",
                ))  # fmt: skip
    shared("name", names)
    problems.sort(key=lambda p: p[0])  # stable: an entry's own problem before those it shares
    if len(problems) == 1:
        raise OnewordError(*problems[0][1:])
    if problems:  # the file named once; each kind of problem's hint once, the fields' list once
        said = "\n".join(f"  - {m.replace(f' of {source}', '', 1)}" for _, m, _ in problems)
        hints = dict.fromkeys(h.replace(f" ({ENTRY_HINT})", "") for _, _, h in problems)
        raise OnewordError(
            f"{len(problems)} problems in concepts manifest {source}:\n{said}",
            hint="; ".join(hints) + f" ({ENTRY_HINT}); check the fixed manifest with `oneword batch MANIFEST "
            "--dry-run`",
        )
    return list(entries.values())


def _beside(manifest: str, path: str) -> str:
    """A local path of a manifest's entry as the manifest's reader means it: `~` is the home folder, and a relative
    path is relative to a local manifest's folder (to a manifest read from s3://, to the working folder)."""
    path = os.path.expanduser(path)
    if storage.is_s3(manifest) or os.path.isabs(path):
        return path
    return os.path.abspath(Path(manifest).parent / path)


def alias_reason(row: dict) -> str:
    """Why a `batch_report` row's version holds the alias it holds, for a person: what the gate said where it is
    no champion (a champion's own reason is what was expected), or said again of an unchanged one's scores, and
    what its photos were (too few, files skipped). An unchanged version's word is from its registration: an alias
    moved by hand since says otherwise."""
    note = f"photos: {row['photo_note']}" if row.get("photo_note") else ""  # one photo may make a champion
    if row.get("rejudged"):
        return "; ".join(x for x in (row["rejudged"], note) if x)
    if "champion" in (row.get("alias") or "").split(",") or not row.get("gate"):
        return note
    gate = f"when registered: {row['gate']}" if row["status"] == "unchanged" else row["gate"]
    return "; ".join(x for x in (gate, note) if x)


def batch_report(tracking_uri: str | None, batch_id: str, concepts: list[dict], experiment: str = "oneword") -> dict:
    """What became of each planned concept of a batch: registered (name, version, alias) or failed (stage, error).

    Args:
        tracking_uri: MLflow tracking URI.
        batch_id: the batch's id.
        concepts: the batch's plan (`plan_concepts`), as the plan step recorded it.
        experiment: the MLflow experiment the batch logged to.

    Returns:
        `{"batch_id", "registered": n, "unchanged": n, "failed": n, "deferred": n, "concepts": [{token, name,
        status, version, alias, stage, error}]}` (a version's also its `reconstruction`, `editability` and the
        `run_id` that registered it); status is registered (a new version), unchanged (registered
        before from the same training and evaluation: that version; `rejudged` says what the gate said of its
        scores where only the gate changed; `gate`: why the version holds its alias), failed, or deferred (it
        changed, and the plan left it to the manifest's next runs: `this_run_takes`). A concept with neither a
        version nor a recorded failure failed in a way no step could record (a pod lost for good): its stage is
        "unknown".
    """
    from oneword.batch_records import batch_failures, batch_unchanged
    from oneword.catalogue import batch_versions

    rows = batch_versions(tracking_uri, batch_id)
    kept = batch_unchanged(tracking_uri, batch_id, experiment)
    failures = batch_failures(tracking_uri, batch_id, experiment)
    # the newest of each concept's rows (they come sorted by version); a new version before one kept
    newest = {r["name"]: ("unchanged", r) for r in kept} | {r["name"]: ("registered", r) for r in rows}
    out = []
    for raw in concepts:
        e = ConceptEntry(**{k: v for k, v in raw.items() if k in ConceptEntry.model_fields})
        name = e.name
        if name in newest:
            status, r = newest[name]
            out.append(
                {
                    "token": e.token,
                    "name": name,
                    "status": status,
                    "version": r["version"],
                    "alias": ",".join(r["aliases"]),
                    "reconstruction": r.get("reconstruction"),
                    "editability": r.get("editability"),
                    "run_id": r.get("run_id"),
                    **({"rejudged": r["rejudged"]} if r.get("rejudged") else {}),
                    **({"gate": r["gate"]} if r.get("gate") else {}),
                    **({"photo_note": r["photo_note"]} if r.get("photo_note") else {}),
                }
            )
        elif raw.get(DEFERRED_KEY) and name not in failures:
            what = "whether it changed could not be told (see plan-batch's log)" if raw.get(UNTOLD_KEY) else "changed"
            if raw.get(ONE_OFF_KEY):  # a run of some concepts: no next run of it will take the rest
                why = f"{what}, and left out: a run trains at most max_concepts_per_run; start it in a run of its own"
            else:
                why = f"{what}, and left to the manifest's next run (max_concepts_per_run)"
            out.append({"token": e.token, "name": name, "status": "deferred", "version": None, "alias": None,
                        "stage": None, "error": why})  # fmt: skip
        else:
            why = failures.get(name, {"stage": "unknown", "error": "no step recorded a result; see the run's logs"})
            out.append(
                {
                    "token": e.token,
                    "name": name,
                    "status": "failed",
                    "version": None,
                    "alias": None,
                    "stage": why.get("stage") or "unknown",
                    "error": why.get("error"),
                    **({"hint": why["hint"]} if why.get("hint") else {}),
                }
            )
    count = {k: sum(c["status"] == k for c in out) for k in ("registered", "unchanged", "failed", "deferred")}
    return {"batch_id": batch_id, **count, "concepts": out}


def manifest_id(source: str) -> str:
    """A concepts manifest as every run of it names it: an `s3://` URI as given, a path made absolute."""
    return source if storage.is_s3(source) else os.path.abspath(os.path.expanduser(source))


def left_the_manifest(tracking_uri: str | None, previous: list[dict] | None, concepts: list[dict]) -> list[dict]:
    """The concepts the manifest's previous run planned and this one does not (removed, or renamed) that still
    hold an alias, which serving may load: `{"name", "aliases": {alias: version}}` each (with `error` where its
    aliases could not be read). oneword moves no alias
    for them: whether a concept left the catalogue is the team's to say (`mlflow`'s delete_registered_model_alias).
    """
    from oneword.batch_records import held_aliases

    now = {c["name"] for c in concepts}
    left = []
    for name in [c["name"] for c in previous or [] if c["name"] not in now]:
        try:
            if held := held_aliases(tracking_uri, name):
                left.append({"name": name, "aliases": held})
        except Exception as e:  # one name the registry would not say: the others are still told, and this one too
            log.warning("could not read %s's aliases: %s", name, e)
            left.append({"name": name, "aliases": {}, "error": f"{type(e).__name__}: {e}"})
    return left


def final_report(tracking_uri: str | None, batch_id: str, plan: Callable[[], list[dict] | None], experiment: str,
                 state: str, previous: Callable[[], list[dict] | None] | None = None,
                 bundle: Callable[[], dict | None] | None = None) -> dict:  # fmt: skip
    """An exit handler's report of a run (a batch, or one concept): the live runs its trainings left open for a
    `register` that never ran are ended first (a pod lost for good, a cancelled run), then `batch_report`.

    Args:
        tracking_uri: MLflow tracking URI.
        batch_id: the run's id (its versions, failures and live runs are tagged with it).
        plan: reads the run's plan (None where none was recorded: the manifest could not be read).
        experiment: the MLflow experiment.
        state: the run's final state, as KFP gives it to an exit handler: on a cluster, ML Metadata's word for the
            exit handler's DAG (COMPLETE, FAILED, CANCELED; before KFP 2.17 often still RUNNING, as the state of a
            DAG of DAGs was not carried up); kfp.local's SUCCEEDED or FAILED.
        previous: reads the plan of the manifest's run before this one (`batch_records.previous_plan`), whose concepts
            that left the manifest are reported (`left_the_manifest`); None: none are.
        bundle: reads what became of the run's bundle (`batch_records.batch_bundle`); None: the run has none.

    Returns:
        `batch_report`'s dict, with `pipeline_state`, `ended_runs`, `left` (with `previous`; `left_error` where
        that could not be told), `bundle` (with `bundle`, where its step ran: `Bundled.summary`, or its `error`),
        and `error` where it could not be made.
    """
    from oneword import tracking
    from oneword.live import end_orphaned_runs

    empty = {"batch_id": batch_id, "registered": 0, "unchanged": 0, "failed": 0, "deferred": 0, "concepts": []}
    no_plan = "no plan was recorded: the manifest could not be read (see plan-batch's log)"
    concepts = None
    with tracking.briefly():  # a server that does not answer holds the run's end for seconds, not minutes
        try:  # first, so that a report that cannot be made does not leave them RUNNING
            ended = end_orphaned_runs(tracking_uri, experiment, batch_id,
                                      f"the run ended ({state}) before this concept registered")  # fmt: skip
        except Exception as e:
            ended = [f"could not end them: {type(e).__name__}: {e}"]
        try:
            concepts = plan()
            if concepts is None:
                report = {**empty, "error": no_plan}
            else:
                report = batch_report(tracking_uri, batch_id, concepts, experiment)
        except Exception as e:  # the summary is still written, saying why it is empty (a failed task uploads none)
            report = {**empty, "error": f"the report could not be made: {type(e).__name__}: {e}"}
        if previous is not None and concepts is not None and "error" not in report:
            try:
                report["left"] = left_the_manifest(tracking_uri, previous(), concepts)
            except Exception as e:  # what the night did is reported all the same, and that this is not known
                log.warning("could not tell which concepts left the manifest: %s", e)
                report["left"], report["left_error"] = [], f"{type(e).__name__}: {e}"
        if bundle is not None:  # said even where the concepts' report could not be made
            try:
                if (made := bundle()) is not None:
                    report["bundle"] = made
            except Exception as e:  # the concepts' report stands; that the bundle's could not be read is said
                report["bundle"] = {"unknown": f"{type(e).__name__}: {e}"}
    return {**report, "pipeline_state": state, "ended_runs": ended}


def bundle_said(made: dict) -> str:
    """What a batch's report says of its bundle (`final_report`'s `bundle`), in a line."""
    name = made.get("name", "")
    if made.get("unknown"):
        return f"what became of the bundle could not be read: {made['unknown']}"
    if made.get("error"):
        return f"bundle {name} failed: {made['error']}"
    left = "; ".join(f"{n}: {why}" for n, why in made.get("left_out", {}).items())
    left = f" (left out: {left})" if left else ""
    n = len(made.get("members", []))
    if made.get("version") is None:
        return f"bundle {name}: nothing registered, no concept of the manifest has a version to hold{left}"
    held = f"{n} concept{'s' * (n != 1)}"
    if made.get("unchanged"):
        return f"bundle {name}/{made['version']} unchanged: {held}{left}"
    return f"bundle {name}/{made['version']} registered: {held}{left}"


def run_answer(report: dict, error: str = "") -> str:
    """A single-concept run's answer, from its `final_report`: `name/version@alias` (" (unchanged)": registered
    before from the same training and evaluation), `name failed at STEP`, or why nothing was registered.

    Args:
        report: `final_report`'s dict for the run's one concept.
        error: what KFP said of the run's failure, where no step recorded one (a cluster's KFP says nothing yet:
            its driver leaves the final status's error empty).
    """
    error = error or ""
    if report.get("error") or not report.get("concepts"):
        why = report.get("error") or error
        return f"nothing registered (run state {report.get('pipeline_state')})" + (f": {why}" if why else "")
    c = report["concepts"][0]
    if c["status"] == "failed":
        if c["stage"] != "unknown":
            return f"{c['name']} failed at {c['stage']}"
        said = error or c.get("error")  # KFP's word on the run, else the report's (a training ended unregistered)
        return f"{c['name']} failed at a step that recorded nothing" + (f": {said}" if said else "")
    return f"{c['name']}/{c['version']}@{c['alias']}" + (UNCHANGED_SUFFIX if c["status"] == "unchanged" else "")
