"""Finished trainings, kept by their training key beside the checkpoints, so that a concept is trained once.

A batch's shards are cut by position, so adding, removing or reordering one concept gives its neighbours new
shard-mates: their shard's checkpoints (keyed by all of its concepts, `train.group_key`) no longer match. Each
concept's own `train.training_key` still does, and its finished folder (embedding files, curve, summary) is
kept under `<checkpoint root>/trainings/<key>.tar`: a later shard that holds the same concept, photos, model and
settings takes it instead of training it again. One file per training, written whole or not at all (an object
PUT, or a local rename), so a reader never sees half of one, and two writers of one key each leave a whole one.
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
# the photos come with the latents; checkpoints stay where they were written
LEFT_OUT = (DATASET_DIR, "checkpoints")


def location(root: str | Path, key: str) -> str:
    """Where the training `key` is kept under a checkpoint root (folder or `s3://` prefix)."""
    return f"{str(root).rstrip('/')}/{FOLDER}/{key}.tar"


def keep(concept_dir: Path, root: str | Path, key: str) -> str | None:
    """Keep a trained concept's folder (without its photos) as the training `key`.

    Keeping is a saving for later runs, not part of this one: a store that refuses it is a warning.

    Returns:
        Where it was kept, or None if it could not be.
    """
    where = location(root, key)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for f in sorted(p for p in Path(concept_dir).rglob("*") if p.is_file()):
            rel = f.relative_to(concept_dir)
            if rel.parts[0] not in LEFT_OUT:
                tar.add(f, arcname=rel.as_posix())
    try:
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
    """Write the kept training `key` into `out_dir`, if there is one that reads and whose checkpoints are there.

    The folder is unpacked beside `out_dir` and moved into place whole. Its summary keeps the earlier training's
    figures and names its checkpoints (evaluation chooses among them: a training whose checkpoints were deleted
    is not taken, or it would be scored at its last step only, as if it had been chosen); it says where it was
    kept (`trained_before`), that no step ran here, and no live MLflow run (that one was the earlier training's:
    `register` opens a new one).

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
                # by name: the folder is recorded resolved, the last checkpoint as the trainer was given its folder
                found = {Path(path).name for _, path in checkpoints.list_checkpoints(summary["checkpoint_dir"])}
                if Path(str(summary.get("last_checkpoint"))).name not in found:
                    raise ValueError(f"its checkpoints are no longer in {summary['checkpoint_dir']}")
                summary.pop("mlflow_run_id", None)
                summary.update(steps_run=0, trained_before=where)
                (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    except Exception as e:  # damaged, incomplete, or a store that does not answer: training again loses nothing
        log.warning("the finished training %s cannot be taken (%s); training it again", where, e)
        return None
    return summary
