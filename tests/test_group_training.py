"""Several concepts trained together: same gradients as alone, failures kept apart, resume after kill -9."""

import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from oneword import checkpoints, outcome, storage, trainings
from oneword.embeddings import load as load_embedding
from oneword.errors import OnewordError
from oneword.inversion import ConceptSpec, InversionTrainer, TrainConfig
from oneword.latents import LatentSet
from oneword.models import load_base_model
from oneword.train import GROUP_FILE, train_group

ONEWORD = str(Path(sys.executable).parent / "oneword")
SPECS = [ConceptSpec(token=f"<g{i}>", init_word=w) for i, w in enumerate(("cat", "dog", "clock"))]


def test_each_concept_gets_the_gradient_it_would_get_alone(tiny_model_dir, cat_latents):
    cfg = TrainConfig(steps=1, batch_size=2, checkpoint_every=0, init_l2=0.5)
    group = InversionTrainer(load_base_model(str(tiny_model_dir)), [(s, cat_latents) for s in SPECS], cfg)
    alone = InversionTrainer(load_base_model(str(tiny_model_dir)), [(SPECS[1], cat_latents)], cfg)
    with torch.no_grad():  # move the vectors off the initializer, so the L2 term has a gradient too
        for c in (group.concepts[1], alone.concepts[0]):
            c.param.add_(0.01)
    z0, ids, _ = group._batch(0)  # (6, C, h, w): two rows per concept
    noise, t = torch.randn(z0.shape, generator=torch.Generator().manual_seed(3)), torch.tensor([10, 500] * 3)
    losses = group.concept_losses(z0, ids, noise, t)
    losses.sum().backward()
    rows = slice(2, 4)  # the dog's rows, with the alone trainer's own token ids swapped in
    alone_ids = ids[rows].clone()
    alone_ids[alone_ids == group.concepts[1].token_ids[0]] = alone.concepts[0].token_ids[0]
    alone_loss = alone.concept_losses(z0[rows], alone_ids, noise[rows], t[rows])
    alone_loss.sum().backward()
    assert losses[1].item() == pytest.approx(alone_loss.item(), rel=1e-5)
    torch.testing.assert_close(group.concepts[1].param.grad, alone.concepts[0].param.grad, rtol=1e-4, atol=1e-7)


def test_a_concept_whose_loss_turns_non_finite_stops_alone(tiny_model, cat_latents, tmp_path, caplog):
    tr = InversionTrainer(tiny_model, [(s, cat_latents) for s in SPECS[:2]], TrainConfig(steps=20, log_every=5))
    real, calls = tr.concept_losses, []

    def poisoned(*a, **k):
        calls.append(1)
        losses = real(*a, **k)
        if len(calls) > 7 and not tr.concepts[0].failed:  # the cat's loss turns NaN from step 8 on
            losses = losses * torch.tensor([float("nan"), 1.0])
        return losses

    tr.concept_losses = poisoned
    with caplog.at_level(logging.WARNING):
        r = tr.run(tmp_path, progress=False)
    assert r.steps == 20 and list(r.failed) == ["<g0>"] and "between steps 5 and 10" in r.failed["<g0>"]
    assert [e.token for e in r.embeddings] == ["<g1>"] and torch.isfinite(r.embeddings[0].vectors).all()
    assert [p["step"] for p in r.curves["<g1>"]] == [5, 10, 15, 20] and len(r.curves["<g0>"]) == 1
    assert "<g0>" in caplog.text
    # the failure is in the checkpoint too: a resumed run does not bring the cat back
    resumed = InversionTrainer(
        load_base_model(str(tiny_model.source)),
        [(s, cat_latents) for s in SPECS[:2]],
        TrainConfig(steps=20, log_every=5),
    )
    resumed.run(tmp_path, resume=True, progress=False)
    assert resumed.concepts[0].failed and not resumed.concepts[1].failed


def test_a_concept_turning_non_finite_does_not_end_the_others_early(tiny_model, cat_latents):
    """Early end measures how far every concept's vectors moved: a NaN row (max() keeps a NaN that comes first)
    read as "settled" and ended the whole group at that step."""
    cfg = TrainConfig(steps=20, log_every=5, early_end=1e-12, early_end_window=5)
    tr = InversionTrainer(tiny_model, [(s, cat_latents) for s in SPECS[:2]], cfg)
    real, calls = tr.concept_losses, []

    def poisoned(*a, **k):
        calls.append(1)
        losses = real(*a, **k)
        if len(calls) > 7 and not tr.concepts[0].failed:
            losses = losses * torch.tensor([float("nan"), 1.0])
        return losses

    tr.concept_losses = poisoned
    r = tr.run(progress=False)
    assert (r.steps, r.ended_early_at, list(r.failed)) == (20, None, ["<g0>"])


