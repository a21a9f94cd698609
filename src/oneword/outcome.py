"""A concept's failure, carried from step to step, so that one concept of a batch never loses the others.

In a batch, a concept whose step fails (bad photos, a non-finite loss) must not fail the pipeline task: KFP
would stop the shard, and with it the shard's other concepts. So batch steps run with `on_error="record"`:
the step writes `failure.json` (stage and error) into its output folder instead of raising, each later step
passes the marker on without working, and `register` records the failure in MLflow, where the batch report
finds it. With `on_error="fail"` (one concept, the CLI) errors are raised as usual.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal, TypeVar

from oneword.errors import OnewordError, TransientError

log = logging.getLogger(__name__)

FAILURE_FILE = "failure.json"
LOCAL_RUN_ENV = "ONEWORD_KFP_LOCAL"  # set for the tasks of `oneword run`/`batch` (kfp.local: no cache, no retries)
UNCHANGED_FILE = "unchanged.json"  # evaluate found the concept registered from the same training and settings
OnError = Literal["fail", "record"]
ON_ERROR_CHOICES = ("fail", "record")
T = TypeVar("T")


def read_failure(folder: str | Path | None) -> dict | None:
    """The failure recorded in a step's output folder (`{"stage", "error", "hint"}`), or None."""
    if not folder:
        return None
    p = Path(folder) / FAILURE_FILE
    return json.loads(p.read_text()) if p.is_file() else None


def write_failure(folder: str | Path, stage: str, error: str, hint: str = "", images: str = "",
                  recorded: bool = True) -> dict:  # fmt: skip
    """Record in `folder` that the concept failed at `stage`; returns the record. `images`, the concept's photos,
    tells whose failure it is where outputs arrive in no promised order (`oneword.train.match_latents`);
    `recorded` False: no MLflow run is to name the concept (`OnewordError.recorded`: it was erased)."""
    from oneword.tracking import shown  # a store's URI with its password, quoted by an MLflow error

    error, hint = shown(error), shown(hint)
    record = {"stage": stage, "error": error, "hint": hint, **({"images": images} if images else {}),
              **({} if recorded else {"unrecorded": True})}  # fmt: skip
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / FAILURE_FILE).write_text(json.dumps(record, indent=2))
    return record


RETRIED_STATUS = (408, 429, 500, 502, 503, 504)  # HTTP answers that a later attempt may not get


def transient(error: BaseException) -> bool:
    """True if `error`, or an error it was raised from, is one a later attempt may not meet.

    A lost connection, a timeout, or a server (object store, model hub, MLflow) answering 5xx, 408 or 429; not
    bad input, a refused request or a bug, which every attempt meets again.
    """
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (ConnectionError, TimeoutError, TransientError)):
            return True
        if isinstance(e, _misconfigured()):  # a certificate or a host name: every attempt meets it again
            return False
        if isinstance(e, _transport_errors()):
            # urllib3 wraps what went wrong in MaxRetryError.reason; requests wraps that MaxRetryError in its args
            inner = e.args[0] if e.args and isinstance(e.args[0], BaseException) else None
            reason = getattr(e, "reason", None) or getattr(inner, "reason", None)
            return not isinstance(reason, _misconfigured()) and not isinstance(inner, _misconfigured())
        response = getattr(e, "response", None)
        status = getattr(response, "status", None) or getattr(response, "status_code", None)
        if isinstance(status, int) and status in RETRIED_STATUS:
            return True
        e = e.__cause__ or e.__context__
    return False


