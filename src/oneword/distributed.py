"""Training over every GPU of a pod: processes started by accelerate's launcher, one per GPU.

How the work is split (`InversionTrainer`): every process holds every concept's rows (a few KB each) and draws
the whole step's batch with the same generators as a single process would, then computes the loss of its own
contiguous share of the batch's K x batch_size samples. Its gradient is summed over the processes (one
all-reduce of the trainable rows: K x n_vectors x width floats, about 3 KB a concept) and every process takes the
same optimiser step, so every process holds the same state as a single process, up to the order of floating-point
sums.

- Several concepts (a batch job's shard, K a multiple of the process count): each process trains whole concepts,
  concept-parallel. One concept: each process takes part of its batch, data-parallel. Both are the same rule.
- The main process alone writes checkpoints, outputs and live MLflow runs. A checkpoint is the same file a single
  process writes, so a run resumes on any process count.
- A process that fails takes the others down (torchrun's elastic agent stops the group), and the launch raises
  the main process's exception or the exit status, so the step fails and its retry resumes from the checkpoints.

On a CPU the same code runs with N processes over gloo: how the tests prove it.
"""

from __future__ import annotations

import importlib
import logging
import os
import pickle
import socket
import sys
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from oneword.errors import OnewordError, TransientError
from oneword.processes import run_group

log = logging.getLogger(__name__)

# How long a process waits at a collective for the others. The main process stores each checkpoint while the
# others wait at the next step's all-reduce, and on an object store that does not answer `save_checkpoint` gives
# up only after its attempts, each bounded by the client's timeouts: up to about 27 minutes, which outlasts
# NCCL's default 10 and would take the others down first, with an error that names no store.
COLLECTIVE_TIMEOUT = timedelta(minutes=45)


@dataclass(frozen=True)
class World:
    """This process's place among the processes of one launch."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this process writes (checkpoints, outputs, live runs, logs)."""
        return self.rank == 0

    def share(self, n: int) -> tuple[int, int]:
        """This process's contiguous share `[lo, hi)` of `n` items (sizes differ by at most one)."""
        return n * self.rank // self.size, n * (self.rank + 1) // self.size


def current(cpu: bool | None = None) -> World:
    """The world this process runs in: a single process unless started by `launch`. `cpu`: whether the work runs
    on the CPU (gloo), whatever GPUs the machine has (default: when it has none)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    from accelerate import PartialState

    # gloo for CPU tensors (torchrun's environment alone makes accelerate assume a single process on a CPU-only
    # machine, and NCCL on a GPU machine, which refuses CPU tensors)
    state = PartialState(cpu=not torch.cuda.is_available() if cpu is None else cpu, timeout=COLLECTIVE_TIMEOUT)
    return World(state.process_index, state.num_processes, state.local_process_index)


def device_for(device: torch.device, world: World) -> torch.device:
    """The device this process trains on: its own GPU (`cuda:<local rank>`) when the run asks for CUDA."""
    if world.size > 1 and device.type == "cuda":
        return torch.device("cuda", world.local_rank)
    return device


def processes(gpus: int, device: str = "auto", in_process_only: str = "") -> int:
    """How many processes a step with `gpus` starts on `device`: `gpus`, or with 0 every visible GPU (1 on a
    CPU). Inside a launch: 1 (the launch has started them).

    `in_process_only` names what the caller passed that cannot cross into other processes (a loaded model,
    callbacks): then 0 means one process, and more than one is refused.
    """
    if gpus < 0:
        raise OnewordError(f"gpus must be 0 (every visible GPU) or more, not {gpus}")
    if launched():
        return 1
    if in_process_only:
        if gpus > 1:
            raise OnewordError(
                f"{gpus} processes each load the model and call back in none, but {in_process_only} was given",
                hint="pass the model as a path or hub id and no callbacks, or use gpus=1",
            )
        return 1
    if gpus:
        return gpus
    on_gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return max(torch.cuda.device_count(), 1) if on_gpu else 1


def launched() -> bool:
    """Whether this process is one of a launch's processes (and so must not launch again)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def all_reduce_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over the processes, in place (no-op in a single process)."""
    if launched():
        torch.distributed.all_reduce(tensor)
    return tensor