def test_train_group_writes_each_concept_and_records_failures(tiny_model_dir, cat_latents_dir, tmp_path):
    broken = tmp_path / "broken-latents"
    outcome.write_failure(broken, "preprocess", "photos/a.jpg is not an image")
    members = [
        ("cat", SPECS[0], cat_latents_dir),
        ("from-bad-photos", SPECS[1], broken),
        ("two-word-init", ConceptSpec(token="<g9>", init_word="grandfather clock tower"), cat_latents_dir),
        ("clock", SPECS[2], cat_latents_dir),
    ]
    rows = train_group(members, tmp_path / "out", TrainConfig(steps=4, checkpoint_every=2), progress=False)
    assert [r["status"] for r in rows] == ["trained", "failed", "failed", "trained"]
    assert rows[1]["stage"] == "preprocess" and "a.jpg" in rows[1]["error"]
    assert rows[2]["stage"] == "train" and "initializer" in rows[2]["error"].lower()
    for name in ("cat", "clock"):
        emb = load_embedding(tmp_path / "out" / name / "learned_embeds.safetensors")
        assert emb.vectors.shape == (1, 32)
        assert (tmp_path / "out" / name / "dataset" / "manifest.json").exists()  # for evaluation
    assert outcome.read_failure(tmp_path / "out" / "from-bad-photos")["stage"] == "preprocess"
    assert [s for s, _ in checkpoints.list_checkpoints(tmp_path / "out" / "checkpoints")] == [2, 4]
    assert yaml.safe_load((tmp_path / "out" / GROUP_FILE).read_text()) == rows
    # a concept's training key is its own: trained with other shard-mates it is the same concept, unchanged
    train_group([("cat", SPECS[0], cat_latents_dir)], tmp_path / "alone", TrainConfig(steps=4, checkpoint_every=2),
                progress=False)  # fmt: skip
    cat, cat_alone, clock = (
        json.loads((tmp_path / where / name / "summary.json").read_text())["training_key"]
        for where, name in (("out", "cat"), ("alone", "cat"), ("out", "clock"))
    )
    assert cat == cat_alone != clock


