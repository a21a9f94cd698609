"""A step's process under KFP's executor ends once its outputs are written (`oneword.step_exit`), and only then:
real `python -m kfp.dsl.executor_main` processes, as kfp.local and a cluster's launcher start them."""

import atexit
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from oneword import step_exit

COMPONENT = '''
from kfp import dsl
from kfp.dsl import *
from typing import *


def step(how: str, marker: str) -> str:
    import atexit

    import oneword  # noqa: F401  the first oneword import in a step's process, as in every component

    atexit.register(lambda: open(marker, "w").write("ran"))  # a library's own exit handler, registered after it
    if how == "raise":
        raise ValueError("no good")
    if how == "stop":
        raise SystemExit(143)  # as oneword.processes.Stopped on SIGTERM
    return how + "!"
'''


def _step(tmp_path: Path, how: str) -> tuple[subprocess.CompletedProcess, Path]:
    module = tmp_path / "component.py"
    module.write_text(COMPONENT)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    executor_input = {
        "inputs": {"parameterValues": {"how": how, "marker": str(out / "marker")}},
        "outputs": {"parameters": {"Output": {"outputFile": str(out / "Output")}},
                    "outputFile": str(out / "executor_output.json")},
    }  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", step_exit.EXECUTOR, "--component_module_path", str(module), "--function_to_execute",
         "step", "--executor_input", json.dumps(executor_input)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return done, out


def test_a_step_that_wrote_its_outputs_ends_with_them_and_its_libraries_exit_handlers(tmp_path):
    done, out = _step(tmp_path, "ok")
    assert done.returncode == 0, done.stderr
    written = json.loads((out / "executor_output.json").read_text())
    assert written["parameterValues"]["Output"] == "ok!"
    assert (out / "marker").read_text() == "ran"  # registered after oneword's: run before it ends the process
    assert "Wrote executor output file" in done.stdout  # the executor's last log line, flushed


@pytest.mark.parametrize(("how", "status", "said"), [("raise", 1, "ValueError: no good"), ("stop", 143, "")])
def test_a_step_that_failed_or_was_stopped_ends_with_its_status(tmp_path, how, status, said):
    out = tmp_path / "out"
    out.mkdir()
    stale = out / "executor_output.json"  # an earlier attempt's outputs: not this one's
    stale.write_text("{}")
    os.utime(stale, (1, 1))
    done, _ = _step(tmp_path, how)
    assert done.returncode == status and said in done.stderr
    assert (out / "marker").read_text() == "ran" and stale.read_text() == "{}"


def test_outside_a_step_nothing_changes_how_a_process_ends():
    before = atexit._ncallbacks()
    step_exit.install()  # pytest's process: not KFP's executor
    assert atexit._ncallbacks() == before


def test_the_output_file_is_read_from_either_form_of_the_argument():
    given = json.dumps({"outputs": {"outputFile": "/x/executor_output.json"}})
    assert step_exit.output_file(["e", "--executor_input", given]) == Path("/x/executor_output.json")
    assert step_exit.output_file(["e", f"--executor_input={given}"]) == Path("/x/executor_output.json")
    assert step_exit.output_file(["e", "--executor_input", "{not json"]) is None
    assert step_exit.output_file(["e"]) is None
