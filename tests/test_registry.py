"""The registry against a real `mlflow server` on loopback (local and S3 artifact stores)."""

import json
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import ClassVar

import mlflow
import pytest
import torch

from oneword import batch_records, catalogue, registry, tracking, trainings
from oneword import embeddings as E
from oneword.errors import OnewordError, TransientError
from oneword.evaluation.gate import GateThresholds

from .conftest import free_port


def _with_scores(eval_dir, tmp_path, reconstruction, editability, fingerprint=None, photos=None):
    """A copy of an evaluation folder with other scores (to drive the gate); `photos`: of another training's."""
    out = tmp_path / f"eval-{reconstruction}-{editability}-{fingerprint}{'-other' if photos else ''}"
    shutil.copytree(eval_dir, out)
    m = json.loads((out / "metrics.json").read_text())
    shift = reconstruction + editability - m["reconstruction"] - m["editability"]
    # the gate pairs versions seed by seed: each version's seeds move by a spread of its own, the mean as given
    spread = [reconstruction * 0.01 * (-1) ** j for j in range(len(m["score_per_seed"]))]
    spread = [s - sum(spread) / len(spread) for s in spread]
    m["score_per_seed"] = [x + shift + s for x, s in zip(m["score_per_seed"], spread)]
    m["reconstruction"], m["editability"] = reconstruction, editability
    if fingerprint:
        m["evaluator"] = {"name": "another-clip", "fingerprint": fingerprint}
    if photos:
        m["image_sha256"] = photos
    (out / "metrics.json").write_text(json.dumps(m))
    return out


def test_the_same_evaluation_registered_twice_does_not_beat_itself(evaluated_concept, tmp_path):
    """The champion's scores are read back from tags kept to 6 places: the same evaluation, registered again,
    beat its own rounded copy by 4e-7 and took the alias ("1.0828 beats the champion's 1.0828")."""
    train_dir, eval_dir = evaluated_concept
    scored = _with_scores(eval_dir, tmp_path, 0.12345649, 0.50000049)  # each rounds down in the registry
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = registry.register(train_dir, scored, uri, name="cat-twice")
    again = registry.register(train_dir, scored, uri, name="cat-twice")
    assert (first.alias, again.alias) == ("champion", "candidate") and "does not beat" in again.reason, again


def test_register_gate_and_queries(evaluated_concept, mlflow_server, tmp_path, tiny_model_dir, monkeypatch, capsys):
    train_dir, eval_dir = evaluated_concept
    name = "cat-gate"
    first = registry.register(train_dir, _with_scores(eval_dir, tmp_path, 0.5, 0.2), mlflow_server, name=name)
    assert (first.version, first.alias) == ("1", "champion")
    worse = registry.register(train_dir, _with_scores(eval_dir, tmp_path, 0.4, 0.2), mlflow_server, name=name)
    assert worse.alias == "candidate" and "does not beat" in worse.reason
    better = registry.register(train_dir, _with_scores(eval_dir, tmp_path, 0.6, 0.3), mlflow_server, name=name)
    assert better.alias == "champion"
    low = registry.register(
        train_dir,
        _with_scores(eval_dir, tmp_path, 0.9, 0.9),
        mlflow_server,
        name=name,
        thresholds=GateThresholds(min_editability=0.95),
    )
    assert low.alias == "candidate" and "threshold" in low.reason
    other = registry.register(
        train_dir, _with_scores(eval_dir, tmp_path, 0.99, 0.99, "sha256:other"), mlflow_server, name=name
    )
    assert other.alias == "candidate" and "different evaluators" in other.reason

    rows = catalogue.list_concepts(mlflow_server)
    mine = [r for r in rows if r["name"] == name]
    assert [r["version"] for r in mine] == ["1", "2", "3", "4", "5"]
    champions = catalogue.list_concepts(mlflow_server, alias="champion")
    assert [r["version"] for r in champions if r["name"] == name] == ["3"]
    fp = mine[0]["base_model_fingerprint"]
    assert len(catalogue.list_concepts(mlflow_server, base_model=fp[7:19])) >= 5
    assert catalogue.list_concepts(mlflow_server, base_model="sha256:0000") == []
    source = mine[0]["base_model"]  # the reference it was trained from, as users name models everywhere else
    on_source = catalogue.list_concepts(mlflow_server, base_model=source + "/")
    assert [r["version"] for r in on_source if r["name"] == name] == ["1", "2", "3", "4", "5"]
    assert catalogue.list_concepts(mlflow_server, base_model=source + "-other") == []

    shown = catalogue.show_concept(f"{name}@champion", mlflow_server)
    assert shown["version"] == "3" and "champion" in shown["aliases"]
    assert len(json.loads(shown["tags"]["score_per_seed"])) == 2  # one score a seed, for the next gate to pair
    assert "paired difference" in better.reason and "paired difference" in worse.reason  # read back and paired
    assert shown["tags"]["oneword.token"] == "<cat-r>" and shown["params"]["init_word"] == "cat"
    assert shown["metrics"]["reconstruction"] == pytest.approx(0.6)
    assert shown["params"]["base_model_fingerprint"] == fp
    run = mlflow.MlflowClient(mlflow_server).get_run(shown["run_id"])
    assert len(mlflow.MlflowClient(mlflow_server).get_metric_history(run.info.run_id, "loss")) >= 1
    assert catalogue.show_concept(f"{name}/1", mlflow_server)["version"] == "1"
    # `concepts show`: what a person asks of the version, in 80 columns; --json, all of it
    from oneword.cli import main

    monkeypatch.setenv("COLUMNS", "80")
    capsys.readouterr()
    main(["concepts", "show", f"{name}@champion", "--tracking-uri", mlflow_server])
    card = capsys.readouterr().out
    assert card.startswith(f"{name}/3  @champion") and max(len(line) for line in card.splitlines()) <= 80
    said = " ".join(card.split())
    assert "token <cat-r> (from 'cat', 1 vector)" in said and "reconstruction 0.600" in said
    # what the gate gave it, beside why: the aliases move later (a promotion by hand), the gate's word does not
    assert f"gate @champion: {better.reason.split()[0]}" in said and "paired difference" in said
    assert re.search(r"learning rate [\d.e-]+ \(base [\d.e-]+, scaled by the batch\)", said)  # the option's
    main(["concepts", "show", f"{name}/3", "--tracking-uri", mlflow_server, "--json"])
    assert json.loads(capsys.readouterr().out) == {**shown, "aliases": ["champion"]}
    with pytest.raises(OnewordError, match="not found"):
        catalogue.get_version("no-such-concept@champion", mlflow_server)
    with pytest.raises(OnewordError, match=f"not found .*did you mean {name!r}"):  # a slip of the keyboard
        catalogue.get_version(f"{name[:-1]}@champion", mlflow_server)
    with pytest.raises(OnewordError, match=f"not found .*did you mean {name!r}"):  # the caps lock's
        catalogue.get_version(name.upper(), mlflow_server)
    # a concept that is there, asked for a version or alias it lacks: what it has, not "not found"
    with pytest.raises(OnewordError, match=r"has no version 99 \(versions 5, 4, 3, 2, 1; aliases: .*@champion"):
        catalogue.get_version(f"{name}/99", mlflow_server)
    with pytest.raises(OnewordError, match=r"has no alias @prod \(aliases: .*@champion.*; versions 5, 4"):
        catalogue.get_version(f"{name}@prod", mlflow_server)
    with pytest.raises(OnewordError, match="a version is a number or 'latest'"):
        catalogue.get_version(f"{name}/abc", mlflow_server)
    assert catalogue.get_version(f"{name}/latest", mlflow_server).version == "5"  # as models:/NAME/latest
    with pytest.raises(OnewordError, match="not found"):
        catalogue.get_version("no-such-concept/latest", mlflow_server)

    # pull in A1111 format: the embedding is the trained one, and diffusers loads the diffusers pull
    pulled, _ = catalogue.pull_concept(f"{name}@champion", tmp_path / "cat.pt", "a1111", mlflow_server)
    ref = E.load(eval_dir / "embedding" / "learned_embeds.safetensors")
    assert torch.equal(E.load(pulled).vectors, ref.vectors)
    from oneword.generate import build_pipeline
    from oneword.models import load_base_model

    diff, _ = catalogue.pull_concept(name, tmp_path / "x.safetensors", "diffusers", mlflow_server)
    pipe = build_pipeline(load_base_model(str(tiny_model_dir)))
    pipe.load_textual_inversion(str(diff))
    assert "<cat-r>" in pipe.tokenizer.get_added_vocab()
    # once the alias has moved on, the card says the gate's alias was then, not now
    client = mlflow.MlflowClient(mlflow_server)
    client.set_registered_model_alias(name, "champion", "2")
    main(["concepts", "show", f"{name}/3", "--tracking-uri", mlflow_server])
    assert f"gate @champion when registered: {better.reason.split()[0]}" in " ".join(capsys.readouterr().out.split())
    client.set_registered_model_alias(name, "champion", "3")
    # compare reads registered versions by reference, labelled by the version each names
    main(["compare", f"{name}/2", f"{name}@champion", "--tracking-uri", mlflow_server, "-o", str(tmp_path / "v.png")])
    rows = json.loads((tmp_path / "v.json").read_text())
    assert [r["run"] for r in rows] == [f"{name}/2", f"{name}/3"] and rows[1]["reconstruction"] == pytest.approx(0.6)
    main(["compare", f"{name}/3", f"{name}@champion", "--tracking-uri", mlflow_server, "-o", str(tmp_path / "v.png")])
    rows = json.loads((tmp_path / "v.json").read_text())
    assert [r["run"] for r in rows] == [f"{name}/3", f"{name}/3 ({name}@champion)"]  # one version, asked twice
    with pytest.raises(SystemExit):
        main(["compare", f"{name}-x", "--tracking-uri", mlflow_server, "-o", str(tmp_path / "x.png")])
    said = " ".join(capsys.readouterr().err.split())
    assert f"error: {name}-x is no evaluation folder here, nor a registered concept: concept '{name}-x' not" in said
    # the command never replaces a file unasked (another concept's, under a shared default name)
    theirs = tmp_path / "theirs.pt"
    theirs.write_bytes(b"someone else's embedding")
    pull = ["concepts", "pull", f"{name}@champion", "-f", "a1111", "-o", str(theirs), "--tracking-uri", mlflow_server]
    with pytest.raises(SystemExit) as refused:
        main(pull)
    assert refused.value.code != 0 and theirs.read_bytes() == b"someone else's embedding"
    capsys.readouterr()
    main([*pull, "--force"])
    assert E.load(theirs).token == "<cat-r>"
    said = capsys.readouterr()
    assert f"{name}/3 (<cat-r>) -> " in said.out  # which version the alias named, for the deploy
    assert "in prompts there, write theirs (the file's name" in " ".join(said.out.split())  # A1111's trigger word
    assert "Downloading artifacts" not in said.err  # no progress bar trailing the answer
    assert "/" not in E.load(theirs).meta["model_source"]  # a file for sharing: no path in it
    main([*pull[:6], str(tmp_path / "pulled" / "cat.pt"), *pull[7:]])  # A1111 would draw it for every "cat"
    assert "warning: 'cat' is a word of the model" in " ".join(capsys.readouterr().out.split())
    # generate --concept draws with the registered concept on the model it was trained on, and keeps no download
    import tempfile

    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    drawn = tmp_path / "drawn"
    main(["generate", "a photo of <cat-r>", "--concept", f"{name}@champion", "--tracking-uri", mlflow_server,
          "-o", str(drawn), "--n", "1", "--steps", "2"])  # fmt: skip
    assert (drawn / "grid.png").exists() and list((tmp_path / "tmp").iterdir()) == []


