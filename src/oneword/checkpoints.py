"""Training checkpoints: vectors, optimiser state, RNG states and step, in a local folder or under `s3://`.

One file per checkpoint, `step-000500.pt`, written atomically, so a run killed at any moment leaves only
whole checkpoints. Files are read back with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch

from oneword import storage
from oneword.errors import OnewordError

log = logging.getLogger(__name__)

NAME = re.compile(r"^step-(\d{6,})\.pt$")


def checkpoint_name(step: int) -> str:
    """File name of the checkpoint at `step`."""
    return f"step-{step:06d}.pt"


UPLOAD_ATTEMPTS = 3  # object storage blips (a MinIO pod restarting) should not cost a GPU job
UPLOAD_BACKOFF_S = 5.0  # seconds before the 2nd attempt, doubled after each
STALE_PART_S = 3600.0  # a checkpoint is written in seconds: a part file this old is a killed writer's


def save_checkpoint(
    where: str | Path, step: int, state: dict, attempts: int = UPLOAD_ATTEMPTS, backoff: float | None = None
) -> str:
    """Write `state` as the checkpoint of `step` into a folder or `s3://` prefix.

    An upload is tried `attempts` times, `backoff` seconds apart (doubling; default `UPLOAD_BACKOFF_S`), unless the
    store refuses it (`storage.refused`: asking again gets the same answer); an object
    is whole or absent (an S3 PUT is atomic) and its size is checked after the upload, so a resume never reads a
    partial checkpoint.

    Returns:
        The checkpoint's path or URI.

    Raises:
        OnewordError: if the checkpoint could not be stored.
    """
    name = checkpoint_name(step)
    if storage.is_s3(where):
        uri = f"{str(where).rstrip('/')}/{name}"
        backoff = UPLOAD_BACKOFF_S if backoff is None else backoff
        attempts = max(1, attempts)
        storage.client()  # no endpoint or credentials configured: said at once, not retried
        with tempfile.TemporaryDirectory() as d:
            local = Path(d) / name
            _save_local(state, local)
            for attempt in range(1, attempts + 1):
                try:
                    storage.upload_file(local, uri)
                    if storage.object_size(uri) != local.stat().st_size:
                        raise OnewordError(f"{uri} does not have the size of the checkpoint uploaded")
                    return uri
                except Exception as e:  # network and server errors come in many types
                    if attempt == attempts or storage.refused(e):
                        tries = "the store refused it" if storage.refused(e) else f"after {attempts} attempts"
                        raise OnewordError(
                            f"could not store checkpoint {uri} ({tries}): {e}",
                            hint="check the object store (S3_ENDPOINT_URL, credentials, the bucket's policy); a "
                            "rerun resumes from the last checkpoint stored",
                        ) from e
                    log.warning("storing %s failed (%s); attempt %d of %d", uri, e, attempt + 1, attempts)
                    time.sleep(backoff * 2 ** (attempt - 1))
    folder = Path(where)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = storage.part_path(folder / name)  # a rerun of the same group may write beside a stale writer
    _save_local(state, tmp)
    tmp.replace(folder / name)
    _drop_stale_parts(folder)
    return str(folder / name)


def _drop_stale_parts(folder: Path) -> None:
    """Remove the part files that writers killed mid-save left behind (never a live writer's: those are fresh)."""
    now = time.time()
    for part in folder.glob(".step-*.part"):
        try:
            if now - part.stat().st_mtime > STALE_PART_S:
                part.unlink()
        except FileNotFoundError:  # another process removed it first
            pass


def _save_local(state: dict, path: Path) -> None:
    """`torch.save`, with a full or read-only disk said as an `OnewordError` (training goes on past one)."""
    try:
        torch.save(state, path)
    except (OSError, RuntimeError) as e:
        path.unlink(missing_ok=True)
        # torch's writer says a write cut short (ENOSPC, EFBIG) as a RuntimeError; any other is no disk's doing
        if isinstance(e, RuntimeError) and not re.search(r"unexpected pos|write failed|PytorchStreamWriter", str(e)):
            raise
        said = str(e) if isinstance(e, OSError) else "the write stopped short"
        free = shutil.disk_usage(path.parent).free if path.parent.is_dir() else None
        raise OnewordError(
            f"could not write checkpoint {path}: {said}" + (f" ({free / 2**20:.1f} MiB free there)" if free is not None
                                                          else ""),
            hint="free space on that disk (for s3:// checkpoints, the temporary folder: $TMPDIR), or checkpoint "
            "elsewhere (--checkpoint-dir)",
        ) from e


def list_checkpoints(where: str | Path) -> list[tuple[int, str]]:
    """List `(step, path or URI)` of the checkpoints in a folder or `s3://` prefix, by step."""
    if storage.is_s3(where):
        # a bucket not made yet holds no checkpoints; a store that is not configured or refuses is an error,
        # not "start from step 0"
        if not storage.client().bucket_exists(storage.split_s3(str(where))[0]):
            return []
        keys = [k for k, _, _ in storage.list_objects(str(where))]
        base = str(where).rstrip("/")
        found = [(int(m.group(1)), f"{base}/{k}") for k in keys if (m := NAME.match(k))]
    else:
        folder = Path(where)
        if not folder.is_dir():
            return []
        found = [(int(m.group(1)), str(p)) for p in folder.iterdir() if (m := NAME.match(p.name))]
    return sorted(found)


def load_checkpoint(path: str | Path) -> dict:
    """Read one checkpoint (local path or `s3://` URI) with `weights_only=True`."""
    with tempfile.TemporaryDirectory() as d:
        local = storage.download_file(str(path), Path(d) / "ckpt.pt") if storage.is_s3(path) else path
        try:
            return torch.load(local, map_location="cpu", weights_only=True)
        except Exception as e:  # unpickling errors come in many types
            raise OnewordError(
                f"checkpoint {path} could not be read ({e})",
                hint="delete the damaged file; training resumes from the one before",
            ) from e


def photos_of(state: dict, token: str) -> list[str] | None:
    """The digests of the photos a checkpoint's `state` learned `token` from; None where it does not say (older
    checkpoints)."""
    return state.get("image_sha256", {}).get(token)


def vectors_of(state: dict, token: str) -> list[torch.Tensor]:
    """The vectors a checkpoint's `state` holds for `token`, one tensor per text encoder."""
    second = state.get("vectors_2", {})
    return [state["vectors"][token]] + ([second[token]] if token in second else [])
