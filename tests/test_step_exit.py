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


def step(how: str, marker: str, out: Output[Artifact]) -> str:
    import atexit

    # an exit handler registered before oneword is: skipped by the quick end, as kfp's own are
    atexit.register(lambda: open(marker + ".before", "w").write("ran"))

    import oneword  # noqa: F401  the first oneword import in a step's process, as in every component

    atexit.register(lambda: open(marker, "w").write("ran"))  # a library's own exit handler, registered after it
    if how == "raise":
        raise ValueError("no good")
    if how == "stop":
        raise SystemExit(143)  # as oneword.processes.Stopped on SIGTERM
    if how == "unwritable":
        out.metadata["x"] = object()  # the executor opens its output file, then fails to write it
    return how + "!"
'''


def _step(tmp_path: Path, how: str) -> tuple[subprocess.CompletedProcess, Path]:
    module = tmp_path / "component.py"
    module.write_text(COMPONENT)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    artifact = {"artifacts": [{"name": "out", "type": {"schemaTitle": "system.Artifact"}, "uri": str(out / "a")}]}
    executor_input = {
        "inputs": {"parameterValues": {"how": how, "marker": str(out / "marker")}},
        "outputs": {"parameters": {"Output": {"outputFile": str(out / "Output")}}, "artifacts": {"out": artifact},
                    "outputFile": str(out / "executor_output.json")},
    }  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", step_exit.EXECUTOR, "--component_module_path", str(module), "--function_to_execute",
         "step", "--executor_input", json.dumps(executor_input)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return done, out


def test_a_step_that_wrote_its_outputs_ends_there_after_its_libraries_exit_handlers(tmp_path):
    done, out = _step(tmp_path, "ok")
    assert done.returncode == 0, done.stderr
    written = json.loads((out / "executor_output.json").read_text())
    assert written["parameterValues"]["Output"] == "ok!"
    assert (out / "marker").read_text() == "ran"  # registered after oneword's: run before it ends the process
    assert not (out / "marker.before").exists()  # registered before: the process ended without Python's own end
    assert "Wrote executor output file" in done.stdout  # the executor's last log line, flushed


@pytest.mark.parametrize(("how", "status", "said"), [
    ("raise", 1, "ValueError: no good"),
    ("stop", 143, ""),
    ("unwritable", 1, "TypeError"),  # its output file written, but not whole: a failure still
])  # fmt: skip
def test_a_step_that_failed_or_was_stopped_ends_as_python_ends_with_its_status(tmp_path, how, status, said):
    out = tmp_path / "out"
    out.mkdir()
    stale = out / "executor_output.json"  # an earlier attempt's outputs: not this one's
    stale.write_text("{}")
    os.utime(stale, (1, 1))
    done, _ = _step(tmp_path, how)
    assert done.returncode == status and said in done.stderr, done.stderr[-2000:]
    assert (out / "marker").read_text() == (out / "marker.before").read_text() == "ran"  # every exit handler
    if how != "unwritable":
        assert stale.read_text() == "{}"


def test_every_component_imports_oneword_before_any_library_that_registers_exit_handlers():
    """Exit handlers registered before oneword's (a third-party import, or multiprocessing's) would be skipped."""
    import ast

    source = (Path(step_exit.__file__).parent / "pipelines" / "components.py").read_text()
    checked = 0
    for node in ast.parse(source).body:
        if not (isinstance(node, ast.FunctionDef) and any("component" in ast.unparse(d) for d in node.decorator_list)):
            continue
        imports = [n for n in ast.walk(node) if isinstance(n, ast.Import | ast.ImportFrom)]
        imports.sort(key=lambda n: n.lineno)
        names = [n.module if isinstance(n, ast.ImportFrom) else n.names[0].name for n in imports]
        first = next(i for i, name in enumerate(names) if name.split(".")[0] == "oneword")
        for name in names[:first]:
            top = name.split(".")[0]
            assert top in sys.stdlib_module_names and top not in {"multiprocessing", "concurrent", "tempfile"}, (
                node.name, name)  # fmt: skip
        checked += 1
    assert checked >= 10


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
