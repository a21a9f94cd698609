"""The concept registry's queries: concepts and versions by reference, base model, alias or batch, and their
embeddings in any format (`oneword concepts`, `oneword generate --concept`); and its upkeep (`prune_versions`)."""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import json
import logging
import re
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from oneword import tracking
from oneword.bundles import MEMBERS_TAG, bundle_files, bundles_holding, member_tag
from oneword.config import TrackingConfig
from oneword.errors import OnewordError, TransientError
from oneword.registry import (
    ABANDONED,
    ALIAS_WAIT_SECONDS,
    BUNDLE_TAG,
    CANDIDATE,
    CHAMPION,
    CONCEPT_TAG,
    EMBEDDING_ARTIFACT,
    PAGE_SIZE,
    PHOTO_NOTE_TAG,
    TRAINING_SUMMARY,
    champion_named,
    created_at,
    delete_version,
    every_page,
    mark_abandoned,
    model_kind,
    newest_version,
    silent_for,
)
from oneword.tracking import resolve

log = logging.getLogger(__name__)
LATEST = "latest"  # a version's name for the newest, as MLflow's model URIs take it


def parse_ref(ref: str) -> tuple[str, str | None, str | None]:
    """`NAME@alias` -> (NAME, alias, None); `NAME/3` -> (NAME, None, "3"); `NAME/latest` -> (NAME, None,
    "latest"), its newest version, as in MLflow's `models:/NAME/latest`; `NAME` -> (NAME, "champion", None)."""
    if "@" in ref:
        n, a = ref.split("@", 1)
        if not n or not a:
            raise OnewordError(f"{ref!r}: a concept's name and an alias go on either side of '@'",
                               hint="write NAME@alias, NAME/3, NAME/latest or NAME")  # fmt: skip
        check_alias(a)
        return n, a, None
    if "/" in ref:
        n, v = ref.rsplit("/", 1)
        if not (v.isdigit() or v == LATEST):
            raise OnewordError(f"{ref!r}: a version is a number or {LATEST!r}",
                               hint="write NAME/3, NAME/latest, NAME@alias or NAME")  # fmt: skip
        if not n:
            raise OnewordError(f"{ref!r} names no concept before its version",
                               hint="write NAME/3, NAME/latest, NAME@alias or NAME")  # fmt: skip
        return n, None, v
    if not ref:
        raise OnewordError("an empty name names no concept", hint="`oneword concepts list` shows their names")
    return ref, CHAMPION, None


def get_version(ref: str, tracking_uri: str | None = None, bundle: bool = False):
    """Resolve a concept reference to an MLflow `ModelVersion`; a bundle's version (`oneword.bundles`) is refused
    unless `bundle`, naming its members (the concepts to name instead). A bundle's bare NAME, where it has no
    @champion, is its newest version: what its server serves."""
    from mlflow.exceptions import MlflowException

    _, client = tracking.client(tracking.existing_store(tracking_uri))  # read: never made
    name, alias, version = parse_ref(ref)
    where = resolve(tracking_uri)
    try:
        if alias:
            mv = client.get_model_version_by_alias(name, alias)
        else:
            if version == LATEST:
                newest = newest_version(client, name)
                if newest is None and (kind := model_kind(client, name)) is not None:
                    what = "bundle" if kind == "bundle" else "concept"
                    raise OnewordError(f"{what} {name!r} has no versions left (deleted, or erased with "
                                       f"{'its concepts' if kind == 'bundle' else 'oneword concepts delete'})",
                                       hint=f"`oneword concepts {'bundles' if kind == 'bundle' else 'list'}` "
                                       "shows what the registry holds")  # fmt: skip
                version = str(getattr(newest, "version", 0))  # none: "not found", as for 3
            mv = client.get_model_version(name, version)
    except MlflowException as e:
        missing = e.error_code == "RESOURCE_DOES_NOT_EXIST" or (
            e.error_code == "INVALID_PARAMETER_VALUE" and "not found" in str(e)
        )
        if not missing:  # the registry could not answer (down, refused, no permission): not "no such concept"
            from oneword.outcome import transient

            why = tracking.said(e)  # "http://host:port did not answer: ...", or the server's answer
            said = f"the registry at {why} (looking up {ref!r})" if why.startswith(("http://", "https://")) else \
                f"the registry at {where} could not look up {ref!r}: {why}"
            raise (TransientError if transient(e) else OnewordError)(
                said,
                hint="check that the MLflow server is up and that your credentials may read the registry",
            ) from e
        if ref == name and model_kind(client, name) == "bundle":  # a bundle has no champion of its own
            if bundle:
                return get_version(f"{name}/{LATEST}", tracking_uri, bundle=True)
            raise OnewordError(f"{name} is a bundle of concepts, not a concept",
                               hint=f"name one of its concepts (`oneword concepts show {name}` lists them)") from e
        raise _not_there(client, name, alias, version, ref, where) from e
    if not bundle and (members := (mv.tags or {}).get(MEMBERS_TAG)) is not None:
        raise OnewordError(f"{name} is a bundle of concepts, not a concept: {name}/{mv.version} holds "
                           f"{members.replace(',', ', ')}", hint="name one of its concepts instead")  # fmt: skip
    return mv


