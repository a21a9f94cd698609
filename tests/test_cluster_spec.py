"""What the compiled pipelines ask of a cluster: every step sized, GPU steps on GPU nodes with the model cache, and
every value a pod needs reachable through the DAGs that contain it (checked on the checked-in specs)."""

import re
import shutil
from pathlib import Path

import pytest
import yaml

from oneword import __version__
from oneword.config import ClusterConfig
from oneword.pipelines.parameters import HF_HOME, INDUCTOR_CACHE, MODEL_CACHE_MOUNT

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = ["textual_inversion", "batch_personalisation"]
GPU_STEPS = {"exec-cache-latents", "exec-train", "exec-evaluate"}
MODEL_STEPS = GPU_STEPS | {"exec-preflight", "exec-changed-concepts"}  # the lookup reads encoders on CPU
PLAN_LOOKUP = {"batch_personalisation": {"exec-plan-batch"}}  # a batch's plan makes the lookup for every concept


def _load(name: str) -> tuple[dict, dict]:
    spec, platform = yaml.safe_load_all((ROOT / "pipelines" / f"{name}.yaml").read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


@pytest.mark.parametrize("name", PIPELINES)
def test_every_step_requests_and_limits_cpu_and_memory(name):
    spec, _ = _load(name)
    executors = spec["deploymentSpec"]["executors"]
    for label, ex in executors.items():
        res = ex["container"].get("resources", {})
        kind = "gpu" if label in GPU_STEPS else "cpu"
        for key, param in [
            ("resourceCpuRequest", "cpu_request"),
            ("resourceCpuLimit", "cpu_limit"),
            ("resourceMemoryRequest", "memory_request"),
            ("resourceMemoryLimit", "memory_limit"),
        ]:
            assert f"pipelinechannel--{kind}_step_{param}" in res.get(key, ""), (label, key, res)
        assert ("accelerator" in res) == (label in GPU_STEPS), label
    assert set(executors) >= GPU_STEPS


@pytest.mark.parametrize("name", PIPELINES)
def test_every_value_a_task_reads_is_declared_by_the_dag_around_it(name):
    """KFP's compiler does not carry channels used only by resource setters into loop bodies by itself; a pod whose
    request names an input its DAG lacks fails on the cluster, never on kfp.local. So: check every DAG."""
    spec, _ = _load(name)
    comps, executors = spec["components"], spec["deploymentSpec"]["executors"]
    dags = [spec["root"]] + [c for c in comps.values() if "dag" in c]
    checked = 0
    for dag in dags:
        declared = set(dag.get("inputDefinitions", {}).get("parameters", {}))
        for task_name, task in dag["dag"]["tasks"].items():
            inputs = task.get("inputs", {}).get("parameters", {})
            for key, value in inputs.items():
                source = value.get("componentInputParameter")
                assert source is None or source in declared, (task_name, key, source)
            comp = comps[task["componentRef"]["name"]]
            if "executorLabel" in comp:
                resources = str(executors[comp["executorLabel"]]["container"].get("resources", {}))
                for needed in re.findall(r"inputs\.parameters\['([^']+)'\]", resources):
                    assert needed in inputs, (task_name, needed)
                    checked += 1
    assert checked > 30  # the loop bodies were looked at, not skipped


@pytest.mark.parametrize("name", PIPELINES)
def test_model_loading_steps_share_the_model_cache_and_may_use_a_hub_token(name):
    spec, k8s = _load(name)
    loading = MODEL_STEPS | PLAN_LOOKUP.get(name, set())
    for label in loading:
        cfg = k8s[label]
        (mount,) = cfg["pvcMount"]
        source = mount["pvcNameParameter"]["componentInputParameter"]  # in a loop body: pipelinechannel--...
        assert mount["mountPath"] == MODEL_CACHE_MOUNT and source.endswith("model_cache_pvc"), label
        hf = [s for s in cfg["secretAsEnv"] if s["secretName"] == "oneword-hf"]
        assert hf and hf[0]["optional"] is True and hf[0]["keyToEnv"][0]["envVar"] == "HF_TOKEN", label
        env = {e["name"] for e in spec["deploymentSpec"]["executors"][label]["container"].get("env", [])}
        assert "HF_HOME" not in env, label  # kfp.local applies task envs: a local run keeps the user's cache
    for label in set(k8s) - loading:
        assert "pvcMount" not in k8s[label], label  # an RWX volume only where models are loaded


@pytest.mark.parametrize("name", PIPELINES)
def test_gpu_steps_select_gpu_nodes_by_a_standard_label(name):
    spec, k8s = _load(name)
    for label in GPU_STEPS:
        assert k8s[label]["nodeSelector"]["nodeSelectorJson"]["componentInputParameter"].endswith("gpu_node_selector")
    default = spec["root"]["inputDefinitions"]["parameters"]["gpu_node_selector"]["defaultValue"]
    assert default == {"nvidia.com/gpu.present": "true"} == ClusterConfig().gpu_node_selector
    for label in set(k8s) - GPU_STEPS:
        assert "nodeSelector" not in k8s[label], label  # CPU steps run anywhere


def test_compile_retargets_every_image_and_check_keeps_the_published_ones(tmp_path):
    from oneword.cli import main

    main(["compile", "--root", str(tmp_path), "--image-registry", "registry.example.com/team"])
    images = set()
    for f in [*tmp_path.glob("components/*.yaml"), *tmp_path.glob("pipelines/*.yaml")]:
        images |= set(re.findall(r"(?m)^\s+image: (\S+)$", f.read_text()))
    assert images == {
        f"registry.example.com/team/oneword:{__version__}",
        f"registry.example.com/team/oneword-cuda:{__version__}",
    }


@pytest.mark.parametrize("dockerfile", ["cpu.Dockerfile", "cuda.Dockerfile"])
def test_the_images_keep_the_hugging_face_cache_where_the_pipelines_mount_the_model_cache(dockerfile):
    text = (ROOT / "docker" / dockerfile).read_text()
    assert re.search(rf"HF_HOME={re.escape(HF_HOME)}\b", text), dockerfile
    assert HF_HOME.startswith(MODEL_CACHE_MOUNT + "/")


def test_the_gpu_image_keeps_torch_compiles_cache_on_the_model_cache_volume():
    text = (ROOT / "docker" / "cuda.Dockerfile").read_text()
    assert re.search(rf"TORCHINDUCTOR_CACHE_DIR={re.escape(INDUCTOR_CACHE)}\b", text)
    assert INDUCTOR_CACHE.startswith(MODEL_CACHE_MOUNT + "/") and f"mkdir -p {HF_HOME} {INDUCTOR_CACHE}" in text


def test_the_gpu_image_finds_a_driver_mounted_where_gke_mounts_it():
    """GKE's own driver installer mounts libcuda under /usr/local/nvidia, on no loader path: with a plain Python
    base (not nvidia/cuda, which sets it), torch saw no GPU there and the GPU steps ran on the CPU."""
    text = (ROOT / "docker" / "cuda.Dockerfile").read_text()
    loader = re.search(r"LD_LIBRARY_PATH=(\S+)", text)
    assert loader and "/usr/local/nvidia/lib64" in loader.group(1).split(":")
    assert re.search(r"PATH=\S*/usr/local/nvidia/bin", text)


def test_compile_check_refuses_a_registry_because_the_checked_in_specs_use_the_published_images(capsys, tmp_path):
    from oneword.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["compile", "--root", str(ROOT), "--check", "--image-registry", "registry.example.com/team"])
    assert exit_.value.code == 2 and "published images" in capsys.readouterr().err
    # nor rewrites them to pull from another registry (ONEWORD_IMAGE_REGISTRY, set for `submit`, names one): a
    # checkout's copy, so that a compile that did would not touch this one's
    shutil.copytree(ROOT / "components", tmp_path / "components")
    (tmp_path / "src" / "oneword").mkdir(parents=True)
    before = {p.name: p.read_bytes() for p in (tmp_path / "components").iterdir()}
    with pytest.raises(SystemExit) as exit_:
        main(["compile", "--root", str(tmp_path), "--image-registry", "registry.example.com/team"])
    said = " ".join(capsys.readouterr().err.split())
    assert exit_.value.code == 2 and "oneword's repository" in said and "--root my-specs" in said, said
    assert {p.name: p.read_bytes() for p in (tmp_path / "components").iterdir()} == before
    main(["compile", "--root", str(ROOT), "--check", "--image-registry", "ghcr.io/oneword-ml"])  # the released one


