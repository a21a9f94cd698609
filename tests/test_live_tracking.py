"""Live training metrics against a real `mlflow server` with basic auth on loopback, as pipeline pods see it:
the train step's run is RUNNING with its loss, norm and sample pictures while the concept waits for evaluation;
`register` completes the same run, links the scores to the logged model and ends it."""

import functools
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from importlib import metadata
from pathlib import Path

import mlflow
import pytest
from kfp import dsl

from oneword.config import ConceptSpec
from oneword.pipelines import components
from oneword.serving import RUNTIME_PACKAGES

from .conftest import _start_mlflow_server, _stop, free_port

ADMIN, PASSWORD = "admin", "live-tracking-test-password"


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """`mlflow server --app-name basic-auth` with its own user database; yields its URL."""
    tmp = tmp_path_factory.mktemp("mlflow-auth")
    ini = tmp / "basic_auth.ini"
    ini.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{tmp / 'auth.db'}\n"
        f"admin_username = {ADMIN}\nadmin_password = {PASSWORD}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "auth_cache_ttl_seconds = 60\n"  # else every request pays a PBKDF2 check, as a server should cache too
    )
    proc, url = _start_mlflow_server(
        tmp,
        str(tmp / "artifacts"),
        env={"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_FLASK_SERVER_SECRET_KEY": "live-tracking-test-csrf-key"},
        extra_args=["--app-name", "basic-auth"],
    )
    yield url
    _stop(proc)


@pytest.fixture
def as_pod(auth_server, monkeypatch):
    """The credentials pipeline pods get from the oneword-mlflow secret."""
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return auth_server


@pytest.fixture(scope="module")
def toy_latents(tmp_path_factory) -> tuple[Path, str]:
    """Five pictures of a held-out toy-world concept, preprocessed and encoded: (latents folder, its shape word)."""
    from oneword.images import preprocess
    from oneword.latents import cache_latents
    from oneword.toyworld.concepts import CONCEPTS, write_concept

    name = next(iter(CONCEPTS))
    root = tmp_path_factory.mktemp("toy")
    write_concept(name, root / "photos")
    preprocess(root / "photos", root / "data", resolution=32)
    cache_latents(root / "data", "toyworld", root / "latents")
    return root / "latents", CONCEPTS[name].shape


def _client(url: str) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(url, url)


def test_unauthenticated_requests_are_refused(auth_server):
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{auth_server}/api/2.0/mlflow/experiments/search?max_results=1", timeout=10)
    assert refused.value.code == 401


