"""The README's Python example, run as a notebook would run it: one process, the library's functions in order,
one loaded model for evaluation and drawing (its own file, so that `make test`'s workers run it beside others)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- python-api: tests/test_python_api.py runs this very code -->"
# what makes it fast enough to run here: fewer steps and pictures, the code otherwise as the README shows it
SMALLER = {
    "TrainConfig(steps=200)": "TrainConfig(steps=10)",
    "EvalConfig(n_images=4)": "EvalConfig(n_images=1, steps=4, checkpoint_budget=0)",
    "GenerateConfig(n=4)": "GenerateConfig(n=1, steps=4)",
}


def readme_code() -> str:
    """The Python block after the marker in README.md."""
    text = README.read_text()
    assert text.count(MARKER) == 1
    found = re.search(r"```python\n(.*?)```", text[text.index(MARKER) :], re.S)
    assert found is not None
    return found.group(1)


@pytest.mark.slow
def test_the_readme_python_example_runs_and_registers_the_concept(tmp_path):
    code = readme_code()
    for shown, smaller in SMALLER.items():
        assert code.count(shown) == 1, shown  # the README changed: keep this test's settings in step with it
        code = code.replace(shown, smaller)
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = done.stdout.split()
    assert printed[-1] == "models:/my-shape/1" and Path(tmp_path, printed[-2]).stat().st_size > 0, done.stdout
    assert all(-1.0 <= float(score) <= 1.0 for score in printed[:2]), done.stdout  # CLIP cosines
    runs = tmp_path / "runs" / "notebook"
    assert (runs / "mlflow.db").is_file() and (runs / "eval" / "metrics.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # nothing written beside it
