"""Finished trainings, kept by their training key beside the checkpoints, so that a concept is trained once.

A batch's shards are cut by position, so adding, removing or reordering one concept gives its neighbours new
shard-mates: their shard's checkpoints (keyed by all of its concepts, `train.group_key`) no longer match. Each
concept's own `train.training_key` still does, and its finished folder (embedding files, curve, summary, and a
copy of the checkpoints evaluation chooses from) is kept under `<checkpoint root>/trainings/<key>.tar`: a later
shard that holds the same concept, photos, model and settings takes it instead of training it again, however
long ago the group's own checkpoint folder was removed (a bucket's lifecycle rule). One file per training,
written whole or not at all (an object PUT, or a local rename), so a reader never sees half of one, and two
writers of one key each leave a whole one.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from oneword import checkpoints, storage
from oneword.errors import OnewordError
from oneword.latents import DATASET_DIR

log = logging.getLogger(__name__)

FOLDER = "trainings"  # under the checkpoint root, beside the groups' checkpoint folders
CHECKPOINTS = "checkpoints"  # in a kept folder: where evaluation looks first (`evaluate._checkpoint_list`)
LEFT_OUT = (DATASET_DIR, CHECKPOINTS)  # the photos come with the latents; the checkpoints from the group's folder
# tags of a concept's live training run: where that training leaves copies of it beside the checkpoint root
GROUP_TAG = "oneword.checkpoint_dir"
KEPT_TAG = "oneword.kept_training"
KEY_HEX = 16  # hex digits of a training's and a group's key (`train.training_key`, `train.group_key`)
_KEY = re.compile(rf"[0-9a-f]{{{KEY_HEX}}}")


def location(root: str | Path, key: str) -> str:
    """Where the training `key` is kept under a checkpoint root (folder or `s3://` prefix)."""
    return f"{str(root).rstrip('/')}/{FOLDER}/{key}.tar"


def keep(concept_dir: Path, root: str | Path, key: str) -> str | None:
    """Keep a trained concept's folder (without its photos) as the training `key`.

    Keeping is a saving for later runs, not part of this one: a store that refuses it is a warning.

    Returns:
        Where it was kept, or None if it could not be.
    """
    from oneword.train import SUMMARY_FILE  # (train imports this module)

    where = location(root, key)
    buffer = io.BytesIO()
    try:
        with tarfile.open(fileobj=buffer, mode="w") as tar, tempfile.TemporaryDirectory() as d:
            for f in sorted(p for p in Path(concept_dir).rglob("*") if p.is_file()):
                rel = f.relative_to(concept_dir)
                if rel.parts[0] not in LEFT_OUT:
                    tar.add(f, arcname=rel.as_posix())
            group = json.loads((Path(concept_dir) / SUMMARY_FILE).read_text())["checkpoint_dir"]
            for _, path in checkpoints.list_checkpoints(group):  # a few KB each: vectors and optimiser state
                local = storage.download_file(path, Path(d) / "c.pt") if storage.is_s3(path) else Path(path)
                tar.add(local, arcname=f"{CHECKPOINTS}/{Path(path).name}")
        if storage.is_s3(where):
            with tempfile.TemporaryDirectory() as d:
                local = Path(d) / "training.tar"
                local.write_bytes(buffer.getvalue())
                storage.upload_file(local, where)
        else:
            final = Path(where)
            final.parent.mkdir(parents=True, exist_ok=True)
            part = storage.part_path(final)
            part.write_bytes(buffer.getvalue())
            part.replace(final)
    except Exception as e:  # an object store's errors come in many types
        log.warning("could not keep the finished training %s (%s): a later shard that holds it trains it again",
                    where, e)  # fmt: skip
        return None
    return where


def take(root: str | Path, key: str, out_dir: Path) -> dict | None:
    """Write the kept training `key` into `out_dir`, if there is one that reads and holds its checkpoints.

    The folder is unpacked beside `out_dir` and moved into place whole, its checkpoints in `checkpoints/`, where
    evaluation chooses among them (without them it would score the last step only, as if it had been chosen).
    Its summary keeps the earlier training's figures; it says where it was kept (`trained_before`), that no step
    ran here, and no live MLflow run (that one was the earlier training's: `register` opens a new one).

    Returns:
        The summary written, or None (none is kept, or it does not read: the concept trains again).
    """
    from oneword.train import SUMMARY_FILE  # (train imports this module)

    where = location(root, key)
    try:
        with tempfile.TemporaryDirectory() as d:
            if storage.is_s3(where):
                if not storage.object_exists(where):
                    return None
                local = storage.download_file(where, Path(d) / "training.tar")
            elif Path(where).is_file():
                local = Path(where)
            else:
                return None
            with storage.atomic_dir(Path(out_dir)) as tmp:
                with tarfile.open(local) as tar:
                    for member in tar.getmembers():  # files only, inside the folder (as `keep` writes them)
                        rel = PurePosixPath(member.name)
                        if not member.isfile() or rel.is_absolute() or ".." in rel.parts:
                            raise ValueError(f"{member.name!r} is not a file of a training")
                        target = tmp / rel
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(tar.extractfile(member).read())
                summary = json.loads((tmp / SUMMARY_FILE).read_text())
                found = {Path(path).name for _, path in checkpoints.list_checkpoints(tmp / CHECKPOINTS)}
                if Path(str(summary.get("last_checkpoint"))).name not in found:
                    raise ValueError("it holds no copy of its checkpoints (kept by a release before 28 November)")
                summary.pop("mlflow_run_id", None)
                # absolute: an erasure (`copies_of`) reads it from wherever it runs
                kept_at = where if storage.is_s3(where) else str(Path(where).resolve())
                summary.update(steps_run=0, trained_before=kept_at)
                (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    except Exception as e:  # damaged, incomplete, or a store that does not answer: training again loses nothing
        log.warning("the finished training %s cannot be taken (%s); training it again", where, e)
        return None
    return summary


def kept(root: str | Path, key: str) -> bool:
    """Whether the training `key` is kept under `root` (a store that does not answer: as if not)."""
    where = location(root, key)
    try:
        return storage.object_exists(where) if storage.is_s3(where) else Path(where).is_file()
    except Exception:  # asked to save a keep: a wrong "no" costs one write
        return False


def copy_tags(group: str, root: str | Path, key: str) -> dict[str, str]:
    """The tags by which a concept's training run names its copies under checkpoint root `root`."""
    return {GROUP_TAG: group, KEPT_TAG: location(root, key)}


def copies_of(summary: dict) -> tuple[str | None, str | None]:
    """Where a finished training (its summary.json) left copies of its concept beside a checkpoint root: the
    group's checkpoint folder (`<root>/<group key>`) and the kept training, each None where there is none: a
    training with no checkpoint root kept its checkpoints in its own output folder (a single concept's
    `oneword train`, which records no training key, in a folder that may hold anything else of the user's)."""
    group, key, kept_at = summary.get("checkpoint_dir"), summary.get("training_key"), summary.get("trained_before")
    if not group or not key or not _absolute(group):
        return None, None
    if kept_at:  # taken from an earlier training, whose group folder it names
        return group, kept_at if _absolute(kept_at) else None
    return group, location(_root_of(group), key)


def _root_of(group: str) -> str:
    """The checkpoint root a group's folder (`<root>/<group key>`) is in."""
    return str(group).rstrip("/").rsplit("/", 1)[0]


def _absolute(where: str) -> bool:
    return storage.is_s3(where) or Path(where).is_absolute()


def copies(groups: set[str], kept_at: set[str]) -> list[str]:
    """What holds a concept beside a checkpoint root (`copies_of`), in the order `remove` deletes it: its kept
    trainings; those of every concept trained with it in one of its groups, which hold copies of the group's
    checkpoints and so its vectors (found by the group they name, whether or not its folder is still there);
    then the groups' checkpoint folders. A delete cut short finds the rest again.

    Deleting another concept's kept training costs a saving only: it trains again if a later shard needs it,
    and its registered versions stay.
    """
    groups, kept_at = _ours(groups, kept=False), _ours(kept_at, kept=True)
    found = [k for k in sorted(kept_at) if _exists(k)]
    found += [str(p) for k in sorted(kept_at) if not storage.is_s3(k) for p in _parts(Path(k))]  # killed writers'
    under: dict[str, list[str]] = {}  # root -> its kept trainings, listed once
    group_of: dict[str, str | None] = {}  # kept training -> the group it names, read once
    for group in sorted(groups):
        root = _root_of(group)
        if root not in under:
            under[root] = _kept_under(root)
        for t in under[root]:
            if t not in group_of:
                group_of[t] = _group_of(t)
        found += [t for t in under[root] if t not in found and group_of[t] == group]
    return found + [g for g in sorted(groups) if _checkpoint_files(g)]


def _ours(places: set[str], kept: bool) -> set[str]:
    """Those of `places` shaped as oneword writes them: a group folder named by its key, a kept training
    `trainings/<key>.tar`. They are read from run tags and artifacts, which anyone who may write to an
    experiment can set: an erasure run with wide rights must not delete whatever path a tag names."""
    shaped = set()
    for where in places:
        try:
            parts = PurePosixPath(storage.split_s3(where)[1] if storage.is_s3(where) else where).parts
        except OnewordError:  # `s3:///x`: no bucket
            parts = ()
        name = parts[-1] if parts and _absolute(where) else ""  # a relative one: read against wherever this runs
        fits = (name.endswith(".tar") and _KEY.fullmatch(name[:-4]) and parts[-2:-1] == (FOLDER,)) if kept \
            else _KEY.fullmatch(name)  # fmt: skip
        if fits and ".." not in parts:
            shaped.add(where)
        else:
            log.warning("%s is not where oneword keeps %s: not deleted (a run's tag or summary names it)", where,
                        "a training" if kept else "a group's checkpoints")  # fmt: skip
    return shaped


def _parts(final: Path) -> list[Path]:
    """The part files that writers of `final` killed mid-write left beside it (`storage.part_path`)."""
    return sorted(final.parent.glob(f".{final.name}.*.part")) if final.parent.is_dir() else []


def remove(places: Sequence[str]) -> None:
    """Delete what `copies` found: a kept training's file, or a group folder's checkpoints (and nothing else of
    the folder; a local one goes once empty)."""
    for where in places:
        if where.endswith((".tar", ".part")):
            _delete_file(where)
            continue
        for f in _checkpoint_files(where):
            _delete_file(f)
        if not storage.is_s3(where):
            with contextlib.suppress(OSError):  # something else of the user's is in it: it stays
                Path(where).rmdir()


def _delete_file(where: str) -> None:
    if storage.is_s3(where):
        storage.client().remove_object(*storage.split_s3(where))
    else:
        Path(where).unlink(missing_ok=True)


def _checkpoint_files(group: str) -> list[str]:
    """A group folder's checkpoints, and (in a local one) the part files of writers killed mid-save."""
    found = [path for _, path in checkpoints.list_checkpoints(group)]
    if not storage.is_s3(group) and Path(group).is_dir():
        found += [str(p) for p in sorted(Path(group).glob(".step-*.part"))]
    return found


def _exists(where: str) -> bool:
    return storage.object_exists(where) if storage.is_s3(where) else Path(where).exists()


def _kept_under(root: str) -> list[str]:
    """The kept trainings under a checkpoint root."""
    folder = f"{root.rstrip('/')}/{FOLDER}"
    if storage.is_s3(folder):
        bucket, _ = storage.split_s3(folder)
        if not storage.client().bucket_exists(bucket):
            return []
        listed = [f"{folder}/{k}" for k, _, _ in storage.list_objects(folder) if "/" not in k]
    else:
        listed = [str(p) for p in sorted(Path(folder).glob("*.tar"))]
    return [t for t in listed if _KEY.fullmatch(PurePosixPath(t).name.removesuffix(".tar")) and t.endswith(".tar")]


def _group_of(where: str) -> str | None:
    """The group checkpoint folder a kept training was trained in (None: it does not read)."""
    from oneword.train import SUMMARY_FILE  # (train imports this module)

    with tempfile.TemporaryDirectory() as d:  # a store that does not answer raises: the erasure stops before
        local = storage.download_file(where, Path(d) / "t.tar") if storage.is_s3(where) else Path(where)
        try:
            with tarfile.open(local) as tar:
                return json.loads(tar.extractfile(SUMMARY_FILE).read())["checkpoint_dir"]
        except (tarfile.TarError, KeyError, TypeError, ValueError, AttributeError) as e:  # damaged, or not ours
            log.warning("could not read kept training %s (%s): not deleted as a copy", where, e)
            return None
