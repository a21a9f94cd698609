"""Child processes that end with the command that started them: a process group each, signalled whole.

A signal sent to a command alone (`timeout`, a scheduler's SIGTERM, `kill`) does not reach its children: a
`train --gpus 2` killed so died alone, and its two workers trained on, orphaned, holding the GPUs. A child
started here runs in a process group of its own; whatever ends the wait (Ctrl-C, SIGTERM, SIGHUP, an error),
the group gets the same signal, and is killed after `GRACE_S` if it is still there. Ctrl-Z and `fg` stop and
resume the group with the command.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Iterable, Iterator

GRACE_S = 10.0  # for a child to end on a signal (a checkpoint written, an alias put back) before it is killed


class Stopped(SystemExit):
    """The command was stopped by SIGTERM or SIGHUP; the exit status is a shell's for that signal (128 + it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum
        self.signal = signal.Signals(signum).name


def signal_group(proc: subprocess.Popen, signum: int) -> None:
    """Send `signum` to every process of `proc`'s group (one that ended already is no error)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signum)


@contextlib.contextmanager
def stops_raise() -> Iterator[None]:
    """SIGTERM and SIGHUP raise `Stopped` inside the block (on the main thread, where they are not ignored), so
    that what the block started is stopped on the way out; as they were after it."""
    watched = [s for s in (signal.SIGTERM, signal.SIGHUP) if signal.getsignal(s) is not signal.SIG_IGN]
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(signum, frame) -> None:
        raise Stopped(signum)

    before = {s: signal.signal(s, on_signal) for s in watched}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def suspended_with(groups: Callable[[], Iterable[subprocess.Popen]]) -> Iterator[None]:
    """Inside the block, Ctrl-Z (SIGTSTP) stops `groups()` (children in process groups of their own, which the
    terminal's signal does not reach) with this process, and `fg` or `bg` (SIGCONT) resumes them with it. Without
    it, a suspended command's tasks went on training. On the main thread, where SIGTSTP is not ignored, only."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTSTP) is signal.SIG_IGN:
        yield
        return

    def on_stop(signum, frame) -> None:
        held = list(groups())
        for proc in held:
            signal_group(proc, signal.SIGSTOP)  # not SIGTSTP, which a child may handle or ignore
        signal.signal(signal.SIGTSTP, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTSTP)  # this process stops here, as the terminal meant; SIGCONT goes on
        signal.signal(signal.SIGTSTP, on_stop)
        for proc in held:
            signal_group(proc, signal.SIGCONT)

    before = signal.signal(signal.SIGTSTP, on_stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTSTP, before)


def run_group(cmd: list[str], env: dict[str, str] | None = None) -> int:
    """Run `cmd` in a process group of its own and wait for it; its exit status.

    Ctrl-C reaches the group as SIGINT (a terminal's would not: the group is not the terminal's), SIGTERM and
    SIGHUP as SIGTERM, and any other way out of the wait as SIGTERM too; whatever is left after `GRACE_S` is
    killed. The exception is raised again.
    """
    proc = subprocess.Popen(cmd, env=env, process_group=0)
    try:
        with stops_raise(), suspended_with(lambda: [proc]):
            return proc.wait()
    except BaseException as e:
        signal_group(proc, signal.SIGINT if isinstance(e, KeyboardInterrupt) else signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=GRACE_S)
        signal_group(proc, signal.SIGKILL)  # its workers too, which may outlive the launcher
        proc.wait()
        raise
