"""Shared fixtures: tiny random-weight models built in code, real photos, and a real S3 server on loopback."""

from __future__ import annotations

import os
import re
import socket
import sys
from pathlib import Path

import pytest

# Real photos, downscaled, with their licence and attribution: data/dreambench/README.md (CC BY 4.0).
DREAMBENCH = Path(__file__).resolve().parent / "data" / "dreambench"

# Never reach a hub from tests, and keep every cache inside the test session.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

# `make test` runs the suite in one worker per core (pytest-xdist): much of it waits on other processes (kfp.local's
# steps, servers) or imports on one thread. Each worker computes on one thread, and so do the processes it starts:
# workers with torch's default thread count fight over the cores and run many times slower, not twice.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    old = os.environ.get("ONEWORD_CACHE")
    os.environ["ONEWORD_CACHE"] = str(tmp_path_factory.mktemp("oneword-cache"))
    yield
    if old is None:
        os.environ.pop("ONEWORD_CACHE", None)
    else:
        os.environ["ONEWORD_CACHE"] = old


@pytest.fixture(autouse=True)
def _no_retry_backoff(monkeypatch):
    """A step tries again what a retry may cure, after waits of minutes (`outcome.RETRY_WAITS_S`): in the tests it
    tries again at once, so that no test sleeps on a backoff. (kfp.local's steps try once: `LOCAL_RUN_ENV`.)"""
    from oneword import outcome

    monkeypatch.setattr(outcome, "RETRY_WAITS_S", (0.0, 0.0))


@pytest.fixture(autouse=True)
def _mlflow_uris_restored():
    """`register` and the queries point mlflow's process-wide URIs (and the variables they export) at their store:
    a later test's bare `MlflowClient(url)` took its registry from them, and waited minutes on a proxy an earlier
    test had shut down."""
    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    before = {k: os.environ.get(k) for k in names}
    yield
    if "mlflow" in sys.modules:
        import mlflow

        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A ~2.6M-parameter SD1-style model (epsilon, 32 px) as a diffusers folder."""
    from oneword.random_models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_v_model_dir(tmp_path_factory) -> Path:
    """A tiny SD2-style model: v-prediction, pad token '!', width 48."""
    from oneword.random_models import build_tiny_model

    return build_tiny_model(
        tmp_path_factory.mktemp("tiny-v") / "model", seed=1, width=48, prediction_type="v_prediction", pad_token="!"
    )


@pytest.fixture(scope="session")
def tiny_sd2_model_dir(tmp_path_factory) -> Path:
    """A tiny model shaped as SD 2.1's diffusers folder: 1024-wide text encoder, v-prediction, '!' padding, 32 px."""
    from oneword.random_models import build_tiny_sd2_model

    return build_tiny_sd2_model(tmp_path_factory.mktemp("tiny-sd2") / "model", seed=2)


@pytest.fixture
def tiny_model(tiny_model_dir):
    """A fresh `LoadedModel` (tokens added by one test never leak into another)."""
    from oneword.models import load_base_model

    return load_base_model(str(tiny_model_dir))


@pytest.fixture(scope="session")
def cat_dataset(tmp_path_factory) -> Path:
    """The DreamBench cat photos, preprocessed to 32 px."""
    from oneword.images import preprocess

    out = tmp_path_factory.mktemp("cat") / "data"
    preprocess(DREAMBENCH / "cat", out, resolution=32)
    return out


@pytest.fixture(scope="session")
def cat_latents_dir(tmp_path_factory, cat_dataset, tiny_model_dir) -> Path:
    from oneword.latents import cache_latents

    out = tmp_path_factory.mktemp("cat-latents") / "latents"
    cache_latents(cat_dataset, str(tiny_model_dir), out)
    return out


