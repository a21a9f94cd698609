"""Ctrl-C stops a local batch within seconds: no step starts after it, and the command says how to go on.

Before, kfp.local's threads went on starting each concept's remaining steps (train, evaluate, register) for
minutes, and the command ended with status 130 and not a word.
"""

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from .conftest import DREAMBENCH


def _default_sigint() -> None:
    # a shell's background job inherits SIGINT ignored; a terminal's foreground command has it as default
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.setpgrp()  # its own group, which the test signals as a terminal signals its foreground group


@pytest.mark.slow
def test_ctrl_c_stops_a_batch_and_no_step_starts_after_it(tiny_model_dir, tiny_clip_dir, tmp_path):
    manifest = tmp_path / "concepts.yaml"
    concepts = [
        {"images": str(DREAMBENCH / "cat"), "token": "<cat-i>", "init_word": "cat"},
        {"images": str(DREAMBENCH / "dog"), "token": "<dog-i>", "init_word": "dog"},
        {"images": str(DREAMBENCH / "cat"), "token": "<kitten-i>", "init_word": "cat"},  # waits for a free thread
    ]
    manifest.write_text(yaml.safe_dump({"concepts": concepts}))
    root, store = tmp_path / "root", f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["batch", manifest, "--base-model", tiny_model_dir, "--clip-model", tiny_clip_dir, "--resolution", 32,
            "--steps", 400, "--n-images", 1, "--sampling-steps", 2, "--checkpoint-budget", 0,
            "--tracking-uri", store, "--pipeline-root", root]  # fmt: skip
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "oneword"), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "COLUMNS": "80"},
        preexec_fn=_default_sigint,
    )
    try:
        seen = []
        for line in proc.stdout:  # a line per finished step
            seen.append(line)
            if "cache-latents done" in line:  # a concept is training (400 steps), the others on their way
                break
        assert any("cache-latents done" in line for line in seen), "".join(seen) + proc.stderr.read()
        deadline = time.time() + 120
        while not _live_runs(store, "RUNNING") and time.time() < deadline:  # a training's live MLflow run is open
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        signalled = time.time()
        out, err = proc.communicate(timeout=60)
        took = time.time() - signalled
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, (out, err)
    assert took < 30, took  # the tasks got SIGINT and no new one started: seconds, not the rest of the batch
    said = " ".join(err.split())
    assert "interrupted: the batch stopped; no step started after Ctrl-C." in said, err
    assert "run the same command again" in said and "the steps' logs:" in said, err
    assert "failure" not in out and "train done" not in out, out  # none for the steps the stop failed
    for finished in ("train/**/summary.json", "evaluate/**/metrics.json", "register/**/registration.json"):
        assert not list(root.glob(f"batch-personalisation-*/**/{finished}")), finished
    # the trainings the stop cut short ended their live runs themselves: none is left RUNNING for good
    assert not _live_runs(store, "RUNNING") and _live_runs(store, "FAILED")


@pytest.mark.slow
def test_a_run_stopped_after_its_training_ends_the_live_run_no_register_will_complete(tiny_model_dir, tiny_clip_dir,
                                                                                      tmp_path):  # fmt: skip
    """Stopped while evaluate ran, the training's live MLflow run, which only register completes, stayed RUNNING
    for good (a rerun is another KFP run, with a run of its own): it ends KILLED, saying why."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["run", "--images", DREAMBENCH / "cat", "--token", "<cat-s>", "--init-word", "cat", "--base-model",
            tiny_model_dir, "--clip-model", tiny_clip_dir, "--resolution", 32, "--steps", 10, "--n-images", 8,
            "--sampling-steps", 20, "--tracking-uri", store, "--pipeline-root", tmp_path / "root"]  # fmt: skip
    proc = subprocess.Popen([str(Path(sys.executable).parent / "oneword"), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path, preexec_fn=_default_sigint)  # fmt: skip
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if "train done" in line:  # evaluate draws its images now
                break
        assert _live_runs(store, "RUNNING"), "".join(seen) + proc.stderr.read()
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130 and "register done" not in out, (out, err)
    assert not _live_runs(store, "RUNNING")
    [killed] = _live_runs(store, "KILLED")
    assert "stopped before its register" in killed.data.tags["oneword.ended_by"]


def _live_runs(uri: str, status: str) -> list:
    """The concepts' runs in the store at `uri` of that status."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    try:
        ids = [e.experiment_id for e in client.search_experiments()]
    except Exception:  # the store is being made
        return []
    runs = client.search_runs(ids, f"attributes.status = '{status}'") if ids else []
    return [r for r in runs if "oneword.concept" in r.data.tags]


