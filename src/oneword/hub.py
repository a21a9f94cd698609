"""Small files from the Hugging Face hub, without the hub client's minute of retries when the hub is out of reach."""

from __future__ import annotations

import os
from pathlib import Path

REACH_TIMEOUT_S = 5.0  # one HEAD request: a hub that does not answer in 5 s is out of reach for a preflight


def is_repo_id(ref: str) -> bool:
    """Whether `ref` reads as a hub id (`owner/name`) rather than a path."""
    return ref.count("/") == 1 and not ref.startswith(("/", ".", "~")) and not Path(ref).expanduser().exists()


def offline() -> bool:
    """Whether the hub is switched off, read as huggingface_hub reads it (at call time, not at its import)."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in ("1", "ON", "YES", "TRUE")


def reachable(repo_id: str, filename: str) -> bool | None:
    """Whether the hub serves `repo_id/filename`: True, False (it answered no), None (no answer, or offline)."""
    if offline():
        return None
    import requests
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    try:
        r = requests.head(
            hf_hub_url(repo_id, filename), headers=build_hf_headers(), timeout=REACH_TIMEOUT_S, allow_redirects=True
        )
    except requests.RequestException:
        return None
    return r.status_code == 200


def small_file(repo_id: str, filename: str) -> Path | None:
    """A hub file from the local cache, else downloaded if the hub answers at once; None if neither."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    if not is_repo_id(repo_id):
        return None
    cached = try_to_load_from_cache(repo_id, filename)
    if isinstance(cached, str):
        return Path(cached)
    if not reachable(repo_id, filename):
        return None
    return Path(hf_hub_download(repo_id, filename))