def _not_there(client, name: str, alias: str | None, version: str | None, ref: str, where: str) -> OnewordError:
    """Why `ref` is not in the registry: no such concept, or (it is there) no such version or alias, with the
    ones it has."""
    from mlflow.exceptions import MlflowException

    try:
        rm = client.get_registered_model(name)
        listed = every_page(client.search_model_versions, filter_string=f"name = '{name}'")
        versions = sorted((int(v.version) for v in listed), reverse=True)
    except MlflowException:
        try:  # a slip of the keyboard: the registry's names closest to it
            names = [m.name for m in every_page(client.search_registered_models)]
        except Exception:  # the registry's names are a help to the message, not what it says
            names = []
        lower = {n.lower(): n for n in names}  # `PURPLE-STAR` for purple-star too
        meant = "".join(f" (did you mean {lower[m]!r}?)"
                        for m in difflib.get_close_matches(name.lower(), list(lower), n=1))  # fmt: skip
        return OnewordError(
            f"concept {name!r} not found in the registry at {where}{meant}",
            hint="list concepts with `oneword concepts list`",
        )
    has = f"versions {', '.join(map(str, versions[:10]))}{' ...' if len(versions) > 10 else ''}" if versions else (
        "no versions")
    aliases = ", ".join(f"@{a}" for a in sorted(rm.aliases or {})) or "none"
    if alias:
        return OnewordError(f"concept {name!r} has no alias @{alias} (aliases: {aliases}; {has})",
                            hint=f"name a version by number ({name}/N, {name}/latest) or by an alias")  # fmt: skip
    return OnewordError(f"concept {name!r} has no version {version} ({has}; aliases: {aliases})",
                        hint=f"`oneword concepts list` shows what {name} has")  # fmt: skip


def list_concepts(
    tracking_uri: str | None = None,
    base_model: str | None = None,
    alias: str | None = None,
    page_size: int = PAGE_SIZE,
    batch: str | None = None,
    names: Sequence[str] = (),
) -> list[dict]:
    """List registered concept versions, optionally only those on a base model (its reference or a fingerprint
    prefix), with an alias, registered by one batch (its id: `oneword batch` prints it), or of concepts whose
    names match one of `names` (shell-style patterns: `cat*`, `team-?-dog`).

    Every page of the registry is read, however many concepts it holds (a batch's, or the named ones': what they
    hold).
    """
    if alias:
        check_alias(alias)  # one MLflow cannot hold is a slip, not "no concepts"
    if batch:
        rows = batch_versions(tracking.existing_store(tracking_uri), batch, page_size)  # read: never made
        rows = [r for r in rows if not base_model or on_base_model(r, base_model)]
        rows = [r for r in rows if not names or _named(r["name"], names)]
        return [r for r in rows if not alias or alias in r["aliases"]]
    _, client = tracking.client(tracking.existing_store(tracking_uri))  # read: never made
    rows = []
    concept = f"tags.`{CONCEPT_TAG}` = 'true'"
    if names:  # asked of the server by LIKE (`_` is its one-character wildcard), then matched exactly here
        if bad := [n for n in names if not re.fullmatch(r"[A-Za-z0-9_.*?\[\]!-]+", n)]:
            raise OnewordError(f"{bad[0]!r} is no concept name or pattern",
                               hint="names hold letters, digits, '_', '.' and '-'; * and ? match any")  # fmt: skip
        found = []
        for n in names:
            like = f"{concept} and name LIKE '{_like(n)}'"
            found += every_page(client.search_registered_models, page_size, filter_string=like)
        matched = {rm.name: rm for rm in found if _named(rm.name, names)}
        models = list(matched.values())
    else:
        models = every_page(client.search_registered_models, page_size, filter_string=concept)
    for rm in models:
        if alias:  # the version it names, not every version of every concept
            held = (rm.aliases or {}).get(alias)
            versions = [] if held is None else _versions_named(client, rm.name, [str(held)])
        else:
            versions = every_page(client.search_model_versions, page_size, filter_string=f"name = '{rm.name}'")
        for mv in versions:
            row = version_row(mv, rm)
            if base_model and not on_base_model(row, base_model):
                continue
            if alias and alias not in row["aliases"]:
                continue
            rows.append(row)
    return sorted(rows, key=lambda r: (r["name"], int(r["version"])))


