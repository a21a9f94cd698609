"""A pipeline step's process ends once KFP's executor has written the step's outputs.

A step imports torch, transformers, diffusers and MLflow; Python's teardown of them at exit (thousands of
modules and their objects freed one by one, in C) took 1 to 2 s of every step's process on two CPU cores, after
the step's work was done: a fifth of a small local batch, whose steps run one after the other (two concepts:
62-64 s before, 48-51 s after). Once the executor has written the step's output file there is nothing left to
do, so the process runs the exit handlers registered after oneword's first import (the step's libraries'), shuts
logging down, flushes its output and ends there, with status 0. A step that failed or was stopped wrote no
output file (the executor writes it last) or raised, and its process ends as any does, with its status.
This holds for any Python component that imports oneword, a team's own included.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import sys
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
        # registered before the step's libraries are imported (a component imports oneword first: tested), their
        # own exit handlers (MLflow ends its active run, multiprocessing joins its children) are registered after
        # this one, so they run before it
        atexit.register(_end_if_written, out, _signature(out))


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


def _signature(path: Path) -> tuple[int, int, int] | None:
    """What tells a file written since apart (not a clock: a file's times lag `time.time()` by a few ms)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _end_if_written(out: Path, before: tuple[int, int, int] | None) -> None:
    if getattr(sys, "last_value", None) is not None:  # an uncaught exception: the process fails as usual
        return
    now = _signature(out)
    if now is None or now == before:  # none written (the step failed, or was stopped), or an earlier attempt's
        return
    logging.shutdown()
    status = 0
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):  # as Python ends when it cannot flush its output
            status = 120
    os._exit(status)
