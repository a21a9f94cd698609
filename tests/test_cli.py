"""Every subcommand runs on its own, end to end, and bad input exits 2 with a message and a hint."""

import json
import os
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from oneword import embeddings as E
from oneword.cli import main

from .conftest import DREAMBENCH, free_port


def run(args, capsys):
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out + out.err


def test_steps_one_by_one(tiny_model_dir, tmp_path, capsys, monkeypatch):
    data, lat, trained = tmp_path / "data", tmp_path / "lat", tmp_path / "train"
    assert run(["preprocess", DREAMBENCH / "dog", "-o", data, "--resolution", 32], capsys)[0] == 0
    code, out = run(["cache-latents", data, "-o", lat, "--base-model", tiny_model_dir], capsys)
    assert code == 0 and "latents.safetensors" in out
    code, out = run(
        [
            "train",
            lat,
            "--token",
            "<dog-c>",
            "--init-word",
            "dog",
            "-o",
            trained,
            "--steps",
            6,
            "--checkpoint-every",
            3,
        ],
        capsys,
    )
    assert code == 0, out
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["concept"]["token"] == "<dog-c>"
    code, out = run(
        [
            "train",
            lat,
            "--token",
            "<dog-c>",
            "--init-word",
            "dog",
            "-o",
            trained,
            "--steps",
            9,
            "--checkpoint-every",
            3,
            "--resume",
        ],
        capsys,
    )
    assert code == 0 and json.loads((trained / "summary.json").read_text())["steps"] == 9
    assert "<dog-c> trained steps 7-9 (" in out, out
    again = ["train", lat, "--token", "<dog-c>", "--init-word", "dog", "-o", trained, "--steps", 9, "--resume"]
    code, out = run(again, capsys)  # at the end already: not "trained for 9 steps (0.0 steps/s)"
    assert code == 0 and "was trained for 9 steps already" in " ".join(out.split()) and "0.0 steps/s" not in out, out
    code, out = run(
        ["export", trained / "learned_embeds.safetensors", "--format", "a1111", "-o", tmp_path / "dog.pt"], capsys
    )
    assert code == 0 and E.load(tmp_path / "dog.pt").token == "<dog-c>"
    assert "in A1111 prompts: dog" in out and "warning: 'dog' is a word of the model" in out and "dog-ti.pt" in out
    # a file for sharing names its model, not the folder it was kept in; the run's own file keeps where it is
    assert E.load(tmp_path / "dog.pt").meta["model_source"] == Path(tiny_model_dir).name
    torch_file = torch.load(tmp_path / "dog.pt", weights_only=True)
    assert str(tiny_model_dir) not in repr(torch_file) and torch_file["sd_checkpoint_name"] == Path(tiny_model_dir).name
    code, out = run(["generate", "a photo of <dog-c>", "-e", tmp_path / "dog.pt", "-o", tmp_path / "no"], capsys)
    assert code != 0 and "names the model it was trained on" in " ".join(out.split()) and "--base-model" in out, out
    code, out = run(
        [
            "generate",
            "a photo of <dog-c>",
            "-e",
            trained / "learned_embeds.safetensors",  # no --base-model: the model the file records it was trained on
            "-o",
            tmp_path / "gen",
            "--n",
            2,
            "--steps",
            3,
        ],
        capsys,
    )
    assert code == 0 and (tmp_path / "gen" / "grid.png").exists()
    # each picture says what drew it, where A1111's PNG Info, ComfyUI and image sites look
    text = Image.open(tmp_path / "gen" / "p00_s1.png").text
    assert text["parameters"].startswith("a photo of <dog-c>\nSteps: 3, Sampler: DDIM, CFG scale: ")
    assert "Seed: 1, Size: 32x32" in text["parameters"]
    said = json.loads(text["oneword"])
    assert (said["seed"], said["steps"], said["tokens"]) == (1, 3, ["<dog-c>"])
    assert said["base_model"] == tiny_model_dir.name  # a local path by its name: no home folder on image sites
    # without -o, each call draws into a folder of its own: an earlier call's pictures are never replaced
    monkeypatch.chdir(tmp_path)
    for expected in ("0001", "0002"):
        code, out = run(["generate", "a photo of <dog-c>", "-e", trained / "learned_embeds.safetensors", "--n", 1,
                         "--steps", 2], capsys)  # fmt: skip
        assert code == 0 and f"generated/{expected}/grid.png" in " ".join(out.split()), out
    # a call that fails leaves no empty numbered folder behind
    code, out = run(["generate", "a photo of <dog-c>", "-e", tmp_path / "no-such.pt", "--n", 1], capsys)
    assert code == 2 and "no-such.pt" in out, out
    assert {p.name for p in (tmp_path / "generated").iterdir() if p.is_dir()} == {"0001", "0002"}


def test_numbered_folders_are_one_per_process(tmp_path):
    """Calls of `generate` started at once (a shell loop's `&`) each draw into a folder of their own."""
    import subprocess
    import sys
    import time

    code = (
        "import sys, time; from pathlib import Path; from oneword.cli.generate import next_folder\n"
        "time.sleep(max(0.0, float(sys.argv[1]) - time.time()))\n"  # all start together
        "print(next_folder(Path(sys.argv[2])).name)"
    )
    start = time.time() + 3
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(start), str(tmp_path / "generated")], stdout=subprocess.PIPE, text=True
        )
        for _ in range(6)
    ]
    names = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert sorted(names) == [f"{i:04d}" for i in range(1, 7)], names
    # a call moving its pictures in (storage.atomic_dir) has `0007` aside for a moment: the number stays taken
    from oneword.cli.generate import next_folder

    for n in (7, 8):
        (tmp_path / "generated" / f".{n:04d}.tmp-x").mkdir()
    (tmp_path / "generated" / ".0009.lock").touch()
    assert next_folder(tmp_path / "generated").name == "0010"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["preprocess", "/no/such/dir", "-o", "{tmp}/x"], "does not exist"),
        (["cache-latents", "{data}", "-o", "{tmp}/x", "--base-model", "/no/model"], "not found"),
        (["cache-latents", "{tmp}", "-o", "{tmp}/x"], "run `oneword preprocess`"),
        (["export", "{tmp}/missing.pt", "--format", "kohya"], "not found"),
        (["export", "{tmp}/missing.pt", "--format", "onnx"], "unknown format"),
        (
            ["compare", "{tmp}/runs/lr-low/eval", "-o", "{tmp}/c.png"],
            "evaluation folder {tmp}/runs/lr-low/eval not found",
        ),
    ],
)
def test_bad_input_exits_2_with_a_message(args, message, tmp_path, cat_dataset, capsys):
    code, out = run([a.format(tmp=tmp_path, data=cat_dataset) for a in args], capsys)
    assert code == 2 and "error:" in out and message.format(tmp=tmp_path) in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "--images", "x"], "Missing option '--token'"),
        (["batch", "m.yaml", "--steps", "abc"], "Invalid value for '--steps'"),
        (["concepts", "erase"], "No such command"),
        (["bench", "--concepts", "1,x"], "Invalid value for '--concepts'"),
        # the plan step's checks, made here before kfp.local starts (it said only "Inner task failed: 'plan-concept'")
        (["run", "--images", "x", "--token", "<a>", "--init-word", "a", "--name", "my cat"], "is not one oneword can"),
        (
            ["run", "--images", "x", "--token", "<a>", "--init-word", "a", "--n-vectors", "0"],
            "invalid setting: n_vectors",
        ),
        (["batch", "/no/such/concepts.yaml"], "concepts manifest /no/such/concepts.yaml not found"),
        # an empty photo folder was the working folder, whatever it held
        (["run", "--images", "", "--token", "<a>", "--init-word", "a"], "images: is empty"),
        (["run", "--images", "x", "--token", "", "--init-word", "a"], "token: is empty"),  # it blamed --name
        (["run", "--images", "x", "--token", "<a b>", "--init-word", "a"], "token: '<a b>' is not one word"),
        (["preflight", "--images", "x", "--token", "<a>"], "needs --init-word too"),  # it checked no concept
        (["preflight", "--images", "x", "--token", "", "--init-word", "a"], "- '': image folder x does not"),
        (
            ["train", "/d", "--token", "<a>", "--init-word", "a", "-o", "/o", "--batch-size", "0"],
            "invalid setting: batch_size: Input should be greater than or equal to 1 (got 0)",
        ),
        (
            [
                "train",
                "/d",
                "--token",
                "<a>",
                "--init-word",
                "a",
                "-o",
                "/o",
                "--precision",
                "bf32",
                "--compile",
                "on",
            ],
            "invalid settings: precision: Input should be 'auto', 'bf16', 'fp16' or 'fp32' (got 'bf32'); compile:",
        ),
        (["register", "/t", "--eval", "/e", "--min-reconstruction", "70"], "min_reconstruction: Input should be"),
    ],
)
def test_usage_errors_exit_2_without_a_traceback(args, message, capsys):
    code, out = run(args, capsys)
    assert code == 2 and message in out and "Traceback" not in out