def from_main(value: Any, world: World) -> Any:
    """The main process's `value`, on every process: a decision that must be the same everywhere."""
    if world.size == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def gather(items: list, world: World) -> list:
    """Every process's `items`, concatenated in rank order, on every process (`items` itself in one process)."""
    if world.size == 1:
        return items
    parts: list[list | None] = [None] * world.size
    torch.distributed.all_gather_object(parts, items)
    return [x for part in parts for x in part]  # type: ignore[union-attr]


def _free_port() -> int:
    # Steps of a batch run side by side on one node (kfp.local runs ParallelFor iterations as processes): each
    # launch takes a port of its own instead of torchrun's fixed 29500.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(fn: str, n: int, **kwargs: Any) -> Any:
    """Call `fn` ("module:function") with `kwargs` in `n` processes started by `accelerate launch`.

    Returns the main process's return value; raises its exception when it raised one, else an `OnewordError`
    naming the exit status when a process died (the others are stopped by the launcher).
    """
    with tempfile.TemporaryDirectory(prefix="oneword-launch-") as tmp:
        call, result = Path(tmp) / "call.pkl", Path(tmp) / "result.pkl"
        call.write_bytes(pickle.dumps((fn, kwargs)))
        cmd = [
            sys.executable, "-m", "accelerate.commands.launch",
            "--multi_gpu", "--num_processes", str(n), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
            "-m", "oneword.distributed", str(call), str(result),
        ]  # fmt: skip
        log.info("starting %d processes: %s", n, " ".join(cmd))
        # a group of its own: a SIGTERM to this process alone stops the workers too (`processes.run_group`)
        code = run_group(cmd, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
        return _outcome(fn, n, result, code)


def _outcome(fn: str, n: int, result: Path, returncode: int) -> Any:
    """What a launch gives its caller: the main process's return value, or its error."""
    try:
        ok, value = pickle.loads(result.read_bytes()) if result.exists() else (False, None)
    except Exception as e:  # an exception that pickles but cannot be rebuilt here
        ok, value = False, RuntimeError(f"unreadable outcome: {e}")
    if ok and returncode == 0:
        return value
    if isinstance(value, OnewordError):  # bad input, found by the main process: the same error as in one
        raise value
    # a process died (the main one then fails on its broken connection) or hit a bug: the launcher's log
    # above has each process's traceback
    main = f"; the main process: {type(value).__name__}: {value}" if not ok and value is not None else ""
    raise OnewordError(
        f"{fn} over {n} processes failed (exit status {returncode}){main}",
        hint="the log above shows which process failed first and why; a rerun resumes from the last "
        "checkpoint, on any number of GPUs",
    )


def _main(call: str, result: str) -> None:
    """A launched process: run the call; the main process writes its outcome for `launch`."""
    fn, kwargs = pickle.loads(Path(call).read_bytes())
    module, name = fn.split(":")
    world = current()
    if not world.main:  # the processes hold the same state: one log is enough
        logging.getLogger().setLevel(logging.WARNING)
    try:
        value = getattr(importlib.import_module(module), name)(**kwargs)
    except BaseException as e:
        if world.main:
            from oneword import outcome

            if outcome.transient(e) and not isinstance(e, TransientError):  # what it is survives the pickle
                e = TransientError(f"{type(e).__name__}: {e}", getattr(e, "hint", None))
            try:
                blob = pickle.dumps((False, e))
            except Exception:  # an exception that cannot cross processes still says what it was
                blob = pickle.dumps((False, RuntimeError(f"{type(e).__name__}: {e}")))
            Path(result).write_bytes(blob)
        raise
    if world.main:
        Path(result).write_bytes(pickle.dumps((True, value)))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    _main(sys.argv[1], sys.argv[2])
