"""Ctrl-C (or SIGTERM) during a kfp.local run: the run stops within seconds.

kfp.local runs each task as a subprocess from a thread of its own. On Ctrl-C its main thread stops waiting, but
then waits for those threads, which go on starting the rest of each concept's tasks: a batch interrupted while
training went on to evaluate and register for minutes (hours, on a GPU), printing nothing. Under `stopping()`,
once SIGINT arrives no task starts any more (it fails at once, as the tasks Ctrl-C killed did), the running
ones get SIGINT (SIGTERM, where this process was started with SIGINT ignored), each task's process group whole
(kfp.local's task is a shell running Python), and those that do not end within `GRACE_S` are killed. SIGTERM
(`timeout`, a scheduler's stop) and SIGHUP do the same: without it this process died alone, and its tasks trained
on, orphaned.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

from oneword.processes import GRACE_S, Stopped, signal_group, suspended_with

STOPPED_RC = 128 + signal.SIGINT  # what a task that was never started reports: a shell's status for SIGINT


class _Tasks:
    """The task processes running now, and whether the run is stopping.

    No lock: the SIGINT handler runs on the main thread, which may itself be starting a task (kfp.local runs a
    DAG's top-level tasks there), and a lock it held would be taken again. A task started while the stop came
    sees the stop after it is listed, and signals itself.
    """

    def __init__(self, stop: threading.Event | None = None, watch: Callable[[], Callable[[str], None]] | None = None,
                 sent: int = signal.SIGINT):  # fmt: skip
        self.running: set[subprocess.Popen] = set()
        self.stop = stop or threading.Event()
        self.watch = watch  # gives each task a reader of its output lines (the terminal's progress)
        self.sent = sent  # what the running tasks are sent at the stop

    def run(self, full_command: list[str], env_vars: dict[str, str] | None = None) -> int:
        """Run one task as kfp.local does (its output, line by line, to this process's stdout), unless the run
        is stopping; its exit status."""
        if self.stop.is_set():
            return STOPPED_RC
        proc = subprocess.Popen(
            full_command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            env={**os.environ, **env_vars} if env_vars else None,
            # a group of its own, which a signal reaches whole: kfp.local's task is `sh -ec` running Python, and a
            # signal to the shell alone left the Python training on, orphaned, holding this process's pipe
            process_group=0,
        )
        self.running.add(proc)
        try:
            if self.stop.is_set():  # it started as the run stopped: the signal to the others missed it
                signal_group(proc, self.sent)
            out = sys.stdout  # the run's log file: a task stopping after the run's end must not write on the terminal
            seen = self.watch() if self.watch else None
            with proc:
                for line in proc.stdout:
                    _write(out, line)
                    if seen:
                        try:
                            seen(line)
                        except Exception:  # the terminal's progress (a closed pipe: `| head`) must not fail the task
                            seen = None
                _write(out, "\n\n")  # kfp.local's separator after a task's logs
                return proc.wait()
        finally:
            self.running.discard(proc)

    def stop_all(self) -> None:
        """Start no task again; SIGINT to those running (their steps unwind as on Ctrl-C), then kill those still
        there after `GRACE_S`. A run started with SIGINT ignored (a shell's background job) passes that on to
        its tasks, which would ignore it to the kill: they get SIGTERM."""
        self.stop.set()
        for proc in list(self.running):
            signal_group(proc, self.sent)
        threading.Thread(target=self._kill_late, daemon=True).start()

    def _kill_late(self) -> None:
        deadline = time.monotonic() + GRACE_S
        while self.running and time.monotonic() < deadline:
            time.sleep(0.1)
        for proc in list(self.running):
            signal_group(proc, signal.SIGKILL)


def _write(out, text: str) -> None:
    """Write a task's output to `out`; once the run has closed it (the task outlived the stop), nowhere."""
    with contextlib.suppress(ValueError):
        out.write(text)


@contextlib.contextmanager
def stopping(
    stop: threading.Event | None = None, watch: Callable[[], Callable[[str], None]] | None = None
) -> Iterator[threading.Event]:
    """Around a kfp.local pipeline call: on SIGINT (or SIGTERM, SIGHUP) no task starts any more and the running
    ones are stopped; KeyboardInterrupt (SystemExit(128 + the signal)) is raised, and comes out once the
    pipeline's threads have wound up. Yields the event set at the stop (`stop`, where given).

    `watch`, where given, makes for each task a callable that reads its output, line by line.

    Only the main thread can take signals: elsewhere (a test's thread) the tasks run as kfp.local runs them.
    """
    from kfp.local import subprocess_task_handler

    # SIGINT, unless this process was started with it ignored, which its tasks inherit: they get SIGTERM
    tasks = _Tasks(stop, watch, signal.SIGTERM if signal.getsignal(signal.SIGINT) is signal.SIG_IGN else signal.SIGINT)
    original = getattr(subprocess_task_handler, "run_local_subprocess", None)
    # a signal ignored stays so: a shell's background job (`&`, nohup) ignores Ctrl-C. SIGHUP (the terminal
    # closed) no longer reaches the tasks, each in a group of its own: it stops them here.
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    watched = [s for s in signals if signal.getsignal(s) is not signal.SIG_IGN]
    if threading.current_thread() is not threading.main_thread() or original is None or not watched:
        yield tasks.stop  # (a kfp that runs its tasks otherwise: as it does)
        return

    def on_signal(signum, frame) -> None:
        if not tasks.stop.is_set():
            tasks.stop_all()
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Stopped(signum)  # SIGTERM (`timeout`, a scheduler), SIGHUP: its tasks must not outlive it

    before = {s: signal.signal(s, on_signal) for s in watched}
    subprocess_task_handler.run_local_subprocess = tasks.run
    try:
        with suspended_with(lambda: tasks.running):  # Ctrl-Z: the tasks, in groups of their own, stop too
            yield tasks.stop
    finally:
        subprocess_task_handler.run_local_subprocess = original
        for s, handler in before.items():
            signal.signal(s, handler)