def test_a_live_run_that_holds_another_registers_params_is_left_for_a_new_run(
    evaluated_concept, mlflow_server, tmp_path
):
    """A register killed after logging its params (or running beside this one for another evaluation) leaves them
    on the live run; MLflow refuses to change a param, so reusing the run failed this register too."""
    train_dir, eval_dir = evaluated_concept
    client = mlflow.MlflowClient(mlflow_server)
    live = client.create_run(client.create_experiment("live-params")).info.run_id
    client.log_param(live, "eval.n_images", "999")  # the killed register's evaluation drew 999
    trained = tmp_path / "trained"
    shutil.copytree(train_dir, trained)
    summary = json.loads((trained / "summary.json").read_text())
    (trained / "summary.json").write_text(json.dumps({**summary, "mlflow_run_id": live}))
    reg = registry.register(trained, eval_dir, mlflow_server, name="cat-live-params")
    assert reg.run_id != live and client.get_run(reg.run_id).data.params["eval.n_images"] != "999"
    assert client.get_run(live).data.params == {"eval.n_images": "999"}
    # the same number of pictures, but another evaluation (its key covers every setting): a run of its own too
    other = client.create_run(client.get_experiment_by_name("live-params").experiment_id).info.run_id
    client.log_param(other, "eval.evaluation_key", "another evaluation")
    (trained / "summary.json").write_text(json.dumps({**summary, "mlflow_run_id": other}))
    scored = tmp_path / "scored"
    shutil.copytree(eval_dir, scored)
    m = json.loads((scored / "metrics.json").read_text())
    (scored / "metrics.json").write_text(json.dumps({**m, "evaluation_key": "this evaluation"}))
    reg = registry.register(trained, scored, mlflow_server, name="cat-live-params")
    assert reg.run_id != other and client.get_run(reg.run_id).data.params["eval.evaluation_key"] == "this evaluation"


def test_pyfunc_loads_and_generates(evaluated_concept, mlflow_server):
    train_dir, eval_dir = evaluated_concept
    reg = registry.register(train_dir, eval_dir, mlflow_server, name="cat-pyfunc")
    mlflow.set_tracking_uri(mlflow_server)
    model = mlflow.pyfunc.load_model(f"models:/{reg.name}@{reg.alias}")
    out = model.predict(["a photo of <cat-r>", "<cat-r> on the moon"], params={"n": 2, "steps": 2, "seed": 3})
    assert list(out["seed"]) == [3, 4, 3, 4] and out["png_base64"].str.len().min() > 100
    # a column of prompts, as a JSON request {"prompt": [...]} arrives: each prompt is its own, not one string
    out = model.predict({"prompt": ["a photo of <cat-r>", "<cat-r> on the moon"]}, params={"n": 1, "steps": 2})
    assert list(out["prompt"]) == ["a photo of <cat-r>", "<cat-r> on the moon"]
    from mlflow.exceptions import MlflowException

    own = model.metadata.signature.params.to_dict()  # the model's own steps: 64 images at them is the most
    steps = next(p["default"] for p in own if p["name"] == "steps")
    for params, why in (({"steps": 0}, "steps must be from 1 to 1000"), ({"steps": 1001}, "steps must be from 1"),
                        ({"n": 0}, "n must be"), ({"n": 40}, "over 64 images"),
                        ({"n": 32, "steps": steps + 1}, f"over {64 * steps} denoising steps a request")):  # fmt: skip
        with pytest.raises(MlflowException, match=why) as refused:
            model.predict(["a <cat-r>", "b <cat-r>"], params=params)
        assert refused.value.error_code == "INVALID_PARAMETER_VALUE"
    # one image may take as many steps as the 64: more steps buy fewer images, never a longer hold
    from oneword.serving import _checked

    defaults = {"n": 1, "seed": 0, "guidance_scale": 7.5}
    assert _checked({**defaults, "steps": 32 * steps}, 2, steps, 1000 * steps)["steps"] == 32 * steps


@pytest.mark.slow
def test_a_registered_concept_serves_the_request_the_docs_show(evaluated_concept, mlflow_server, tmp_path):
    """`mlflow models serve` of a version, sent the very request docs/deploy.md shows: a row per image."""
    import base64
    import io

    from PIL import Image

    from .conftest import served

    doc = (Path(__file__).resolve().parents[1] / "docs" / "deploy.md").read_text().split("<!-- serving-request:", 1)[1]
    body = json.loads(re.search(r"-d '(\{.*\})'", doc)[1].replace("<my-cat>", "<cat-r>"))
    train_dir, eval_dir = evaluated_concept
    reg = registry.register(train_dir, eval_dir, mlflow_server, name="cat-serve")
    rows = served(f"models:/{reg.name}@champion", mlflow_server, body, tmp_path / "serve.log")
    n = body["params"]["n"]
    assert [r["prompt"] for r in rows] == [p for p in body["inputs"] for _ in range(n)]
    assert [r["seed"] for r in rows] == [body["params"]["seed"] + j for j in range(n)] * len(body["inputs"])
    assert Image.open(io.BytesIO(base64.b64decode(rows[0]["png_base64"]))).size[0] > 0


def test_failure_before_registration_leaves_no_version(evaluated_concept, mlflow_server, monkeypatch):
    train_dir, eval_dir = evaluated_concept

    def corrupt(*a, **k):
        raise OnewordError("artifact x does not match its local file after upload")

    monkeypatch.setattr(registry, "_upload_and_verify", corrupt)
    with pytest.raises(OnewordError, match="does not match"):
        registry.register(train_dir, eval_dir, mlflow_server, name="cat-atomic")
    assert [r for r in catalogue.list_concepts(mlflow_server) if r["name"] == "cat-atomic"] == []


def test_failure_after_version_creation_rolls_back(evaluated_concept, mlflow_server, monkeypatch):
    train_dir, eval_dir = evaluated_concept

    def boom(*a, **k):
        raise RuntimeError("registry went away")

    monkeypatch.setattr(registry, "_decide_alias", boom)
    with pytest.raises(RuntimeError):
        registry.register(train_dir, eval_dir, mlflow_server, name="cat-rollback")
    assert [r for r in catalogue.list_concepts(mlflow_server) if r["name"] == "cat-rollback"] == []
    # the run that holds the upload says it registered nothing (it had ended FINISHED, as a registered one)
    client = mlflow.MlflowClient(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("oneword").experiment_id],
                                "tags.`oneword.concept` = 'cat-rollback'")  # fmt: skip
    assert run.info.status == "FAILED" and run.data.tags["oneword.failed_stage"] == "register"
    assert "registry went away" in run.data.tags["oneword.error"]


def test_a_failure_after_the_alias_moved_gives_the_champion_back(evaluated_concept, mlflow_server, tmp_path,
                                                                  monkeypatch):  # fmt: skip
    train_dir, eval_dir = evaluated_concept
    name = "cat-alias-back"
    assert registry.register(train_dir, _with_scores(eval_dir, tmp_path, 0.5, 0.2), mlflow_server, name=name).alias == (
        "champion"
    )
    real = mlflow.MlflowClient.set_model_version_tag

    def gate_tag_fails(self, model, version, key, value):
        if key == "gate":
            raise RuntimeError("the pod was stopped")
        return real(self, model, version, key, value)

    monkeypatch.setattr(mlflow.MlflowClient, "set_model_version_tag", gate_tag_fails)
    with pytest.raises(RuntimeError, match="stopped"):  # a better version: it took the alias, then failed
        registry.register(train_dir, _with_scores(eval_dir, tmp_path, 0.7, 0.4), mlflow_server, name=name)
    monkeypatch.undo()
    assert catalogue.get_version(f"{name}@champion", mlflow_server).version == "1"
    assert [r["version"] for r in catalogue.list_concepts(mlflow_server) if r["name"] == name] == ["1"]


def _two_undecided_versions(server: str, name: str):
    """A registered model `name` with versions 1 and 2, neither with its alias decided; returns the client."""
    client = mlflow.MlflowClient(server)
    client.create_registered_model(name)
    run = client.create_run(client.create_experiment(f"{name}-exp"))
    for _ in range(2):
        client.create_model_version(name, f"runs:/{run.info.run_id}/concept", run_id=run.info.run_id)
    return client


def test_a_version_whose_register_died_is_waited_for_once(mlflow_server):
    name = "cat-abandoned"
    client = _two_undecided_versions(mlflow_server, name)
    client.set_model_version_tag(name, "1", "gate", "passes the thresholds; no champion yet")
    # version 2's register died before deciding its alias; version 3 waits for it, then marks it
    waits = []
    for _ in range(2):
        t0 = time.monotonic()
        registry._wait_for_older_decisions(client, name, 3, "another-run", {}, "models:/m-3", timeout=2.0)
        waits.append(time.monotonic() - t0)
    assert waits[0] >= 2.0 and waits[1] < 2.0  # the next registration does not wait for it again
    assert client.get_model_version(name, "2").tags["gate"] == registry.ABANDONED


def test_a_register_says_what_it_waits_for_and_not_for_one_long_silent(mlflow_server, caplog, monkeypatch):
    """After a register killed outright, the next one printed nothing for five minutes; and one killed an hour
    before was waited for as long."""
    import logging

    name = "cat-silent"
    client = _two_undecided_versions(mlflow_server, name)
    client.set_model_version_tag(name, "1", "gate", "decided")
    with caplog.at_level(logging.INFO, logger="oneword.registry"):
        registry._wait_for_older_decisions(client, name, 3, "run-3", {}, "models:/m-3", timeout=0.3)
    said = " ".join(caplog.text.split())
    assert "cat-silent: waiting for version 2's register to decide its alias before version 3's" in said, said
    client.delete_model_version_tag(name, "2", "gate")
    real = registry.silent_for
    monkeypatch.setattr(registry, "silent_for", lambda mv, now=None: real(mv, now) + 3600)  # as if an hour later
    t0 = time.monotonic()
    registry._wait_for_older_decisions(client, name, 3, "run-3", {}, "models:/m-3", timeout=30)
    assert time.monotonic() - t0 < 10 and client.get_model_version(name, "2").tags["gate"] == registry.ABANDONED


def test_a_waiting_version_is_not_abandoned_with_the_dead_one_it_waits_for(mlflow_server):
    """Versions 1 and 2 are undecided when version 3 runs out of patience: 1's register died, 2's is alive and
    waiting for 1 as 3 is. Version 3 marks only 1, so that 2 decides its own alias before 3 decides; marking both
    at once let 2 and 3 set the champion alias at the same time."""
    name = "cat-queue"
    client = _two_undecided_versions(mlflow_server, name)

    def version_2_register():  # alive: waits for version 1 longer than version 3 does, then decides
        registry._wait_for_older_decisions(client, name, 2, "run-2", {}, "models:/m-2", timeout=30)
        client.set_model_version_tag(name, "2", "gate", "decided by its own register")

    class Marks:  # version 3's client, which notes the versions it marks
        marked: ClassVar[list[str]] = []

        def __getattr__(self, attr):
            return getattr(client, attr)

        def set_model_version_tag(self, name, version, key, value):
            self.marked.append(str(version))
            client.set_model_version_tag(name, version, key, value)

    alive = threading.Thread(target=version_2_register)
    alive.start()
    # 3 s: after 3 marks 1, 2 must see it and decide (a few local HTTP calls) before 3's patience runs out again
    registry._wait_for_older_decisions(Marks(), name, 3, "run-3", {}, "models:/m-3", timeout=3.0)
    alive.join(timeout=30)
    assert Marks.marked == ["1"]
    assert {v: client.get_model_version(name, v).tags["gate"] for v in ("1", "2")} == {
        "1": registry.ABANDONED,
        "2": "decided by its own register",
    }