@pytest.mark.parametrize("name", PIPELINES)
def test_every_value_a_task_reads_has_the_type_its_input_declares(name):
    """KFP's driver on a cluster refuses a value of another type than the input's ("type mismatch: expect LIST, got
    string": a shard of `plan_batch -> list` reached `personalise` so, every night); kfp.local does not check.
    A STRING may feed anything through a selector (`parseJson(string_value)[...]`), which the driver resolves."""
    spec, _ = _load(name)
    comps = spec["components"]
    dags = [("root", spec["root"])] + [(k, c) for k, c in comps.items() if "dag" in c]

    def outputs(comp: dict) -> dict:
        return {k: v["parameterType"] for k, v in comp.get("outputDefinitions", {}).get("parameters", {}).items()}

    checked = 0
    for dag_name, dag in dags:
        around = {k: v["parameterType"] for k, v in dag.get("inputDefinitions", {}).get("parameters", {}).items()}
        tasks = dag["dag"]["tasks"]
        for task_name, task in tasks.items():
            declared = comps[task["componentRef"]["name"]].get("inputDefinitions", {}).get("parameters", {})
            for key, value in task.get("inputs", {}).get("parameters", {}).items():
                if key not in declared or "parameterExpressionSelector" in value:
                    continue  # a resource setter's channel (checked above), or a field picked out of a JSON string
                if "componentInputParameter" in value:
                    given = around[value["componentInputParameter"]]
                elif "taskOutputParameter" in value:
                    out = value["taskOutputParameter"]
                    producer = comps[tasks[out["producerTask"]]["componentRef"]["name"]]
                    given = outputs(producer)[out["outputParameterKey"]]
                else:
                    continue  # a constant, or a runtime value the compiler typed itself
                assert given == declared[key]["parameterType"], (dag_name, task_name, key, given)
                checked += 1
    assert checked > 50