def test_a_damaged_newest_checkpoint_is_skipped(tiny_model_dir, cat_latents_dir, tmp_path, caplog):
    members = [("cat", SPECS[0], cat_latents_dir), ("dog", SPECS[1], cat_latents_dir)]
    whole = tmp_path / "whole"
    train_group(members, whole, TrainConfig(steps=30, checkpoint_every=10), progress=False)
    broken = tmp_path / "broken"
    train_group(members, broken, TrainConfig(steps=20, checkpoint_every=10), progress=False)
    newest = broken / "checkpoints" / "step-000020.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # a truncated upload, a full disk
    with caplog.at_level(logging.WARNING):
        train_group(members, broken, TrainConfig(steps=30, checkpoint_every=10), progress=False)
    assert "skipping damaged checkpoint" in caplog.text and "step-000020.pt" in caplog.text
    for name in ("cat", "dog"):
        a = load_embedding(whole / name / "learned_embeds.safetensors").vectors
        b = load_embedding(broken / name / "learned_embeds.safetensors").vectors
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_killed_group_training_resumes_to_the_vectors_of_an_unbroken_run(tiny_model_dir, cat_latents_dir, tmp_path):
    """... and in the MLflow runs the killed training opened, one per concept, not a second beside each."""
    group = tmp_path / "group.yaml"
    group.write_text(
        yaml.safe_dump(
            [
                {"name": "cat", "latents": str(cat_latents_dir), "token": "<k0>", "init_word": "cat"},
                {"name": "dog", "latents": str(cat_latents_dir), "token": "<k1>", "init_word": "dog", "n_vectors": 2},
            ]
        )
    )
    steps = ["--steps", "60", "--checkpoint-every", "10", "--batch-size", "2"]

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def cmd(out, *tracked):
        return [ONEWORD, "train", "--concepts", str(group), "-o", str(out), *steps, "--resume", *tracked]

    subprocess.run(cmd(tmp_path / "unbroken"), check=True, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(cmd(killed, "--tracking-uri", uri), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    # the first checkpoint: the most of the run still ahead, so that a busy machine's late look still kills mid-run
    while not (killed / "checkpoints" / "step-000010.pt").exists() and proc.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = [s for s, _ in checkpoints.list_checkpoints(killed / "checkpoints")]
    assert proc.returncode == -signal.SIGKILL and max(done) < 60, done  # it really died mid-run
    subprocess.run(cmd(killed, "--tracking-uri", uri), check=True, capture_output=True)
    client = mlflow.MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    for name in ("cat", "dog"):
        a = load_embedding(tmp_path / "unbroken" / name / "learned_embeds.safetensors").vectors
        b = load_embedding(killed / name / "learned_embeds.safetensors").vectors
        assert torch.equal(a, b), name
        runs = client.search_runs(experiments, f"tags.`oneword.concept` = '{name}'")
        assert len(runs) == 1, (name, [(r.info.run_id, r.info.status) for r in runs])
        assert json.loads((killed / name / "summary.json").read_text())["mlflow_run_id"] == runs[0].info.run_id
        logged = [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")]
        assert max(logged) >= max(done) and len(logged) == len(set(logged)), (name, logged)


def test_an_object_store_outage_while_checkpointing(tiny_model, cat_latents, s3_bucket, monkeypatch, caplog):
    """Uploads are retried; a store down for longer leaves no object a resume would trust, and training goes on."""
    from oneword import storage
    from oneword.errors import OnewordError

    real, calls = storage.upload_file, []

    def down_for(n):
        def upload(path, uri):
            calls.append(uri)
            if len(calls) <= n:
                raise ConnectionError("the object store is restarting")
            return real(path, uri)

        return upload

    where = f"s3://{s3_bucket}/outage"
    monkeypatch.setattr(storage, "upload_file", down_for(2))
    uri = checkpoints.save_checkpoint(where, 10, {"x": torch.ones(2)}, backoff=0)
    assert len(calls) == 3 and checkpoints.load_checkpoint(uri)["x"].sum() == 2
    calls.clear()
    monkeypatch.setattr(storage, "upload_file", down_for(10**6))
    with pytest.raises(OnewordError, match="after 3 attempts"):
        checkpoints.save_checkpoint(where, 20, {"x": torch.ones(2)}, backoff=0)
    assert [s for s, _ in checkpoints.list_checkpoints(where)] == [10]
    # mid-run, an outage costs that checkpoint only: training goes on and the next one is stored
    calls.clear()
    monkeypatch.setattr(storage, "upload_file", down_for(3))
    monkeypatch.setattr(checkpoints, "UPLOAD_BACKOFF_S", 0.0)
    tr = InversionTrainer(tiny_model, [(SPECS[0], cat_latents)], TrainConfig(steps=10, checkpoint_every=5))
    with caplog.at_level(logging.WARNING):
        r = tr.run(f"{where}/run", progress=False)
    assert r.steps == 10 and "training goes on" in caplog.text
    assert [s for s, _ in checkpoints.list_checkpoints(f"{where}/run")] == [10]


def test_each_concept_may_have_its_own_learning_rate(tiny_model_dir, cat_latents_dir, tmp_path):
    import json

    slow = ConceptSpec(token="<lr-a>", init_word="cat", learning_rate=1e-4)
    members = [("slow", slow, cat_latents_dir), ("default", SPECS[1], cat_latents_dir)]
    train_group(members, tmp_path, TrainConfig(steps=2, batch_size=2, learning_rate=5e-3), progress=False)
    used = {n: json.loads((tmp_path / n / "summary.json").read_text())["learning_rate_used"] for n, _, _ in members}
    assert used == {"slow": pytest.approx(2e-4), "default": pytest.approx(1e-2)}  # both scaled by the batch size
    tr = InversionTrainer(
        load_base_model(str(tiny_model_dir)),
        [(slow, LatentSet.load(cat_latents_dir))],
        TrainConfig(steps=1, batch_size=2, learning_rate=5e-3),
    )
    assert tr.optimizer.param_groups[0]["lr"] == pytest.approx(2e-4)  # what the optimiser really uses


def test_the_photos_content_key_follows_their_content_not_their_folder(tmp_path, s3_bucket):
    """The plan records which photos a run found by this key: new photos under an old folder or prefix change it."""
    from oneword import storage
    from oneword.batch import content_key

    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"first photo")
    before = content_key(str(folder))
    assert before.startswith("sha256:") and content_key(str(folder)) == before
    (folder / "a.jpg").write_bytes(b"a new photo, same name")
    assert content_key(str(folder)) != before
    prefix = f"s3://{s3_bucket}/photos"
    storage.upload_file(folder / "a.jpg", f"{prefix}/a.jpg")
    on_s3 = content_key(prefix)
    (folder / "a.jpg").write_bytes(b"replaced again")
    storage.upload_file(folder / "a.jpg", f"{prefix}/a.jpg")
    assert content_key(prefix) != on_s3
    # one concept's bucket that does not exist leaves the plan of the others standing: its own step fails
    from oneword.batch import ConceptEntry, plan_concepts

    entries = [ConceptEntry(images=f"s3://no-such-bucket-{i}/photos", token=f"<t{i}>", init_word="cat") for i in (1, 2)]
    planned = plan_concepts([*entries, ConceptEntry(images=prefix, token="<t3>", init_word="cat")])
    assert [p["content_key"] for p in planned] == ["", "", content_key(prefix)]


def test_the_checkpoint_key_follows_what_is_trained_not_the_registered_names(cat_latents):
    from oneword.train import group_key

    images = cat_latents.image_sha256
    members = [("cat", SPECS[0], images), ("dog", SPECS[1], images)]
    key = group_key(members, TrainConfig(steps=4), "sha256:m")
    renamed = [("my-cat", SPECS[0], images), ("my-dog", SPECS[1], images)]
    assert group_key(renamed, TrainConfig(steps=4), "sha256:m") == key
    other_token = [("cat", SPECS[2], images), ("dog", SPECS[1], images)]
    assert group_key(other_token, TrainConfig(steps=4), "sha256:m") != key
    assert group_key(members, TrainConfig(steps=5), "sha256:m") != key
    assert group_key(members, TrainConfig(steps=4, log_every=7, compile="max"), "sha256:m") == key
    assert group_key(members, TrainConfig(steps=4), "sha256:other") != key


def test_a_failure_passed_on_keeps_its_hint(tmp_path):
    first, second = tmp_path / "preprocess", tmp_path / "cache_latents"
    outcome.write_failure(first, "preprocess", "photos/a.jpg is not an image", "remove it or replace it")
    assert outcome.run_step("cache_latents", second, "record", lambda: 1 / 0, upstream=[first]) is None
    assert outcome.read_failure(second) == {
        "stage": "preprocess",
        "error": "photos/a.jpg is not an image",
        "hint": "remove it or replace it",
    }


def test_a_member_that_cannot_train_beside_the_others_fails_alone(tiny_model_dir, cat_latents_dir, tmp_path):
    import dataclasses

    cat = LatentSet.load(cat_latents_dir)
    bigger = tmp_path / "bigger"  # encoded at another resolution: one batch cannot hold both sizes
    dataclasses.replace(cat, mean=cat.mean.repeat(1, 1, 1, 2, 2), std=cat.std.repeat(1, 1, 1, 2, 2)).save(bigger)
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "latents.safetensors").write_bytes(b"\x10\x00\x00\x00not a header")
    members = [
        ("two-vectors", ConceptSpec(token="<h0>", init_word="cat", n_vectors=2), cat_latents_dir),
        ("clashes", ConceptSpec(token="<h0>_1", init_word="dog"), cat_latents_dir),  # the first one's 2nd entry
        ("same-token", ConceptSpec(token="<h0>", init_word="dog"), cat_latents_dir),
        ("other-case", ConceptSpec(token="<H0>", init_word="dog"), cat_latents_dir),  # a prompt matches either
        ("other-size", ConceptSpec(token="<h3>", init_word="dog"), bigger),
        ("damaged", ConceptSpec(token="<h4>", init_word="dog"), damaged),
        ("too-late", ConceptSpec(token="<h5>", init_word="dog", n_vectors=3), cat_latents_dir),
        ("fine", ConceptSpec(token="<h6>", init_word="clock"), cat_latents_dir),
    ]
    cfg = TrainConfig(steps=4, progressive_every=2)
    rows = train_group(members, tmp_path / "out", cfg, str(tiny_model_dir), progress=False)
    assert {r["name"]: r["status"] for r in rows} == {
        "two-vectors": "trained", "clashes": "failed", "same-token": "failed", "other-case": "failed",
        "other-size": "failed",
        "damaged": "failed", "too-late": "failed", "fine": "trained",
    }  # fmt: skip
    errors = {r["name"]: r["error"] for r in rows}
    assert "'<h0>_1' cannot be told from two-vectors's" in errors["clashes"] and "<h0>" in errors["same-token"]
    assert "cannot be told from two-vectors's '<h0>'" in errors["other-case"]
    assert "one batch cannot hold both" in errors["other-size"]
    assert "is not a latent set oneword wrote" in errors["damaged"]
    assert "switches on at step 4" in errors["too-late"]


def test_a_fresh_group_training_refuses_an_earlier_ones_checkpoints(tiny_model_dir, cat_latents_dir, tmp_path):
    members = [("cat", SPECS[0], cat_latents_dir), ("dog", SPECS[1], cat_latents_dir)]
    train_group(members, tmp_path / "out", TrainConfig(steps=2, checkpoint_every=2), str(tiny_model_dir),
                resume=False, progress=False)  # fmt: skip
    with pytest.raises(OnewordError, match=r"checkpoints of an earlier training \(steps 2-2\)"):
        train_group(members, tmp_path / "out", TrainConfig(steps=3), str(tiny_model_dir), resume=False,
                    progress=False)  # fmt: skip


def test_a_retried_step_tries_again_itself_what_a_retry_may_cure(tmp_path, monkeypatch):
    """KFP 2.17's manifests set Argo's retryPolicy OnError: a pod that exits non-zero is not retried, so an object
    store's blip cost a batch's concepts the night. The step tries again itself, after each of RETRY_WAITS_S."""
    waited = []
    monkeypatch.setattr(outcome, "RETRY_WAITS_S", (30.0, 120.0))
    monkeypatch.setattr(outcome.time, "sleep", waited.append)  # the waits, said; not slept through
    calls = []

    def flaky():  # a lost connection, then an answer
        calls.append(1)
        if len(calls) == 1:
            raise _wrapped(TimeoutError("read"))
        return "photos"

    assert outcome.run_step("preprocess", tmp_path / "a", "record", flaky, retried=True) == "photos"
    assert waited == [outcome.RETRY_WAITS_S[0]] and outcome.read_failure(tmp_path / "a") is None
    calls.clear(), waited.clear()

    def lost():
        calls.append(1)
        raise ConnectionError("the store did not answer")

    with pytest.raises(ConnectionError):  # tried each time, then raised for the task's own retries
        outcome.run_step("preprocess", tmp_path / "b", "record", lost, retried=True)
    assert len(calls) == len(outcome.RETRY_WAITS_S) + 1 and waited == list(outcome.RETRY_WAITS_S)
    calls.clear(), waited.clear()

    def bad():
        calls.append(1)
        raise _wrapped(ValueError("x"))

    assert outcome.run_step("preprocess", tmp_path / "c", "record", bad, retried=True) is None  # once: bad input
    assert calls == [1] and waited == [] and outcome.read_failure(tmp_path / "c")["stage"] == "preprocess"
    assert outcome.run_step("train", tmp_path / "d", "record", lost) is None and waited == []  # a step not retried
    monkeypatch.setenv(outcome.LOCAL_RUN_ENV, "1")  # kfp.local: a local run says what failed at once
    calls.clear()
    assert outcome.run_step("preprocess", tmp_path / "e", "record", lost, retried=True) is None and calls == [1]


def test_a_retried_step_raises_what_a_retry_may_cure_even_in_a_batch(tmp_path, monkeypatch):
    """Recorded, a lost connection would cost the concept this run; raised, the task's retries are for it."""
    import urllib3
    from minio.error import S3Error


    def unreachable():  # a real refused connection through minio's transport: nothing listens on port 9
        urllib3.PoolManager(retries=False).request("GET", "http://127.0.0.1:9/photos/cat")

    with pytest.raises(Exception) as lost:
        outcome.run_step("preprocess", tmp_path / "a", "record", unreachable, retried=True)
    assert outcome.transient(lost.value)
    with pytest.raises(OnewordError, match="the step could not go on"):  # ... wrapped in oneword's own error, too
        outcome.run_step("preprocess", tmp_path / "b", "record", lambda: _wrapped(TimeoutError("read")), retried=True)
    # bad input is recorded as before, and so is a lost connection in a step without retries
    bad = outcome.run_step("preprocess", tmp_path / "c", "record", lambda: _wrapped(ValueError("x")), retried=True)
    assert bad is None
    assert outcome.run_step("train", tmp_path / "d", "record", unreachable) is None
    assert outcome.read_failure(tmp_path / "d")["stage"] == "train"

    class Answer:
        def __init__(self, status):
            self.status = status

    def s3_error(status, code):
        return S3Error(Answer(status), code, "m", "r", "i", "h")

    assert outcome.transient(s3_error(503, "SlowDown")) and not outcome.transient(s3_error(403, "AccessDenied"))
    # settings, not weather: a host name that does not resolve, a certificate refused
    import requests

    unresolved = urllib3.exceptions.NameResolutionError("no-such-host", None, OSError("Name or service not known"))
    assert not outcome.transient(urllib3.exceptions.MaxRetryError(None, "http://no-such-host/", unresolved))
    # as requests raises it (MLflow's client): the MaxRetryError inside its args, a misspelt tracking host
    wrapped = requests.exceptions.ConnectionError(urllib3.exceptions.MaxRetryError(None, "/x", unresolved))
    assert not outcome.transient(wrapped)
    refused = urllib3.exceptions.NewConnectionError(None, "Connection refused")
    assert outcome.transient(requests.exceptions.ConnectionError(urllib3.exceptions.MaxRetryError(None, "/x", refused)))
    assert not outcome.transient(requests.exceptions.SSLError("certificate verify failed"))
    # the model hub's own client (huggingface_hub 2.x asks with httpx2), under the hub's "not in the cache" error
    import httpx2
    from huggingface_hub.errors import LocalEntryNotFoundError

    for lost in (httpx2.ConnectError("connection refused"), httpx2.ReadTimeout("read timed out")):
        missing = LocalEntryNotFoundError("cannot find the requested files in the disk cache")
        missing.__cause__ = lost
        assert outcome.transient(lost) and outcome.transient(missing)
    # kfp.local retries nothing: there, what a retry may cure is recorded like any failure
    monkeypatch.setenv(outcome.LOCAL_RUN_ENV, "1")
    assert outcome.run_step("preprocess", tmp_path / "e", "record", unreachable, retried=True) is None


def _wrapped(cause: Exception):
    try:
        raise cause
    except Exception as e:
        raise OnewordError("the step could not go on") from e


def test_a_shard_that_fails_as_a_whole_records_each_concept_in_a_batch(cat_latents_dir, tmp_path):
    """A model that does not load or settings that are not valid: each concept's report says so, not "unknown"."""
    from oneword.train import train_shard

    members = [("cat", SPECS[0], cat_latents_dir), ("dog", SPECS[1], cat_latents_dir)]
    rows = train_shard(members, tmp_path / "a", lambda: TrainConfig(steps=4), "record", base_model="/no/such/model",
                       progress=False)  # fmt: skip
    assert [(r["name"], r["status"], r["stage"]) for r in rows] == [
        ("cat", "failed", "train"),
        ("dog", "failed", "train"),
    ]
    assert all("/no/such/model" in outcome.read_failure(tmp_path / "a" / n)["error"] for n in ("cat", "dog"))
    assert json.loads((tmp_path / "a" / "concepts.json").read_text()) == rows
    rows = train_shard(members, tmp_path / "b", lambda: TrainConfig(steps=-5), "record", progress=False)
    assert "steps" in outcome.read_failure(tmp_path / "b" / "dog")["error"]
    broken = tmp_path / "broken-latents"  # its photos failed first: that failure is the one to fix
    outcome.write_failure(broken, "preprocess", "photos/a.jpg is not an image")
    rows = train_shard([*members, ("bad", SPECS[2], broken)], tmp_path / "d", lambda: TrainConfig(steps=-5), "record")
    assert (rows[2]["stage"], outcome.read_failure(tmp_path / "d" / "bad")["stage"]) == ("preprocess", "preprocess")
    with pytest.raises(OnewordError):  # one concept run: the error is the run's
        train_shard(members, tmp_path / "c", lambda: TrainConfig(steps=4), "fail", base_model="/no/such/model")


def test_a_shard_raises_what_a_retry_may_cure_where_a_retry_follows(cat_latents_dir, tmp_path, monkeypatch):
    """On a cluster the task's retries are for a lost connection; kfp.local retries nothing, so there it is each
    concept's recorded failure, not a failed task whose concepts the report calls "unknown"."""
    from oneword.train import train_shard

    tries = []

    def lost():
        tries.append(1)
        raise ConnectionResetError("the hub closed the connection")

    members = [("cat", SPECS[0], cat_latents_dir), ("dog", SPECS[1], cat_latents_dir)]
    with pytest.raises(ConnectionResetError):
        train_shard(members, tmp_path / "cluster", lost, "record")
    assert len(tries) == len(outcome.RETRY_WAITS_S) + 1  # tried again itself first, whatever the cluster's policy
    monkeypatch.setenv(outcome.LOCAL_RUN_ENV, "1")
    tries.clear()
    rows = train_shard(members, tmp_path / "local", lost, "record")
    assert len(tries) == 1
    assert [(r["status"], r["stage"]) for r in rows] == [("failed", "train")] * 2
    assert "closed the connection" in outcome.read_failure(tmp_path / "local" / "dog")["error"]


def test_a_shards_latents_are_matched_to_its_concepts_by_their_photos_not_their_order(tmp_path):
    """dsl.Collected gathers a loop's outputs in an order KFP does not promise."""
    from oneword.train import match_latents

    def latents(name, images):
        folder = tmp_path / name
        (folder / "dataset").mkdir(parents=True)
        rows = [{"source": f"{images}/{i}.jpg"} for i in range(2)]
        (folder / "dataset" / "manifest.json").write_text(json.dumps({"images": rows}))
        return folder

    failed = tmp_path / "failed"  # preprocess failed: its folder holds a failure, no manifest
    failed.mkdir()
    dog, cat2 = latents("l-dog", "/photos/dog"), latents("l-cat2", "s3://b/cat2")
    cat = latents("l-cat", "/photos/cat")
    concepts = [{"images": "/photos/cat/"}, {"images": "/photos/broken"}, {"images": "/photos/dog"},
                {"images": "s3://b/cat2"}]  # fmt: skip
    assert match_latents(concepts, [dog, failed, cat2, cat]) == [cat, failed, dog, cat2]
    assert match_latents(concepts, [cat, failed, dog, cat2]) == [cat, failed, dog, cat2]  # in order: unchanged
    kitten = latents("l-kitten", "/photos/cat/kitten")  # nested under another concept's folder
    nested = [{"images": "/photos/cat"}, {"images": "/photos/cat/kitten"}]
    assert match_latents(nested, [kitten, cat]) == [cat, kitten]
    # two failed concepts: each failure record, passed on from preprocess, names its photos
    for name, images in (("fail-a", "/photos/a"), ("fail-c", "s3://b/c/")):
        outcome.run_step("preprocess", tmp_path / "pre" / name, "record", lambda: 1 / 0, images=images)
        outcome.run_step("cache_latents", tmp_path / name, "record", lambda: None, upstream=[tmp_path / "pre" / name])
    both = [{"images": "/photos/a"}, {"images": "s3://b/c"}]
    assert match_latents(both, [tmp_path / "fail-c", tmp_path / "fail-a"]) == [tmp_path / "fail-a", tmp_path / "fail-c"]


def test_a_concept_trained_before_in_another_shard_is_not_trained_again(
    tiny_model_dir, cat_latents_dir, tmp_path, caplog
):
    """A batch's shards are cut by position: one concept added ahead of the dog gives it new shard-mates. The
    dog's own training key is unchanged, so its finished training is taken from the checkpoint root."""
    root, cfg = tmp_path / "checkpoints", TrainConfig(steps=4, checkpoint_every=2)
    first = train_group([("cat", SPECS[0], cat_latents_dir), ("dog", SPECS[1], cat_latents_dir)], tmp_path / "a",
                        cfg, checkpoint_root=root, progress=False)  # fmt: skip
    assert [r["status"] for r in first] == ["trained"] * 2
    with caplog.at_level(logging.INFO):
        rows = train_group([("dog", SPECS[1], cat_latents_dir), ("clock", SPECS[2], cat_latents_dir)],
                           tmp_path / "b", cfg, checkpoint_root=root, progress=False)  # fmt: skip
    assert [r["status"] for r in rows] == ["trained"] * 2 and "dog was trained before" in caplog.text
    was, now = (json.loads((tmp_path / d / "dog" / "summary.json").read_text()) for d in ("a", "b"))
    assert now["training_key"] == was["training_key"] and now["steps_run"] == 0 and was["steps_run"] == 4
    assert now["trained_before"].endswith(f"trainings/{was['training_key']}.tar") and "mlflow_run_id" not in now
    assert torch.equal(*(load_embedding(tmp_path / d / "dog" / "learned_embeds.safetensors").vectors for d in "ab"))
    assert (tmp_path / "b" / "dog" / "dataset" / "manifest.json").is_file()  # its photos, for evaluation
    assert all((tmp_path / "b" / "dog" / f).is_file() for f in now["files"].values()) and len(now["files"]) == 3
    # evaluation chooses among the checkpoints the dog was trained with, the first shard's
    from oneword.evaluation.evaluate import _checkpoint_list

    assert [s for s, _ in _checkpoint_list(tmp_path / "b" / "dog", now)] == [2, 4]
    clock = json.loads((tmp_path / "b" / "clock" / "summary.json").read_text())
    assert clock["steps_run"] == 4 and clock["concepts_trained_together"] == 1  # the clock trained alone
    # a fresh training (no resume) takes nothing, and a kept file that does not read is trained again
    fresh = train_group([("dog", SPECS[1], cat_latents_dir)], tmp_path / "c", cfg, checkpoint_root=tmp_path / "other",
                        resume=False, progress=False)  # fmt: skip
    assert fresh[0]["status"] == "trained"
    assert "trained_before" not in json.loads((tmp_path / "c" / "dog" / "summary.json").read_text())
    Path(now["trained_before"]).write_bytes(b"not a tar file")
    with caplog.at_level(logging.WARNING):
        again = train_group([("dog", SPECS[1], cat_latents_dir)], tmp_path / "d", cfg, checkpoint_root=root,
                            progress=False)  # fmt: skip
    assert again[0]["status"] == "trained" and "cannot be taken" in caplog.text
    retrained = json.loads((tmp_path / "d" / "dog" / "summary.json").read_text())
    assert retrained["steps_run"] == 4 and "trained_before" not in retrained


def test_a_kept_training_is_taken_only_whole_and_a_shard_resumes_its_own_checkpoints_first(
    cat_latents_dir, tmp_path, caplog
):
    """A kept training carries its checkpoints, which evaluation chooses from: taken after the group's folder was
    removed (a lifecycle rule), with them; one without them (kept by an older release) trains again. And a shard
    that finished (its checkpoints are there) but kept only some of its concepts (a store that refused the rest)
    resumes its own checkpoints, instead of training the others again alone."""
    import shutil
    import tarfile

    root, cfg = tmp_path / "checkpoints", TrainConfig(steps=4, checkpoint_every=2)
    pair = [("cat", SPECS[0], cat_latents_dir), ("dog", SPECS[1], cat_latents_dir)]
    train_group(pair, tmp_path / "a", cfg, checkpoint_root=root, progress=False)
    dog = json.loads((tmp_path / "a" / "dog" / "summary.json").read_text())
    (root / "trainings" / f"{dog['training_key']}.tar").unlink()  # the dog's keep was refused
    train_group(pair, tmp_path / "b", cfg, checkpoint_root=root, progress=False)
    for name in ("cat", "dog"):
        again = json.loads((tmp_path / "b" / name / "summary.json").read_text())
        assert again["steps_run"] == 0 and "trained_before" not in again, name  # resumed at the end: 0 steps
    # the pair's checkpoints removed: the cat's kept training carries its own copy
    shutil.rmtree(dog["checkpoint_dir"])
    train_group([("cat", SPECS[0], cat_latents_dir)], tmp_path / "c", cfg, checkpoint_root=root, progress=False)
    cat = json.loads((tmp_path / "c" / "cat" / "summary.json").read_text())
    from oneword.evaluation.evaluate import _checkpoint_list

    assert "trained_before" in cat and [s for s, _ in _checkpoint_list(tmp_path / "c" / "cat", cat)] == [2, 4]
    # a kept training without its checkpoints would be scored at its last step only: it trains again
    kept = root / "trainings" / f"{cat['training_key']}.tar"
    with tarfile.open(kept) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if not m.name.startswith("checkpoints/")]
    with tarfile.open(kept, "w") as tar:
        for m, data in members:
            tar.addfile(m, io.BytesIO(data))
    with caplog.at_level(logging.WARNING):
        train_group([("cat", SPECS[0], cat_latents_dir)], tmp_path / "d", cfg, checkpoint_root=root, progress=False)
    cat = json.loads((tmp_path / "d" / "cat" / "summary.json").read_text())
    assert cat["steps_run"] == 4 and "trained_before" not in cat and "no copy of its checkpoints" in caplog.text


