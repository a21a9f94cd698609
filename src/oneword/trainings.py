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

import io
import json
import logging
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from oneword import checkpoints, storage
from oneword.latents import DATASET_DIR

log = logging.getLogger(__name__)

FOLDER = "trainings"  # under the checkpoint root, beside the groups' checkpoint folders
CHECKPOINTS = "checkpoints"  # in a kept folder: where evaluation looks first (`evaluate._checkpoint_list`)
LEFT_OUT = (DATASET_DIR, CHECKPOINTS)  # the photos come with the latents; the checkpoints from the group's folder


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
                summary.update(steps_run=0, trained_before=where)
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