def _misconfigured() -> tuple[type[BaseException], ...]:
    """Connection errors that are settings, not weather: a certificate refused, a host name that does not resolve."""
    import ssl

    kinds: list[type[BaseException]] = [ssl.SSLError]
    try:
        import urllib3.exceptions as u

        kinds += [u.SSLError, u.NameResolutionError, u.LocationParseError]
    except (ImportError, AttributeError):
        pass
    try:
        import requests.exceptions as r

        kinds += [r.SSLError, r.InvalidURL]
    except ImportError:
        pass
    return tuple(kinds)


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP clients' own errors for a request that never got an answer (minio, requests, httpx, the hub's)."""
    kinds: list[type[BaseException]] = []
    try:
        import urllib3.exceptions as u

        kinds += [u.MaxRetryError, u.ProtocolError, u.TimeoutError, u.NewConnectionError]
    except ImportError:
        pass
    try:
        import requests.exceptions as r

        kinds += [r.ConnectionError, r.Timeout]
    except ImportError:
        pass
    for name in ("httpx", "httpx2"):  # huggingface_hub 2.x asks with httpx2
        with contextlib.suppress(ImportError, AttributeError):
            kinds.append(importlib.import_module(name).TransportError)
    return tuple(kinds)


# Waits before a step tries again, itself, what a retry may cure. A cluster's retry policy may retry no pod that
# failed: KFP 2.17's manifests set Argo's `retryPolicy: OnError`, under which a step that exits non-zero is not
# tried again, and an object store's blip would cost a batch's concepts the night. The tasks' own retries
# (`set_retry`) come on top, where the policy lets them.
RETRY_WAITS_S = (30.0, 120.0)


def retrying(work: Callable[[], T], what: str) -> T:
    """`work()`, tried again after each of `RETRY_WAITS_S` while it fails with a `transient` error; the last error
    is raised. Under kfp.local (`LOCAL_RUN_ENV`) it is tried once: a local run says what failed at once."""
    for wait in () if os.environ.get(LOCAL_RUN_ENV) else RETRY_WAITS_S:
        try:
            return work()
        except Exception as e:
            if not transient(e):
                raise
            log.warning("%s: %s; trying again in %.0f s", what, e, wait)
        # out of the except block: the error's traceback (and the frames holding the first attempt's model) is let go
        time.sleep(wait)
    return work()


def run_step(
    stage: str,
    out_dir: str | Path,
    on_error: OnError,
    work: Callable[[], T],
    upstream: Sequence[str | Path] = (),
    retried: bool = False,
    images: str = "",
) -> T | None:
    """Run one step of one concept, honouring failures before it and `on_error`.

    Args:
        stage: the step's name, recorded with a failure.
        out_dir: the step's output folder (where a failure is written).
        on_error: `fail` raises; `record` writes the failure into `out_dir` and returns None.
        work: the step itself.
        upstream: the input folders of earlier steps; a failure recorded there is passed on, and `work` is
            not run.
        retried: the step is tried again, after `RETRY_WAITS_S`, for errors a retry may cure (`retrying`); a
            `transient` error that outlasts them is then raised even with `record`, so that the task fails and
            its retries may try again, instead of losing the concept for this run. Under kfp.local
            (`LOCAL_RUN_ENV`), which retries nothing, it is tried once and recorded.
        images: the concept's photos, recorded with a failure (an upstream failure keeps its own).

    Returns:
        What `work` returned, or None if the concept had failed.
    """
    retried = retried and not os.environ.get(LOCAL_RUN_ENV)
    if on_error not in ON_ERROR_CHOICES:
        raise OnewordError(f"on_error must be one of {ON_ERROR_CHOICES}, not {on_error!r}")
    from oneword.tracking import HideCredentials

    HideCredentials.install()  # the step's log is kept with the run, and read by whoever sees it
    for folder in upstream:
        if (earlier := read_failure(folder)) is not None:
            write_failure(out_dir, earlier["stage"], earlier["error"], earlier.get("hint", ""),
                          earlier.get("images", images))  # fmt: skip
            log.info("skipping %s: the concept failed at %s", stage, earlier["stage"])
            return None
    try:
        return retrying(work, stage) if retried else work()
    except OnewordError as e:
        # Written in both modes: with `fail`, whoever started the pipeline shows it (not the runner's traceback).
        write_failure(out_dir, stage, e.message, e.hint or "", images, e.recorded)
        if on_error == "fail" or (retried and transient(e)):
            raise
        log.error("%s failed: %s", stage, e)
    except Exception as e:  # a crash of one concept's step must not lose the batch; the trace goes to the log
        write_failure(out_dir, stage, f"{type(e).__name__}: {e}", images=images)
        if on_error == "fail" or (retried and transient(e)):
            raise
        log.exception("%s crashed", stage)
    return None