def _named(name: str, patterns: Sequence[str]) -> bool:
    """Whether `name` matches one of the shell-style `patterns`, case and all."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _like(pattern: str) -> str:
    """A shell-style name pattern as SQL LIKE reads it, as wide or wider (`[ab]` is any one character)."""
    return re.sub(r"\[[^]]*\]", "_", pattern).replace("*", "%").replace("?", "_")


def _deciding(client, name: str, mark: bool = True) -> list[str]:
    """The versions of `name` whose register has not decided their alias yet and is alive. One whose register
    has said nothing for twice the time a register waits for another (`registry.silent_for`) died: it is marked
    abandoned (unless not `mark`: a dry run changes nothing), as the next register of the concept would mark it,
    and is not waited for."""
    versions = every_page(client.search_model_versions, filter_string=f"name = '{name}'")
    undecided = sorted((mv for mv in versions if mv.tags.get("gate") is None), key=lambda mv: int(mv.version))
    waiting = []
    for mv in undecided:
        if silent_for(mv) > 2 * ALIAS_WAIT_SECONDS:
            if mark:
                log.warning("%s version %s never decided its alias (its register was killed?): marked abandoned",
                            name, mv.version)  # fmt: skip
                mark_abandoned(client, name, str(mv.version))
        else:
            waiting.append(str(mv.version))
    return waiting


def _still_deciding(name: str, version: str, what: str) -> OnewordError:
    """`what` is refused while `version` of `name` is being registered."""
    return OnewordError(
        f"{name} version {version} is still being registered: its gate has not decided",
        hint=f"wait for its register to finish, then {what} (a register that died is taken as abandoned once "
        f"it has said nothing for {2 * ALIAS_WAIT_SECONDS:.0f} s)",
    )


def _versions_named(client, name: str, versions: list[str]) -> list:
    """These versions of `name`, leaving out one deleted since it was named (any other registry error is raised)."""
    from mlflow.exceptions import MlflowException

    out = []
    for v in versions:
        try:
            out.append(client.get_model_version(name, v))
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
    return out


def on_base_model(row: dict, base_model: str) -> bool:
    """Whether a concept row was trained on `base_model`: the reference it was trained from (a hub id, a folder, an
    s3:// prefix, as given) or a prefix of its fingerprint (with or without `sha256:`)."""
    fp = row["base_model_fingerprint"]
    given = (row.get("base_model") or "").rstrip("/")
    return (
        base_model.rstrip("/") == given
        or fp.startswith(base_model)
        or fp.removeprefix("sha256:").startswith(base_model)
    )


def batch_versions(tracking_uri: str | None, batch_id: str, page_size: int = PAGE_SIZE) -> list[dict]:
    """The concept versions one batch registered (their gate decided), as `list_concepts` rows.

    Found by the batch's version tag, and each of their models read once for its aliases: the query costs what
    the batch holds, not what the whole registry holds.
    """
    if not re.fullmatch(r"[\w.:-]+", batch_id):  # a KFP run's id, or a local batch's: a quote would break the query
        raise OnewordError(f"{batch_id!r} is no batch id", hint="pass the id `oneword batch` printed")
    _, client = tracking.client(tracking_uri)
    versions = every_page(
        client.search_model_versions, page_size, filter_string=f"tags.`oneword.batch_id` = '{batch_id}'"
    )
    # a version whose register died before its gate decided is no registration (as in `registered_result`)
    versions = [mv for mv in versions if mv.tags.get("gate") and mv.tags["gate"] != ABANDONED]
    models = {name: client.get_registered_model(name) for name in {mv.name for mv in versions}}
    rows = [version_row(mv, models[mv.name]) for mv in versions]
    return sorted(rows, key=lambda r: (r["name"], int(r["version"])))


def champion_tokens(tracking_uri: str | None, names: Sequence[str]) -> dict[str, tuple[str, str | None]]:
    """`{name: (version, token)}` of each concept in `names` that has a champion (the others are left out)."""
    from mlflow.exceptions import MlflowException

    _, client = tracking.client(tracking_uri)
    held = {}
    for name in names:
        try:
            mv = client.get_model_version_by_alias(name, CHAMPION)
        except MlflowException as e:
            if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):  # no concept, or no champion
                continue
            raise
        held[name] = (str(mv.version), (mv.tags or {}).get("oneword.token"))
    return held


