"""Bundles: many concepts served by one model (`oneword concepts bundle`).

A concept version serves alone: a server per concept loads the base model once per concept. A bundle is a
registered model whose every version holds copies of fixed concept versions' embeddings, all trained on one base
model, as one pyfunc model: `mlflow models serve` loads the base model once and draws any member's token, and a
prompt may name several. A version never changes under its server: bundling again after a promotion makes a new
version, or none where the members are those of the newest one (two bundlings of the same members at once make
one: the later deletes its copy). `models:/NAME/latest` is the newest.

An embedding is a few KB, so a version copies its members' rather than fetching them when it loads: it serves
wherever its artifacts can be read (a KServe storage URI), and a member pruned from the registry still serves.
Erasing a concept (`catalogue.delete_concept`) deletes the bundle versions that hold a copy of it.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from oneword import tracking
from oneword.config import NAME_LENGTH
from oneword.errors import OnewordError
from oneword.registry import (
    BUNDLE_TAG,
    CHAMPION,
    NAME_PATTERN,
    created_at,
    ensure_experiment,
    every_page,
    model_kind,
    newest_of,
)
from oneword.tracking import resolve

log = logging.getLogger(__name__)

MEMBERS_TAG = "oneword.members"  # on a version: "cat/3,mug/5", by name
MEMBER_TAG_PREFIX = "oneword.member."  # on a version's run, a tag per member: "oneword.member.cat" = "3 RUN_ID"
EXPERIMENT = "oneword-bundles"  # the runs that log bundle versions: apart from the concepts' runs
# On a bundle's registered model: the manifest whose batches keep it (`batch.manifest_id`). Two manifests that kept
# one bundle would each make it hold their own concepts alone, night after night.
MANIFEST_TAG = "oneword.bundle_manifest"
BATCH_TAG = "oneword.bundle_batch"  # on a bundle version's run: the batch run that made it
ARTIFACT_PREFIX = "embedding:"  # a member's artifact key in the pyfunc model: "embedding:NAME"
# Bundling reads the members again after registering: another bundling of the same name, or a promotion, that
# came between the read and the registration makes it register again (a batch's runs may end together).
ROUNDS = 3


@dataclass(frozen=True)
class Member:
    """One concept version a bundle holds."""

    name: str
    version: str
    token: str
    base_model: str
    fingerprint: str
    family: str
    run_id: str

    @property
    def ref(self) -> str:
        return f"{self.name}/{self.version}"


@dataclass(frozen=True)
class Bundled:
    """What `bundle_concepts` did: the version that holds `members` (`unchanged`: it held them already; `version`
    None: a dry run, or no member); `left_out`: the manifest's concepts it does not hold, and why."""

    name: str
    version: str | None
    members: list[Member]
    unchanged: bool = False
    left_out: dict[str, str] = field(default_factory=dict)

    @property
    def model_uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    def summary(self) -> dict:
        """What a batch's report says of the bundle (`batch_records.record_bundle`)."""
        return {"name": self.name, "version": self.version, "unchanged": self.unchanged,
                "members": [m.ref for m in self.members], "left_out": self.left_out}  # fmt: skip


def members_tag(members: Sequence[Member]) -> str:
    """`MEMBERS_TAG`'s value: the members' references, by name."""
    return ",".join(m.ref for m in sorted(members, key=lambda m: m.name))


def parse_members(tag: str | None) -> dict[str, str]:
    """`{name: version}` of a `MEMBERS_TAG` value."""
    return dict(ref.rsplit("/", 1) for ref in (tag or "").split(",") if ref)