def test_a_concept_with_other_settings_is_trained_again(tiny_model_dir, cat_latents_dir, tmp_path):
    root = tmp_path / "checkpoints"
    for out, steps in (("a", 4), ("b", 6)):
        train_group([("dog", SPECS[1], cat_latents_dir)], tmp_path / out, TrainConfig(steps=steps), progress=False,
                    checkpoint_root=root)  # fmt: skip
    summary = json.loads((tmp_path / "b" / "dog" / "summary.json").read_text())
    assert summary["steps_run"] == 6 and "trained_before" not in summary
    assert len(list((root / "trainings").glob("*.tar"))) == 2


def test_finished_trainings_kept_in_an_object_store(tiny_model_dir, cat_latents_dir, tmp_path, s3_bucket, caplog):
    root, cfg = f"s3://{s3_bucket}/checkpoints", TrainConfig(steps=4, checkpoint_every=2)
    train_group([("dog", SPECS[1], cat_latents_dir)], tmp_path / "a", cfg, checkpoint_root=root, progress=False)
    with caplog.at_level(logging.INFO):
        rows = train_group([("cat", SPECS[0], cat_latents_dir), ("dog", SPECS[1], cat_latents_dir)], tmp_path / "b",
                           cfg, checkpoint_root=root, progress=False)  # fmt: skip
    assert [r["status"] for r in rows] == ["trained"] * 2 and "dog was trained before" in caplog.text
    dog = json.loads((tmp_path / "b" / "dog" / "summary.json").read_text())
    assert dog["trained_before"].startswith(f"{root}/trainings/") and dog["checkpoint_dir"].startswith(root)
    assert torch.equal(*(load_embedding(tmp_path / d / "dog" / "learned_embeds.safetensors").vectors for d in "ab"))
    # an erasure of the dog (`catalogue.delete_concept`) takes its copies from the bucket, the cat's stay
    group, kept = trainings.copies_of(dog)
    assert kept == dog["trained_before"] and group == dog["checkpoint_dir"]
    assert checkpoints.list_checkpoints(group) and storage.object_exists(kept)
    assert trainings.copies({group}, {kept}) == [kept, group]
    trainings.remove([kept, group])
    assert not checkpoints.list_checkpoints(group) and not storage.object_exists(kept)
    cat_group, cat_kept = trainings.copies_of(json.loads((tmp_path / "b" / "cat" / "summary.json").read_text()))
    assert len(checkpoints.list_checkpoints(cat_group)) == 2 and storage.object_exists(cat_kept)