def version_row(mv, rm) -> dict:
    """One concept version as `list_concepts` lists it; `rm` is its registered model (for the aliases)."""
    aliases = sorted(a for a, v in (rm.aliases or {}).items() if str(v) == str(mv.version))
    return {
        "name": rm.name,
        "version": str(mv.version),
        "aliases": aliases,
        "token": mv.tags.get("oneword.token"),
        "base_model": mv.tags.get("oneword.base_model"),
        "base_model_fingerprint": mv.tags.get("oneword.base_model_fingerprint", ""),
        "model_family": mv.tags.get("oneword.model_family"),
        "reconstruction": as_number(mv.tags.get("reconstruction")),
        "editability": as_number(mv.tags.get("editability")),
        "gate": mv.tags.get("gate"),
        "photo_note": mv.tags.get(PHOTO_NOTE_TAG, ""),
        "batch_id": mv.tags.get("oneword.batch_id"),
        "run_id": mv.run_id,
    }


def as_number(tag: str | None) -> float | None:
    """A tag or logged param as a number (a version registered unevaluated, tagged by another tool, a param logged
    as "None": None)."""
    try:
        return None if tag is None else float(tag)
    except ValueError:
        return None


def show_concept(ref: str, tracking_uri: str | None = None) -> dict:
    """Everything about one concept version: tags, aliases, run metrics and params, the bundle versions that hold
    it (`bundled_in`); or about a bundle's version."""
    _, client = tracking.client(tracking.existing_store(tracking_uri))  # read: never made
    mv = get_version(ref, tracking_uri, bundle=True)
    run = client.get_run(mv.run_id)
    rm = client.get_registered_model(mv.name)
    bundled = []
    if MEMBERS_TAG not in (mv.tags or {}):  # the bundle versions that serve this one (a copy of its embedding)
        experiments = [e.experiment_id for e in every_page(client.search_experiments)]
        held, runs = bundles_holding(client, mv.name, experiments)
        holds = {r.info.run_id: r.data.tags.get(member_tag(mv.name), "").split(" ")[0] for r in runs}  # its version
        bundled = [f"{b.name}/{b.version}" for b in held if holds.get(b.run_id) == str(mv.version)]
    return {
        "bundled_in": bundled,
        "name": mv.name,
        "version": str(mv.version),
        "aliases": sorted(a for a, v in (rm.aliases or {}).items() if str(v) == str(mv.version)),
        "tags": dict(mv.tags),
        "run_id": mv.run_id,
        "metrics": dict(run.data.metrics),
        "params": dict(run.data.params),
        "source": mv.source,
        "created": created_at(mv),
    }


def pull_concept(
    ref: str, out: Path | None = None, fmt: str = "diffusers", tracking_uri: str | None = None, replace: bool = True,
    shared: bool = False,
) -> tuple[Path, dict]:
    """Download a concept's embedding and write it in `fmt` (an SDXL pair in diffusers' format: `out` and its
    `embeddings.second_file`); with `replace` false, a file already there is refused, not replaced; `shared`: a
    file for another tool or person, which names its base model but not where it was kept (`embeddings.shared`).
    Without `out`, the file is written into a new temporary folder of its own, which the caller keeps (and
    deletes when done with it).

    Returns:
        (the written file, the version's tags).
    """
    from oneword import embeddings as emb_io  # torch: only a pull needs it

    mlflow, _ = tracking.client(tracking.existing_store(tracking_uri))  # read: never made
    mv = get_version(ref, tracking_uri)
    with tempfile.TemporaryDirectory(prefix="oneword-pull-") as d:
        emb = emb_io.load(download_embedding(mlflow, mv.run_id, Path(d), f"{mv.name}/{mv.version}"))
    # without `out`, the file goes to a folder of its own that the caller keeps (generate reads it after)
    out = (
        Path(out)
        if out
        else Path(tempfile.mkdtemp(prefix="oneword-pull-"))
        / emb_io.default_filename(
            emb.token,
            fmt,  # type: ignore[arg-type]
        )
    )
    there = [f for f in emb_io.files_written(emb, out, fmt) if f.exists()]  # type: ignore[arg-type]
    if there and not replace:
        raise OnewordError(
            f"{there[0]} already exists", hint="pass --out with another name, or --force to replace it"
        )
    emb_io.save(emb_io.shared(emb) if shared else emb, out, fmt)  # type: ignore[arg-type]
    return out, {**mv.tags, "oneword.version": str(mv.version), "oneword.name": mv.name}