def bundle_concepts(
    name: str,
    concepts: Sequence[str] = (),
    alias: str = CHAMPION,
    tracking_uri: str | None = None,
    dry_run: bool = False,
    base_model: str | None = None,
    manifest: str = "",
    batch_id: str = "",
) -> Bundled:
    """Register a version of bundle `name` that holds the given concepts' embeddings.

    Args:
        name: the bundle's registered-model name (new, or a bundle's).
        concepts: each `NAME` (its version with `alias`), `NAME@alias`, `NAME/3`, or a pattern of names (`team-a-*`:
            every concept it matches that has a version with `alias`; `team-a-*@candidate`: with that alias).
        alias: the alias a bare name or a pattern takes its version by.
        tracking_uri: the registry's MLflow tracking URI.
        dry_run: register nothing; say which versions it would hold.
        base_model: a pattern, or the manifest, takes only the concepts trained on this base model (its reference
            as given to train, or a prefix of its fingerprint), as `concepts list --base-model` lists them.
        manifest: a concepts manifest (`oneword.batch`, a path or s3:// URI): its concepts' versions with `alias`
            too; one that has none (not trained yet, or failed its gate), or whose is on another base model, is
            left out and said so (`Bundled.left_out`), as a batch run's bundle is made. The bundle is then kept by
            this manifest: another manifest's is refused (`check_bundle_name`).
        batch_id: the batch run that bundles (its version's run is tagged with it): a retry of its step that finds
            the version it made says "registered", not "unchanged".

    Raises:
        OnewordError: a concept or alias not found; two versions of one concept; members on different base models,
            or whose tokens a prompt cannot tell apart; `name` taken by a concept or another tool's model, or kept
            by another manifest.
    """
    if not concepts and not manifest:
        raise OnewordError(f"bundle {name!r} names no concept", hint="name concepts or patterns: 'team-a-*'")
    if not dry_run:
        tracking.refuse_active_run("a bundle")
    uri = resolve(tracking_uri)
    mlflow, client = tracking.client(uri)
    names = _manifest_names(manifest) if manifest else []
    # by hand, a bundle is made a manifest's even where another kept it (a manifest moved); a batch's is refused
    check_bundle_name(name, names, uri, manifest, kept=bool(batch_id))
    made, tags = None, {BATCH_TAG: batch_id} if batch_id else {}
    for _ in range(ROUNDS):
        refs, left_out = _manifest_members(names, alias, uri, base_model)
        if not concepts and not refs:
            return Bundled(name, None, [], left_out=left_out)
        members = _members(client, [*concepts, *refs], alias, uri, base_model)
        _check_one_base_model(members, manifest)
        if top := _newest_holding(client, name, members):
            (keep, held), twins = top[-1], [mv for mv, _ in top[:-1]]
            if made is not None and (ours := next((mv for mv in twins if str(mv.version) == made.version), None)):
                # another bundling registered these members first: one version each, the first stays
                log.info("%s/%s holds what %s registered as well: deleting %s", name, keep.version, name,
                         made.model_uri)  # fmt: skip
                _discard(client, ours.run_id, name, ours)
                made = None
            mine = made is not None or bool(batch_id and held.get(BATCH_TAG) == batch_id)
            made = Bundled(name, str(keep.version), members, unchanged=not mine, left_out=left_out)
            break
        if dry_run:
            return Bundled(name, None, members, left_out=left_out)
        made = Bundled(name, _register(mlflow, client, uri, name, members, tags), members, left_out=left_out)
    else:
        log.warning("the members of %s kept changing while it was bundled: %s holds what they were at its making",
                    name, made.model_uri)  # fmt: skip
    if manifest and not dry_run:
        _keep(client, name, manifest)
    return made


def _register(mlflow, client, uri: str, name: str, members: Sequence[Member], tags: dict[str, str]) -> str:
    """Register a version of bundle `name` holding copies of `members`' embeddings; its number."""
    exp_id = ensure_experiment(mlflow, EXPERIMENT, uri)
    run_id = client.create_run(exp_id, run_name=f"bundle {name}", tags={BUNDLE_TAG: name, **tags}).info.run_id
    version = None
    try:
        _tag_run(client, run_id, _member_tags(members))  # first: an erasure finds the copies by these
        with tempfile.TemporaryDirectory(prefix="oneword-bundle-") as d, mlflow.start_run(run_id=run_id):
            info = _log_model(mlflow, members, _member_files(mlflow, members, Path(d)))
        version = _create_version(client, name, info, run_id, members)
        _check_still_registered(client, members)
    except BaseException:  # a failed bundle leaves no copy behind
        _discard(client, run_id, name, version)
        raise
    return str(version.version)


def _newest_holding(client, name: str, members: Sequence[Member]) -> list[tuple]:
    """Bundle `name`'s newest versions that each hold just `members`, newest first, with their runs' tags:
    empty where the newest holds others. Two bundlings of the same members at once each register a version; both
    find both here, and the oldest of them is the one that stays. A version whose run is gone (a failed or
    duplicate bundling's, being deleted) is passed over."""
    from mlflow.exceptions import MlflowException

    versions = every_page(client.search_model_versions, filter_string=f"name = '{name}'")
    wanted, found = _member_tags(members), []
    for mv in sorted(versions, key=lambda mv: int(mv.version), reverse=True):
        try:
            run = client.get_run(mv.run_id)
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            continue
        if run.info.lifecycle_stage == "deleted":
            continue
        tags = run.data.tags
        if _member_runs(tags) != wanted:
            break
        found.append((mv, tags))
    return found