def test_a_concept_that_failed_at_cache_latents_is_matched_by_its_photos(cat_dataset, tmp_path):
    """cache_latents' own failure names the photos too (preprocess's manifest records their folder)."""
    from oneword.images import Manifest
    from oneword.train import match_latents

    photos = Manifest.photos_of(cat_dataset)
    assert photos and Path(photos).is_dir() and Manifest.photos_of(tmp_path / "none") == ""
    outcome.run_step("cache_latents", tmp_path / "l-cat", "record", lambda: 1 / 0, upstream=[cat_dataset],
                     images=photos)  # fmt: skip
    outcome.run_step("cache_latents", tmp_path / "l-dog", "record", lambda: 1 / 0)  # a failure that names nothing
    concepts = [{"images": photos}, {"images": "/photos/dog"}]
    assert match_latents(concepts, [tmp_path / "l-dog", tmp_path / "l-cat"]) == [tmp_path / "l-cat", tmp_path / "l-dog"]


def test_the_training_key_follows_what_changes_the_training(cat_latents, tmp_path):
    """A file of templates by what it says (an edited file trains anew; a moved one is the same), and how often
    the run reports only where early end looks at it then."""
    from oneword.train import training_key

    def key(templates, **config):
        return training_key(ConceptSpec(token="<k>", init_word="cat", templates=templates),
                            cat_latents.image_sha256, TrainConfig(**config), "model")  # fmt: skip

    mine, moved = tmp_path / "mine.txt", tmp_path / "moved.txt"
    for f in (mine, moved):
        f.write_text("a photo of {}\n")
    before = key(str(mine))
    assert key(str(moved)) == before and key("object") != before
    mine.write_text("a painting of {}\n")
    assert key(str(mine)) != before
    assert key("object", log_every=10) == key("object", log_every=50)
    assert key("object", log_every=10, early_end=0.1) != key("object", log_every=50, early_end=0.1)