def test_the_batch_report_fits_80_columns_and_says_what_failed_by_its_exit_status():
    from rich.console import Console

    from oneword.cli.run import print_batch_report

    ok = {"name": "cat-q", "status": "registered", "version": "3", "alias": "champion", "reconstruction": 0.613,
          "editability": 0.2}  # fmt: skip
    bad = {
        "name": "a-very-long-concept-name-from-a-manifest",
        "status": "failed",
        "stage": "preprocess",
        "error": "photos/a.jpg: cannot identify image file; every other photo of the folder was skipped " * 2,
        "hint": "copy the photos again",
    }
    report = {"batch_id": "b-1", "registered": 1, "failed": 1, "concepts": [ok, bad], "run_dir": "/r" * 50}
    console = Console(width=80, record=True)
    assert print_batch_report(report, console) == 1
    text = console.export_text()
    assert max(len(line) for line in text.splitlines() if "run_dir" not in line) <= 80
    # rich crops what does not fit an 80-column line: every word of the error must still be there, folded
    assert set(bad["error"].split()) <= set(text.split())
    assert "(fix: copy the photos again)" in " ".join(text.split())  # the fix the step gave, as --dry-run says it
    assert "champion" in text and "a-very-long" in text and "1 registered, 0 unchanged, 1 failed" in text
    assert "cat-q registered 3 0.61 0.20 champion" in " ".join(text.split()), text  # its scores, as `concepts list`
    assert "versions      oneword concepts list --batch b-1" in text  # what the batch registered, to ask later
    # a new version that is no champion says why; a champion's own reason is left out as expected
    gate = "editability 0.2100 < threshold 0.2500"
    candidate = {"name": "dog-q", "status": "registered", "version": "2", "alias": "candidate", "gate": gate}
    console = Console(width=80, record=True)
    print_batch_report({**report, "concepts": [{**ok, "gate": "the first champion"}, candidate]}, console)
    text = " ".join(console.export_text().split())
    assert f"candidate; {gate}" in text and "the first champion" not in text, text
    # with a team's long names beside scores, no letter of the reason is cropped at the edge
    long = {**candidate, "name": "team-a-product-photos-" + "x" * 16, "reconstruction": 0.5, "editability": -0.12,
            "version": "1234", "gate": "not better than the champion: reconstruction 0.500 vs 0.510"}  # fmt: skip
    console = Console(width=80, record=True)
    print_batch_report({**report, "concepts": [long, bad]}, console)
    text = console.export_text()
    assert max(len(line) for line in text.splitlines() if "run_dir" not in line) <= 80
    words = set(text.split())
    assert set(long["gate"].split()) <= words and set(bad["error"].split()) <= words, text
    assert print_batch_report({**report, "failed": 0, "concepts": [ok]}, Console(width=80, file=None)) == 0
    # a concept a cluster run left to the next (max_concepts_per_run) is not a failure
    later = {"name": "dog-q", "status": "deferred", "version": None, "alias": None, "stage": None,
             "error": "changed, and left to the manifest's next run (max_concepts_per_run)"}  # fmt: skip
    console = Console(width=80, record=True)
    assert print_batch_report({**report, "failed": 0, "deferred": 1, "concepts": [ok, later]}, console) == 0
    text = console.export_text()
    assert "deferred" in text and "left to the manifest's next run" in " ".join(text.split())
    assert "1 registered, 0 unchanged, 0 failed, 1 deferred" in text
    assert max(len(line) for line in text.splitlines() if "run_dir" not in line) <= 80
    unplanned = {"batch_id": "b-2", "registered": 0, "failed": 0, "concepts": [], "error": "no plan was recorded",
                 "logs": "runs/kfp/logs/b-2.log"}  # fmt: skip
    console = Console(width=80, record=True)
    assert print_batch_report(unplanned, console) == 2
    assert "logs          runs/kfp/logs/b-2.log" in console.export_text()  # where to see why