def check_bundle_name(name: str, concepts: Sequence[str], tracking_uri: str | None, manifest: str = "",
                      registry: bool = True, kept: bool = True) -> None:  # fmt: skip
    """Raise where bundle `name` is no name oneword can look up; or it is also one of `manifest`'s `concepts`, a
    registered concept, another tool's registered model, a bundle a manifest keeps where `manifest` is none (one
    made by hand), or (`kept`) one another manifest keeps (`registry` False: a store not made yet, not asked).
    A batch checks it before it trains (its concept would be refused at `register`, and its bundle at its end)."""
    if not NAME_PATTERN.fullmatch(name) or len(name) > NAME_LENGTH:
        raise OnewordError(
            f"bundle name {name!r} is not one oneword can look up",
            hint="use letters, digits, '_', '.' and '-' only, starting with a letter or digit",
        )
    if name in concepts:
        raise OnewordError(f"bundle {name!r} is also a concept of {manifest or 'the manifest'}",
                           hint="name the bundle otherwise")  # fmt: skip
    if not registry:
        return
    _, client = tracking.client(resolve(tracking_uri))
    if (kind := model_kind(client, name)) in ("concept", "other"):
        what = "a concept" if kind == "concept" else "another tool's model"
        raise OnewordError(f"{name!r} is {what}, not a bundle", hint="name the bundle otherwise")
    keeper = (client.get_registered_model(name).tags or {}).get(MANIFEST_TAG) if kind == "bundle" else None
    if keeper and not manifest:
        raise OnewordError(
            f"bundle {name!r} is kept by manifest {keeper}: each of its batches makes it hold that manifest's "
            "champions again, undoing a bundle made by hand",
            hint=f"give this bundle a name of its own; or bundle that manifest's concepts: oneword concepts bundle "
            f"{name} --manifest {keeper} (where no batch bundles it any more, delete the registered model's tag "
            f"{MANIFEST_TAG} first)",
        )
    if kept and manifest and keeper:
        from oneword.batch import manifest_id

        if keeper != manifest_id(manifest):
            raise OnewordError(
                f"bundle {name!r} holds the concepts of another manifest, {keeper}",
                hint="give this manifest's bundle a name of its own (each one's runs would make it hold their own "
                f"concepts alone); or, where that manifest moved here, make the bundle this one's by hand: "
                f"oneword concepts bundle {name} --manifest {manifest}",
            )


def _keep(client, name: str, manifest: str) -> None:
    """Mark bundle `name` (registered) as kept by `manifest`."""
    from oneword.batch import manifest_id

    keeper, mine = (client.get_registered_model(name).tags or {}).get(MANIFEST_TAG), manifest_id(manifest)
    if keeper != mine:
        if keeper:
            log.warning("bundle %s is now kept by %s, no longer by %s: that manifest's batches will refuse it", name,
                        mine, keeper)  # fmt: skip
        client.set_registered_model_tag(name, MANIFEST_TAG, mine)


def _manifest_names(manifest: str) -> list[str]:
    """The registered-model names of a manifest's concepts."""
    from oneword.batch import concept_names, load_concepts_manifest

    return concept_names(load_concepts_manifest(manifest))


def _manifest_members(names: Sequence[str], alias: str, uri: str, base_model: str | None
                      ) -> tuple[list[str], dict[str, str]]:  # fmt: skip
    """The versions (`NAME/3`) with `alias` of the concepts named, on `base_model` where given; and why each other
    one is left out."""
    from oneword.catalogue import list_concepts, on_base_model

    rows = {r["name"]: r for r in list_concepts(uri, alias=alias, names=names)} if names else {}
    refs, left_out = [], {}
    for n in names:
        if (row := rows.get(n)) is None:
            left_out[n] = f"no @{alias} version"
        elif base_model and not on_base_model(row, base_model):
            left_out[n] = f"its @{alias} ({n}/{row['version']}) was trained on {row['base_model']}"
        else:
            refs.append(f"{n}/{row['version']}")
    return refs, left_out


def member_tag(concept: str) -> str:
    """The run tag by which a bundle version's run says it holds a copy of `concept`'s embedding."""
    return f"{MEMBER_TAG_PREFIX}{concept}"


def _member_tags(members: Sequence[Member]) -> dict[str, str]:
    return {member_tag(m.name): f"{m.version} {m.run_id}" for m in members}


def _member_runs(tags: dict[str, str]) -> dict[str, str]:
    """A bundle version's run's member tags (of its run's `tags`): which version of which concept (and its run)
    it holds."""
    return {k: v for k, v in tags.items() if k.startswith(MEMBER_TAG_PREFIX)}


