"""Training checkpoints: vectors, optimiser state, RNG states and step, in a local folder or under `s3://`.

One file per checkpoint, `step-000500.pt`, written atomically, so a run killed at any moment leaves only
whole checkpoints. Files are read back with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import torch

from oneword import storage
from oneword.errors import OnewordError

NAME = re.compile(r"^step-(\d{6,})\.pt$")


def checkpoint_name(step: int) -> str:
    """File name of the checkpoint at `step`."""
    return f"step-{step:06d}.pt"


def save_checkpoint(where: str | Path, step: int, state: dict) -> str:
    """Write `state` as the checkpoint of `step` into a folder or `s3://` prefix.

    Returns:
        The checkpoint's path or URI.
    """
    name = checkpoint_name(step)
    if storage.is_s3(where):
        with tempfile.TemporaryDirectory() as d:
            local = Path(d) / name
            torch.save(state, local)
            uri = f"{str(where).rstrip('/')}/{name}"
            storage.upload_file(local, uri)
            return uri
    folder = Path(where)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.part"
    torch.save(state, tmp)
    tmp.replace(folder / name)
    return str(folder / name)


def list_checkpoints(where: str | Path) -> list[tuple[int, str]]:
    """List `(step, path or URI)` of the checkpoints in a folder or `s3://` prefix, by step."""
    if storage.is_s3(where):
        try:
            keys = [k for k, _, _ in storage.list_objects(str(where))]
        except OnewordError:
            return []
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


def latest_checkpoint(where: str | Path) -> tuple[int, str] | None:
    """Return `(step, path)` of the newest checkpoint, or None if there is none."""
    found = list_checkpoints(where)
    return found[-1] if found else None