def test_a_task_that_ignores_sigint_is_killed_and_none_starts_after_the_stop(tmp_path, monkeypatch, capsys):
    import threading

    from oneword.pipelines import interrupt

    monkeypatch.setattr(interrupt, "GRACE_S", 1.0)
    tasks = interrupt._Tasks()
    stubborn = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); print('up', flush=True); "
    stubborn += "time.sleep(9)"  # rc 0 unless killed
    result = {}
    thread = threading.Thread(target=lambda: result.update(rc=tasks.run([sys.executable, "-c", stubborn])))
    thread.start()
    deadline = time.time() + 30
    while "up" not in capsys.readouterr().out and time.time() < deadline:  # its first line: it ignores SIGINT now
        thread.join(0.05)
    tasks.stop_all()
    thread.join(20)
    assert not thread.is_alive() and result["rc"] == -signal.SIGKILL, result
    marker = tmp_path / "started"
    rc = tasks.run([sys.executable, "-c", f"open({str(marker)!r}, 'w')"])
    assert rc == interrupt.STOPPED_RC and not marker.exists()


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_to_the_run_alone_stops_its_task_too(tmp_path, signum, status):
    """`timeout` or a scheduler sends SIGTERM, `kill -INT` SIGINT, to the command alone (a terminal's Ctrl-C
    reaches its tasks too): the command died, and its task trained on, orphaned."""
    pid_file = tmp_path / "task.pid"
    task = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    shell = shlex.join([sys.executable, "-c", task]) + "; echo done"  # as kfp.local's: a shell that runs Python
    run = (  # as `oneword batch` runs it, with what it says when stopped
        "import sys, typer\nfrom kfp.local import subprocess_task_handler as handler\n"
        "from oneword.cli.app import on_interrupt\nfrom oneword.pipelines.interrupt import stopping\n"
        "try:\n"
        "    with on_interrupt('stopped after {by}; run it again'), stopping():\n"
        f"        handler.run_local_subprocess(['sh', '-ec', {shell!r}])\n"
        "except typer.Exit as e:\n"
        "    sys.exit(e.exit_code)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", run], preexec_fn=_default_sigint, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.time() + 60
        while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
            time.sleep(0.05)  # the task is up
        task_pid = int(pid_file.read_text())
        os.kill(proc.pid, signum)
        assert proc.wait(timeout=30) == status
        said = proc.stderr.read().strip()
        assert said == ("stopped by SIGTERM: stopped after SIGTERM; run it again" if signum == signal.SIGTERM
                        else "interrupted: stopped after Ctrl-C; run it again")  # fmt: skip
        deadline = time.time() + 30
        while _alive(task_pid) and time.time() < deadline:
            time.sleep(0.05)
        assert not _alive(task_pid), "the task outlived the run"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def test_a_run_that_ignores_ctrl_c_passes_sigterm_on_to_its_tasks(tmp_path):
    """Started as a shell's background job, the run ignores SIGINT, and so do its tasks: SIGTERM to it sent them
    SIGINT, which they ignored until they were killed, with no last checkpoint saved. They get SIGTERM now."""
    got = tmp_path / "got"
    task = (f"import signal, sys, time\ndef on(s, f):\n    open({str(got)!r}, 'w').write(signal.Signals(s).name)"
            "\n    sys.exit(143)\nsignal.signal(signal.SIGTERM, on)\nprint('up', flush=True)\ntime.sleep(60)\n")
    shell = shlex.join([sys.executable, "-c", task])
    run = (
        "import sys, typer\nfrom kfp.local import subprocess_task_handler as handler\n"
        "from oneword.cli.app import on_interrupt\nfrom oneword.pipelines.interrupt import stopping\n"
        "try:\n"
        "    with on_interrupt('stopped after {by}'), stopping():\n"
        f"        handler.run_local_subprocess(['sh', '-ec', {shell!r}])\n"
        "except typer.Exit as e:\n"
        "    sys.exit(e.exit_code)\n"
    )
    ignoring = lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)  # noqa: E731  (as `&` in a script starts it)
    proc = subprocess.Popen([sys.executable, "-c", run], preexec_fn=ignoring, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "up"
        started = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=30) == 143
        assert got.read_text() == "SIGTERM" and time.monotonic() - started < 5  # not killed after the grace
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, ended and not yet reaped by its parent, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def test_a_progress_reader_that_fails_fails_no_task(capsys):
    """The terminal's progress reads each task's lines; a closed pipe (`oneword batch | head`) raised there, and the
    task was reported failed."""
    from oneword.pipelines.interrupt import _Tasks

    read = []

    def watch():
        def seen(line: str) -> None:
            read.append(line)
            raise BrokenPipeError

        return seen

    assert _Tasks(watch=watch).run(["sh", "-c", "echo one; echo two; exit 0"]) == 0
    assert read == ["one\n"] and "two" in capsys.readouterr().out  # read no more, the task's output all there