def _tag_run(client, run_id: str, tags: dict[str, str]) -> None:
    from mlflow.entities import RunTag

    items = [RunTag(k, v) for k, v in tags.items()]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 tags a request
        client.log_batch(run_id, tags=items[i : i + 100])


def _check_still_registered(client, members: Sequence[Member]) -> None:
    """Raise where a member was deleted while this bundle was made (an erasure that listed the bundles before
    this version existed would leave its copy)."""
    from mlflow.exceptions import MlflowException

    for m in members:
        try:
            client.get_model_version(m.name, m.version)
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            raise OnewordError(f"{m.ref} was deleted while the bundle was made", hint="bundle again") from e


def _discard(client, run_id: str, name: str, version) -> None:
    """Delete what a bundle that failed made: its version, its run's logged model and artifacts, the run."""
    from oneword.catalogue import erase_runs
    from oneword.registry import delete_version

    try:
        if version is not None:
            delete_version(client, name, version.version)
        erase_runs(client, [client.get_run(run_id)])
    except Exception as e:  # the bundle's own error is the one to raise; the next erasure finds the run by its tags
        log.warning("could not delete what the failed bundle made (run %s): %s", run_id, e)


def _members(client, concepts: Sequence[str], alias: str, uri: str, base_model: str | None) -> list[Member]:
    """The concept versions `concepts` name, one per concept."""
    from oneword.catalogue import get_version, list_concepts

    found: dict[str, list] = {}
    for ref in concepts:
        if any(c in ref for c in "*?["):
            pattern, _, held_by = ref.partition("@")  # 'team-a-*@candidate': their versions with that alias
            held_by = held_by or alias
            rows = list_concepts(uri, alias=held_by, names=[pattern], base_model=base_model)
            if not rows:
                on = f" on {base_model}" if base_model else ""
                raise OnewordError(
                    f"no concept named {pattern!r} has @{held_by}{on} in the registry at {uri}",
                    hint=f"list them with `oneword concepts list {pattern!r} --alias {held_by}"
                    + (f" --base-model {base_model}`" if base_model else "`"),
                )
            versions = [client.get_model_version(r["name"], r["version"]) for r in rows]
        else:
            versions = [get_version(ref if "@" in ref or "/" in ref else f"{ref}@{alias}", uri)]
        for mv in versions:
            found.setdefault(mv.name, [])
            if str(mv.version) not in [str(x.version) for x in found[mv.name]]:
                found[mv.name].append(mv)
    if twice := {n: vs for n, vs in found.items() if len(vs) > 1}:
        n, vs = next(iter(twice.items()))
        raise OnewordError(f"two versions of {n}: {', '.join(f'{n}/{v.version}' for v in vs)}",
                           hint="a bundle holds one version of each concept: name the one to serve")  # fmt: skip
    members = []
    for n, (mv,) in sorted(found.items()):
        if model_kind(client, n) != "concept":
            raise OnewordError(f"{n} is not a oneword concept", hint="bundle concepts that oneword registered")
        tags = mv.tags or {}
        members.append(
            Member(
                n,
                str(mv.version),
                tags.get("oneword.token", ""),
                tags.get("oneword.base_model", ""),
                tags.get("oneword.base_model_fingerprint", ""),
                tags.get("oneword.model_family", ""),
                mv.run_id,
            )
        )
    return members


def _check_one_base_model(members: Sequence[Member], manifest: str = "") -> None:
    groups: dict[str, list[Member]] = {}
    for m in members:
        groups.setdefault(m.fingerprint, []).append(m)
    if len(groups) > 1:
        said = "; ".join(f"{', '.join(m.ref for m in ms)} on {ms[0].base_model} ({fp[:15]})"
                         for fp, ms in groups.items())  # fmt: skip
        raise OnewordError(
            f"these concepts were trained on different base models: {said}",
            hint="bundle the manifest's concepts of one base model: --base-model X (a batch gives its own)"
            if manifest else "bundle the concepts of one base model (`oneword concepts list --base-model X` lists "
            "them)",
        )


def _member_files(mlflow, members: Sequence[Member], folder: Path) -> dict[str, Path]:
    """Each member's embedding, downloaded as `<name>.safetensors` (pyfunc keeps an artifact by its file name), after
    checking that a prompt can tell every member's token from the others'."""
    from oneword import embeddings as emb_io
    from oneword.catalogue import download_embedding
    from oneword.tokens import clashing_entries, vector_tokens

    files, entries = {}, {}
    for m in members:
        f = download_embedding(mlflow, m.run_id, folder / m.name, f"{m.name}/{m.version}")
        emb = emb_io.load(f)
        mine = vector_tokens(emb.token, emb.n_vectors)
        for other, theirs in entries.items():
            if clashing_entries(mine, theirs):
                raise OnewordError(
                    f"{other} and {m.ref} use tokens a prompt cannot tell apart ({theirs[0]!r} and {emb.token!r})",
                    hint="bundle one of them, or export one under another token and register it "
                    "(`oneword export FILE --token '<new-name>'`)",
                )
        entries[m.ref] = mine
        files[m.name] = f.rename(folder / f"{m.name}.safetensors")
    return files


