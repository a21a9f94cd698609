"""A pipeline step's process ends once KFP's executor has written the step's outputs.

A step imports torch, transformers, diffusers and MLflow; Python's teardown of them at exit (thousands of
modules and their objects freed one by one, in C) took 1 to 2 s of every step's process on two CPU cores, after
the step's work was done: an eighth of a small local batch, whose steps run one after the other. Once the
executor has written the step's output file there is nothing left to do, so the process flushes its logs and
ends there, with status 0. A step that failed or was stopped wrote no output file (the executor writes it last),
and its process ends as any does, with its status.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path

EXECUTOR = "kfp.dsl.executor_main"  # what KFP runs a Python component's step with, kfp.local and cluster alike


def install() -> None:
    """Under KFP's executor, end the process at exit without Python's teardown if the step wrote its output
    file; elsewhere (the CLI, a library user's process) do nothing."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is None or spec.name != EXECUTOR:
        return
    out = output_file(sys.argv)
    if out is not None:
        # registered before the step's libraries are imported: their own exit handlers (MLflow ends its active run)
        # are registered after this one, so they run before it
        atexit.register(_end_if_written, out, time.time())


def output_file(argv: list[str]) -> Path | None:
    """The output file the executor writes once the step succeeded, from its `--executor_input` argument."""
    for i, arg in enumerate(argv):
        value = argv[i + 1] if arg == "--executor_input" and i + 1 < len(argv) else None
        if arg.startswith("--executor_input="):
            value = arg.split("=", 1)[1]
        if value is not None:
            try:
                return Path(json.loads(value)["outputs"]["outputFile"])
            except (ValueError, KeyError, TypeError):
                return None
    return None


def _end_if_written(out: Path, started: float) -> None:
    if getattr(sys, "last_value", None) is not None:  # an uncaught exception: the process fails as usual
        return
    try:
        if out.stat().st_mtime < started:  # an earlier attempt's
            return
    except OSError:  # none written: the step failed, or was stopped
        return
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken pipe: nothing more to say
            stream.flush()
    os._exit(0)