def test_a_resumed_run_ends_early_where_an_unbroken_one_does(tiny_model_dir, cat_latents, tmp_path):
    """The vectors early end measures from are in the checkpoint: resumed from step 10 (a pod lost at 15), the run
    no longer waits a whole window from step 10 before it may end."""
    import shutil

    cfg = TrainConfig(steps=100, checkpoint_every=10, log_every=5, early_end=10.0, early_end_window=20)

    def trainer():
        return InversionTrainer(load_base_model(str(tiny_model_dir)), [(SPECS[0], cat_latents)], cfg)

    unbroken = trainer()
    whole = unbroken.run(tmp_path / "a", progress=False)
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / "step-000010.pt", tmp_path / "b")
    resumed = trainer()
    again = resumed.run(tmp_path / "b", resume=True, progress=False)
    assert whole.ended_early_at == again.ended_early_at == 20
    assert torch.equal(unbroken.concepts[0].param, resumed.concepts[0].param)
    # a checkpoint past this run's steps is not taken for it
    shorter = InversionTrainer(load_base_model(str(tiny_model_dir)), [(SPECS[0], cat_latents)],
                               cfg.model_copy(update={"steps": 15}))  # fmt: skip
    with pytest.raises(OnewordError, match="up to step 20, past this run's 15 steps"):
        shorter.run(tmp_path / "a", resume=True, progress=False)