def test_training_logs_live_and_register_completes_the_run(as_pod, toy_latents, tmp_path):
    url, (latents, shape) = as_pod, toy_latents
    model, metrics = dsl.Model(uri=str(tmp_path / "model")), dsl.Metrics(uri=str(tmp_path / "train-metrics"))
    names = components.train.python_func(
        latents=[dsl.Artifact(uri=str(latents))],
        concepts=[{"name": "toy-live", "token": "<toy-live>", "init_word": shape}],
        model=model,
        metrics=metrics,
        base_model="toyworld",
        steps=8,
        checkpoint_every=4,
        log_every=2,
        sample_every=4,
        tracking_uri=url,
        experiment="live",
        kfp_run_id="3f0c-run",
        kfp_run_name="nightly",
    )
    assert names == ["toy-live"]

    # After training, before evaluation: the run is open, with the curve and pictures so far.
    summary = json.loads((tmp_path / "model" / "toy-live" / "summary.json").read_text())
    client = _client(url)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "RUNNING" and run.info.run_name == "toy-live"
    assert run.data.tags["kfp.run_id"] == "3f0c-run" and run.data.tags["kfp.run_name"] == "nightly"
    assert run.data.tags["oneword.concept"] == "toy-live"
    for key in ("loss", "embedding_norm"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [2, 4, 6, 8]
    curve = json.loads((tmp_path / "model" / "toy-live" / "curve.json").read_text())
    assert [m.value for m in client.get_metric_history(run.info.run_id, "loss")] == [p["loss"] for p in curve]
    pictures = [f.path for f in client.list_artifacts(run.info.run_id, "images")]
    assert {s for s in (4, 8) if any(f"samples+step+{s}+" in p and p.endswith(".png") for p in pictures)} == {4, 8}

    evaluation = dsl.Artifact(uri=str(tmp_path / "evaluation"))
    components.evaluate.python_func(
        model=model,
        concept="toy-live",
        evaluation=evaluation,
        metrics=dsl.Metrics(uri=str(tmp_path / "eval-metrics")),
        report=dsl.HTML(uri=str(tmp_path / "report.html")),
        n_images=2,
        sampling_steps=2,
        checkpoint_budget=1,
    )
    registered = components.register.python_func(
        model=model,
        evaluation=evaluation,
        concept="toy-live",
        registration=dsl.Artifact(uri=str(tmp_path / "registration")),
        tracking_uri=url,
        experiment="live",
        kfp_run_id="3f0c-run",
        kfp_run_name="nightly",
    )
    assert registered == "toy-live/1@champion"

    # The same run, completed and ended; the scores are numbers on the logged model, found by search.
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED" and run.data.params["train.steps"] == "8"
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 4  # the curve was not logged twice
    version = client.get_model_version("toy-live", "1")
    assert version.run_id == run.info.run_id
    scores = json.loads((tmp_path / "evaluation" / "metrics.json").read_text())
    r = scores["reconstruction"]
    mlflow.set_tracking_uri(url)
    exp = [run.info.experiment_id]
    found = mlflow.search_logged_models(exp, filter_string=f"metrics.reconstruction > {r - 0.01}", output_format="list")
    # the version's logged model (MLflow 3.17's REST API returns no model_id with a version: its source names it)
    assert [f"models:/{m.model_id}" for m in found] == [version.source]
    assert found[0].source_run_id == run.info.run_id
    metrics_of = {m.key: m.value for m in found[0].metrics}
    assert metrics_of["reconstruction"] == pytest.approx(r) and metrics_of["editability"] == pytest.approx(
        scores["editability"]
    )
    assert not mlflow.search_logged_models(
        exp, filter_string=f"metrics.reconstruction > {r + 0.01}", output_format="list"
    )

    # The pyfunc: an input example, requirements any index can satisfy, and it serves without oneword installed.
    uri = "models:/toy-live/1"
    info = mlflow.models.get_model_info(uri)
    assert info.saved_input_example_info is not None
    assert "<toy-live>" in json.dumps(mlflow.models.Model.load(uri).load_input_example())
    requirements = Path(mlflow.pyfunc.get_model_dependencies(uri)).read_text().split()
    assert not [r for r in requirements if r.lower().startswith("oneword")]
    assert f"torch=={metadata.version('torch').split('+')[0]}" in requirements  # as PyPI names it: no "+cpu"
    assert not [r for r in requirements if "+" in r]
    served = _predict_without_oneword_installed(uri, url)
    assert served["rows"] == 2 and "/code/oneword/" in served["oneword"]
    # what loading and predicting imported of oneword's own dependencies is in the model's requirements
    shipped = {p.replace("_", "-") for p in (*RUNTIME_PACKAGES, "mlflow")}
    assert set(served["imported"]) <= shipped, set(served["imported"]) - shipped


SERVE = """
import json, re, sys
sys.path = [p for p in sys.path if not (p.endswith("/src") and __import__("os").path.isdir(p + "/oneword"))]
import mlflow.pyfunc
from importlib import metadata
model = mlflow.pyfunc.load_model(sys.argv[1])
out = model.predict(["A photo of <toy-live>"], params={"n": 2, "steps": 2})
import oneword
declared = {
    re.split(r"[<>=!~;\\[ ]", r)[0].lower().replace("_", "-")
    for r in metadata.requires("oneword") or []
    if "extra ==" not in r
}
dists = metadata.packages_distributions()
imported = {d.lower().replace("_", "-") for m in list(sys.modules) for d in dists.get(m.split(".")[0], [])}
print(json.dumps({"rows": len(out), "oneword": oneword.__file__, "imported": sorted(imported & declared)}))
"""


def _predict_without_oneword_installed(uri: str, tracking_uri: str) -> dict:
    """Load and predict in a fresh interpreter where only the model's shipped code can provide oneword."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    done = subprocess.run([sys.executable, "-c", SERVE, uri], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_mlflow_failing_does_not_stop_training(as_pod, cat_latents_dir, tmp_path, caplog, monkeypatch):
    """The server refuses writes half-way, or is not there at all: a warning, and training finishes."""
    from oneword.inversion import ConceptSpec, TrainConfig
    from oneword.live import LiveTracking
    from oneword.train import train

    def refused(step: int, _: dict) -> None:
        if step == 4:  # the credentials stop working (a rotated secret): every write is refused from here
            monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "rotated")

    closed = f"http://127.0.0.1:{free_port()}"
    for where, url, callbacks in (("refused", as_pod, [refused]), ("closed", closed, [])):
        result = train(
            cat_latents_dir,
            tmp_path / where,
            ConceptSpec(token=f"<cat-{where}>", init_word="cat"),
            TrainConfig(steps=8, log_every=2, checkpoint_every=0),
            callbacks=callbacks,
            progress=False,
            tracking=LiveTracking(url, "failing"),
        )
        assert result.steps == 8 and (tmp_path / where / "learned_embeds.safetensors").exists()
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("could not log the training metrics" in w and "training goes on" in w for w in warned)
    assert any(closed in w and "could not open the runs" in w for w in warned)

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    run_id = json.loads((tmp_path / "refused" / "summary.json").read_text())["mlflow_run_id"]
    assert [m.step for m in _client(as_pod).get_metric_history(run_id, "loss")] == [2]  # logged until refused
    assert "mlflow_run_id" not in json.loads((tmp_path / "closed" / "summary.json").read_text())


def test_a_training_killed_and_resumed_goes_on_in_its_run(cat_latents_dir, tiny_model_dir, tmp_path):
    """`train --resume` after a kill opened a second run of the concept, and the first stayed RUNNING for ever
    beside it: the resume goes on in the run the killed training opened (found by its checkpoint folder)."""
    import signal
    import time

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "out"
    args = [str(Path(sys.executable).parent / "oneword"), "train", str(cat_latents_dir), "--token", "<cat-k>",
            "--init-word", "cat", "-o", str(out), "--base-model", str(tiny_model_dir), "--checkpoint-every", "2",
            "--device", "cpu", "--tracking-uri", uri]  # fmt: skip
    proc = subprocess.Popen([*args, "--steps", "100000"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints" / "step-000004.pt").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # no handler runs: the run is left RUNNING
        proc.wait(timeout=60)
    finally:
        proc.kill()
    newest = max(int(p.stem.split("-")[1]) for p in (out / "checkpoints").glob("step-*.pt"))
    done = subprocess.run([*args, "--steps", str(newest + 2), "--resume"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = mlflow.MlflowClient(uri).search_runs(
        [e.experiment_id for e in mlflow.MlflowClient(uri).search_experiments()], "tags.`oneword.concept` = 'cat-k'"
    )
    assert len(runs) == 1, [(r.info.run_id, r.info.status) for r in runs]  # left open for register, as always
    assert json.loads((out / "summary.json").read_text())["mlflow_run_id"] == runs[0].info.run_id
    steps = [m.step for m in mlflow.MlflowClient(uri).get_metric_history(runs[0].info.run_id, "loss")]
    assert max(steps) >= newest and len(steps) == len(set(steps))  # the killed one's curve, then the resume's


def test_a_server_that_answers_only_after_training_started_gets_the_runs_and_every_point(
    as_pod, cat_latents_dir, tmp_path, monkeypatch
):
    """Opening the runs was tried once: a server down for the first minute meant no live run at all."""
    from oneword import live
    from oneword.inversion import ConceptSpec, TrainConfig
    from oneword.live import LiveTracking
    from oneword.train import train

    monkeypatch.setattr(live, "RETRY_AFTER_S", 0.0)  # the next report tries again at once
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-yet")  # refused, as a server not up yet refuses

    def comes_up(step: int, _: dict) -> None:
        if step == 4:
            monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)

    train(cat_latents_dir, tmp_path / "late", ConceptSpec(token="<cat-late>", init_word="cat"),
          TrainConfig(steps=8, log_every=2, checkpoint_every=0), callbacks=[comes_up], progress=False,
          tracking=LiveTracking(as_pod, "late-server"))  # fmt: skip
    run_id = json.loads((tmp_path / "late" / "summary.json").read_text())["mlflow_run_id"]
    client = _client(as_pod)
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [2, 4, 6, 8]
    assert len(client.search_runs([client.get_experiment_by_name("late-server").experiment_id])) == 1


def test_runs_left_running_by_a_stopped_batch_are_ended(tmp_path):
    """A batch that stops before a concept's register (another concept failed under on_error=fail) would leave
    that concept's live run RUNNING for ever; the batch's exit handler ends it, and only its own runs."""
    from oneword import tracking
    from oneword.live import LiveRuns, LiveTracking, end_orphaned_runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cat, dog = ConceptSpec(token="<cat-o>", init_word="cat"), ConceptSpec(token="<dog-o>", init_word="dog")
    mine = LiveRuns(LiveTracking(uri, "oneword", {"kfp.run_id": "batch-1"}), [("cat-o", cat)], "sha256:x")
    other = LiveRuns(LiveTracking(uri, "oneword", {"kfp.run_id": "batch-2"}), [("dog-o", dog)], "sha256:x")
    ended = end_orphaned_runs(uri, "oneword", "batch-1", "the batch ended (FAILED) before this concept registered")
    assert ended == [mine.run_ids["cat-o"]]
    _, client = tracking.client(uri)
    run = client.get_run(ended[0])
    assert run.info.status == "KILLED" and "before this concept registered" in run.data.tags["oneword.ended_by"]
    assert client.get_run(other.run_ids["dog-o"]).info.status == "RUNNING"  # another batch's run: untouched
    assert end_orphaned_runs(uri, "oneword", "batch-1", "again") == []  # nothing left to end


def test_a_runs_final_report_ends_its_open_runs_even_when_the_report_cannot_be_made(tmp_path):
    """The exit handlers' library part (report-run, report-batch): a GPU pod lost for good left the live run open."""
    from oneword import tracking
    from oneword.batch import final_report
    from oneword.live import LiveRuns, LiveTracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cat = ConceptSpec(token="<cat-k>", init_word="cat")
    lost = LiveRuns(LiveTracking(uri, "oneword", {"kfp.run_id": "run-9"}), [("cat-k", cat)], "sha256:x")

    def unreadable():
        raise ConnectionError("the plan's store did not answer")

    report = final_report(uri, "run-9", unreadable, "oneword", "FAILED")
    assert report["ended_runs"] == [lost.run_ids["cat-k"]] and "did not answer" in report["error"]
    assert tracking.client(uri)[1].get_run(lost.run_ids["cat-k"]).info.status == "KILLED"
    plan = [{"images": "x", "token": "<cat-k>", "init_word": "cat", "name": "cat-k"}]
    report = final_report(uri, "run-9", lambda: plan, "oneword", "FAILED")
    assert report["pipeline_state"] == "FAILED" and [c["status"] for c in report["concepts"]] == ["failed"]
    assert "ended (FAILED) before this concept registered" in report["concepts"][0]["error"]  # not "no step said"
    from oneword.batch import run_answer

    assert run_answer(report).startswith("cat-k failed at a step that recorded nothing: the run ended (FAILED)")
    # as a cluster's exit handler is told: ML Metadata's state, and no error message (the driver fills none)
    unplanned = final_report(uri, "run-9", lambda: None, "oneword", "RUNNING")
    assert run_answer(unplanned, None) == (
        "nothing registered (run state RUNNING): no plan was recorded: the manifest could not be read (see "
        "plan-batch's log)")
    assert run_answer({**unplanned, "error": ""}, None) == "nothing registered (run state RUNNING)"


def test_a_failed_step_after_training_ends_its_live_run_with_why(tmp_path):
    """A failed evaluation left training's run RUNNING: the step that fails ends it, with why (the exit handler
    ends it too, but only as KILLED, without the step's error)."""
    from oneword import tracking
    from oneword.live import LiveRuns, LiveTracking, end_training_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs = LiveRuns(LiveTracking(uri, "oneword"), [("cat-e", ConceptSpec(token="<cat-e>", init_word="cat"))], "x")
    trained = tmp_path / "trained"
    trained.mkdir()
    (trained / "summary.json").write_text(json.dumps({"mlflow_run_id": runs.run_ids["cat-e"]}))
    assert end_training_run(uri, trained, "evaluate", "CUDA out of memory") == runs.run_ids["cat-e"]
    run = tracking.client(uri)[1].get_run(runs.run_ids["cat-e"])
    assert run.info.status == "FAILED" and run.data.tags["oneword.failed_stage"] == "evaluate"
    assert run.data.tags["oneword.error"] == "CUDA out of memory"
    assert end_training_run(uri, trained, "evaluate", "again") is None  # ended already: left as it is
    assert end_training_run(uri, tmp_path / "never-trained", "evaluate", "x") is None


@pytest.mark.parametrize("on_error", ["fail", "record"])
def test_a_failed_register_ends_training_live_run_with_why(on_error, tmp_path, monkeypatch):
    """register is the step that ends training's live run: failing before it opened it (a deleted evaluation file,
    an experiment it cannot make), it left the run RUNNING; ended here, it says why."""
    from oneword import tracking
    from oneword.errors import OnewordError
    from oneword.live import LiveRuns, LiveTracking

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs = LiveRuns(LiveTracking(uri, "oneword"), [("cat-f", ConceptSpec(token="<cat-f>", init_word="cat"))], "x")
    model = tmp_path / "model"
    (model / "cat-f").mkdir(parents=True)
    (model / "cat-f" / "summary.json").write_text(json.dumps({"mlflow_run_id": runs.run_ids["cat-f"]}))
    (model / "concepts.json").write_text(json.dumps([{"name": "cat-f", "token": "<cat-f>"}]))
    (tmp_path / "evaluation").mkdir()  # evaluated, its metrics.json since lost
    register = functools.partial(
        components.register.python_func, model=dsl.Model(uri=str(model)), concept="cat-f", tracking_uri=uri,
        evaluation=dsl.Artifact(uri=str(tmp_path / "evaluation")), on_error=on_error,
        registration=dsl.Artifact(uri=str(tmp_path / "registration")),
    )  # fmt: skip
    if on_error == "fail":
        with pytest.raises(OnewordError, match=r"metrics\.json"):
            register()
    else:
        assert register() == "cat-f failed at register"
    run = tracking.client(uri)[1].get_run(runs.run_ids["cat-f"])
    assert run.info.status == "FAILED" and run.data.tags["oneword.failed_stage"] == "register"


def test_live_samples_decode_outside_an_fp16_autocast(tiny_model_dir):
    """SDXL's VAE overflows in fp16: under the training step's fp16 autocast the samples' decode stays in the VAE's
    own precision (diffusers' upcast looks at the weights, fp32 here, and would not step in)."""
    import torch

    from oneword.live import decode_outside_autocast
    from oneword.models import load_base_model

    vae = load_base_model(str(tiny_model_dir), parts=("vae",)).vae
    z = torch.randn(1, 4, 4, 4)
    with torch.autocast("cpu", dtype=torch.float16):
        assert vae.decode(z).sample.dtype == torch.float16  # what the samples were decoded in before
        decode_outside_autocast(vae)
        out = vae.decode(z).sample
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
