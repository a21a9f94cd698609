"""`oneword bench --reference-script`: diffusers' textual-inversion script timed as a subprocess.

The real script needs torchvision, which the CPU torch build here cannot load, so these tests give the bench a
stand-in script with the same command line: it records its arguments, does work in proportion to its steps and
writes the file the real one writes. The real script ran through this code on an H100 (docs/benchmarks.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from oneword import bench, profiles
from oneword.errors import OnewordError

STAND_IN = """
import argparse, json, os, sys, time
p = argparse.ArgumentParser()
for a in ("pretrained_model_name_or_path", "train_data_dir", "learnable_property", "placeholder_token",
          "initializer_token", "resolution", "train_batch_size", "gradient_accumulation_steps", "max_train_steps",
          "learning_rate", "lr_scheduler", "lr_warmup_steps", "mixed_precision", "seed", "output_dir"):
    p.add_argument("--" + a)
p.add_argument("--scale_lr", action="store_true")
p.add_argument("--save_steps")
p.add_argument("--checkpointing_steps")
args = p.parse_args()
start = time.perf_counter() + float(os.environ.get("STAND_IN_STARTUP", 0.5))
while time.perf_counter() < start:  # start-up (imports, model loading) as long as many steps
    sum(range(1000))
with open(os.environ["STAND_IN_LOG"], "a") as f:
    f.write(json.dumps(dict(vars(args), photos=sorted(os.listdir(args.train_data_dir)))) + "\\n")
if os.environ.get("STAND_IN_FAIL"):
    sys.exit("CUDA out of memory (stand-in)")
end = time.perf_counter() + float(os.environ.get("STAND_IN_STEP", 0.02)) * int(args.max_train_steps)
while time.perf_counter() < end:  # busy work in proportion to the steps, as training is
    sum(range(1000))