def test_fp16s_loss_scale_is_given_back_when_a_concept_stops(tiny_model, cat_latents, monkeypatch):
    """Each non-finite step of a concept that goes NaN halves the loss scale all concepts share; stopped, it must
    not leave the others training at a scale hundreds of times too small."""
    import oneword.inversion as inversion

    monkeypatch.setattr(inversion, "device_precision", lambda requested, device: "fp16")  # a V100 or a T4
    tr = InversionTrainer(tiny_model, [(s, cat_latents) for s in SPECS[:2]], TrainConfig(steps=20, log_every=10))
    assert tr.precision == "fp16"
    real, calls = tr.concept_losses, []

    def poisoned(*a, **k):
        calls.append(1)
        losses = real(*a, **k)
        if len(calls) > 4 and not tr.concepts[1].failed:  # the dog's loss turns NaN from step 5 on
            losses = losses * torch.tensor([1.0, float("nan")])
        return losses

    tr.concept_losses = poisoned
    start = tr.scaler.get_scale()
    r = tr.run(progress=False, keep_going=True)
    assert list(r.failed) == ["<g1>"] and r.steps == 20
    assert tr.scaler.get_scale() == start  # halved five times before the stop, given back at it


def test_a_concept_whose_vectors_would_not_fit_a_prompt_is_refused(tiny_model, cat_latents_dir, tmp_path):
    from oneword.inversion import check_concept
    from oneword.train import train

    room = tiny_model.tokenizer.model_max_length - 2
    check_concept(tiny_model.tokenizer, ConceptSpec(token="<few>", init_word="cat", n_vectors=4, templates="object"))
    many = ConceptSpec(token="<many>", init_word="cat", n_vectors=room, templates="object")
    with pytest.raises(OnewordError, match="would never train") as e:
        check_concept(tiny_model.tokenizer, many)
    assert "at most" in e.value.hint
    # `oneword train` of one concept: refused before its first step, as a group's member is (it trained, and
    # exported its last vectors as they began)
    with pytest.raises(OnewordError, match="would never train"):
        train(cat_latents_dir, tmp_path / "one", many, TrainConfig(steps=1), progress=False)
    assert not (tmp_path / "one" / "learned_embeds.safetensors").exists()