def download_embedding(mlflow, run_id: str, folder: Path, what: str = "") -> Path:
    """The embedding file of a concept version's run (`run_id`), downloaded into `folder`; `what` names the
    version in an error."""
    import os
    from unittest.mock import patch

    from mlflow.exceptions import MlflowException

    # a file of a few KB: MLflow's progress bar only trailed the answer on the terminal
    bar = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    with patch.dict(os.environ, {} if bar in os.environ else {bar: "false"}):
        folder.mkdir(parents=True, exist_ok=True)
        try:
            return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=EMBEDDING_ARTIFACT,
                                                            dst_path=str(folder)))  # fmt: skip
        except (MlflowException, OSError) as e:
            raise OnewordError(
                f"the embedding of {what or 'a concept'} ({EMBEDDING_ARTIFACT} of run {run_id}) could not be "
                f"downloaded: {tracking.said(e)}",
                hint="check that the artifact store answers and your credentials may read it; if the run's "
                "artifacts were removed, register the concept again or promote another version",
            ) from e


def pull_concepts(
    refs: list[str], tracking_uri: str | None = None, folder: Path | None = None
) -> tuple[list[Path], str]:
    """Download several concepts (diffusers format), into `folder` if given (else each into a folder of its own
    that the caller keeps); a bundle's version gives the copies it holds of its concepts. Returns (files, the base
    model they were trained on)."""
    mlflow, _ = tracking.client(tracking.existing_store(tracking_uri))  # read: never made
    files, bases = [], set()
    for i, ref in enumerate(refs):
        mv = get_version(ref, tracking_uri, bundle=True)
        if MEMBERS_TAG in (mv.tags or {}):  # what it serves, though a member be pruned from the registry since
            into = Path(folder) / f"{i}" if folder else Path(tempfile.mkdtemp(prefix="oneword-pull-"))
            files += bundle_files(mlflow, mv, into)
            bases.add(mv.tags.get("oneword.base_model"))
            continue
        out = Path(folder) / f"{i}" / "learned_embeds.safetensors" if folder else None
        f, tags = pull_concept(ref, out, tracking_uri=tracking_uri)
        files.append(f)
        bases.add(tags.get("oneword.base_model"))
    if len(bases) > 1:
        raise OnewordError(
            f"concepts {refs} were trained on different base models {sorted(map(str, bases))}",
            hint="generate with concepts of one base model at a time",
        )
    return files, next(iter(bases))


def prune_versions(
    tracking_uri: str | None = None,
    keep: int = TrackingConfig().keep_versions,
    names: Sequence[str] = (),
    dry_run: bool = False,
) -> list[dict]:
    """Delete the concept versions that no alias points at, beyond each concept's `keep` newest; and a bundle's
    (`oneword.bundles`) alike.

    Never deleted: a version an alias points at (`champion`, `candidate`, or one of your own), or one of the `keep`
    newest; a concept with a version whose gate has not decided (a register at work) is left whole. A version's
    MLflow run stays, with its embedding, scores and report (a bundle's, with its copies).

    Args:
        tracking_uri: the registry's MLflow tracking URI.
        keep: newest versions kept per concept (at least 1).
        names: only these concepts or bundles (default: every one).
        dry_run: delete nothing; return what would be deleted.

    Returns:
        `list_concepts` rows of the versions deleted (or that would be), by name and version.
    """
    if keep < 1:
        raise OnewordError(
            f"keep must be at least 1, not {keep}", hint="the newest version is what the next run compares with"
        )
    _, client = tracking.client(tracking_uri)
    rows = list_concepts(tracking_uri) + _bundle_rows(client)
    # a concept or bundle with no versions left is there, with nothing to prune
    if missing := sorted(n for n in set(names) - {r["name"] for r in rows} if model_kind(client, n) is None):
        raise OnewordError(
            f"no concept named {', '.join(map(repr, missing))} in the registry at "
            f"{resolve(tracking_uri)}",
            hint="list concepts with `oneword concepts list`",
        )
    gone = []
    for name in sorted({r["name"] for r in rows if not names or r["name"] in names}):
        versions = sorted((r for r in rows if r["name"] == name), key=lambda r: -int(r["version"]))  # each once
        undecided = any(r["gate"] is None and not r.get("bundle") for r in versions)
        if undecided and _deciding(client, name, mark=not dry_run):
            # a register at work may hand the alias back to an older version (`registry._apply_gate`) or ask
            # which decided version came just before its own: this concept waits for the next prune
            log.info("%s: a version is still being registered; not pruned now", name)
            continue
        for r in versions[keep:]:
            if r["aliases"]:
                continue
            if not dry_run:
                held = client.get_registered_model(name).aliases or {}  # an alias moved since the listing
                if str(r["version"]) in {str(v) for v in held.values()}:
                    continue
                delete_version(client, name, r["version"])
            gone.append(r)
    return gone