def _log_model(mlflow, members: Sequence[Member], files: dict[str, Path]):
    """Log the bundle's pyfunc model, then check that its copies of the embeddings are intact."""
    from oneword import serving
    from oneword.profiles import DEFAULT_FAMILY, PROFILES

    first = members[0]
    info = serving.log_model(
        {f"{ARTIFACT_PREFIX}{n}": f for n, f in files.items()},
        {
            "base_model": first.base_model,
            "model_fingerprint": first.fingerprint,
            "members": [m.ref for m in members],
            "tokens": [m.token for m in members],
        },
        PROFILES.get(first.family, PROFILES[DEFAULT_FAMILY]),  # its sampler: what a request's params default to
        first.token,
        name="bundle",
    )
    for n, f in files.items():
        serving.check_copy(mlflow, info, f"{ARTIFACT_PREFIX}{n}", f)
    return info


def _create_version(client, name: str, info, run_id: str, members: Sequence[Member]):
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, tags={BUNDLE_TAG: "true"},
                                       description="oneword bundle: many concepts served by one model")  # fmt: skip
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    first = members[0]
    tags = {MEMBERS_TAG: members_tag(members), "oneword.tokens": " ".join(m.token for m in members),
            "oneword.base_model": first.base_model, "oneword.base_model_fingerprint": first.fingerprint}  # fmt: skip
    return client.create_model_version(name, info.model_uri, run_id=run_id, model_id=info.model_id, tags=tags)


def list_bundles(tracking_uri: str | None = None) -> list[dict]:
    """Every bundle in the registry, by name: its newest version (what a server on `models:/NAME/latest`, and the
    serving overlay's, serves), that version's members and base model, how many versions it has, its aliases,
    and the concepts manifest whose batches keep it ("" where people bundle it by hand)."""
    _, client = tracking.client(resolve(tracking_uri))
    rows = []
    for rm in every_page(client.search_registered_models, filter_string=f"tags.`{BUNDLE_TAG}` = 'true'"):
        versions = every_page(client.search_model_versions, filter_string=f"name = '{rm.name}'")
        newest = newest_of(versions)
        tags = (newest.tags or {}) if newest else {}
        rows.append({
            "name": rm.name,
            "version": newest and str(newest.version),
            "versions": len(versions),
            "members": [f"{n}/{v}" for n, v in parse_members(tags.get(MEMBERS_TAG)).items()],
            "base_model": tags.get("oneword.base_model", ""),
            "aliases": {a: str(v) for a, v in sorted((rm.aliases or {}).items())},
            "manifest": (rm.tags or {}).get(MANIFEST_TAG, ""),
            "created": newest and created_at(newest),
        })  # fmt: skip
    return sorted(rows, key=lambda r: r["name"])


def bundles_holding(client, concept: str, experiments: Sequence[str]) -> tuple[list, list]:
    """The bundle versions that hold a copy of `concept`'s embedding (any version of it), and every run that
    logged such a copy (a bundle version's, and a failed bundle's or a deleted version's that kept it), found by
    their member tag in `experiments`."""
    from mlflow.entities import ViewType

    runs = every_page(client.search_runs, experiment_ids=list(experiments), run_view_type=ViewType.ALL,
                      filter_string=f"tags.`{member_tag(concept)}` LIKE '%'")  # fmt: skip
    versions = [mv for r in runs for mv in every_page(client.search_model_versions,
                                                        filter_string=f"run_id = '{r.info.run_id}'")]  # fmt: skip
    return sorted(versions, key=lambda mv: (mv.name, int(mv.version))), runs


def bundle_files(mlflow_module, mv, folder: Path) -> list[Path]:
    """The embedding files a bundle's version holds (its own copies), downloaded into `folder`."""
    from mlflow.models import Model

    from oneword.serving import artifact_uris

    model_id = mv.source.removeprefix("models:/")
    flavors = Model.load(mv.source).flavors
    uris = artifact_uris(mlflow_module, model_id, flavors)
    return [Path(mlflow_module.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(folder / str(i))))
            for i, (_, uri) in enumerate(sorted(uris.items()))]  # fmt: skip