os.makedirs(args.output_dir, exist_ok=True)
open(os.path.join(args.output_dir, "learned_embeds.safetensors"), "wb").close()
"""


@pytest.fixture
def stand_in(tmp_path, monkeypatch) -> Path:
    script = tmp_path / "textual_inversion.py"
    script.write_text(STAND_IN)
    monkeypatch.setenv("STAND_IN_LOG", str(tmp_path / "calls.jsonl"))
    return script


def calls(stand_in: Path) -> list[dict]:
    return [json.loads(line) for line in (stand_in.parent / "calls.jsonl").read_text().splitlines()]


def test_reference_rate_is_steps_over_the_difference_of_two_runs(stand_in, monkeypatch):
    recipe = bench.REFERENCE_RECIPES[0]
    # 50 ms a step after a 2 s start-up both runs share: 20 steps/s once start-up cancels, where the long run's
    # own rate, start-up included, is 10; the band leaves either run's process start ±0.6 s on a busy machine
    monkeypatch.setenv("STAND_IN_STARTUP", "2.0")
    monkeypatch.setenv("STAND_IN_STEP", "0.05")
    r = bench.bench_reference_script(stand_in, "some/model", recipe, 64, steps=(2, 42), device="cpu")
    assert r.steps == 40 and 14 < r.steps_per_second < 30, r.steps_per_second
    assert r.images_per_second == pytest.approx(r.steps_per_second * 4)
    assert (r.batch_size, r.grad_accum) == (1, 4) and r.name == recipe.name
    first, second = calls(stand_in)
    # the README recipe's flags, unchanged, on our model and five photos
    assert first["pretrained_model_name_or_path"] == "some/model" and first["scale_lr"]
    assert (first["train_batch_size"], first["gradient_accumulation_steps"]) == ("1", "4")
    assert (first["learning_rate"], first["lr_scheduler"], first["mixed_precision"]) == ("5.0e-04", "constant", "no")
    assert first["resolution"] == "64" and len(first["photos"]) == 5
    assert int(second["save_steps"]) > 42 and int(second["checkpointing_steps"]) > 42  # no save inside a run
    assert (first["max_train_steps"], second["max_train_steps"]) == ("2", "42")


def test_a_failing_reference_script_says_why(stand_in, monkeypatch):
    monkeypatch.setenv("STAND_IN_FAIL", "1")
    with pytest.raises(OnewordError, match="out of memory") as e:
        bench.bench_reference_script(stand_in, "m", bench.REFERENCE_RECIPES[0], 64, steps=(1, 2), device="cpu")
    assert "torchvision" in e.value.hint
    with pytest.raises(OnewordError, match="does not exist"):
        bench.bench_reference_script(stand_in.parent / "nope.py", "m", bench.REFERENCE_RECIPES[0], 64, device="cpu")


def test_bench_cli_runs_the_reference_beside_oneword(stand_in, tmp_path, capsys):
    from oneword.cli import main

    out_json = tmp_path / "b.json"
    args = ["bench", "--steps", "40", "--no-baseline", "--reference-script", str(stand_in), "--json", str(out_json)]
    main(args)
    out = capsys.readouterr().out
    rows = json.loads(out_json.read_text())
    # on a CPU only the README recipe runs (bf16 on a CPU is not what anyone runs); the ratio is printed
    assert [r["name"] for r in rows] == ["oneword", bench.REFERENCE_RECIPES[0].name]
    assert "oneword against diffusers script, README recipe (fp32)" in " ".join(out.split())
    model = Path(calls(stand_in)[0]["pretrained_model_name_or_path"])  # the tiny model oneword timed
    assert (model / "model_index.json").is_file()


def test_every_loop_trains_on_the_latents_of_the_resolution_asked_for(stand_in, tmp_path, capsys):
    """At 64 px the tiny model's VAE (which halves twice) makes 16 x 16 latents: oneword's loop, which loads no VAE,
    must train on those too, not on the 8 x 8 an SD VAE would make, or it is timed on a quarter of the work."""
    from oneword.cli import main

    out_json = tmp_path / "b.json"
    main(["bench", "--steps", "20", "--resolution", "64", "--reference-script", str(stand_in), "--json", str(out_json)])
    rows = json.loads(out_json.read_text())
    assert [r["name"] for r in rows] == ["oneword", "diffusers-example-style", bench.REFERENCE_RECIPES[0].name]
    assert [r["latent_side"] for r in rows] == [16, 16, 16]
    model_dir = Path(calls(stand_in)[0]["pretrained_model_name_or_path"])
    no_vae = bench.load_bench_model(None, parts=("unet",))
    assert no_vae.vae is None and bench.vae_factor(no_vae) == profiles.vae_factor(str(model_dir)) == 4
    assert "16 x 16 latents" in capsys.readouterr().out


def test_bench_profile_records_the_steps_and_says_where_their_time_went(tmp_path, capsys):
    import gzip

    from oneword.cli import main

    out_json = tmp_path / "b.json"
    main(["bench", "--steps", "3", "--no-baseline", "--profile", str(tmp_path / "prof"), "--json", str(out_json)])
    ops = (tmp_path / "prof" / "oneword.ops.txt").read_text()
    # the UNet's convolutions and attention are in the table; the trace opens as Chrome's trace format
    assert "convolution" in ops and "scaled_dot_product" in ops and "ms a step under the profiler" in ops
    trace = json.loads(gzip.decompress((tmp_path / "prof" / "oneword.trace.json.gz").read_bytes()))
    assert any(e.get("name") == "aten::convolution_backward" for e in trace["traceEvents"])
    (row,) = json.loads(out_json.read_text())
    assert row["profile"].startswith("oneword: ") and str(tmp_path / "prof") in row["profile"]
    assert "profile of oneword" in capsys.readouterr().out


def test_a_failing_profiler_keeps_the_loops_timing(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("CUPTI_ERROR_NOT_INITIALIZED")

    monkeypatch.setattr(bench, "record_profile", broken)
    r = bench.bench_oneword(bench.load_bench_model(None, parts=("unet",)), steps=2, warmup=1, profile_dir=tmp_path)
    assert r.steps_per_second > 0 and "the profiler failed (RuntimeError: CUPTI_ERROR_NOT_INITIALIZED)" in r.profile


def test_a_failed_loop_leaves_the_others(stand_in, tmp_path, monkeypatch, capsys):
    from oneword.cli import main

    monkeypatch.setenv("STAND_IN_FAIL", "1")
    out_json = tmp_path / "b.json"
    with pytest.raises(SystemExit) as e:  # a failed loop fails the command, after the table
        main(["bench", "--steps", "3", "--no-baseline", "--reference-script", str(stand_in), "--json", str(out_json)])
    assert e.value.code == 1
    captured = capsys.readouterr()
    assert "a loop failed" in captured.err and "out of memory" in captured.err
    assert [r["name"] for r in json.loads(out_json.read_text())] == ["oneword"]


def test_a_k_that_fails_keeps_the_figures_of_the_others(tmp_path, monkeypatch, capsys):
    from oneword.cli import main

    real = bench.bench_oneword

    def out_of_memory_at_two(model, *args, concepts: int = 1, **kwargs):
        if concepts == 2:
            raise RuntimeError("CUDA out of memory (two concepts)")
        return real(model, *args, concepts=concepts, **kwargs)

    monkeypatch.setattr(bench, "bench_oneword", out_of_memory_at_two)
    out_json = tmp_path / "b.json"
    with pytest.raises(SystemExit) as e:
        main(["bench", "--concepts", "1,2", "--steps", "2", "--no-sequential", "--json", str(out_json)])
    assert e.value.code == 1 and "two concepts" in capsys.readouterr().err
    assert [r["name"] for r in json.loads(out_json.read_text())] == ["oneword"]


@pytest.mark.slow
def test_bench_gpus_times_one_process_beside_several(tmp_path, capsys):
    """`--gpus 2` on a CPU: 1 concept in one process beside 2 concepts over 2 (gloo) processes, and the scaling."""
    from oneword.cli import main

    out_json = tmp_path / "b.json"
    main(["bench", "--steps", "6", "--gpus", "2", "--device", "cpu", "--no-baseline", "--json", str(out_json)])
    rows = json.loads(out_json.read_text())
    assert [r["name"] for r in rows] == ["oneword", "oneword, 2 concepts together, over 2 processes"]
    assert [r["batch_size"] for r in rows] == [4, 8] and all(r["images_per_second"] > 0 for r in rows)
    out = " ".join(capsys.readouterr().out.split())
    scaling = rows[1]["images_per_second"] / (2 * rows[0]["images_per_second"])
    assert f"{scaling:.0%} of linear scaling" in out


def test_a_reference_script_that_is_not_there_is_refused_before_any_loop_runs(tmp_path, capsys):
    """It was found missing after every other loop had been timed: on a GPU, the session's minutes."""
    from .test_cli import run

    code, said = run(["bench", "--reference-script", tmp_path / "textual_inversion.py", "--steps", 2], capsys)
    assert code == 2 and "textual_inversion.py' does not exist" in said
    assert "steps/s" not in said  # no loop ran