def _bundle_rows(client) -> list[dict]:
    """Every bundle version, as `list_concepts` rows marked `bundle` (a bundle's versions have no gate to wait
    for)."""
    rows = []
    for rm in every_page(client.search_registered_models, filter_string=f"tags.`{BUNDLE_TAG}` = 'true'"):
        for mv in every_page(client.search_model_versions, filter_string=f"name = '{rm.name}'"):
            rows.append({**version_row(mv, rm), "bundle": True})
    return rows


def delete_concept(name: str, tracking_uri: str | None = None, dry_run: bool = False) -> dict:
    """Delete a concept whole: its registered model and every version, and every MLflow run of it (trainings,
    registrations, failures, in any experiment) with their artifacts and logged models: the embedding, the sample
    grids and reports drawn from the owner's photos; every bundle version that holds a copy of its embedding; and
    its trainings' checkpoint folders and kept trainings beside the checkpoint root (`trainings.copies`), as its
    runs name them. What a request to erase a person's concept asks for. A bundle's name deletes the bundle: its
    versions, runs and logged models (its members stay).

    Runs are deleted as MLflow deletes them (kept in its database, marked deleted, until `mlflow gc`); their
    artifacts, which hold the likeness, are removed from the artifact store now. Safe to run again: a delete
    cut short is finished by the next one (deleted runs are found too).

    Args:
        name: the concept's registered-model name.
        tracking_uri: the registry's MLflow tracking URI.
        dry_run: delete nothing; return what would be deleted.

    Returns:
        `{"name", "versions": [...], "runs": [...], "logged_models": [...], "bundle_versions": [...]}`: what was
        (or would be) deleted; `bundle_versions` are the versions of bundles that held a copy of its embedding
        (`oneword.bundles`), deleted with their runs and logged models; `checkpoints` the checkpoint folders and
        kept trainings deleted.

    Raises:
        OnewordError: no such concept; a model that is not a oneword concept; a version still being registered.
    """
    from mlflow.entities import ViewType
    _, client = tracking.client(tracking_uri)
    kind = model_kind(client, name)
    registered, bundle = kind is not None, kind == "bundle"
    if kind == "other":
        raise OnewordError(f"{name} is not a oneword concept", hint="delete models of other tools with their tools")
    if kind == "concept" and (deciding := _deciding(client, name, mark=not dry_run)):  # its register would remake it
        raise _still_deciding(name, deciding[0], "delete")
    versions = every_page(client.search_model_versions, filter_string=f"name = '{name}'") if registered else []
    experiments = [e.experiment_id for e in every_page(client.search_experiments, view_type=ViewType.ALL)]
    # a bundle's runs are tagged by its name as a concept's are: a delete cut short leaves either kind's
    run_tags = [BUNDLE_TAG if bundle else CONCEPT_TAG] if registered else [CONCEPT_TAG, BUNDLE_TAG]
    runs = {r.info.run_id: r for tag in run_tags
            for r in every_page(client.search_runs, experiment_ids=experiments,
                                filter_string=f"tags.`{tag}` = '{name}'", run_view_type=ViewType.ALL)}  # fmt: skip
    for mv in versions:  # a version registered from a run another tool made, untagged
        if mv.run_id and mv.run_id not in runs:
            runs[mv.run_id] = client.get_run(mv.run_id)
    held, copies = ([], []) if bundle else bundles_holding(client, name, experiments)  # copies of its embedding
    runs |= {r.info.run_id: r for r in copies}
    models = _logged_models(client, runs.values(), experiments)
    from oneword import trainings  # (it brings torch: not imported by the listing commands)

    groups, kept_at = _copies_outside(client, runs.values())  # read before its runs' artifacts go
    try:
        outside = trainings.copies(groups, kept_at)
    except Exception as e:  # before anything is deleted: an erasure that cannot finish does not start
        where, why = ", ".join(sorted(groups | kept_at)), getattr(e, "message", e)
        raise OnewordError(f"cannot reach the checkpoints that {name}'s trainings left ({where}): {why}",
                           hint="give this machine the object store's settings (S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID, "
                           "AWS_SECRET_ACCESS_KEY) and delete again; nothing was deleted") from e  # fmt: skip
    if not registered and not held and not models and not outside and all(
            r.info.lifecycle_stage == "deleted" for r in runs.values()):  # fmt: skip
        gone = f" (deleted: {len(runs)} runs of it are kept as deleted records until `mlflow gc`)" if runs else ""
        raise OnewordError(f"no concept or bundle named {name!r} in the registry at {resolve(tracking_uri)}{gone}",
                           hint="list concepts with `oneword concepts list`")  # fmt: skip
    done = {"name": name, "versions": sorted((str(mv.version) for mv in versions), key=int),
            "runs": sorted(runs), "logged_models": sorted(m.model_id for m in models),
            "bundle_versions": [f"{mv.name}/{mv.version}" for mv in held], "checkpoints": outside}  # fmt: skip
    if dry_run:
        return done
    if registered:  # first: nothing resolves `models:/NAME@champion` any more, whatever fails after
        client.delete_registered_model(name)
    if not bundle:  # after: a bundle made meanwhile holds a copy too (one made after this finds its member gone)
        held, copies = bundles_holding(client, name, experiments)
        runs |= {r.info.run_id: r for r in copies}
        done["bundle_versions"] = [f"{mv.name}/{mv.version}" for mv in held]
    for mv in held:
        delete_version(client, mv.name, mv.version)
    # before the runs: a delete cut short finds them again through the runs (their tags stay with their records)
    trainings.remove(outside)
    erase_runs(client, list(runs.values()), experiments)
    return done