@pytest.mark.parametrize("name", PIPELINES)
def test_every_step_has_a_deadline_that_ends_a_hung_pod(name):
    """A pod that hangs is stopped by Kubernetes (activeDeadlineSeconds) after its kind's deadline; one that hangs
    at every attempt its retries make (a stopped pod ends Failed: Argo's OnFailure retries it) within a day. Argo's
    window for a task's retries (KFP's SDK wrote 1 hour) holds every attempt at its deadline."""
    from oneword.pipelines.definitions import CPU_STEP_DEADLINE_S, GPU_STEP_DEADLINE_S, RETRY_PENDING_S

    spec, k8s = _load(name)
    for label, cfg in k8s.items():
        deadline = GPU_STEP_DEADLINE_S if label in GPU_STEPS else CPU_STEP_DEADLINE_S
        assert int(cfg["activeDeadlineSeconds"]) == deadline, label
    comps = spec["components"]
    dags = [spec["root"]["dag"]] + [c["dag"] for c in comps.values() if "dag" in c]
    worst = {}
    for dag in dags:
        for task_name, task in dag["tasks"].items():
            label = comps[task["componentRef"]["name"]].get("executorLabel")
            if label is None:
                continue
            retry = task.get("retryPolicy", {})
            n, wait, waited = retry.get("maxRetryCount", 0), float(retry.get("backoffDuration", "0s")[:-1]), 0.0
            for _ in range(n):
                waited += wait
                wait *= retry.get("backoffFactor", 1.0)
            worst[task_name] = (n + 1) * int(k8s[label]["activeDeadlineSeconds"]) + waited
            if n:  # Argo tries no retry past the window, and stops one at it: it holds every attempt, whole
                window = float(retry["backoffMaxDuration"][:-1])
                assert window >= worst[task_name] + RETRY_PENDING_S, (task_name, window, worst[task_name])
    assert worst["train"] > GPU_STEP_DEADLINE_S * 3  # retries counted
    assert max(worst.values()) < 24 * 3600, worst