def test_export_and_blend_never_replace_a_file_unasked(tmp_path, capsys):
    a = E.Embedding("<a>", torch.ones(1, 32), {})
    E.save(a, tmp_path / "learned_embeds.safetensors")  # concept a's file, under diffusers' shared default name
    E.save(E.Embedding("<b>", torch.zeros(1, 32), {}), tmp_path / "b.pt", "a1111")
    code, out = run(["export", tmp_path / "b.pt", "-f", "diffusers"], capsys)
    assert code == 2 and "already exists" in out and "--force" in out
    assert E.load(tmp_path / "learned_embeds.safetensors").token == "<a>"
    (tmp_path / "folder").mkdir()  # a folder is refused as such, --force or not: it leaves no debris there
    code, out = run(["export", tmp_path / "b.pt", "-f", "kohya", "-o", tmp_path / "folder", "--force"], capsys)
    assert code == 2 and "is a folder" in out and list((tmp_path / "folder").iterdir()) == []
    assert run(["export", tmp_path / "b.pt", "-f", "diffusers", "--force"], capsys)[0] == 0
    assert E.load(tmp_path / "learned_embeds.safetensors").token == "<b>"
    code, out = run(["blend", tmp_path / "b.pt", tmp_path / "learned_embeds.safetensors", "--token", "<ab>",
                     "-o", tmp_path / "b.pt"], capsys)  # fmt: skip
    assert code == 2 and "one of the concepts blended" in out
    # a new token is checked as training checks one: a word the vocabulary has, spaces, an empty one
    for token, said in (("star", "already in the vocabulary"), ("bad token", "no spaces"), ("", "no spaces")):
        out_file = tmp_path / "t.safetensors"
        code, out = run(["export", tmp_path / "b.pt", "-f", "kohya", "--token", token, "-o", out_file], capsys)
        assert code == 2 and said in out, out
        code, out = run(["blend", tmp_path / "b.pt", tmp_path / "learned_embeds.safetensors", "--token", token,
                         "-o", tmp_path / "ab.safetensors"], capsys)  # fmt: skip
        assert code == 2 and said in out, out
    assert not (tmp_path / "t.safetensors").exists() and not (tmp_path / "ab.safetensors").exists()


def test_an_sdxl_pair_exports_to_diffusers_as_its_two_files(tmp_path, capsys):
    xl = E.Embedding("<xl>", torch.randn(1, 32), {}, torch.randn(1, 64))
    E.save(xl, tmp_path / "xl.safetensors", "kohya")
    (tmp_path / "out_2.safetensors").write_bytes(b"another concept's")  # half of the pair's place is taken
    code, out = run(["export", tmp_path / "xl.safetensors", "-f", "diffusers", "-o", tmp_path / "out.safetensors"],
                     capsys)  # fmt: skip
    assert code == 2 and "out_2.safetensors already exists" in out and not (tmp_path / "out.safetensors").exists()
    (tmp_path / "out_2.safetensors").unlink()
    code, out = run(["export", tmp_path / "xl.safetensors", "-f", "diffusers", "-o", tmp_path / "out.safetensors"],
                     capsys)  # fmt: skip
    assert code == 0 and "out.safetensors and" in out and "text_encoder=pipe.text_encoder_2" in out, out
    back = E.load(tmp_path / "out.safetensors")
    assert back.token == "<xl>" and torch.equal(back.vectors_2, xl.vectors_2)


def test_bad_initializer_through_the_cli(cat_latents_dir, tmp_path, capsys):
    code, out = run(["train", cat_latents_dir, "--token", "<q>", "--init-word", "xylophonist", "-o", tmp_path], capsys)
    assert code == 2 and "splits into" in out and "hint:" in out
    assert not (tmp_path / "learned_embeds.safetensors").exists()


def test_bench_prints_figures(capsys):
    code, out = run(["bench", "--steps", 3], capsys)
    assert code == 0 and "steps/s" in out and "oneword against diffusers-example-style" in out


def test_bench_concepts_together_beside_one_after_another(tmp_path, capsys):
    import json

    out_json = tmp_path / "bench.json"
    code, out = run(["bench", "--concepts", "1,2", "--steps", 3, "--json", str(out_json)], capsys)
    assert code == 0 and "steps/s" in out and "together" in out
    rows = {r["name"]: r for r in json.loads(out_json.read_text())}
    assert set(rows) == {"oneword", "oneword, 2 concepts together", "oneword, 2 concepts one after another"}
    together, apart = rows["oneword, 2 concepts together"], rows["oneword, 2 concepts one after another"]
    assert together["batch_size"] == 8 and apart["batch_size"] == 4
    assert together["images_per_second"] == pytest.approx(together["steps_per_second"] * 8)
    assert apart["images_per_second"] == pytest.approx(apart["steps_per_second"] * 4)


def test_train_group_through_the_cli(cat_latents_dir, tmp_path, capsys):
    group = tmp_path / "group.yaml"
    rows = [("cat", "<cli-a>", "cat"), ("bad", "<cli-b>", "xylophonist")]
    group.write_text(
        "".join(f"- {{name: {n}, latents: {cat_latents_dir}, token: '{t}', init_word: {w}}}\n" for n, t, w in rows)
    )
    code, out = run(["train", "--concepts", group, "-o", tmp_path / "out", "--steps", 2], capsys)
    assert code == 2 and "<cli-a> trained" in out and "<cli-b> failed" in out and "splits into" in out
    assert (tmp_path / "out" / "cat" / "learned_embeds.safetensors").exists()
    code, out = run(["train", "-o", tmp_path / "x", "--token", "<q>"], capsys)
    assert code == 2 and "--concepts" in out
    for text, message in (
        ("- [\n", f"concepts file {group} is not valid YAML, line 2, column 1"),
        ("- just-a-string\n", "is 'just-a-string', not a mapping of fields"),
        # a field's typo is named with the one meant, as a manifest's is, not a bare KeyError or pydantic's dump
        (f"- {{name: a, latent: {cat_latents_dir}, token: '<e>', init_word: cat}}\n",
         "missing field 'latents'; unknown field 'latent' (did you mean 'latents'?)"),
        (f"- {{name: a, latents: {cat_latents_dir}, token: '<e>', init_word: cat, n_vector: 2}}\n",
         "unknown field 'n_vector' (did you mean 'n_vectors'?)"),
        (f"- {{name: a, latents: {cat_latents_dir}, token: '<e>', init_word: cat, 1: 2}}\n",
         "key 1 is not a field's name"),
        (f"- {{name: ../escape, latents: {cat_latents_dir}, token: '<e>', init_word: cat}}\n", "'../escape'"),
        (f"- {{name: '', latents: {cat_latents_dir}, token: '<e>', init_word: cat}}\n", "its name is empty"),
    ):
        group.write_text(text)
        code, out = run(["train", "--concepts", group, "-o", tmp_path / "y", "--steps", 2], capsys)
        assert code == 2 and message in out and "Traceback" not in out and "pydantic" not in out, (text, out)
    assert not (tmp_path / "escape").exists()


def test_bench_eval_draws_the_pictures_asked_for(tmp_path, capsys):
    import json

    out_json = tmp_path / "bench.json"
    code, out = run(["bench", "--eval", "--steps", 2, "--eval-images", 4, "--json", str(out_json)], capsys)
    assert code == 0 and "images/s" in out
    (r,) = json.loads(out_json.read_text())
    assert r["name"] == "evaluation (2 DDIM steps)" and r["steps"] == 4 and r["images_per_second"] > 0
    # an odd count is drawn as asked (rounded up to whole prompts), and the rate is of what was drawn
    for asked, drawn in ((3, 4), (1, 1)):
        code, out = run(["bench", "--eval", "--steps", 2, "--eval-images", asked, "--json", str(out_json)], capsys)
        (r,) = json.loads(out_json.read_text())
        assert code == 0 and r["steps"] == drawn and r["images_per_second"] == pytest.approx(drawn / r["seconds"])