def _copies_outside(client, runs) -> tuple[set[str], set[str]]:
    """The checkpoint folders and kept trainings (`trainings.copies_of`) that the runs' trainings left beside the
    checkpoint root, as their logged summary.json files name them."""
    from oneword import trainings

    groups: set[str] = set()
    kept_at: set[str] = set()
    with tempfile.TemporaryDirectory() as d:
        for i, run in enumerate(runs):
            tags = run.data.tags  # a training that failed, or was cut short, logged no summary
            groups |= {tags[trainings.GROUP_TAG]} if trainings.GROUP_TAG in tags else set()
            kept_at |= {tags[trainings.KEPT_TAG]} if trainings.KEPT_TAG in tags else set()
            try:
                path = client.download_artifacts(run.info.run_id, TRAINING_SUMMARY, f"{d}/{i}")
                summary = json.loads(Path(path).read_text())
            except Exception as e:  # a failure's run, a bundle's, one erased before: no training of it there
                from oneword.outcome import transient

                if transient(e):  # a store that did not answer: its copies would be missed, then unfindable
                    raise OnewordError(f"could not read what run {run.info.run_id} trained: {tracking.said(e)}",
                                       hint="delete again once the artifact store answers; nothing was "
                                       "deleted") from e  # fmt: skip
                continue
            group, kept = trainings.copies_of(summary)
            groups |= {group} if group else set()
            kept_at |= {kept} if kept else set()
    return groups, kept_at


def _logged_models(client, runs, experiments: Sequence[str]) -> list:
    return [m for r in runs for m in every_page(client.search_logged_models, experiment_ids=list(experiments),
                                                filter_string=f"source_run_id = '{r.info.run_id}'")]  # fmt: skip


def erase_runs(client, runs: Sequence, experiments: Sequence[str] | None = None) -> None:
    """Delete MLflow runs whole: their logged models (found in `experiments`, default the runs' own) and every
    artifact of both from the artifact store, then the runs (MLflow keeps their records until `mlflow gc`)."""
    for m in _logged_models(client, runs, experiments or sorted({r.info.experiment_id for r in runs})):
        _delete_artifacts(m.artifact_location)
        client.delete_logged_model(m.model_id)
    for run in runs:
        _delete_artifacts(run.info.artifact_uri)
        if run.info.lifecycle_stage != "deleted":
            client.delete_run(run.info.run_id)