def test_a_dead_version_two_registers_mark_at_once_fails_neither(mlflow_server):
    """Two registers waited as long for a dead version 1 and mark it at one moment: PostgreSQL refuses the second
    insert of the tag (an HTTP 400 MLflow's client does not retry). Here the other register's mark lands just
    before this one's, and this one's is refused as PostgreSQL would; it waits on, and so does a register whose
    dead version was deleted meanwhile."""
    from mlflow.exceptions import MlflowException

    name = "cat-marked-twice"
    client = _two_undecided_versions(mlflow_server, name)
    client.set_model_version_tag(name, "2", "gate", "decided by its own register")

    class Refused:  # this register's client: the other's mark lands first, and its own insert is refused
        def __getattr__(self, attr):
            return getattr(client, attr)

        def set_model_version_tag(self, name, version, key, value):
            client.set_model_version_tag(name, version, key, value)  # the other register's
            raise MlflowException("duplicate key value violates unique constraint", error_code="BAD_REQUEST")

    registry._wait_for_older_decisions(Refused(), name, 3, "run-3", {}, "models:/m-3", timeout=0.3)
    assert client.get_model_version(name, "1").tags["gate"] == registry.ABANDONED

    class Deleted(Refused):
        def set_model_version_tag(self, name, version, key, value):
            client.delete_model_version(name, version)  # pruned meanwhile
            client.set_model_version_tag(name, version, key, value)

    two = client.get_model_version(name, "2")
    client.create_model_version(name, two.source, run_id=two.run_id)  # 3, whose register died
    registry._wait_for_older_decisions(Deleted(), name, 4, "run-4", {}, "models:/m-4", timeout=0.3)
    assert [mv.version for mv in client.search_model_versions(f"name = '{name}'")] == ["2", "1"]


def test_another_registers_version_of_the_same_run_and_scores_is_no_twin(mlflow_server):
    """Two registers of one training take its live run, and one evaluation draws the same scores twice: only the
    logged model tells the other's version from a retried create's twin."""
    name, tags = "cat-not-a-twin", {"reconstruction": "0.500000"}
    client = mlflow.MlflowClient(mlflow_server)
    client.create_registered_model(name)
    run = client.create_run(client.create_experiment(f"{name}-exp")).info.run_id
    for model in ("a", "b"):
        client.create_model_version(name, f"runs:/{run}/{model}", run_id=run, tags=tags)
    registry._wait_for_older_decisions(client, name, 2, run, tags, f"runs:/{run}/b", timeout=0.5)
    assert client.get_model_version(name, "1").tags["gate"] == registry.ABANDONED  # waited for, not deleted
    client.set_model_version_tag(name, "2", "gate", "decided by its register")
    for _ in range(2):  # version 3, and its retried create's answer, version 4
        client.create_model_version(name, f"runs:/{run}/c", run_id=run, tags=tags)
    registry._wait_for_older_decisions(client, name, 4, run, tags, f"runs:/{run}/c", timeout=30)
    assert sorted(mv.version for mv in client.search_model_versions(f"name = '{name}'")) == ["1", "2", "4"]


def test_only_a_decided_version_just_before_is_the_same_result(mlflow_server):
    name, key = "cat-same-result", {registry.RESULT_KEY_TAG: "r-1"}
    client = mlflow.MlflowClient(mlflow_server)
    client.create_registered_model(name)
    run = client.create_run(client.create_experiment(f"{name}-exp")).info.run_id
    for _ in range(2):
        client.create_model_version(name, f"runs:/{run}/x", run_id=run, tags=key)
    client.set_model_version_tag(name, "1", "gate", registry.ABANDONED)  # its register died: it decided nothing
    assert registry._same_result_before(client, name, 2, key) is None
    client.set_model_version_tag(name, "1", "gate", "passes the thresholds; no champion yet")
    assert registry._same_result_before(client, name, 2, key).version == "1"
    assert registry._same_result_before(client, name, 2, {registry.RESULT_KEY_TAG: "r-2"}) is None
    assert registry._same_result_before(client, name, 2, {}) is None  # unevaluated: never the same result