def test_a_kept_training_under_a_relative_checkpoint_folder_is_taken(cat_latents_dir, tmp_path, monkeypatch):
    """`oneword train --concepts ... --checkpoint-dir ck`: the summary records the folder resolved, the last
    checkpoint as the trainer was given it; the two still name the same file."""
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(steps=2, checkpoint_every=2)
    train_group([("dog", SPECS[1], cat_latents_dir)], tmp_path / "a", cfg, checkpoint_root="ck", progress=False)
    train_group([("dog", SPECS[1], cat_latents_dir), ("cat", SPECS[0], cat_latents_dir)], tmp_path / "b", cfg,
                checkpoint_root="ck", progress=False)  # fmt: skip
    assert "trained_before" in json.loads((tmp_path / "b" / "dog" / "summary.json").read_text())


def test_an_erasure_finds_the_copies_that_hold_a_concept_and_takes_nothing_else(cat_latents_dir, tmp_path):
    """The kept trainings of a concept's shard-mates hold copies of the shard's checkpoints, and so its vectors:
    they are found by the shard they name, after its folder went (a bucket's lifecycle rule, a delete cut short).
    Only checkpoints leave a folder; and a single concept's training, which keeps its checkpoints where the user
    said (`oneword train --checkpoint-dir`), names no copy at all."""
    from oneword.train import train

    root, cfg = tmp_path / "checkpoints", TrainConfig(steps=4, checkpoint_every=2)
    train_group([("cat", SPECS[0], cat_latents_dir), ("dog", SPECS[1], cat_latents_dir)], tmp_path / "a", cfg,
                checkpoint_root=root, progress=False)  # fmt: skip
    cat, dog = (json.loads((tmp_path / "a" / n / "summary.json").read_text()) for n in ("cat", "dog"))
    group, kept = trainings.copies_of(cat)
    dog_kept = trainings.location(root.resolve(), dog["training_key"])
    assert group == dog["checkpoint_dir"] and Path(kept).is_file() and Path(dog_kept).is_file()
    assert trainings.copies({group}, {kept}) == [kept, dog_kept, group]
    cut = Path(kept).with_name(f".{Path(kept).name}.0123456789ab.part")  # a keep killed mid-write
    cut.write_bytes(b"half a kept training")
    assert trainings.copies({group}, {kept}) == [kept, str(cut), dog_kept, group]
    (Path(group) / "notes.txt").write_text("the user's")
    for _, f in checkpoints.list_checkpoints(group):  # the shard's folder emptied of checkpoints
        Path(f).unlink()
    found = trainings.copies({group}, {kept})
    assert found == [kept, str(cut), dog_kept]  # the dog's copy of the shard's checkpoints is found all the same
    trainings.remove(found)
    assert not Path(kept).exists() and not Path(dog_kept).exists() and (Path(group) / "notes.txt").is_file()
    assert not cut.exists()

    mine = tmp_path / "my-work"
    mine.mkdir()
    (mine / "thesis.txt").write_text("not oneword's")
    train(cat_latents_dir, tmp_path / "one", SPECS[0], cfg, checkpoint_dir=mine, progress=False)
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert one["checkpoint_dir"] == str(mine.resolve()) and trainings.copies_of(one) == (None, None)