def _delete_artifacts(uri: str) -> None:
    """Remove everything under an artifact URI (a run's, a logged model's) from its store."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    with contextlib.suppress(FileNotFoundError):  # a local store's folder, gone already (a delete cut short)
        get_artifact_repository(uri).delete_artifacts()


PROMOTED_TAG = "oneword.promoted"


def check_alias(alias: str) -> None:
    """Refuse, before the registry is asked, an alias MLflow would refuse: one of other characters than letters,
    digits, '_' and '-', or one it reserves (`latest`, and `v` with a number, which name versions)."""
    if not re.fullmatch(r"[\w-]{1,255}", alias):  # as MLflow's own check: letters of any script count
        raise OnewordError(f"alias {alias!r} is not one MLflow can hold",
                           hint="an alias is letters, digits, '_' and '-', such as champion or staging")  # fmt: skip
    if alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
        raise OnewordError(f"alias {alias!r} is reserved by MLflow (it names a version: the newest, or one by number)",
                           hint="choose another name, such as champion or staging")  # fmt: skip


def promote(ref: str, alias: str = CHAMPION, reason: str = "", tracking_uri: str | None = None) -> dict:
    """Point `alias` at a version by hand: a rollback (the new champion draws its concept worse than its scores
    say), or a move the gate cannot make (a champion on the old base model, whose scores it does not compare).
    The version is tagged with who held the alias before and why (`promoted_tag`); later registrations compare
    with it as with any champion. A bundle's version (`oneword.bundles`) is promoted alike: the alias its servers
    load by (a rollback of a bundle).

    Refused while one of the concept's versions is still being registered (its gate undecided): that register
    would set the alias after this.

    Args:
        ref: `NAME/VERSION` of the version, or `NAME@alias` (`my-cat@candidate`: the version that alias names).
        alias: the alias to point at it.
        reason: why, recorded on the version.
        tracking_uri: the registry's MLflow tracking URI.

    Returns:
        `{"name", "version", "alias", "before", "token", "before_token"}`: `before` is the version the alias
        named (None: none; the version itself: nothing was done), `before_token` that version's token (a
        prompt that names it draws nothing of the new one where the two differ).
    """
    if "/" not in ref and "@" not in ref:
        raise OnewordError(f"promote takes NAME/VERSION or NAME@alias, not {ref!r}",
                           hint="e.g. my-cat/3 or my-cat@candidate (`oneword concepts list`)")  # fmt: skip
    check_alias(alias)
    name, _, _ = parse_ref(ref)
    mv = get_version(ref, tracking_uri, bundle=True)
    _, client = tracking.client(tracking_uri)
    kind = model_kind(client, name)
    if kind == "other":
        raise OnewordError(f"{name} is not a oneword concept", hint="promote concepts that oneword registered")
    # a concept's register sets the alias after this: this one would not hold (a bundle's versions have no gate)
    if kind == "concept" and (deciding := _deciding(client, name)):
        raise _still_deciding(name, deciding[0], "promote")
    tag = promoted_tag(alias)  # one per alias: a later promote to another alias leaves this one's record
    records = _records(client, mv.name, tag)
    before = (client.get_registered_model(mv.name).aliases or {}).get(alias)
    before = None if before is None else str(before)
    token = (mv.tags or {}).get("oneword.token")
    answer = {"name": mv.name, "version": str(mv.version), "alias": alias, "before": before, "token": token,
              "before_token": token}  # fmt: skip
    if before == str(mv.version):  # a second promote (a retry, a script run twice) leaves the first one's record
        return answer
    at = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())

    def record(before: str | None) -> None:
        said = f"@{alias} by hand" + (f" (was version {before})" if before is not None else "") + f" at {at}"
        client.set_model_version_tag(mv.name, mv.version, tag, (said + (f": {reason}" if reason else ""))[:4000])

    client.set_registered_model_alias(mv.name, alias, mv.version)
    now = client.get_registered_model(mv.name).aliases or {}
    holder = now.get(alias)
    if str(holder) != str(mv.version):  # MLflow sets an alias unconditionally: the last of two at once holds
        raise OnewordError(
            f"@{alias} of {mv.name} was moved to version {holder} by another promote at the same moment: it "
            f"holds, and version {mv.version} does not",
            hint=f"look with `oneword concepts show {mv.name}@{alias}`, and promote again if you still mean it",
        )
    # recorded only once it held: a promote overtaken at once (it says so) leaves no record, and one whose record
    # is new since this one began held the alias after this one's read of it: it is the one this replaced
    record(before)
    new = {v for v, said in _records(client, mv.name, tag).items() if records.get(v) != said}
    if moved := sorted(new - {answer["version"], before}, key=int):
        answer["before"] = before = moved[-1]
        record(before)
    if before is not None:
        answer["before_token"] = (client.get_model_version(mv.name, before).tags or {}).get("oneword.token")
    if alias == CHAMPION:
        champion_named(client, mv.name, token)
        if str(now.get(CANDIDATE)) == str(mv.version):  # what the gate held back is the champion now, not both
            client.delete_registered_model_alias(mv.name, CANDIDATE)
    return answer


def _records(client, name: str, tag: str) -> dict[str, str]:
    """Each version of `name` that carries the record `tag` of a promote by hand, and the record."""
    versions = every_page(client.search_model_versions, filter_string=f"name = '{name}'")
    return {str(mv.version): mv.tags[tag] for mv in versions if (mv.tags or {}).get(tag)}


def promoted_tag(alias: str) -> str:
    """The version tag that records who pointed `alias` at it by hand, and why."""
    return f"{PROMOTED_TAG}.{alias}"


def promotions(tags: dict[str, str], aliases: Sequence[str]) -> list[str]:
    """What a version's tags record of the aliases it holds now that were pointed at it by hand (one tag for
    every alias, before the tag of each)."""
    said = [tags[promoted_tag(a)] for a in aliases if tags.get(promoted_tag(a))]
    return said or ([tags[PROMOTED_TAG]] if tags.get(PROMOTED_TAG) and aliases else [])