def _state(pid: int) -> str:
    """Process `pid`'s state letter (R, S, T: stopped, Z), or "" where it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return ""


def _until(check, what: str, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while not check():  # a state another process reaches, looked at until it does
        assert time.time() < deadline, what
        time.sleep(0.05)


@pytest.mark.parametrize("runner", ["kfp.local's task", "train's workers"])
def test_ctrl_z_stops_the_tasks_with_the_command_and_fg_resumes_them(tmp_path, runner):
    """Ctrl-Z stops the command; its tasks, in process groups of their own, went on training. Now they stop with
    it and go on with it (SIGCONT: `fg`, `bg`)."""
    ticks, pid_file = tmp_path / "ticks", tmp_path / "task.pid"
    task = (f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
            f"while True:\n    open({str(ticks)!r}, 'a').write('.')\n    time.sleep(0.02)\n")  # fmt: skip
    if runner == "kfp.local's task":
        shell = shlex.join([sys.executable, "-c", task])
        run = ("from kfp.local import subprocess_task_handler as handler\n"
               "from oneword.pipelines.interrupt import stopping\n"
               f"with stopping():\n    handler.run_local_subprocess(['sh', '-ec', {shell!r}])\n")  # fmt: skip
    else:
        run = f"import sys\nfrom oneword.processes import run_group\nrun_group([sys.executable, '-c', {task!r}])\n"
    proc = subprocess.Popen([sys.executable, "-c", run], preexec_fn=_default_sigint, stdout=subprocess.DEVNULL)
    task_group = None
    try:
        _until(lambda: pid_file.exists() and pid_file.read_text() and ticks.exists(), "the task started")
        task_pid = int(pid_file.read_text())
        task_group = os.getpgid(task_pid)  # kfp.local's: its shell's group
        os.kill(proc.pid, signal.SIGTSTP)  # as the terminal's Ctrl-Z reaches the command's group, not its tasks'
        _until(lambda: _state(proc.pid) == "T" and _state(task_pid) == "T", "the command and its task stopped")
        stopped_at = ticks.stat().st_size
        time.sleep(0.5)  # what a stopped task would have written meanwhile: nothing
        assert ticks.stat().st_size == stopped_at and _state(task_pid) == "T"
        os.kill(proc.pid, signal.SIGCONT)  # fg
        _until(lambda: ticks.stat().st_size > stopped_at, "the task went on")
        assert _state(proc.pid) in ("R", "S")
        os.kill(proc.pid, signal.SIGTERM)  # and it still ends with its command
        proc.wait(timeout=30)
        _until(lambda: not _alive(task_pid), "the task ended with the command")
    finally:
        for group in (proc.pid, task_group):  # a test that failed leaves no task behind, stopped or not
            with contextlib.suppress(ProcessLookupError, TypeError):
                os.killpg(group, signal.SIGKILL)