@pytest.fixture
def cat_latents(cat_latents_dir):
    from oneword.latents import LatentSet

    return LatentSet.load(cat_latents_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol server (moto) on loopback; S3 settings are exported to the environment."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "S3_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket on the S3 server; returns its name."""
    from oneword.storage import client

    name = "t-" + re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:40].strip("-")
    mc = client()
    if not mc.bucket_exists(name):
        mc.make_bucket(name)
    return name


def served(model_uri: str, tracking_uri: str, body: dict, log: Path, command: list[str] | None = None,
           env: dict[str, str] | None = None) -> list[dict]:  # fmt: skip
    """`mlflow models serve` of `model_uri` started, sent `body` at /invocations, stopped: the answer's rows.

    `command`: the server's command as a manifest gives it instead (`/bin/sh -c 'exec mlflow models serve ...'`),
    with `env` beside the tracking URI; on loopback and a free port here either way."""
    import json
    import os
    import re
    import subprocess
    import sys
    import time
    import urllib.request

    port, bin_dir = free_port(), os.path.dirname(sys.executable)  # mlflow starts `uvicorn` by name
    env = {**os.environ, **(env or {}), "MLFLOW_TRACKING_URI": tracking_uri, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    if command is None:
        command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
                   "--host", "127.0.0.1", "-p", str(port)]  # fmt: skip
    else:  # a manifest's, whose server listens on every address at its port: here, on loopback at a free one
        command = [re.sub(r"-p \d+", f"-p {port}", a).replace("--host 0.0.0.0", "--host 127.0.0.1") for a in command]
        assert any("--host 127.0.0.1" in a and f"-p {port}" in a for a in command), command
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.time() + 120
        while True:  # the server's start (a model load), not a retry of a request that failed
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-2000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5)
                break
            except OSError:
                time.sleep(0.5)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})  # fmt: skip
        return json.load(urllib.request.urlopen(request, timeout=300))["predictions"]
    finally:
        _stop(proc)


def _start_mlflow_server(
    tmp: Path,
    artifacts_destination: str,
    env: dict | None = None,
    port: int | None = None,
    extra_args: list[str] | None = None,
):
    """Start a real `mlflow server` on loopback with a SQLite backend; returns (process, url)."""
    import subprocess
    import sys
    import time
    import urllib.request

    port = port or free_port()
    log = open(tmp / "mlflow-server.log", "wb")  # noqa: SIM115 - closed when the process ends
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{tmp / 'mlflow.db'}",
            "--artifacts-destination",
            artifacts_destination,
            "--workers",
            "1",
            *(extra_args or []),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {(tmp / 'mlflow-server.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise RuntimeError("mlflow server did not become healthy in 120 s")


def _stop(proc) -> None:
    """End a server the tests started: SIGTERM, then SIGKILL if it has not exited in 30 s (a loaded machine)."""
    import subprocess

    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server (SQLite backend, local proxied artifacts) on loopback; yields its URL."""
    tmp = tmp_path_factory.mktemp("mlflow")
    proc, url = _start_mlflow_server(tmp, str(tmp / "artifacts"))
    yield url
    _stop(proc)


@pytest.fixture(scope="session")
def mlflow_server_s3(tmp_path_factory, s3_server):
    """A real MLflow server whose artifacts go to the S3 (moto) server, as with MinIO in a cluster."""
    from oneword.storage import client

    mc = client()
    if not mc.bucket_exists("mlflow"):
        mc.make_bucket("mlflow")
    tmp = tmp_path_factory.mktemp("mlflow-s3")
    # The server alone holds S3 credentials; clients reach artifacts through its proxy.
    env = {
        "MLFLOW_S3_ENDPOINT_URL": s3_server["S3_ENDPOINT_URL"],
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    proc, url = _start_mlflow_server(tmp, "s3://mlflow/", env)
    yield url
    _stop(proc)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    from oneword.random_models import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("tiny-clip") / "clip")


@pytest.fixture(scope="session")
def evaluated_concept(tmp_path_factory, cat_latents_dir, cat_dataset, tiny_clip_dir):
    """A tiny concept, trained and evaluated: (train dir, eval dir)."""
    from oneword.evaluation.evaluate import EvalConfig, evaluate
    from oneword.inversion import ConceptSpec, TrainConfig
    from oneword.train import train

    root = tmp_path_factory.mktemp("concept")
    train(
        cat_latents_dir,
        root / "train",
        ConceptSpec(token="<cat-r>", init_word="cat"),
        TrainConfig(steps=6, checkpoint_every=3),
        progress=False,
    )
    evaluate(
        root / "train",
        cat_dataset,
        root / "eval",
        EvalConfig(n_images=2, steps=2, checkpoint_budget=1, clip_model=str(tiny_clip_dir)),
    )
    return root / "train", root / "eval"


def pytest_collection_modifyitems(config, items):
    """Files with the most slow tests first: with one worker per core (`make test`), each file runs on one worker,
    and a long file started last would keep one worker busy alone at the end. (`make test` passes
    `--no-loadscope-reorder`, or xdist would order the files by their number of tests instead.)"""
    slow: dict = {}
    for item in items:
        slow[item.path] = slow.get(item.path, 0) + (item.get_closest_marker("slow") is not None)
    items.sort(key=lambda item: -slow[item.path])  # stable: a file's tests keep their order