@pytest.mark.parametrize(("stop", "status", "said"), [("SIGINT", 130, "interrupted"),
                                                      ("SIGTERM", 143, "stopped by SIGTERM")])  # fmt: skip
def test_ctrl_c_in_train_says_what_was_kept_and_how_to_go_on(cat_latents_dir, tiny_model_dir, tmp_path, stop,
                                                             status, said):  # fmt: skip
    """Ctrl-C (SIGINT, to a real process) left a blank line and status 130: now the newest checkpoint is named
    and the command that continues from it is printed, whole, ready to paste. A SIGTERM (`timeout`, `kill`) ended
    it with nothing said: the same now, with its status."""
    import shlex
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    out = tmp_path / "out"
    args = ["train", str(cat_latents_dir), "--token", "<ctrl-c>", "--init-word", "cat", "-o", str(out), "--base-model",
            str(tiny_model_dir), "--steps", "100000", "--checkpoint-every", "2", "--device", "cpu"]  # fmt: skip
    # a job started in the background by a shell (CI's, say) inherits SIGINT ignored, and Python then leaves it so:
    # the process gets the disposition of one started at a terminal
    proc = subprocess.Popen([str(Path(sys.executable).parent / "oneword"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints" / "step-000004.pt").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(getattr(signal, stop))
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()  # never left training 100,000 steps behind a failed assertion
    assert proc.returncode == status, err[-2000:]
    newest = max(int(p.stem.split("-")[1]) for p in (out / "checkpoints").glob("step-*.pt"))
    assert f"{said}: the training stopped; its newest checkpoint is step {newest}." in err, err[-2000:]
    again = next(line for line in err.splitlines() if line.startswith("to continue: "))
    assert shlex.split(again.removeprefix("to continue: ")) == ["oneword", *args, "--resume"]
    assert "Traceback" not in err


def test_ctrl_c_before_any_checkpoint_says_to_start_again_not_resume(tmp_path, capsys, monkeypatch):
    import typer

    from oneword.cli import STATE
    from oneword.cli.train import _interrupted

    monkeypatch.setitem(STATE, "argv", ["train", "lat", "--token", "<t>", "--init-word", "cat", "--resume"])
    with pytest.raises(typer.Exit) as stopped, _interrupted(tmp_path / "checkpoints", listed=True):
        raise KeyboardInterrupt
    err = capsys.readouterr().err
    assert stopped.value.exit_code == 130 and "no checkpoint was written yet" in err, err
    assert "to start again: oneword train lat --token '<t>' --init-word cat" in err and "--resume" not in err, err


def test_evaluate_finds_the_training_images_in_the_training_folder(evaluated_concept, tiny_clip_dir, tmp_path, capsys):
    train_dir, _ = evaluated_concept
    args = ["evaluate", train_dir, "-o", tmp_path / "eval", "--n-images", 1, "--sampling-steps", 2,
            "--checkpoint-budget", 0, "--clip-model", tiny_clip_dir, "--no-baselines"]  # fmt: skip
    code, out = run(args, capsys)
    assert code == 0, out
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["n_images"] == 1


def test_generate_with_a_registered_concept(
    evaluated_concept, mlflow_server, tiny_model_dir, tmp_path, capsys, monkeypatch
):
    from oneword import registry

    train_dir, eval_dir = evaluated_concept
    registry.register(train_dir, eval_dir, mlflow_server, name="cat-cli")
    code, out = run(
        [
            "generate",
            "a photo of <cat-r>",
            "--concept",
            "cat-cli@champion",
            "--tracking-uri",
            mlflow_server,
            "-o",
            tmp_path / "gen",
            "--n",
            1,
            "--steps",
            2,
        ],
        capsys,
    )
    assert code == 0, out
    assert (tmp_path / "gen" / "grid.png").exists()  # base model found from the registry, by reference
    code, out = run(["concepts", "list", "--tracking-uri", mlflow_server, "--json"], capsys)
    assert code == 0 and '"cat-cli"' in out
    # In an 80-column terminal the table keeps a long name and the token whole.
    registry.register(train_dir, eval_dir, mlflow_server, name="purple-star-watercolour-v2")
    monkeypatch.setenv("COLUMNS", "80")
    capsys.readouterr()  # what registering printed
    code, out = run(["concepts", "list", "--tracking-uri", mlflow_server], capsys)
    assert code == 0 and "purple-star-watercolour-v2" in out and "<cat-r>" in out, out
    table = [line for line in out.splitlines() if "purple-star-watercolour-v2" in line or "recon" in line]
    assert len(table) == 2 and max(len(line) for line in table) <= 80, out


def test_errors_print_message_and_hint_and_verbose_adds_the_traceback(tmp_path, capsys):
    code, out = run(["preprocess", tmp_path / "no-photos", "-o", tmp_path / "data"], capsys)
    assert code == 2 and "error:" in out and "no-photos" in out and "Traceback" not in out, out
    code, out = run(["--verbose", "preprocess", tmp_path / "no-photos", "-o", tmp_path / "data"], capsys)
    assert code == 2 and "Traceback" in out and "no-photos" in out, out
    code, out = run(["preprocess", tmp_path / "no-photos", "-o", tmp_path / "data", "--verbose"], capsys)
    assert code == 2 and "Traceback" in out and "No such option" not in out, out  # added at the end, to rerun


def test_profiles_table_fits_80_columns(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    code, out = run(["profiles"], capsys)
    assert code == 0 and all(f in out for f in ("toyworld", "sd1", "sd2", "sdxl", "openai/clip-vit-base-patch32"))
    assert max(len(line) for line in out.splitlines()) <= 80
    assert "CLIP evaluator of sd1, sd2, sdxl: openai/clip-vit-base-patch32" in out  # one line, not a centred fold
    code, out = run(["profiles", "--base-model", "toyworld"], capsys)
    assert code == 0 and "400" in out and "CLIP evaluator of toyworld: toyworld-clip" in out
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a mistyped folder reads as a hub id: not sd1's profile, shown as its
    code, out = run(["profiles", "--base-model", "models/no-such"], capsys)
    assert code == 2 and "could not read the config files of base model 'models/no-such'" in out


def _commands(group=None, prefix=()):
    """Every command of the CLI, as its words: ("train",), ("concepts", "list"), ..."""
    import typer.main

    from oneword.cli.app import app

    group = group or typer.main.get_command(app)
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            yield from _commands(cmd, (*prefix, name))
        else:
            yield (*prefix, name)


def test_help_reads_whole_in_an_80_column_terminal(capsys, monkeypatch):
    """Summaries uncut, examples one command a line (copyable, within 80 columns), and no host, path or flag
    broken at a hyphen or inside a word."""
    monkeypatch.setenv("COLUMNS", "80")
    for group in ((), ("concepts",), ("toyworld",)):
        code, out = run([*group, "--help"], capsys)
        listing = out.split("Commands:")[1]
        assert code == 0 and "..." not in listing, out
    checked = 0
    for words in _commands():
        code, out = run([*words, "--help"], capsys)
        assert code == 0, (words, out)
        example = out.split("Example")[1].split("\n\n")[0] if "Example" in out else ""
        assert all(len(line) <= 80 for line in example.splitlines()), (words, example)
        assert not any(line.rstrip().endswith("-") for line in out.splitlines()), (words, out)
        assert not re.search(r"\[default:$", out, re.M), (words, out)  # its value alone on the next line
        checked += 1
    assert checked >= 25
    _, out = run(["submit", "--help"], capsys)
    assert "http://ml-pipeline-ui.kubeflow" in out and "s3://oneword-artifacts/pipeline-root, on" in out
    _, out = run(["generate", "--help"], capsys)
    assert "-e runs/my-cat/eval/embedding/learned_embeds.safetensors" in out and "<list[Path]>" not in out


def test_a_registry_that_does_not_answer_is_said_in_seconds_without_a_traceback(capsys, monkeypatch):
    """MLflow's client retries 7 times with backoff: `concepts list` waited almost 5 minutes, then a traceback."""
    import os

    from oneword.tracking import QUERY_HTTP

    for key in QUERY_HTTP:  # unset, as a shell's are
        monkeypatch.delenv(key, raising=False)
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    code, out = run(["concepts", "list", "--tracking-uri", url], capsys)
    assert code == 2 and "error: MLflow: " in out and "check --tracking-uri" in out and "Traceback" not in out
    assert f"{url} did not answer: Connection refused" in out and "Max retries" not in out  # not urllib3's 400 chars
    assert not any(key in os.environ for key in QUERY_HTTP)  # the command's own: not left to what runs next
    # a server whose queue of connections is full (or a network policy that drops them): the connection times
    # out, which MLflow words in its own way
    import socket

    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    waiting = [socket.socket() for _ in range(3)]
    for w in waiting:
        w.setblocking(False)
        w.connect_ex(full.getsockname())
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    try:
        url = f"http://127.0.0.1:{full.getsockname()[1]}"
        code, out = run(["concepts", "list", "--tracking-uri", url], capsys)
    finally:
        for sock in (full, *waiting):
            sock.close()
    assert code == 2 and f"{url} did not answer: Connection to 127.0.0.1 timed out" in out, out


def test_a_password_in_the_tracking_uri_is_never_printed_logged_or_kept(mlflow_server, capsys, monkeypatch, tmp_path):
    """MLflow takes `http://user:password@host` as basic auth: errors, hints, log lines and registration.json
    quoted it whole, and a step's log and KFP's artifact metadata are read by everyone who sees the run."""
    import logging

    from oneword import registry
    from oneword.tracking import QUERY_HTTP, HideCredentials, shown

    for key in QUERY_HTTP:
        monkeypatch.delenv(key, raising=False)
    secret = "S3cr3tPW"
    closed = f"http://alice:{secret}@127.0.0.1:{free_port()}"
    code, out = run(["concepts", "list", "--tracking-uri", closed], capsys)
    assert code == 2 and "did not answer: Connection refused" in out and secret not in out, out
    with_password = mlflow_server.replace("http://", f"http://alice:{secret}@")
    code, out = run(["concepts", "show", "no-such-concept", "--tracking-uri", with_password], capsys)
    assert code == 2 and mlflow_server in out and secret not in out, out  # the server answered, with the password
    code, out = run(["concepts", "list", "no-such-*", "--tracking-uri", with_password], capsys)
    assert f"in the registry at {mlflow_server}" in out and secret not in out, out
    record = logging.LogRecord("oneword", logging.WARNING, __file__, 1, "could not log to %s: %s", (closed, "x"), None)
    assert HideCredentials().filter(record) and secret not in record.getMessage() and "127.0.0.1" in record.getMessage()
    unfit = logging.LogRecord("oneword", logging.WARNING, __file__, 1, "bad %d %d", (1,), None)
    assert HideCredentials().filter(unfit)  # left to logging's handler to say, as without the filter: no raise
    assert shown("http://u:p@ss@host:5000/api") == "http://host:5000/api"  # a password may hold an @
    from oneword.outcome import write_failure

    said = write_failure(tmp_path, "register", f"MlflowException: API request to {closed}/api failed", f"see {closed}")
    assert secret not in json.dumps(said) and secret not in (tmp_path / "failure.json").read_text()
    kept = registry.Registration("cat", "1", "champion", "", "r", "models:/cat/1", with_password).as_dict()
    assert kept["tracking_uri"] == mlflow_server
    for untouched in ("models:/cat@champion", "s3://bucket/a@b.tar", "runs:/abc/embedding"):
        assert shown(untouched) == untouched


def test_a_server_that_answers_only_errors_or_speaks_no_tls_is_said_as_such(capsys, monkeypatch):
    """Said as "did not answer: no answer" (a server answering 503 again and again, a TLS handshake refused)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Busy(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(503)
            self.end_headers()

        def log_message(self, *args):
            pass

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")  # no test sleeps on a backoff
    server = ThreadingHTTPServer(("127.0.0.1", 0), Busy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        code, out = run(["concepts", "list", "--tracking-uri", f"http://127.0.0.1:{port}"], capsys)
        assert code == 2 and f"http://127.0.0.1:{port} answered HTTP 503 at every attempt" in out, out
        code, out = run(["concepts", "list", "--tracking-uri", f"https://127.0.0.1:{port}"], capsys)
        assert code == 2 and f"https://127.0.0.1:{port}: TLS failed: wrong version number" in out, out
    finally:
        server.shutdown()


def test_the_concept_card_says_the_learning_rate_the_option_took_and_the_one_the_steps_used():
    from oneword.cli.concepts import _learning_rate

    run = {"train.learning_rate": "0.005", "train.learning_rate_used": "0.02", "train.scale_lr": "True"}
    assert _learning_rate(run | {"learning_rate": "None"}) == "learning rate 0.02 (base 0.005, scaled by the batch)"
    # the concept's own rate, from its manifest, is the base it was scaled from
    assert _learning_rate(run | {"learning_rate": "0.002", "train.learning_rate_used": "0.008"}) == (
        "learning rate 0.008 (base 0.002, scaled by the batch)")
    assert _learning_rate(run | {"train.scale_lr": "False", "train.learning_rate_used": "0.005"}) == (
        "learning rate 0.005")  # nothing scaled, nothing said of it
    assert _learning_rate({}) == ""


def test_the_concept_card_of_one_image_a_prompt_shows_no_nan_error_bar():
    """One image a prompt has no spread to measure: the card said `reconstruction 0.545 ± nan`."""
    from rich.console import Console

    from oneword.cli.concepts import concept_card

    info = {"name": "s", "version": "2", "aliases": [], "run_id": "r", "metrics": {}, "params": {"eval.n_images": "1"},
            "tags": {"reconstruction": "0.545", "reconstruction_se": "nan", "editability": "0.473",
                     "editability_se": "0.012"}}  # fmt: skip
    console = Console(width=80, record=True)
    console.print(concept_card(info))
    text = console.export_text()
    assert "reconstruction 0.545, editability 0.473 ± 0.012" in text and "nan" not in text, text
    assert "1 image a prompt" in text, text


def test_a_registry_query_makes_no_store_where_there_is_none_and_an_empty_one_says_so(tmp_path, capsys,
                                                                                       monkeypatch):
    """A misspelt or forgotten store made an empty `mlflow.db` there and listed nothing, with status 0."""
    from oneword.tracking import ensure_store

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for argv in (["concepts", "list"], ["concepts", "show", "cat"], ["concepts", "prune", "--dry-run"],
                 ["concepts", "list", "--tracking-uri", f"sqlite:///{tmp_path}/mlfow.db"],
                 ["generate", "a photo of <cat>", "--concept", "cat@champion", "-o", tmp_path / "drawn"]):  # fmt: skip
        code, out = run(argv, capsys)
        assert code == 2 and "no MLflow store at" in out and "--tracking-uri" in out, (argv, out)
    assert list(tmp_path.iterdir()) == []
    uri = ensure_store(f"sqlite:///{tmp_path}/mlflow.db")
    code, out = run(["concepts", "list", "--alias", "champoin", "--tracking-uri", uri], capsys)
    assert code == 0 and "no oneword concepts with @champoin in the registry at" in " ".join(out.split())


def test_a_store_given_as_a_path_is_the_sqlite_file_there_and_a_folder_is_refused(tmp_path, capsys, monkeypatch):
    """`--tracking-uri ./mlflow.db` answered with MLflow's file-store warning, cut off mid-sentence."""
    from oneword.tracking import as_uri, ensure_store

    monkeypatch.chdir(tmp_path)
    ensure_store(f"sqlite:///{tmp_path}/mlflow.db")
    assert as_uri("./mlflow.db") == f"sqlite:///{tmp_path}/mlflow.db"
    assert as_uri("http://mlflow:5000") == "http://mlflow:5000" and as_uri("sqlite:///x.db") == "sqlite:///x.db"
    assert as_uri("databricks") == "databricks" and as_uri("databricks://team") == "databricks://team"
    code, out = run(["concepts", "list", "--tracking-uri", "./mlflow.db"], capsys)
    assert code == 0 and f"in the registry at sqlite:///{tmp_path}/mlflow.db" in " ".join(out.split()), out
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "mlflow.db")
    assert run(["concepts", "list"], capsys)[0] == 0
    for argv in (["concepts", "list", "--tracking-uri", "x.db"], ["concepts", "list", "--tracking-uri", "./mlruns"]):
        code, out = run(argv, capsys)
        said = " ".join(out.split())
        assert code == 2 and ("no MLflow store at" in said if argv[-1] == "x.db" else "is a path" in said), said
    assert "--tracking-uri ./mlruns.db" in said and "maintenance" not in said.split("hint")[1], said
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db", "mlflow.db.lock"]


def test_what_the_machine_refuses_is_one_line_and_a_hint(tmp_path, capsys):
    """An output path through a file (or a read-only folder, a full disk), a device this torch has not, a
    resolution of 0: each was a traceback."""
    (tmp_path / "a-file").write_text("")
    for args, said in (
        (["preprocess", DREAMBENCH / "cat", "-o", tmp_path / "a-file" / "data"],
         f"{tmp_path / 'a-file'} is a file, where a folder was to be made"),
        (["preprocess", DREAMBENCH / "cat", "-o", tmp_path / "data", "--resolution", 0], "resolution"),
        (["cache-latents", tmp_path, "-o", tmp_path / "lat", "--device", "banana"], "unknown device 'banana'"),
        (["preprocess", tmp_path / "a-file", "-o", tmp_path / "data"], "is a file: pass the folder"),
        (["register", tmp_path / "no-such-training"], "not found"),
    ):
        code, out = run(args, capsys)
        assert code == 2 and said in out and "hint:" in out and "Traceback" not in out, out


def test_a_refused_write_names_the_folder_given_not_the_scratch_file_in_it(tmp_path):
    """Written whole first, then renamed into place: a read-only folder was said as `.data.tmp-ka7wm6z3`."""
    import errno

    from oneword.cli import _os_error

    for scratch in (".data.tmp-ka7wm6z3", ".x.pt.1f2e3d4c5b6a.part", "x.pt.part"):
        said = _os_error(OSError(errno.EROFS, "Read-only file system", str(tmp_path / "out" / scratch))).message
        assert said == f"cannot write in {tmp_path / 'out'}: Read-only file system", said
    said = _os_error(OSError(errno.EACCES, "Permission denied", str(tmp_path / "x.safetensors"))).message
    assert said == f"cannot read or write {tmp_path / 'x.safetensors'}: Permission denied"
    deep = tmp_path / "out" / ".data.tmp-ka7wm6z3" / "images" / "0.png"  # a file inside the scratch folder
    said = _os_error(OSError(errno.ENOSPC, "No space left on device", str(deep))).message
    assert said == f"cannot write in {tmp_path / 'out'}: No space left on device"
    (tmp_path / "a-file").write_text("")
    try:  # read as a folder: a file where a folder was read, not "to be made"
        os.listdir(tmp_path / "a-file")
    except NotADirectoryError as e:
        said = _os_error(e).message
    assert said == f"cannot read or write {tmp_path / 'a-file'}: Not a directory"
    # a write into an open file on a full disk names no file: the one in hand is named (the scratch file's folder)
    try:
        with open(__file__, "rb") as read, open("/dev/full", "wb") as f:  # a file read beside it is not named
            f.write(read.read(1) * 100_000)
            f.flush()
    except OSError as e:
        assert not e.filename
        said = _os_error(e).message
    assert said == "cannot read or write /dev/full: No space left on device", said


def test_the_concepts_table_keeps_aliases_and_tokens_whole_in_80_columns():
    """A long name squeezed every other column into 3-character fragments ("cha / mpi / on")."""
    from rich.console import Console

    from oneword.cli.concepts import concepts_table

    row = {"version": "1", "aliases": ["champion"], "token": "<pstar>", "base_model": "/models/sd15",
           "base_model_fingerprint": "sha256:e29e1234abcd", "reconstruction": 0.66, "editability": 0.5}  # fmt: skip
    console = Console(width=80, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(concepts_table([{**row, "name": "my-golden-retriever-on-the-beach-2024-summer"}]))
    lines = console.export_text().splitlines()
    assert max(map(len, lines)) <= 80
    first = next(line for line in lines if "champion" in line)
    assert "<pstar>" in first and "0.66" in first and "0.50" in first
    rows = lines[next(i for i, line in enumerate(lines) if "─" in line) + 1 :]
    name = "".join(line.split()[0] for line in rows if line.strip())
    assert name == "my-golden-retriever-on-the-beach-2024-summer"  # folded, whole
    # a long token and two aliases beside it: the token folds, the scores stay
    wide = {"name": "my-golden-retriever-on-the-beach-2024", "token": "<my-very-long-token-name-xyz>",
            "aliases": ["champion", "candidate"]}  # fmt: skip
    console.print(concepts_table([{**row, **wide}]))
    lines = console.export_text().splitlines()
    first = next(line for line in lines if "champion" in line)
    assert max(map(len, lines)) <= 80 and "0.66" in first and "0.50" in first
    assert any("candidate" in line for line in lines)


def test_the_dry_run_table_keeps_every_character_in_80_columns():
    """A long name beside a failing concept's status made the table 81 columns wide, and rich cut a character
    from each folded line of the error, the column the reader needs."""
    from rich.console import Console

    from oneword.cli.run import print_batch_plan

    why = "/tmp/audit/photos/nowhere does not exist: put 3-5 photos of the concept there"
    rows = [{"name": "my-golden-retriever-on-the-beach", "status": "fails at preprocess", "version": "",
             "alias": "", "why": why},
            {"name": "cat", "status": "unchanged", "version": "12", "alias": "champion", "why": ""}]  # fmt: skip
    console = Console(width=80, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    print_batch_plan({"tracking_uri": "sqlite:///mlflow.db", "registry": True, "concepts": rows}, console)
    text = console.export_text()
    assert max(map(len, text.splitlines())) <= 80 and "fails at preprocess" in text
    lines = text.splitlines()
    header = next(line for line in lines if "alias / why" in line)
    col = header.index("alias / why")  # the why's column, as folded over the rows' lines
    said = "".join(line[col:].strip() for line in lines[lines.index(header) + 2 :] if line[:col].strip() != "cat")
    assert why.replace(" ", "") in said.replace(" ", "") and "champion" in text


def test_the_dry_run_says_how_many_cluster_runs_the_concepts_to_train_need():
    """kfp.local trains any number; a KFP run on Argo trains at most max_concepts_per_run. The dry run, which a
    team runs before the night, says how many cluster runs the concepts to train (or not told) need, counting no
    unchanged concept."""
    from rich.console import Console

    from oneword.batch import RUN_LIMIT
    from oneword.cli.run import print_batch_plan

    def said(n: int, unchanged: int = 0) -> str:
        rows = [{"name": f"c{i}", "status": "to train" if i % 2 else "unknown", "version": "", "alias": "", "why": ""}
                for i in range(n)]  # fmt: skip
        rows += [{"name": f"u{i}", "status": "unchanged", "version": "1", "alias": "champion", "why": ""}
                 for i in range(unchanged)]  # fmt: skip
        console = Console(width=80, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
        print_batch_plan({"tracking_uri": "sqlite:///mlflow.db", "registry": True, "concepts": rows}, console)
        return console.export_text()

    text = said(2 * RUN_LIMIT + 1)
    assert "on a cluster" in text and f"a run trains {RUN_LIMIT} of them" in " ".join(text.split())
    assert "3 runs in all" in " ".join(text.split()) and max(map(len, text.splitlines())) <= 80
    assert "on a cluster" not in said(RUN_LIMIT, unchanged=5 * RUN_LIMIT)


def test_a_dry_run_before_any_registry_still_tells_which_concepts_would_fail(tiny_model_dir, tiny_clip_dir, tmp_path,
                                                                              capsys):
    """No store yet: nothing is registered, but photos that do not read still fail, and the dry run says so (and
    exits 1), names the registry it meant, and makes none."""
    import yaml

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.jpg").write_bytes(b"not a jpeg")
    manifest = tmp_path / "concepts.yaml"
    manifest.write_text(yaml.safe_dump({"concepts": [
        {"images": str(DREAMBENCH / "cat"), "token": "<cat-d>", "init_word": "cat"},
        {"images": str(broken), "token": "<bad-d>", "init_word": "dog"},
    ]}))  # fmt: skip
    store = tmp_path / "mlflow.db"
    args = ["batch", manifest, "--dry-run", "--base-model", tiny_model_dir, "--resolution", 32,
            "--tracking-uri", f"sqlite:///{store}", "--clip-model", tiny_clip_dir]  # fmt: skip
    code, out = run(args, capsys)
    assert code == 1 and "1 to train, 0 unchanged, 1 would fail" in out and "none there yet" in out
    assert out.count("bad-d") == 1, out  # its row; not also a warning before the table that says the same
    assert not store.exists()
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in [*args, "--json"]])
    plan = json.loads(capsys.readouterr().out)  # the logs go to stderr: stdout is the plan alone, for a pipe
    assert e.value.code == 1 and not plan["registry"]
    told = [(r["name"], r["status"]) for r in plan["concepts"]]
    assert told == [("cat-d", "to train"), ("bad-d", "fails at preprocess")]
    # a run of some of the manifest's concepts plans those alone; a name it does not hold is refused, whole
    code, out = run([*args, "--only-concepts", "cat-d"], capsys)
    assert code == 0 and "1 to train, 0 unchanged" in out and "would fail" not in out and "bad-d" not in out
    code, out = run([*args, "--only-concepts", "cat-d,bad"], capsys)
    assert code == 2 and "only_concepts (--only-concepts) names 'bad', which" in out and "did you mean 'bad-d'" in out
    # what would stop a run at its preflight stops the dry run, in the same words, not a table of concepts
    # "a run trains"
    code, out = run([*args[:4], tmp_path / "no-such-model", *args[5:]], capsys)
    assert code == 2 and "preflight found 1 problem" in out and "no-such-model' not found" in out
    assert "to train" not in out and not store.exists()
    code, out = run([*args[:-1], tmp_path / "no-such-clip"], capsys)
    assert code == 2 and "no-such-clip" in out and "to train" not in out
    from mlflow import MlflowClient

    from oneword.tracking import ensure_store

    uri = ensure_store(f"sqlite:///{store}")  # a store that is there: asked whether it answers, and nothing more
    code, out = run(args, capsys)
    assert code == 1 and "1 to train" in out and MlflowClient(uri).get_experiment_by_name("oneword") is None
    store.unlink()
    silent = f"http://127.0.0.1:{free_port()}"
    code, out = run([*args[:7], "--tracking-uri", silent, *args[9:]], capsys)
    assert code == 2 and f"tracking server {silent} did not answer: Connection refused" in out and "to train" not in out
    code, out = run([a for a in args if a != "--dry-run"] + ["--json"], capsys)  # a run has no plan to print
    assert code == 2 and "--json prints a dry run's plan" in out


def test_a_report_that_could_not_tell_which_concepts_left_says_so():
    from rich.console import Console

    from oneword.cli.run import print_batch_report

    report = {"batch_id": "b", "registered": 0, "unchanged": 0, "failed": 0, "concepts": [], "left": [],
              "left_error": "ConnectionError: the registry did not answer"}  # fmt: skip
    console = Console(width=80, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    assert print_batch_report(report, console) == 0
    text = " ".join(console.export_text().split())
    assert "could not tell which concepts left the manifest: ConnectionError: the registry did not answer" in text


def test_the_batch_report_says_what_became_of_its_bundle_and_exits_1_where_it_could_not_be_made():
    from rich.console import Console

    from oneword.cli.run import print_batch_report

    ok = {"name": "cat-q", "status": "registered", "version": "3", "alias": "champion"}
    report = {"batch_id": "b", "registered": 1, "unchanged": 0, "failed": 0, "concepts": [ok]}
    left = {f"a-long-concept-name-{i}": "no @champion version" for i in range(3)}
    said = {}
    for made, code in (({"name": "studio", "version": "4", "unchanged": False, "members": ["cat-q/3", "dog/1"],
                         "left_out": left}, 0),
                       ({"name": "studio", "version": "4", "unchanged": True, "members": ["cat-q/3"],
                         "left_out": {}}, 0),
                       ({"name": "studio", "version": None, "unchanged": False, "members": [], "left_out": left}, 0),
                       ({"name": "studio", "error": "these concepts were trained on different base models"}, 1)):
        console = Console(width=80, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
        assert print_batch_report({**report, "bundle": made}, console) == code
        text = console.export_text()
        assert max(len(line) for line in text.splitlines()) <= 80
        said[made.get("version", "error"), made.get("unchanged")] = " ".join(text.split())
    assert ("bundle studio/4 registered: 2 concepts (left out: a-long-concept-name-0: no @champion version; "
            "a-long-concept-name-1") in said["4", False]  # fmt: skip
    assert "bundle studio/4 unchanged: 1 concept" in said["4", True]
    assert "bundle studio: nothing registered, no concept of the manifest has a version to hold" in said[None, False]
    assert "bundle studio failed: these concepts were trained on different base models" in said["error", None]
    # what became of it could not be read: said, and no failure of the run's
    console = Console(width=80, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    assert print_batch_report({**report, "bundle": {"unknown": "ConnectionError: no answer"}}, console) == 0
    assert "what became of the bundle could not be read: ConnectionError" in " ".join(console.export_text().split())
    # a report the concepts' part of which could not be made still says what became of the bundle
    console = Console(width=80, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    failed = {"name": "studio", "error": "not made: the run ended before its bundle-concepts step"}
    assert print_batch_report({**report, "error": "the report could not be made", "bundle": failed}, console) == 2
    assert "bundle studio failed: not made: the run ended" in " ".join(console.export_text().split())


def test_preflight_says_once_what_passed(tiny_model_dir, tiny_clip_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["--base-model", tiny_model_dir, "--clip-model", tiny_clip_dir, "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]
    code, out = run(["preflight", *args], capsys)
    assert code == 0, out
    assert out.count("preflight passed") == 1 and "base model" in out and "tracking" in out
    assert "no concept checked: give --images, --token and --init-word" in out  # what it did not check, said
    concept = ["--images", DREAMBENCH / "cat", "--token", "<pf-cat>", "--init-word", "cat"]
    code, out = run(["preflight", *args, *concept], capsys)
    assert code == 0 and "images of <pf-cat>" in out and "no concept checked" not in out, out


def test_register_says_what_it_registered_without_mlflows_chatter(evaluated_concept, tmp_path, capfd):
    """MLflow drew a progress bar for each file of a few KB it read back: a dozen lines around the one a person
    ran the command for."""
    trained, evaluation = evaluated_concept
    code = 0
    try:
        main(["register", str(trained), "--eval", str(evaluation), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"])
    except SystemExit as e:
        code = e.code
    out = "".join(capfd.readouterr())
    assert code in (0, None) and "cat-r version 1 -> champion" in out and "Downloading artifacts" not in out, out


def test_mlflows_advice_on_logging_a_pyfunc_is_not_given_at_every_registration(recwarn):
    """MLflow advises type hints on `predict` (a warning at class definition, which no filter quiets: MLflow sets
    its own around it) and warns of CloudPickle at every logging of a model from an object (the steps' logs)."""
    import logging
    import warnings

    import mlflow.pyfunc

    from oneword.serving import ConceptModel

    warnings.simplefilter("always")

    class Plain(mlflow.pyfunc.PythonModel):  # the control: MLflow advises it
        def predict(self, context, model_input, params=None):
            return model_input

    class Ours(ConceptModel):  # a fresh class, as serving's is at import
        def predict(self, context, model_input, params=None):
            return model_input

    hints = [str(w.message) for w in recwarn if "type hints" in str(w.message)]
    assert len(hints) == 1, hints  # Plain's, not Ours'
    import oneword.registry  # noqa: F401  (it sets the filter, as the register step imports it)

    pyfunc_log = logging.getLogger("mlflow.pyfunc")  # its filters, asked as the logger asks them for each record

    def kept(message: str) -> bool:
        return bool(pyfunc_log.filter(pyfunc_log.makeRecord(pyfunc_log.name, logging.WARNING, __file__, 0, message,
                                                             (), None)))  # fmt: skip

    assert not kept("Passing a Python object as `python_model` causes it to be serialized using CloudPickle")
    assert kept("a warning of its own")


def test_compare_prints_its_scores_as_a_table(evaluated_concept, tmp_path, capsys, monkeypatch):
    """It printed the scores file's rows as Python's repr of a list of dicts."""
    monkeypatch.setenv("COLUMNS", "80")
    _, evaluation = evaluated_concept
    code, out = run(["compare", evaluation, evaluation, "--label", "lr-low", "--label", "lr-high", "-o",
                     tmp_path / "lr.png"], capsys)  # fmt: skip
    assert code == 0 and (tmp_path / "lr.png").exists() and (tmp_path / "lr.json").exists()
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.strip().startswith("lr-")}
    scores = {r["run"]: r for r in json.loads((tmp_path / "lr.json").read_text())}
    low = scores["lr-low"]
    assert rows["lr-low"][-2:] == [f"{low['reconstruction']:.4f}", f"{low['editability']:.4f}"]
    table = [line for line in out.splitlines() if "scatter ->" not in line]  # a path is printed whole, to copy
    assert "{'run'" not in out and all(len(line) <= 80 for line in table)
    # two pipeline runs' evaluations, in folders kfp.local names alike: each labelled by the run it is of
    import shutil

    runs = [tmp_path / "root" / f"textual-inversion-2026-11-28-{t}" / "evaluate" / "evaluation" for t in ("a", "b")]
    for r in runs:
        shutil.copytree(evaluation, r)
    code, out = run(["compare", *runs, "-o", tmp_path / "two.png"], capsys)
    labels = [r["run"] for r in json.loads((tmp_path / "two.json").read_text())]
    assert code == 0 and labels == ["textual-inversion-2026-11-28-a", "textual-inversion-2026-11-28-b"], labels


def test_a_setting_out_of_range_points_at_the_help_of_the_command_given(tmp_path, capsys):
    manifest = tmp_path / "concepts.yaml"
    manifest.write_text(f"concepts:\n  - {{images: {DREAMBENCH / 'cat'}, token: '<cat-h>', init_word: cat}}\n")
    code, out = run(["batch", manifest, "--steps", -5, "--dry-run"], capsys)
    assert code == 2 and "steps=-5" in out and "`oneword batch --help`" in " ".join(out.split()), out