def test_a_new_token_under_the_same_name_replaces_the_champion(evaluated_concept, tmp_path):
    """A manifest's `token:` changed, its `name:` kept: prompts with the new word must find it at @champion,
    though its scores, close to the old word's, would not beat them."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    train_dir, eval_dir = evaluated_concept
    registry.register(train_dir, _with_scores(eval_dir, tmp_path, 0.6, 0.3), uri, name="cat-renamed")
    renamed = tmp_path / "renamed"
    shutil.copytree(train_dir, renamed)
    summary = json.loads((renamed / "summary.json").read_text())
    summary["concept"]["token"] = "<cat-new>"
    (renamed / "summary.json").write_text(json.dumps(summary))

    def evaluated_as_new(reconstruction: float, editability: float):  # its evaluation names the new token
        scored = _with_scores(eval_dir, tmp_path, reconstruction, editability)
        metrics = json.loads((scored / "metrics.json").read_text())
        (scored / "metrics.json").write_text(json.dumps({**metrics, "token": "<cat-new>"}))
        return scored

    r = registry.register(renamed, evaluated_as_new(0.59, 0.3), uri, name="cat-renamed")
    assert r.alias == "champion" and "replaces the champion's token '<cat-r>'" in r.reason
    assert "first champion" not in r.reason, r.reason  # there was one
    low = registry.register(renamed, evaluated_as_new(0.2, 0.1), uri, name="cat-renamed",
                            thresholds=GateThresholds(min_reconstruction=0.5))  # fmt: skip
    assert low.alias == "candidate"  # the same word now: the gate as always


def test_a_version_trained_on_none_of_the_champions_photos_is_not_compared_with_it(evaluated_concept, tmp_path):
    """Two concepts that share a token (the paper's `S*`) share a registered name: the second, trained on other
    photos, must not take `@champion` from the first by scores measured against other pictures."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    train_dir, eval_dir = evaluated_concept
    first = registry.register(train_dir, _with_scores(eval_dir, tmp_path, 0.6, 0.3), uri, name="s-photos")
    assert first.alias == "champion"
    other = tmp_path / "other-photos"
    shutil.copytree(train_dir, other)
    summary = json.loads((other / "summary.json").read_text())
    summary["image_sha256"] = [h[::-1] for h in summary["image_sha256"]]
    (other / "summary.json").write_text(json.dumps(summary))
    manifest = json.loads((other / "dataset" / "manifest.json").read_text())
    for image in manifest["images"]:
        image["source_sha256"] = image["source_sha256"][::-1]
    (other / "dataset" / "manifest.json").write_text(json.dumps(manifest))
    r = registry.register(other, _with_scores(eval_dir, tmp_path, 0.9, 0.5, photos=summary["image_sha256"]), uri,
                          name="s-photos")  # fmt: skip
    assert (r.version, r.alias) == ("2", "candidate"), r
    said = " ".join(r.reason.split())
    assert "trained on other photos than the champion, version 1" in said, said
    assert "oneword concepts promote s-photos/2" in said, said
    # one photo in common is the same concept with photos added or taken out: the gate compares as always
    manifest["images"][0]["source_sha256"] = manifest["images"][0]["source_sha256"][::-1]
    (other / "dataset" / "manifest.json").write_text(json.dumps(manifest))
    shared = registry.register(other, _with_scores(eval_dir, tmp_path, 0.9, 0.4, photos=summary["image_sha256"]), uri,
                               name="s-photos")  # fmt: skip
    assert shared.alias == "champion" and "other photos" not in shared.reason, shared


def test_a_champion_under_a_raised_bar_gives_way_to_a_version_that_passes_it(evaluated_concept, tmp_path):
    """Raised thresholds do not take the alias from the champion on their own (serving goes on), but a version
    that passes them takes it, though it scores less than the champion in all."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    train_dir, eval_dir = evaluated_concept
    registry.register(train_dir, _with_scores(eval_dir, tmp_path, 0.9, 0.2), uri, name="cat-bar")
    raised = GateThresholds(min_editability=0.3)
    r = registry.register(train_dir, _with_scores(eval_dir, tmp_path, 0.6, 0.35), uri, name="cat-bar",
                          thresholds=raised)  # fmt: skip
    assert r.alias == "champion" and "version 1, does not pass these thresholds (editability 0.2000" in r.reason
    assert r.reason.startswith("passes the thresholds; the champion"), r.reason
    low = registry.register(train_dir, _with_scores(eval_dir, tmp_path, 0.9, 0.25), uri, name="cat-bar",
                            thresholds=raised)  # fmt: skip
    assert low.alias == "candidate" and "editability 0.2500 < threshold" in low.reason
    # under the bar it was judged by, a lower score does not beat the champion
    again = registry.register(train_dir, _with_scores(eval_dir, tmp_path, 0.5, 0.35), uri, name="cat-bar",
                              thresholds=raised)  # fmt: skip
    assert again.alias == "candidate" and "does not beat the champion" in again.reason


def test_a_changed_gate_alone_judges_the_newest_versions_recorded_scores_again(evaluated_concept, tmp_path):
    """Only the gate changed since the newest version (its evaluation key is tonight's): its twin would score the
    same; a run is worth it only if that twin would take @champion."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    train_dir, eval_dir = evaluated_concept

    def scored(reconstruction, editability, fingerprint=None):
        out = _with_scores(eval_dir, tmp_path, reconstruction, editability, fingerprint)
        m = json.loads((out / "metrics.json").read_text())
        (out / "metrics.json").write_text(json.dumps({**m, "evaluation_key": "same-evaluation"}))
        return out

    def again(gate, evaluation="same-evaluation"):
        return registry.rejudged_result(uri, "cat-rj", evaluation, gate, "<cat-r>")

    assert registry.register(train_dir, scored(0.9, 0.2), uri, name="cat-rj").alias == "champion"
    second = registry.register(train_dir, scored(0.5, 0.35), uri, name="cat-rj", thresholds=GateThresholds(margin_se=2))
    assert second.alias == "candidate"  # 0.85 does not beat 1.1
    # a bar the champion fails and the newest passes: its twin would take @champion, so a run must register it
    assert again(GateThresholds(min_editability=0.3)) is None
    # a bar neither passes: no alias would move; the note says why, and what becomes of the champion
    found = again(GateThresholds(min_editability=0.4))
    assert (found["version"], found["aliases"]) == ("2", ["candidate"])
    assert found["rejudged"].startswith("the gate changed: editability 0.3500 < threshold 0.4000")
    assert "the champion, version 1, does not pass them either" in found["rejudged"]
    assert found["rejudged"].endswith("it keeps @champion until a version that passes them takes it")
    assert again(GateThresholds(min_editability=0.4), "another-evaluation") is None  # not a twin: evaluate again
    # scores measured by another evaluator are not compared with the champion's: no alias would move
    third = registry.register(train_dir, scored(0.5, 0.35, "sha256:other"), uri, name="cat-rj",
                              thresholds=GateThresholds(margin_se=3))  # fmt: skip
    assert third.alias == "candidate" and "not compared" in third.reason
    found = again(GateThresholds(min_editability=0.3))
    assert found["version"] == "3" and "not compared" in found["rejudged"]
    # tags that do not parse (another tool wrote them): evaluated again, this concept only
    client = mlflow.MlflowClient(uri)
    client.set_model_version_tag("cat-rj", "3", "reconstruction", "n/a")
    assert again(GateThresholds(min_editability=0.3)) is None


def test_a_single_concept_runs_exit_handler_answers_from_the_registry(evaluated_concept, tmp_path):
    from types import SimpleNamespace

    from oneword.pipelines import components

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    train_dir, eval_dir = evaluated_concept
    registry.register(train_dir, eval_dir, uri, name="cat-rr", batch_id="run-7")

    def answer(run_id, state, error="", name="cat-rr"):
        return components.report_run.python_func(batch_id=run_id, images="x", token="<cat-r>", init_word="cat",
                                                 name=name, status=SimpleNamespace(state=state, error_message=error),
                                                 tracking_uri=uri)  # fmt: skip

    assert answer("run-7", "SUCCEEDED") == "cat-rr/1@champion"
    assert answer("run-8", "FAILED", "evaluate: pod lost") == (
        "cat-rr failed at a step that recorded nothing: evaluate: pod lost"
    )
    said = answer("run-8", "FAILED", name="my cat")  # a name the registry cannot hold: said, not a crash
    assert said.startswith("nothing registered (run state FAILED)") and "my cat" in said
    # as a cluster tells it: ML Metadata's state, and no error message (KFP's driver fills none)
    assert answer("run-9", "RUNNING", None) == (
        "cat-rr failed at a step that recorded nothing: no step recorded a result; see the run's logs")


def test_a_registry_that_does_not_answer_is_not_no_champion(monkeypatch):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE

    class Down:
        def get_model_version_by_alias(self, name, alias):
            raise MlflowException("API request failed with error code 503", error_code=TEMPORARILY_UNAVAILABLE)

    metrics = {"reconstruction": 0.9, "editability": 0.9, "evaluator": {"name": "c", "fingerprint": "f"}}
    with pytest.raises(MlflowException, match="503"):
        registry._decide_alias(Down(), "cat", metrics, GateThresholds())

    class NoChampion:
        def get_model_version_by_alias(self, name, alias):
            raise MlflowException(f"Registered model alias {alias} not found.", error_code=INVALID_PARAMETER_VALUE)

    assert registry._decide_alias(NoChampion(), "cat", metrics, GateThresholds())[0] == "champion"


def test_s3_artifact_store_through_the_server(evaluated_concept, mlflow_server_s3, tmp_path, monkeypatch):
    """Artifacts land in S3 (moto) via the server's proxy; the client needs no S3 credentials."""
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "S3_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(k, raising=False)
    train_dir, eval_dir = evaluated_concept
    reg = registry.register(train_dir, eval_dir, mlflow_server_s3, name="cat-s3")
    assert reg.alias == "champion"
    pulled, _ = catalogue.pull_concept("cat-s3@champion", tmp_path / "c.safetensors", tracking_uri=mlflow_server_s3)
    assert E.load(pulled).token == "<cat-r>"
    monkeypatch.undo()
    from oneword import storage

    keys = [k for k, _, _ in storage.list_objects("s3://mlflow")]
    keys = [k for k in keys if reg.run_id in k]  # the bucket holds other tests' artifacts too
    assert any(k.endswith("embeddings/diffusers/learned_embeds.safetensors") for k in keys)
    assert any(k.endswith("evaluation/report.html") for k in keys)
    # an erasure request: the concept goes whole, its artifacts from the bucket too, through the server's proxy
    from oneword.cli import main

    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "S3_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(k, raising=False)
    client = mlflow.MlflowClient(mlflow_server_s3)
    planned = catalogue.delete_concept("cat-s3", mlflow_server_s3, dry_run=True)
    assert planned["versions"] == ["1"] and planned["runs"] == [reg.run_id] and len(planned["logged_models"]) == 1
    main(["concepts", "delete", "cat-s3", "--yes", "--tracking-uri", mlflow_server_s3])
    monkeypatch.undo()
    left = [k for k, _, _ in storage.list_objects("s3://mlflow")]
    assert not [k for k in left if reg.run_id in k or planned["logged_models"][0] in k], left
    assert client.get_run(reg.run_id).info.lifecycle_stage == "deleted"
    with pytest.raises(OnewordError, match="not found"):
        catalogue.get_version("cat-s3@champion", mlflow_server_s3)


def test_an_erasure_takes_the_checkpoints_and_kept_trainings_that_hold_the_concept(
    cat_latents_dir, tiny_model_dir, tmp_path, capsys, monkeypatch
):
    """Outside MLflow, a training leaves its group's checkpoints and a kept copy of each concept under the
    checkpoint root: an erasure takes those that hold the concept (a shard-mate's kept copy of the shared
    checkpoints too), found through its runs, a failed training's as well; the others' stay."""
    from oneword.cli import main
    from oneword.inversion import ConceptSpec, TrainConfig
    from oneword.live import LiveTracking
    from oneword.train import train_group

    uri = tracking.ensure_store(f"sqlite:///{tmp_path / 'mlflow.db'}")
    root, cfg, live = tmp_path / "checkpoints", TrainConfig(steps=4, checkpoint_every=2), LiveTracking(uri)

    def trained(out: str, *names: str) -> None:
        members = [(n, ConceptSpec(token=f"<{n}>", init_word="cat"), cat_latents_dir) for n in names]
        rows = train_group(members, tmp_path / out, cfg, str(tiny_model_dir), root, progress=False, tracking=live)
        assert [r["status"] for r in rows] == ["trained"] * len(names)

    trained("ab", "cat-a", "cat-b")  # a shard of two
    trained("c", "cat-c")
    trained("d", "cat-d")  # never registered: its live run alone names its copies
    for name, out in (("cat-a", "ab"), ("cat-b", "ab"), ("cat-c", "c")):
        registry.register(tmp_path / out / name, None, uri, name=name)

    def summary(out: str, name: str) -> dict:
        return json.loads((tmp_path / out / name / "summary.json").read_text())

    def kept(out: str, name: str) -> Path:
        return root / "trainings" / f"{summary(out, name)['training_key']}.tar"

    group = {out: Path(summary(out, name)["checkpoint_dir"]) for out, name in (("ab", "cat-a"), ("c", "cat-c"),
                                                                                ("d", "cat-d"))}  # fmt: skip
    assert all(kept(o, n).is_file() for o, n in (("ab", "cat-a"), ("ab", "cat-b"), ("c", "cat-c"), ("d", "cat-d")))
    planned = catalogue.delete_concept("cat-a", uri, dry_run=True)
    assert sorted(planned["checkpoints"]) == sorted(map(str, (group["ab"], kept("ab", "cat-a"), kept("ab", "cat-b"))))
    assert group["ab"].is_dir() and kept("ab", "cat-a").is_file()  # a dry run deletes nothing
    main(["concepts", "delete", "cat-a", "--yes", "--tracking-uri", uri])
    said = " ".join(capsys.readouterr().out.split())
    assert "and 3 checkpoint folders or kept trainings holding it" in said and str(group["ab"]) in said, said
    assert not group["ab"].exists() and not kept("ab", "cat-a").exists()
    assert not kept("ab", "cat-b").exists()  # it held copies of the shared checkpoints, cat-a's vectors in them
    assert catalogue.get_version("cat-b/1", uri)  # cat-b's registered version stays
    assert group["c"].is_dir() and kept("c", "cat-c").is_file() and group["d"].is_dir()
    assert catalogue.delete_concept("cat-d", uri)["checkpoints"] == [str(kept("d", "cat-d")), str(group["d"])]
    assert not group["d"].exists() and not kept("d", "cat-d").exists() and kept("c", "cat-c").is_file()
    # copies in an object store this machine has no settings for: refused before anything goes
    client = mlflow.MlflowClient(uri)
    elsewhere = client.create_run(client.get_experiment_by_name("oneword").experiment_id, tags={
        registry.CONCEPT_TAG: "cat-e",
        trainings.GROUP_TAG: "s3://ckpt/checkpoints/0123456789abcdef"}).info.run_id  # fmt: skip
    for k in ("S3_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(OnewordError, match=r"cannot reach the checkpoints that cat-e's trainings left \(s3://ckpt/"):
        catalogue.delete_concept("cat-e", uri)
    assert client.get_run(elsewhere).info.lifecycle_stage == "active"


def test_a_concept_is_deleted_whole_and_only_with_yes(evaluated_concept, tmp_path, capsys):
    """Every version, every run of it (a failure's too), their artifacts and logged models; a second delete
    (one cut short) finishes the first; another tool's model is refused."""
    from oneword.cli import main

    uri = tracking.ensure_store(f"sqlite:///{tmp_path / 'mlflow.db'}")
    train_dir, eval_dir = evaluated_concept
    first = registry.register(train_dir, eval_dir, uri, name="cat-erase")
    second = registry.register(train_dir, _with_scores(eval_dir, tmp_path, 0.7, 0.3), uri, name="cat-erase")
    client = mlflow.MlflowClient(uri)
    failed = client.create_run(client.get_experiment_by_name("oneword").experiment_id,
                               tags={registry.CONCEPT_TAG: "cat-erase"}).info.run_id  # fmt: skip
    other = registry.register(train_dir, eval_dir, uri, name="dog-stays")
    main(["concepts", "delete", "cat-erase", "--tracking-uri", uri])
    said = " ".join(capsys.readouterr().out.split())
    assert "would delete cat-erase: 2 versions, 3 MLflow runs and 2 logged models, with their artifacts" in said
    assert "Nothing was deleted" in said and catalogue.get_version("cat-erase@champion", uri)
    artifacts = tmp_path / "mlartifacts"
    assert (artifacts / first.run_id).exists()
    main(["concepts", "delete", "cat-erase", "--yes", "--tracking-uri", uri])
    assert "deleted cat-erase: 2 versions, 3 MLflow runs" in " ".join(capsys.readouterr().out.split())
    def files(folder: Path) -> list[Path]:
        return [f for f in folder.rglob("*") if f.is_file()]

    for run_id in (first.run_id, second.run_id, failed):
        assert client.get_run(run_id).info.lifecycle_stage == "deleted" and not files(artifacts / run_id)
    kept = catalogue.get_version("dog-stays@champion", uri)
    assert [m.name for m in (artifacts / "models").iterdir() if files(m)] == [kept.source.split("/")[-1]]
    assert files(artifacts / other.run_id)  # the other concept's run keeps its artifacts
    with pytest.raises(OnewordError, match="no concept or bundle named 'cat-erase'"):
        catalogue.delete_concept("cat-erase", uri)  # nothing left of it
    cut = registry.register(train_dir, eval_dir, uri, name="cat-cut")
    client.delete_registered_model("cat-cut")  # a delete cut short after its first step: the next one finishes it
    assert catalogue.delete_concept("cat-cut", uri)["runs"] == [cut.run_id] and not files(artifacts / cut.run_id)
    client.create_registered_model("their-model")
    with pytest.raises(OnewordError, match="not a oneword concept"):
        catalogue.delete_concept("their-model", uri)


def test_an_erasure_deletes_no_path_a_run_names_that_oneword_did_not_write(tmp_path, caplog):
    """Run tags and summaries name the copies a training left; anyone who may write to an experiment can set
    them: an erasure by a person with wide rights deleted whatever file or folder a planted tag named."""
    import logging

    from oneword import trainings

    uri = tracking.ensure_store(f"sqlite:///{tmp_path / 'mlflow.db'}")
    victim = tmp_path / "victim"
    (victim / "ckpts").mkdir(parents=True)
    (victim / "ckpts" / "step-000001.pt").write_bytes(b"someone's")
    (victim / "important.tar").write_bytes(b"someone's")
    (victim / "trainings").mkdir()
    (victim / "trainings" / "notes.tar").write_bytes(b"someone's")  # where kept trainings lie, not one by name
    client = mlflow.MlflowClient(uri)
    planted = client.create_run(client.create_experiment("team-b"), tags={
        registry.CONCEPT_TAG: "team-b-thing", trainings.GROUP_TAG: str(victim / "ckpts"),
        trainings.KEPT_TAG: str(victim / "trainings" / "notes.tar")}).info.run_id  # fmt: skip
    also = client.create_run(client.get_experiment_by_name("team-b").experiment_id, tags={
        registry.CONCEPT_TAG: "team-b-thing", trainings.GROUP_TAG: f"{victim}/ckpts/../0123456789abcdef",
        trainings.KEPT_TAG: str(victim / "important.tar")}).info.run_id  # fmt: skip
    with caplog.at_level(logging.WARNING):
        done = catalogue.delete_concept("team-b-thing", uri)
    assert done["checkpoints"] == [] and sorted(done["runs"]) == sorted([planted, also])
    assert sorted(p.name for p in victim.rglob("*") if p.is_file()) == ["important.tar", "notes.tar",
                                                                         "step-000001.pt"]  # fmt: skip
    said = " ".join(caplog.text.split())
    assert f"{victim / 'ckpts'} is not where oneword keeps a group's checkpoints: not deleted" in said
    assert f"{victim / 'important.tar'} is not where oneword keeps a training: not deleted" in said
    # nor one read against wherever the erasure runs, nor a bucket-less URI (which stopped the erasure)
    key = "0123456789abcdef"
    assert trainings.copies({f"ckpts/{key}", f"s3:///{key}"}, {f"trainings/{key}.tar"}) == []


def test_a_query_of_a_store_that_is_not_there_makes_none(tmp_path):
    """From a notebook, a misspelt SQLite path made folders and an empty store, and the query answered []."""
    missing = tmp_path / "no" / "dir" / "x.db"
    for query in (lambda uri: catalogue.list_concepts(tracking_uri=uri), lambda uri: catalogue.show_concept("a", uri),
                  lambda uri: catalogue.list_concepts(tracking_uri=uri, batch="77842948"),
                  lambda uri: catalogue.pull_concept("a@champion", tracking_uri=uri)):  # fmt: skip
        with pytest.raises(OnewordError, match=f"no MLflow store at {missing}"):
            query(f"sqlite:///{missing}")
    assert not (tmp_path / "no").exists()


def test_register_inside_a_callers_active_run_is_refused_by_name(evaluated_concept, tmp_path):
    """In a notebook's `with mlflow.start_run():`, register failed with MLflow's bare "Run ... is already active"
    after making its experiment, and pointed the caller's run at oneword's store."""
    train_dir, eval_dir = evaluated_concept
    theirs = f"sqlite:///{tmp_path / 'theirs.db'}"
    mlflow.set_tracking_uri(theirs)
    try:
        with mlflow.start_run() as run:
            said = f"register opens an MLflow run of its own, and run {run.info.run_id} is active"
            with pytest.raises(OnewordError, match=said):
                registry.register(train_dir, eval_dir, f"sqlite:///{tmp_path / 'ours.db'}", name="cat-in-run")
            mlflow.log_metric("still", 1.0)  # the caller's run logs on, to the caller's store
        assert mlflow.MlflowClient(theirs).get_run(run.info.run_id).data.metrics == {"still": 1.0}
        assert not (tmp_path / "ours.db").exists()
    finally:
        mlflow.set_tracking_uri(None)


def test_local_default_store(evaluated_concept, tmp_path, monkeypatch):
    """With no tracking URI, a SQLite store and artifact folder appear in the working directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    train_dir, eval_dir = evaluated_concept
    reg = registry.register(train_dir, eval_dir, name="cat-local")
    assert reg.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert (tmp_path / "mlflow.db").exists() and list((tmp_path / "mlartifacts").rglob("report.html"))


def test_an_unchanged_concept_keeps_its_version_and_the_batch_report_says_so(evaluated_concept, mlflow_server,
                                                                             tmp_path):  # fmt: skip
    """A scheduled batch finds a concept whose newest version came from the same training, evaluation and gate:
    no new version."""
    from oneword.batch import batch_report
    from oneword.config import EvalConfig
    from oneword.evaluation.protocol import evaluation_key

    train_dir, eval_dir = evaluated_concept
    trained = tmp_path / "trained"
    shutil.copytree(train_dir, trained)
    summary = json.loads((trained / "summary.json").read_text())
    (trained / "summary.json").write_text(json.dumps({**summary, "training_key": "t-1"}))
    config, gate = EvalConfig(n_images=2, prompt_set="paper"), GateThresholds()

    def scored(training_key, rec):
        out = _with_scores(eval_dir, tmp_path, rec, 0.2)
        m = json.loads((out / "metrics.json").read_text())
        (out / "metrics.json").write_text(json.dumps({**m, "evaluation_key": evaluation_key(training_key, config)}))
        return out

    name = "cat-nightly"
    assert registry.earlier_result(mlflow_server, trained, name, config, gate) is None  # nothing registered yet
    first = scored("t-1", 0.5)
    found_run = registry.register(trained, first, mlflow_server, name=name, batch_id="reg-night-1").run_id
    found = registry.earlier_result(mlflow_server, trained, name, config, gate)
    assert found == {"version": "1", "aliases": ["champion"]}
    assert (
        registry.earlier_result(mlflow_server, trained, name, EvalConfig(n_images=3, prompt_set="paper"), gate) is None
    )
    assert registry.earlier_result(mlflow_server, trained, name, config, GateThresholds(min_editability=0.1)) is None
    # settings evaluate will refuse are evaluate's to report, not this lookup's
    assert registry.earlier_result(mlflow_server, trained, name, EvalConfig(prompt_set="no-such-set"), gate) is None
    prompts = tmp_path / "prompts.txt"  # a prompt file is part of the key by its content
    prompts.write_text("a {} in space\n")
    before = evaluation_key("t-1", EvalConfig(prompt_set=str(prompts)))
    prompts.write_text("a {} at night\n")
    assert evaluation_key("t-1", EvalConfig(prompt_set=str(prompts))) != before
    # the next night: the same training and settings
    r = batch_records.record_unchanged(mlflow_server, trained, name, found, "reg-night-2")
    assert (r.version, r.alias) == ("1", "champion") and "unchanged" in r.reason
    client = mlflow.MlflowClient(mlflow_server)
    assert client.get_run(r.run_id).info.status == "FINISHED"
    assert [mv.version for mv in client.search_model_versions(f"name = '{name}'")] == ["1"]  # no second version
    plan = [{"images": "x", "token": "<cat-r>", "init_word": "cat", "name": name}]
    report = batch_report(mlflow_server, "reg-night-2", plan)
    assert (report["registered"], report["unchanged"], report["failed"]) == (0, 1, 0)
    row = report["concepts"][0]
    assert {k: row[k] for k in ("name", "status", "version", "alias")} == {
        "name": name, "status": "unchanged", "version": "1", "alias": "champion"
    }  # fmt: skip
    assert row["reconstruction"] == pytest.approx(0.5) and row["run_id"] == found_run  # the version's own scores
    assert row["gate"] == client.get_model_version(name, "1").tags["gate"]  # why it holds its alias
    # `oneword register` run again on what it registered: that version, found before anything is uploaded
    experiment = [client.get_run(found_run).info.experiment_id]
    models = len(mlflow.search_logged_models(experiment_ids=experiment, output_format="list"))
    again = registry.register(trained, first, mlflow_server, name=name, batch_id="reg-night-3")
    assert again.unchanged and (again.version, again.alias) == ("1", "champion") and "unchanged" in again.reason
    assert client.list_artifacts(again.run_id) == [] and client.get_run(again.run_id).info.status == "FINISHED"
    assert len(mlflow.search_logged_models(experiment_ids=experiment, output_format="list")) == models  # none new
    assert batch_report(mlflow_server, "reg-night-3", plan)["unchanged"] == 1
    assert batch_report(mlflow_server, "reg-night-1", plan)["registered"] == 1
    # a batch's versions are found by its tag, as the whole registry lists them
    night_1 = catalogue.batch_versions(mlflow_server, "reg-night-1")
    assert night_1 == [r for r in catalogue.list_concepts(mlflow_server) if r["batch_id"] == "reg-night-1"]
    assert [(r["name"], r["version"]) for r in night_1] == [(name, "1")]
    assert catalogue.batch_versions(mlflow_server, "no-such-batch") == []
    assert catalogue.list_concepts(mlflow_server, batch="reg-night-1", alias="champion") == night_1
    assert catalogue.list_concepts(mlflow_server, batch="reg-night-1", alias="candidate") == []
    # by name: a pattern, asked of the server and matched exactly (LIKE's `_` would match any character)
    assert catalogue.list_concepts(mlflow_server, names=["cat-night*"]) == night_1
    assert catalogue.list_concepts(mlflow_server, names=["cat-nightl?"]) == night_1
    assert catalogue.list_concepts(mlflow_server, names=["cat_nightly", "no-such-night-*"]) == []
    with pytest.raises(OnewordError, match="is no concept name or pattern"):
        catalogue.list_concepts(mlflow_server, names=["x' or name LIKE '%"])
    # photos changed (version 2), then changed back: version 1's inputs are no longer the newest, so it counts
    # for nothing; and a version whose register died before its gate decided never counts
    registry.register(trained, scored("t-2", 0.4), mlflow_server, name=name)
    assert registry.earlier_result(mlflow_server, trained, name, config, gate) is None
    client.delete_model_version_tag(name, "2", "gate")
    client.set_model_version_tag(name, "2", "oneword.result_key",
                                 client.get_model_version(name, "1").tags["oneword.result_key"])  # fmt: skip
    assert registry.earlier_result(mlflow_server, trained, name, config, gate) is None
    # the version a batch kept, deleted since by an operator: the report says the concept failed, and is made
    client.delete_model_version(name, "1")
    assert batch_report(mlflow_server, "reg-night-2", plan)["concepts"][0]["status"] == "failed"


def test_a_batchs_failures_say_where_each_concept_failed(mlflow_server):
    """A concept that failed in `register` has its own FAILED run (no stage), then the one `record_failure` logs:
    the report gives the stage and error, whichever of them is newer."""
    client = mlflow.MlflowClient(mlflow_server)
    exp = client.create_experiment("failures-exp")
    now = int(time.time() * 1000)
    for name, offset in (("older-own-run", -60_000), ("newer-own-run", 60_000)):
        tags = {registry.CONCEPT_TAG: name, "oneword.batch_id": "b-7"}
        own = client.create_run(exp, start_time=now + offset, tags=tags)
        client.set_terminated(own.info.run_id, status="FAILED")
        batch_records.record_failure(mlflow_server, name, "<x>", "b-7", "register", "sha mismatch", "failures-exp")
    failures = batch_records.batch_failures(mlflow_server, "b-7", "failures-exp")
    assert {n: (f["stage"], f["error"]) for n, f in failures.items()} == {
        "older-own-run": ("register", "sha mismatch"),
        "newer-own-run": ("register", "sha mismatch"),
    }
    # the same failure recorded again (a retried step): the run recorded the first time, not another
    first = batch_records.batch_failures(mlflow_server, "b-7", "failures-exp")["older-own-run"]["run_id"]
    again = batch_records.record_failure(mlflow_server, "older-own-run", "<x>", "b-7", "register", "sha mismatch",
                                         "failures-exp")  # fmt: skip
    assert again == first
    other = batch_records.record_failure(mlflow_server, "older-own-run", "<x>", "b-7", "register", "timeout",
                                         "failures-exp")  # fmt: skip
    assert other != first
    assert batch_records.batch_failures(mlflow_server, "b-7", "failures-exp")["older-own-run"]["error"] == "timeout"
    assert len(client.search_runs([exp], "attributes.status = 'FAILED'")) == 5
    # the fix a step's error came with travels with it: the report says what --dry-run said
    batch_records.record_failure(mlflow_server, "hinted", "<h>", "b-7", "train", "init word splits", "failures-exp",
                                 hint="try one of: object, thing")  # fmt: skip
    assert batch_records.batch_failures(mlflow_server, "b-7", "failures-exp")["hinted"]["hint"] == (
        "try one of: object, thing")


def test_a_registered_name_that_registry_searches_cannot_hold_is_refused_before_training():
    assert registry.concept_name("<My Cat!>") == "my-cat"
    assert registry.concept_name("<x>", "team.cat_v2-final") == "team.cat_v2-final"
    for bad in ("bob's-cat", "cat@home", "-cat", "cat/1", "a b"):
        with pytest.raises(OnewordError, match="not one oneword can look up") as e:
            registry.concept_name("<x>", bad)
        assert registry.NAME_PATTERN.fullmatch(e.value.hint.split("e.g. ")[1].strip("'"))
    from oneword.batch import ConceptEntry, plan_concepts

    with pytest.raises(OnewordError, match="bob's-cat"):
        plan_concepts([ConceptEntry(images="photos", token="<bob-cat>", init_word="cat", name="bob's-cat")])


def test_registering_a_concept_that_did_not_train_says_why(tmp_path, mlflow_server):
    from oneword import outcome

    failed = tmp_path / "train"
    outcome.write_failure(failed, "train", "the loss of <x> became nan", "lower the learning rate")
    with pytest.raises(OnewordError, match="failed at train: the loss of <x> became nan") as e:
        registry.register(failed, None, mlflow_server, name="never-trained")
    assert e.value.hint == "lower the learning rate"
    (tmp_path / "empty").mkdir()
    with pytest.raises(OnewordError, match="train did not finish"):
        registry.register(tmp_path / "empty", None, mlflow_server, name="never-trained")
    with pytest.raises(OnewordError, match=r"folder .*no-such-folder not found"):
        registry.register(tmp_path / "no-such-folder", None, mlflow_server, name="never-trained")


@pytest.mark.parametrize("seam", ["_artifact_files", "_log_model", "_version_tags"])  # before its run, in, after
def test_a_concept_deleted_while_a_registration_uploads_stays_deleted(seam, evaluated_concept, tmp_path, monkeypatch):
    """`concepts delete` refuses while a version is being decided, but a registration spends most of its time
    uploading before any version exists: a delete then, before its run was made or after, was undone (the
    registered model made anew, the run and its 100-odd artifacts back). The registration erases what it made and
    says so."""
    uri = tracking.ensure_store(f"sqlite:///{tmp_path / 'mlflow.db'}")
    train_dir, eval_dir = evaluated_concept
    registry.register(train_dir, eval_dir, uri, name="cat-gone")
    again = _with_scores(eval_dir, tmp_path / "again", 0.7, 0.3)  # another result: a new version, not unchanged
    real = getattr(registry, seam)

    def deleted_meanwhile(*args, **kwargs):
        out = real(*args, **kwargs)
        catalogue.delete_concept("cat-gone", uri)  # as another process's delete, between two of register's calls
        return out

    monkeypatch.setattr(registry, seam, deleted_meanwhile)
    with pytest.raises(registry.ErasedMeanwhile, match="cat-gone was deleted while this registration uploaded"):
        registry.register(train_dir, again, uri, name="cat-gone")
    client = mlflow.MlflowClient(uri)
    assert registry.model_kind(client, "cat-gone") is None
    runs = client.search_runs([client.get_experiment_by_name(registry.EXPERIMENT).experiment_id],
                              run_view_type=mlflow.entities.ViewType.ALL)  # fmt: skip
    assert runs and all(r.info.lifecycle_stage == "deleted" for r in runs)
    assert not [f for f in (tmp_path / "mlartifacts").rglob("*") if f.is_file()]


def test_a_deleted_experiment_is_named_with_how_to_restore_it(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    exp = registry.ensure_experiment(mlflow, "gone", uri)
    mlflow.MlflowClient(uri).delete_experiment(exp)
    with pytest.raises(OnewordError, match="'gone' is deleted") as e:
        registry.ensure_experiment(mlflow, "gone", uri)
    assert f"--experiment-id {exp}" in e.value.hint


class _LosesOneAnswer(BaseHTTPRequestHandler):
    """A proxy in front of the tracking server that forwards every request, and answers the first model-version
    create with a 503 after the server made the version (a gateway timing out, a pod restarting)."""

    upstream = ""
    lost: ClassVar[list] = []

    def _forward(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else None
        skip = ("host", "content-length", "connection", "transfer-encoding")
        headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
        req = urllib.request.Request(self.upstream + self.path, data=body, method=self.command, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                status, data, kind = r.status, r.read(), r.headers.get("Content-Type", "application/json")
        except urllib.error.HTTPError as e:
            status, data, kind = e.code, e.read(), e.headers.get("Content-Type", "application/json")
        if self.command == "POST" and self.path.startswith("/api/2.0/mlflow/model-versions/create") and not self.lost:
            self.lost.append(data)  # the server made the version; its answer is lost on the way back
            status, data, kind = 503, b'{"error_code": "TEMPORARILY_UNAVAILABLE"}', "application/json"
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _forward

    def log_message(self, *args) -> None:
        pass


def test_a_version_whose_create_was_retried_is_deleted_not_waited_for(evaluated_concept, mlflow_server, monkeypatch):
    """MLflow's client retries a create whose answer was lost: the server then holds a twin of this run's version
    (the first try's). Before, register waited ALIAS_WAIT_SECONDS (300 s) for it and left it ABANDONED."""
    import threading
    from http.server import ThreadingHTTPServer

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")  # the client's retry comes at once
    _LosesOneAnswer.upstream, _LosesOneAnswer.lost = mlflow_server, []
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), _LosesOneAnswer)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    train_dir, eval_dir = evaluated_concept
    name = "cat-twin"
    try:
        t0 = time.monotonic()
        reg = registry.register(train_dir, eval_dir, f"http://127.0.0.1:{proxy.server_address[1]}", name=name,
                                batch_id="b-twin")  # fmt: skip
        seconds = time.monotonic() - t0
    finally:
        proxy.shutdown()
        proxy.server_close()
    assert _LosesOneAnswer.lost, "the proxy never saw the create"
    client = mlflow.MlflowClient(mlflow_server, registry_uri=mlflow_server)  # register set the proxy as the default
    # waited for the twin instead (the bug): 300 s, and it would be left beside version 2 as ABANDONED
    assert seconds < 240 and reg.version == "2"
    assert [mv.version for mv in client.search_model_versions(f"name = '{name}'")] == ["2"]
    # a version the batch tagged whose register died before its gate decided is not reported as registered
    dead = client.create_model_version(
        name, f"runs:/{reg.run_id}/x", run_id=reg.run_id, tags={"oneword.batch_id": "b-twin"}
    )
    assert [(r["name"], r["version"]) for r in catalogue.batch_versions(mlflow_server, "b-twin")] == [(name, "2")]
    client.delete_model_version(name, dead.version)


def test_a_registry_that_cannot_answer_is_not_reported_as_a_missing_concept():
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Refusing(BaseHTTPRequestHandler):  # a tracking server behind a proxy that refuses these credentials
        def do_GET(self):
            self.send_response(403)
            self.send_header("Content-Length", "9")
            self.end_headers()
            self.wfile.write(b"Forbidden")

        def log_message(self, *args):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        with pytest.raises(OnewordError, match="could not look up 'my-cat@champion'") as e:
            catalogue.get_version("my-cat@champion", f"http://127.0.0.1:{srv.server_address[1]}")
        assert "not found" not in e.value.message and "credentials" in e.value.hint
        assert not isinstance(e.value, TransientError)  # a refusal is not weather
    finally:
        srv.shutdown()
    from oneword.evaluation.compare import load_metrics

    down = f"http://127.0.0.1:{free_port()}"  # nothing listens: said so in a line, not as urllib3's retry chatter
    with pytest.raises(TransientError) as e:
        load_metrics("my-cat/1", down)  # compare's lookup: not "no evaluation folder here, nor a concept"
    assert e.value.message == f"the registry at {down} did not answer: Connection refused (looking up 'my-cat/1')"


def test_pruning_deletes_old_versions_no_alias_points_at_and_leaves_the_rest(tmp_path, capsys, monkeypatch):
    from oneword.cli import main

    mlflow_server = f"sqlite:///{tmp_path / 'mlflow.db'}"  # a store of its own: pruning every concept of the
    # shared server would delete the versions other tests look at
    client = mlflow.MlflowClient(mlflow_server)
    run = client.create_run(client.create_experiment("prune-exp")).info.run_id
    for name, concept in (("cat-prune", "true"), ("dog-prune", "true"), ("not-a-concept", None)):
        client.create_registered_model(name, tags={registry.CONCEPT_TAG: concept} if concept else None)
        for v in range(1, 7):
            client.create_model_version(name, f"runs:/{run}/m{v}", run_id=run, tags={"oneword.token": "<p>"})
            if v != 4 or name == "dog-prune":  # cat-prune's version 4: its register is still deciding
                client.set_model_version_tag(name, str(v), "gate", registry.ABANDONED if v == 1 else "decided")
        client.set_registered_model_alias(name, "champion", "2")
        client.set_registered_model_alias(name, "candidate", "6")

    def versions(name):
        return sorted(int(mv.version) for mv in client.search_model_versions(f"name = '{name}'"))

    def pruned(rows):
        return [(r["name"], r["version"]) for r in rows]

    would = catalogue.prune_versions(mlflow_server, keep=2, names=["dog-prune"], dry_run=True)
    assert pruned(would) == [("dog-prune", "4"), ("dog-prune", "3"), ("dog-prune", "1")]
    assert versions("dog-prune") == [1, 2, 3, 4, 5, 6]  # a dry run deletes nothing
    # kept: the newest two and the alias holders; a concept whose register is at work, whole; another team's
    # models are not concepts: untouched
    assert pruned(catalogue.prune_versions(mlflow_server, keep=2)) == pruned(would)
    assert versions("dog-prune") == [2, 5, 6] and versions("cat-prune") == [1, 2, 3, 4, 5, 6]
    assert versions("not-a-concept") == [1, 2, 3, 4, 5, 6]
    client.set_model_version_tag("cat-prune", "4", "gate", "decided")  # its register is done
    assert pruned(catalogue.prune_versions(mlflow_server, keep=2)) == [("cat-prune", v) for v in "431"]
    fifth = [r for r in catalogue.list_concepts(mlflow_server) if r["version"] == "5"]
    assert catalogue.prune_versions(mlflow_server, keep=1) == fifth and len(fifth) == 2
    with pytest.raises(OnewordError, match="no concept named 'no-such-cat'"):
        catalogue.prune_versions(mlflow_server, names=["no-such-cat"])
    with pytest.raises(OnewordError, match="at least 1"):
        catalogue.prune_versions(mlflow_server, keep=0)
    # an alias that moved onto an old version after the listing: that version stays
    client.create_model_version("cat-prune", f"runs:/{run}/m7", run_id=run, tags={"oneword.token": "<p>", "gate": "d"})
    client.set_registered_model_alias("cat-prune", "candidate", "7")
    stale = catalogue.list_concepts(mlflow_server)  # version 6 holds no alias here
    client.set_registered_model_alias("cat-prune", "stable", "6")
    monkeypatch.setattr(catalogue, "list_concepts", lambda uri: stale)
    assert pruned(catalogue.prune_versions(mlflow_server, keep=1)) == [] and versions("cat-prune") == [2, 6, 7]
    monkeypatch.undo()
    client.delete_registered_model_alias("cat-prune", "stable")  # version 6 holds no alias now
    monkeypatch.setenv("COLUMNS", "80")
    main(["concepts", "prune", "--keep", "1", "--dry-run", "--tracking-uri", mlflow_server])  # raises on an error
    out = capsys.readouterr().out
    assert "would delete 1 version of 1 concept (their" in out and "cat-prune" in out
    assert max(map(len, out.splitlines())) <= 80 and versions("cat-prune") == [2, 6, 7]  # a dry run


def test_an_alias_is_pointed_by_hand_at_a_decided_version_and_says_who_held_it(tmp_path, capsys):
    from oneword.cli import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    run = client.create_run(client.create_experiment("promote-exp")).info.run_id
    client.create_registered_model("cat-hand", tags={registry.CONCEPT_TAG: "true"})
    client.create_registered_model("other-team")
    for v in range(1, 4):
        client.create_model_version("cat-hand", f"runs:/{run}/m{v}", run_id=run, tags={"oneword.token": "<h>"})
    client.create_model_version("other-team", f"runs:/{run}/o", run_id=run, tags={"gate": "x"})
    for v in ("1", "2"):
        client.set_model_version_tag("cat-hand", v, "gate", "decided")
    client.set_registered_model_alias("cat-hand", "champion", "2")
    with pytest.raises(OnewordError, match="version 3 is still being registered"):  # it sets the alias after
        catalogue.promote("cat-hand/1", tracking_uri=uri)
    client.set_model_version_tag("cat-hand", "3", "gate", "decided")
    done = catalogue.promote("cat-hand/1", reason="version 2 draws the ears wrong", tracking_uri=uri)
    assert done == {"name": "cat-hand", "version": "1", "alias": "champion", "before": "2", "token": "<h>",
                    "before_token": "<h>"}
    assert str(catalogue.get_version("cat-hand@champion", uri).version) == "1"
    tag = client.get_model_version("cat-hand", "1").tags[catalogue.promoted_tag("champion")]
    assert re.fullmatch(r"@champion by hand \(was version 2\) at 20\d\d-\d\d-\d\d \d\d:\d\d:\d\d UTC: "
                        r"version 2 draws the ears wrong", tag), tag
    for ref, said in (("cat-hand/9", r"no version 9 \(versions 3, 2, 1; aliases: @champion\)"),
                      ("cat-hand", "takes NAME/VERSION or NAME@alias"),
                      ("other-team/1", "not a oneword concept")):  # fmt: skip
        with pytest.raises(OnewordError, match=said):
            catalogue.promote(ref, tracking_uri=uri)
    main(["concepts", "promote", "cat-hand/2", "--alias", "stable", "--tracking-uri", uri])
    assert "cat-hand@stable -> version 2" in capsys.readouterr().out
    assert str(catalogue.get_version("cat-hand@stable", uri).version) == "2"
    # a second promote of the holder changes nothing, not even its record; NAME@alias names the version to move
    main(["concepts", "promote", "cat-hand@champion", "--tracking-uri", uri])
    assert "cat-hand@champion is version 1 already: nothing changed" in capsys.readouterr().out
    assert client.get_model_version("cat-hand", "1").tags[catalogue.promoted_tag("champion")] == tag
    main(["concepts", "promote", "cat-hand/1", "--alias", "stable", "--tracking-uri", uri])  # a record each
    capsys.readouterr()
    assert client.get_model_version("cat-hand", "1").tags[catalogue.promoted_tag("champion")] == tag
    client.set_model_version_tag("cat-hand", "3", "oneword.token", "S*")  # retrained under another word
    client.set_registered_model_alias("cat-hand", "candidate", "3")
    main(["concepts", "promote", "cat-hand@candidate", "--tracking-uri", uri])
    said = " ".join(capsys.readouterr().out.split())
    assert "cat-hand@champion -> version 3 (was version 1)" in said, said
    assert "its token is S*, version 1's was <h>: prompts that name <h> must name S* now" in said, said
    model = client.get_registered_model("cat-hand")
    assert {a: str(v) for a, v in model.aliases.items()} == {"champion": "3", "stable": "1"}  # not a candidate now
    assert model.tags["oneword.token"] == "S*" and model.description == "oneword concept S*"  # the champion's word
    # `show` says the records of the aliases a version holds, not of one it lost
    main(["concepts", "show", "cat-hand/1", "--tracking-uri", uri])
    shown = capsys.readouterr().out
    assert "@stable by hand" in shown and "@champion by hand" not in shown, shown
    for ref, said in (("cat-hand@", "go on either side"), ("@champion", "go on either side"),
                      ("cat-hand@champion/1", "is not one MLflow can hold"), ("/3", "names no concept")):  # fmt: skip
        with pytest.raises(OnewordError, match=said):
            catalogue.get_version(ref, uri)


def test_a_version_whose_register_died_does_not_hold_up_a_promote_or_an_erasure(tmp_path, monkeypatch):
    """A register killed between its version and its gate left the version undecided: promote and delete refused
    the concept, and prune passed it over, for good. A version undecided longer than a register waits for another
    is marked abandoned, as the next register would mark it."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    run = client.create_run(client.create_experiment("died-exp")).info.run_id
    client.create_registered_model("cat-died", tags={registry.CONCEPT_TAG: "true"})
    client.create_model_version("cat-died", f"runs:/{run}/m1", run_id=run, tags={"oneword.token": "<d>", "gate": "d"})
    client.create_model_version("cat-died", f"runs:/{run}/m2", run_id=run, tags={"oneword.token": "<d>"})
    with pytest.raises(OnewordError, match="version 2 is still being registered") as e:  # young: it may be at work
        catalogue.promote("cat-died/1", tracking_uri=uri)
    assert "taken as abandoned once it has said nothing for 600 s" in e.value.hint
    # a register waiting long for another says it is alive, on its version: silent is from its last word
    from types import SimpleNamespace

    old = SimpleNamespace(creation_timestamp=1_000_000, tags={registry.HEARTBEAT_TAG: "1999"})
    assert registry.silent_for(old, now=2009.0) == 10.0
    assert registry.silent_for(SimpleNamespace(creation_timestamp=1_000_000, tags={}), now=2009.0) == 1009.0
    monkeypatch.setattr(catalogue, "ALIAS_WAIT_SECONDS", 0.0)  # as if its register died 10 minutes ago
    catalogue.delete_concept("cat-died", tracking_uri=uri, dry_run=True)  # a dry run marks nothing
    assert "gate" not in client.get_model_version("cat-died", "2").tags
    assert catalogue.promote("cat-died/1", tracking_uri=uri)["before"] is None
    assert client.get_model_version("cat-died", "2").tags["gate"] == registry.ABANDONED
    with pytest.raises(OnewordError, match="is no batch id"):  # a quote broke the registry's query
        catalogue.list_concepts(uri, batch="x'")
    with pytest.raises(OnewordError, match="is not one MLflow can hold"):  # not "no concepts"
        catalogue.list_concepts(uri, alias="bad alias")
    # its run holds no embedding (removed from the artifact store): the error names the version and run
    with pytest.raises(OnewordError, match=f"embedding of cat-died/1 .*of run {run}\\) could not be downloaded"):
        catalogue.pull_concept("cat-died/1", tmp_path / "x.safetensors", tracking_uri=uri)
    client.create_model_version("cat-died", f"runs:/{run}/m3", run_id=run, tags={"oneword.token": "<d>"})
    catalogue.delete_concept("cat-died", tracking_uri=uri)  # an erasure goes through
    assert registry.model_kind(client, "cat-died") is None


def test_an_evaluation_against_other_images_is_not_registered(evaluated_concept, tmp_path):
    """Registered scores rank versions and the champion: all must be against the training images."""
    import shutil

    train_dir, eval_dir = evaluated_concept
    other = tmp_path / "eval"
    shutil.copytree(eval_dir, other)
    metrics = json.loads((other / "metrics.json").read_text())
    assert metrics["reference_images"]["training_images"]
    held_out = {"training_images": False, "n": 2, "folder": "/photos/held-out"}
    (other / "metrics.json").write_text(json.dumps({**metrics, "reference_images": held_out}))
    with pytest.raises(OnewordError, match="2 images that are not the ones it was trained on") as e:
        registry.register(train_dir, other, tracking_uri=f"sqlite:///{tmp_path}/never.db")
    assert "without --data" in e.value.hint
    assert not (tmp_path / "never.db").exists()


def test_an_evaluation_of_another_training_is_not_registered_with_this_one(evaluated_concept, tmp_path):
    """`register TRAIN --eval EVAL` of two different trainings registered one's card with the other's file and
    scores: refused, before anything reaches the registry."""
    import shutil

    train_dir, eval_dir = evaluated_concept
    summary = json.loads((train_dir / "summary.json").read_text())
    for change, said in (({"concept": {**summary["concept"], "token": "<dog-r>"}}, "token"),
                         ({"steps": summary["steps"] + 4}, "steps"),
                         ({"image_sha256": ["f" * 64, *summary["image_sha256"][1:]]}, "photos")):  # fmt: skip
        other = tmp_path / said
        shutil.copytree(train_dir, other)
        (other / "summary.json").write_text(json.dumps({**summary, **change}))
        with pytest.raises(OnewordError, match=f"another training.*{said}") as e:
            registry.register(other, eval_dir, tracking_uri=f"sqlite:///{tmp_path}/never.db")
        assert "oneword evaluate" in e.value.hint
    assert not (tmp_path / "never.db").exists()
    # the same token and steps, other vectors: where the evaluation picked the last checkpoint, its vectors tell
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    assert metrics["step"] == metrics["final_step"]  # a budget of one checkpoint: the last
    other = tmp_path / "vectors"
    shutil.copytree(train_dir, other)
    emb = E.load(other / "learned_embeds.safetensors")
    E.save(E.Embedding(emb.token, emb.vectors + 1, emb.meta), other / "learned_embeds.safetensors")
    with pytest.raises(OnewordError, match="last vectors"):
        registry.register(other, eval_dir, tracking_uri=f"sqlite:///{tmp_path}/never.db")
    # a checkpoint past the training's end (a later training into its folder, killed) was scored and chosen
    late = tmp_path / "late"
    shutil.copytree(eval_dir, late)
    (late / "metrics.json").write_text(json.dumps({**metrics, "step": metrics["final_step"] + 100}))
    with pytest.raises(OnewordError, match=r"chosen step \(\d+, past this training's last"):
        registry.register(train_dir, late, tracking_uri=f"sqlite:///{tmp_path}/never.db")
    assert not (tmp_path / "never.db").exists()


def test_registry_queries_do_not_load_torch():
    """`oneword concepts list` answered in 8 s, 4 of them loading torch and CLIP that a query never uses."""
    code = (
        "import sys, oneword.catalogue, oneword.registry, oneword.cli.concepts; "
        "bad = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'diffusers'}); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_overview_page_is_written_whatever_the_registry_answers(tmp_path, monkeypatch):
    """The exit handler writes it: a grid that cannot be read is said in its place, never a failed report."""
    from oneword import batch_overview

    uri = tracking.ensure_store(f"sqlite:///{tmp_path / 'mlflow.db'}")
    ok = {"name": "cat <x>", "token": "<x>", "status": "registered", "version": "2", "alias": "candidate",
          "gate": "reconstruction 0.41 < 0.50", "reconstruction": 0.41, "editability": 0.3, "run_id": "f" * 32}
    bad = {"name": "dog", "token": "<d>", "status": "failed", "version": None, "stage": "train", "error": "CUDA OOM"}
    report = {"batch_id": "b-9", "registered": 1, "failed": 1, "concepts": [ok, bad],
              "left": [{"name": "old", "aliases": {"champion": "3"}}]}  # fmt: skip
    page = batch_overview.overview_page(report, tmp_path / "o.html", uri, "FAILED").read_text()
    assert "1 registered, 0 unchanged, 1 failed, 0 deferred; the run ended FAILED" in page
    assert "cat &lt;x&gt;/2 @candidate" in page and "its sample grid could not be read" in page
    assert "reconstruction 0.41 &lt; 0.50" in page and "train: CUDA OOM" in page and "old: @champion v3" in page
    # the KFP dashboard's frame opens no window and reads `#name` as its own address: the page links nothing out
    assert "scrollIntoView" in page and 'href="#v-' not in page and "target=" not in page
    # a failure's fix, as the terminal's table says it; a run that succeeded with a failed concept says why
    fixable = {**bad, "hint": "lower --batch-size"}
    page = batch_overview.overview_page({**report, "concepts": [ok, fixable]}, tmp_path / "o.html", uri,
                                        "SUCCEEDED").read_text()  # fmt: skip
    assert "train: CUDA OOM (fix: lower --batch-size)" in page
    assert "the run ended SUCCEEDED (its failed concepts were recorded, and the others went on)" in page
    page = batch_overview.overview_page({**report, "concepts": [ok, fixable]}, tmp_path / "o.html", uri,
                                        "COMPLETE").read_text()  # a cluster's word for it (ML Metadata's)
    assert "the run ended COMPLETE (its failed concepts were recorded, and the others went on)" in page
    assert "td:nth-child(-n+2){white-space:nowrap}" in page  # names and tokens are not broken at their hyphens
    # a store that fails picture after picture is asked no more (the exit handler must end)
    many = {**report, "concepts": [{**ok, "name": f"c{i}", "version": "1"} for i in range(5)]}
    page = batch_overview.overview_page(many, tmp_path / "o.html", uri).read_text()
    assert page.count("could not be read") == 3 and page.count("not read: the 3 before it could not be") == 2
    monkeypatch.setattr(batch_overview, "MAX_PICTURES", 0)
    page = batch_overview.overview_page(report, tmp_path / "o.html", "https://u:secret@mlflow.example/").read_text()
    assert "1 more concept registered" in page and "could not be read" not in page
    assert "https://mlflow.example/" in page and "secret" not in page  # a URI's credentials stay off the page


def test_a_version_learned_from_one_photo_says_so_in_the_batch_report(evaluated_concept, tmp_path):
    """One photo in a manifest's folder trained, and registered as champion, with no word of it but in the steps'
    log: the version carries what its photos were, and the batch's table and overview say it beside the alias."""
    from rich.console import Console

    from oneword import batch_overview
    from oneword.batch import batch_report
    from oneword.cli.run import print_batch_report

    train_dir, eval_dir = evaluated_concept
    trained = shutil.copytree(train_dir, tmp_path / "trained")
    manifest = trained / "dataset" / "manifest.json"
    m = json.loads(manifest.read_text())
    skipped = [{"source": "s3://b/cat/notes.txt", "reason": "not an image file (suffix '.txt')"}]
    manifest.write_text(json.dumps({**m, "images": m["images"][:1], "skipped": skipped}))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    r = registry.register(trained, eval_dir, uri, name="one-photo", batch_id="b-photo")
    note = mlflow.MlflowClient(uri).get_model_version("one-photo", r.version).tags[registry.PHOTO_NOTE_TAG]
    assert note == "1 photo only (fewer than 3: it may learn their pose and background too); 1 file skipped: " \
                   "notes.txt (not an image file)"  # fmt: skip
    many = [{"source": f"p/{i}.jpg", "reason": "damaged image: it could not be decoded (SyntaxError: x); copy it"}
            for i in range(5)]  # fmt: skip
    manifest.write_text(json.dumps({**m, "skipped": many}))
    assert registry.photo_note(trained) == ("5 files skipped: 0.jpg (damaged image: it could not be decoded), 1.jpg "
                                            "(damaged image: it could not be decoded), 2.jpg (damaged image: it could "
                                            "not be decoded) and 2 more (preprocess's log says why)")
    odd = [{"source": "p/caf\udce9.jpg", "reason": "refused: 30000x30000 pixels (900 MP) is more than oneword decodes"}]
    manifest.write_text(json.dumps({**m, "skipped": odd}))  # a Latin-1 name, as preprocess passes it on
    assert registry.photo_note(trained) == "1 file skipped: caf\ufffd.jpg (refused: 30000x30000 pixels)"
    manifest.write_text(json.dumps({**m, "images": m["images"][:1], "skipped": skipped}))
    plan = [{"images": "x", "token": "<cat-r>", "init_word": "cat", "name": "one-photo"}]
    report = batch_report(uri, "b-photo", plan)
    console = Console(width=80, record=True)
    print_batch_report({**report, "seconds": 1}, console)
    said = " ".join(console.export_text().split())
    assert f"{r.alias}; photos: 1 photo only (fewer than 3" in said, said  # a champion's too
    page = batch_overview.overview_page(report, tmp_path / "o.html", uri).read_text()
    assert "photos: 1 photo only (fewer than 3" in page
    assert registry.photo_note(train_dir) == ""  # the fixture's photos: nothing to say


def test_a_registry_that_refuses_to_rename_the_champion_keeps_the_new_champion(evaluated_concept, tmp_path,
                                                                               monkeypatch):  # fmt: skip
    """Naming the champion's token on the registered model ran inside the registration's clean-up: a registry
    that refused it deleted the version that had just become champion. It is only said now."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def refused(self, *args, **kwargs):
        raise mlflow.exceptions.MlflowException("permission denied")

    monkeypatch.setattr(mlflow.MlflowClient, "update_registered_model", refused)
    r = registry.register(*evaluated_concept, uri, name="cat-named")
    assert (r.version, r.alias) == ("1", "champion")
    assert str(mlflow.MlflowClient(uri).get_registered_model("cat-named").aliases["champion"]) == "1"


def test_a_dry_run_says_why_a_concept_is_trained_again(tmp_path):
    """`batch --dry-run` listed a concept "to train" with no word of why (a person then reran it to find out)."""
    uri = tracking.ensure_store(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.MlflowClient(uri)
    run = client.create_run(client.create_experiment("why")).info.run_id
    assert registry.why_changed(uri, "why-cat", "e1") == "not registered yet"
    client.create_registered_model("why-cat", tags={registry.CONCEPT_TAG: "true"})
    tags = {registry.EVALUATION_KEY_TAG: "e1", "gate": "champion: first version"}
    client.create_model_version("why-cat", f"runs:/{run}/m", run_id=run, tags=tags)
    assert registry.why_changed(uri, "why-cat", "e2").startswith("v1 was trained or evaluated otherwise")
    assert registry.why_changed(uri, "why-cat", "e1").startswith("only the gate changed, and by it v1's scores")
    client.create_model_version("why-cat", f"runs:/{run}/m", run_id=run, tags={**tags, "gate": registry.ABANDONED})
    assert registry.why_changed(uri, "why-cat", "e1") == "v2's registration did not finish"


def test_a_champion_promoted_while_a_version_is_judged_is_the_one_it_is_judged_against(evaluated_concept, tmp_path,
                                                                                        monkeypatch):
    """A promote by hand refuses while a version is decided, but one between the gate's read of @champion and its
    alias set was overruled: the new version was judged against the champion before it."""
    uri = tracking.ensure_store(f"sqlite:///{tmp_path / 'mlflow.db'}")
    train_dir, eval_dir = evaluated_concept
    assert registry.register(train_dir, _with_scores(eval_dir, tmp_path, 0.8, 0.4), uri, name="judged").alias == \
        "champion"  # fmt: skip
    assert registry.register(train_dir, _with_scores(eval_dir, tmp_path, 0.5, 0.3), uri, name="judged").alias == \
        "candidate"  # fmt: skip
    real, promoted = registry._decide_alias, []

    def promoted_meanwhile(client, name, *args):
        said = real(client, name, *args)
        if not promoted:  # as a person's promote that came between the read and the set
            client.set_registered_model_alias(name, "champion", "2")
            promoted.append(said)
        return said

    monkeypatch.setattr(registry, "_decide_alias", promoted_meanwhile)
    third = registry.register(train_dir, _with_scores(eval_dir, tmp_path, 0.6, 0.4), uri, name="judged")
    assert promoted[0][0] == "candidate"  # against version 1, it would have been
    assert third.alias == "champion", third.reason  # against version 2, which holds now, it wins
    assert str(mlflow.MlflowClient(uri).get_registered_model("judged").aliases["champion"]) == "3"


def test_a_registration_that_finds_its_concept_erased_leaves_a_shards_checkpoints_to_its_other_concepts(tmp_path):
    """Its shard's other concepts may be evaluating from the shard's checkpoints as it registers: only its own
    kept copy goes then; a concept trained alone takes its checkpoints with it."""
    for together, group_stays in ((2, True), (1, False)):
        group = tmp_path / str(together) / "checkpoints" / "0f1e2d3c4b5a6978"
        group.mkdir(parents=True)
        (group / "step-000004.pt").write_bytes(b"vectors")
        kept = Path(trainings.location(group.parent, "a1b2c3d4e5f60718"))
        kept.parent.mkdir()
        kept.write_bytes(b"its kept training")
        registry._erase_training_copies({"checkpoint_dir": str(group), "training_key": "a1b2c3d4e5f60718",
                                         "concepts_trained_together": together, "concept": {"token": "<c>"}})
        assert not kept.exists() and (group / "step-000004.pt").exists() == group_stays, together


def test_a_concept_deleted_while_it_was_trained_is_not_registered_again_nor_recorded(evaluated_concept, tmp_path):
    """Training's live run carries the concept's tag, so a delete during training erases it: its register met
    "Cannot start run ... in the deleted state" (or, without the live run, made the concept anew). It erases what
    is left and registers nothing; a batch's step records no FAILED run that names the concept again."""
    from oneword import outcome

    uri = tracking.ensure_store(f"sqlite:///{tmp_path / 'mlflow.db'}")
    train_dir, eval_dir = evaluated_concept
    registry.register(train_dir, eval_dir, uri, name="cat-trained")
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(registry.EXPERIMENT).experiment_id
    live = client.create_run(experiment, tags={registry.CONCEPT_TAG: "cat-trained"}).info.run_id  # training's
    trained = tmp_path / "trained"
    shutil.copytree(train_dir, trained)
    summary = json.loads((trained / "summary.json").read_text())
    group = tmp_path / "checkpoints" / "0f1e2d3c4b5a6978"  # where it checkpoints, under a checkpoint root
    kept = trainings.location(group.parent, "b1b2c3d4e5f60718")
    (trained / "summary.json").write_text(json.dumps({**summary, "mlflow_run_id": live, "checkpoint_dir": str(group),
                                                      "training_key": "b1b2c3d4e5f60718"}))  # fmt: skip
    catalogue.delete_concept("cat-trained", uri)  # while it trained
    group.mkdir(parents=True)  # what it wrote after the delete: the registration deletes it
    (group / "step-000006.pt").write_bytes(b"vectors")
    Path(kept).parent.mkdir()
    Path(kept).write_bytes(b"a kept training")
    again = _with_scores(eval_dir, tmp_path / "again", 0.7, 0.3)
    said = outcome.run_step("register", tmp_path / "registration", "record",
                            lambda: registry.register(trained, again, uri, name="cat-trained"))  # fmt: skip
    assert said is None and registry.model_kind(client, "cat-trained") is None
    failure = outcome.read_failure(tmp_path / "registration")
    assert "cat-trained was deleted while it was trained" in failure["error"] and failure["unrecorded"] is True
    assert not (group / "step-000006.pt").exists() and not Path(kept).exists()
    runs = client.search_runs([experiment], run_view_type=mlflow.entities.ViewType.ALL)
    assert runs and all(r.info.lifecycle_stage == "deleted" for r in runs)
