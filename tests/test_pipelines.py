"""The KFP pipelines: compiled specs, real kfp.local runs, and submit/schedule against a loopback KFP API."""

import json
import re
import shutil
import subprocess
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
import yaml

from oneword import __version__, catalogue
from oneword.pipelines.compile import stale_files
from oneword.pipelines.parameters import PIPELINE_ROOT

from .conftest import DREAMBENCH

ROOT = Path(__file__).resolve().parents[1]


def _spec(name: str) -> dict:
    """The pipeline spec and its platform spec (a second YAML document) as one dict."""
    spec, platform = yaml.safe_load_all((ROOT / "pipelines" / f"{name}.yaml").read_text())
    return {**spec, **platform}


def test_checked_in_specs_are_up_to_date():
    assert stale_files(ROOT) == []


def _dags(spec: dict) -> dict[str, dict]:
    """Every DAG of a compiled pipeline (root, sub-pipelines, loop bodies): {component name: its tasks}."""
    dags = {"root": spec["root"]["dag"]["tasks"]}
    dags.update({n: c["dag"]["tasks"] for n, c in spec["components"].items() if "dag" in c})
    return dags


def _task(spec: dict, name: str) -> tuple[str, dict]:
    (found,) = [(dag, tasks[name]) for dag, tasks in _dags(spec).items() if name in tasks]
    return found


def test_compiled_pipeline_loads_back_with_gpu_settings_on_train():
    from kfp.components import load_component_from_file

    loaded = load_component_from_file(str(ROOT / "pipelines" / "textual_inversion.yaml"))
    assert loaded.name == "textual-inversion"
    spec = _spec("textual_inversion")
    for step in ("cache-latents", "train", "evaluate"):
        container = spec["deploymentSpec"]["executors"][f"exec-{step}"]["container"]
        acc = container["resources"]["accelerator"]
        assert "accelerator_type" in acc["resourceType"] and "accelerator_limit" in acc["resourceCount"], step
        k8s = spec["platforms"]["kubernetes"]["deploymentSpec"]["executors"][f"exec-{step}"]
        assert "gpu_node_selector" in k8s["nodeSelector"]["nodeSelectorJson"]["componentInputParameter"], step
        assert "gpu_tolerations" in k8s["tolerations"][0]["tolerationJson"]["componentInputParameter"], step
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["gpu_tolerations"]["parameterType"] == "LIST"  # KFP's driver appends each (backend k8s.go)
    assert [t["key"] for t in params["gpu_tolerations"]["defaultValue"]] == ["nvidia.com/gpu"]
    # KFP's driver reads a pod's resource fields from string parameters only (resolvePodSpecInputRuntimeParameter:
    # GetStringValue, "" for a number): a number there would leave the GPU steps asking for no GPU
    for name in ("textual_inversion", "batch_personalisation"):
        s = _spec(name)
        resources = json.dumps([e["container"].get("resources", {}) for e in s["deploymentSpec"]["executors"].values()])
        read = set(re.findall(r"pipelinechannel--(\w+)", resources))
        assert {"accelerator_limit", "gpu_step_memory_limit"} <= read, read
        kinds = {k: s["root"]["inputDefinitions"]["parameters"][k]["parameterType"] for k in read}
        assert set(kinds.values()) == {"STRING"}, kinds
    assert {"accelerator_type", "accelerator_limit", "gpu_node_selector"} <= set(params)
    # every parameter explains itself on the dashboard
    assert all(p.get("description") for p in params.values()), [
        k for k, p in params.items() if not p.get("description")
    ]
    # the train task retries (spot GPUs) and resumes: its checkpoints live outside the pod, keyed by content
    _, train = _task(spec, "train")
    assert train["retryPolicy"]["maxRetryCount"] == 3
    assert params["checkpoint_root"]["defaultValue"].startswith("s3://")
    # every pipeline channel a task reads is declared by its DAG (KFP's compiler does not check this itself)
    for name, comp in spec["components"].items():
        declared = set(comp.get("inputDefinitions", {}).get("parameters", {}))
        for task_name, task in comp.get("dag", {}).get("tasks", {}).items():
            for arg in task.get("inputs", {}).get("parameters", {}).values():
                ref = arg.get("componentInputParameter")
                assert ref is None or ref in declared, (name, task_name, ref)


def test_batch_spec_is_the_five_steps_per_concept_with_one_train_per_shard():
    spec = _spec("batch_personalisation")
    dags = _dags(spec)
    where = {task: dag for dag, tasks in dags.items() for task in tasks}
    # per concept: preprocess and cache_latents in one loop, evaluate and register in another
    assert where["preprocess"] == where["cache-latents"] != where["evaluate"] == where["register"]
    for loop in (where["preprocess"], where["evaluate"]):
        (parent,) = [d for d, tasks in dags.items() if any(t["componentRef"]["name"] == loop for t in tasks.values())]
        assert parent == where["train"]  # both loops sit beside the shard's single train task
        assert any("parameterIterator" in t for t in dags[parent].values())
    train = dags[where["train"]]["train"]
    collected = train["inputs"]["artifacts"]["latents"]["taskOutputArtifact"]  # every concept's latents, gathered
    assert dags[where["train"]][collected["producerTask"]]["componentRef"]["name"] == where["cache-latents"]
    assert "accelerator" in spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]
    # the shards loop runs the same `personalise` sub-pipeline as textual_inversion
    (shards,) = [t for t in dags[where["personalise"]].values() if t["componentRef"]["name"] == "comp-personalise"]
    assert shards["inputs"]["parameters"]["on_error"]["runtimeValue"]["constant"] == "record"
    plan = next(t for tasks in dags.values() for n, t in tasks.items() if n == "plan-batch")
    assert not plan.get("cachingOptions", {}).get("enableCache")  # re-reads the manifest every run
    assert plan["retryPolicy"]["maxRetryCount"] == 2  # a store that blinks at 02:00 does not cost the night
    check = next(t for tasks in dags.values() for n, t in tasks.items() if n == "preflight")
    assert check["retryPolicy"]["maxRetryCount"] == 2  # nor one whose node was lost while it checked
    # the run's limit reaches the plan, which reads the model (for the unchanged lookup) from the shared cache
    limit = plan["inputs"]["parameters"]["max_concepts_per_run"]["componentInputParameter"]
    assert limit.endswith("-max_concepts_per_run")
    pvc = spec["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-plan-batch"]["pvcMount"]
    assert pvc[0]["mountPath"] == "/models"
    for step in ("preprocess", "cache-latents"):  # what a retry may cure fails them, and is retried
        task = dags[where[step]][step]
        assert task["retryPolicy"]["maxRetryCount"] == 2, step
        # KFP's launcher cannot read another run's cached artifact from MinIO (docs/deploy.md): nothing is cached
        assert not task.get("cachingOptions", {}).get("enableCache"), step


def test_the_code_a_component_ships_holds_no_docstring_and_its_spec_keeps_the_descriptions():
    """Argo keeps a task's code in several of its nodes (`argo_size`): a component's docstring, given by `@doc`,
    stays out of the code KFP ships and still describes the component and its inputs in components/*.yaml."""
    from oneword.pipelines import components

    for component in components.ALL:
        spec = yaml.safe_load((ROOT / "components" / f"{component.name.replace('-', '_')}.yaml").read_text())
        (executor,) = spec["deploymentSpec"]["executors"].values()
        code = executor["container"]["command"][-1]
        summary = component.python_func.__doc__.split("\n")[0]
        assert f"\ndef {component.python_func.__name__}(" in code and summary not in code, component.name
        documented = set(re.findall(r"^ {8}(\w+): ", component.python_func.__doc__, re.MULTILINE))
        inputs = spec["root"]["inputDefinitions"].get("parameters", {})
        assert documented & set(inputs), component.name
        assert {n for n, p in inputs.items() if p.get("description")} == documented & set(inputs), component.name


def test_a_batch_run_at_the_limit_fits_in_what_argo_keeps_of_a_run():
    """Argo ends a run whose Workflow object outgrows 1 MiB. By the model of its node statuses (`argo_size`), a
    batch run that trains max_concepts_per_run concepts, one a shard, with KFP 2.17's retry nodes, leaves a sixth
    of it spare; twice as many would not fit (the limit is not set far below what fits either)."""
    from oneword.batch import RUN_LIMIT

    from .argo_size import MAX_WORKFLOW_SIZE, Run

    spec = ROOT / "pipelines" / "batch_personalisation.yaml"
    assert Run(spec, shards=RUN_LIMIT, per_shard=1).total() < 0.85 * MAX_WORKFLOW_SIZE
    assert Run(spec, shards=2 * RUN_LIMIT, per_shard=1).total() > MAX_WORKFLOW_SIZE
    # concepts trained together cost fewer nodes each
    assert Run(spec, shards=RUN_LIMIT // 4, per_shard=4).total() < Run(spec, shards=RUN_LIMIT, per_shard=1).total()


def test_a_batch_bundles_after_every_shard_on_cpu_inside_the_exit_handler():
    """`bundle-concepts` waits for the shards' loop (every concept registered or recorded as failed), inside the exit
    handler (so report-batch reads what it did), on a CPU pod, never cached."""
    spec = _spec("batch_personalisation")
    dags = _dags(spec)
    where, task = _task(spec, "bundle-concepts")
    loop = dags[where][task["dependentTasks"][0]]
    assert len(task["dependentTasks"]) == 1 and loop["taskInfo"]["name"] == "shards"
    exit_handler = next(t for t in dags["root"].values() if t.get("triggerPolicy", {}).get("strategy") ==
                        "ALL_UPSTREAM_TASKS_COMPLETED")  # fmt: skip
    assert exit_handler["taskInfo"]["name"] == "report-batch" and exit_handler["dependentTasks"] == [
        next(n for n, t in dags["root"].items() if t["componentRef"]["name"] == where)]  # fmt: skip
    assert not task.get("cachingOptions", {}).get("enableCache") and task["retryPolicy"]["maxRetryCount"] >= 1
    assert "accelerator" not in spec["deploymentSpec"]["executors"]["exec-bundle-concepts"]["container"]["resources"]
    assert task["inputs"]["parameters"]["bundle"]["componentInputParameter"] == "pipelinechannel--bundle"


@pytest.mark.parametrize("name", ["textual_inversion", "batch_personalisation"])
def test_a_concept_told_unchanged_on_cpu_asks_for_no_gpu(name):
    """`changed-concepts` (CPU) runs before the GPU steps, which run only under its count being above 0."""
    spec = _spec(name)
    dags = _dags(spec)
    parent = {c: d for d, tasks in dags.items() for c in (t["componentRef"]["name"] for t in tasks.values())}
    where, lookup = _task(spec, "changed-concepts")
    assert where == "comp-personalise" and not lookup.get("cachingOptions", {}).get("enableCache")  # asks MLflow
    assert "accelerator" not in spec["deploymentSpec"]["executors"]["exec-changed-concepts"]["container"]["resources"]
    (branch,) = [t for t in dags[where].values() if "triggerPolicy" in t]
    assert branch["triggerPolicy"]["condition"] == (
        "int(inputs.parameter_values['pipelinechannel--changed-concepts-Output']) > 0"
    )
    for step in ("cache-latents", "train", "evaluate"):  # each GPU step, and the loops holding them, in the branch
        dag = _task(spec, step)[0]
        while dag != branch["componentRef"]["name"]:
            assert dag != where, step
            dag = parent[dag]
    pvc = spec["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-changed-concepts"]["pvcMount"]
    assert pvc[0]["mountPath"] == "/models"  # it reads the model into the cache the GPU steps use


def test_no_task_of_either_pipeline_is_kfp_cached():
    """KFP's launcher cannot read another run's cached artifact from MinIO (docs/deploy.md): as checked in, as
    scheduled (no per-run setting rewrites a recurring run's tasks)."""
    for name in ("textual_inversion", "batch_personalisation"):
        spec = _spec(name)
        dags = [spec["root"]["dag"]] + [c["dag"] for c in spec["components"].values() if "dag" in c]
        tasks = {t: task for dag in dags for t, task in dag["tasks"].items()}
        cached = [t for t, task in tasks.items() if task.get("cachingOptions", {}).get("enableCache")]
        assert not cached, (name, cached)


def test_secrets_reach_pods_as_env_never_as_parameters():
    for name in ("textual_inversion", "batch_personalisation"):
        spec = _spec(name)
        params = spec["root"]["inputDefinitions"]["parameters"]
        assert not [p for p in params if any(w in p.lower() for w in ("secret", "password", "access_key"))]
        for executor, cfg in spec["platforms"]["kubernetes"]["deploymentSpec"]["executors"].items():
            envs = {e["envVar"] for s in cfg["secretAsEnv"] for e in s["keyToEnv"]}
            assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= envs, executor
            # settings from oneword-config; the ones added later are optional, so an older ConfigMap still works
            maps = {e["envVar"]: m.get("optional", False) for m in cfg["configMapAsEnv"] for e in m["keyToEnv"]}
            assert not maps["S3_ENDPOINT_URL"] and maps["AWS_REGION"] and maps["MLFLOW_BOTO_CLIENT_ADDRESSING_STYLE"]


def test_components_use_the_oneword_image_and_never_pip_install():
    from oneword import __version__

    for f in (ROOT / "components").glob("*.yaml"):
        spec = next(yaml.safe_load_all(f.read_text()))
        for ex in spec["deploymentSpec"]["executors"].values():
            image = ex["container"]["image"]
            assert image.endswith(f":{__version__}") and ":latest" not in image, (f.name, image)
            assert "pip install" not in " ".join(ex["container"]["command"]), f.name


def test_library_modules_do_not_import_kfp():
    code = (
        "import sys, oneword.images, oneword.latents, oneword.train, oneword.evaluation, oneword.registry, "
        "oneword.batch, oneword.generate, oneword.embeddings, oneword.models; "
        "bad = [m for m in sys.modules if m == 'kfp' or m.startswith('kfp.')]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_local_run_reads_its_own_folder_when_other_runs_share_the_pipeline_root(tmp_path):
    """Two `oneword batch` runs in one pipeline root: the one that ends first must not read the other's folder,
    which a task of the other touched last."""
    import datetime
    import os
    import time

    from oneword.pipelines.local import RUN_NAME_TIME, _own_run

    started = time.time()
    folders = {}
    for who, offset in (("earlier", -20.0), ("mine", 0.2), ("later", 15.0)):
        named = datetime.datetime.fromtimestamp(started + offset).strftime(RUN_NAME_TIME)
        folders[who] = tmp_path / f"batch-personalisation-{named}"
        (folders[who] / "report-batch").mkdir(parents=True)
    (tmp_path / "batch-personalisation-notes").mkdir()  # not a run of kfp.local's
    os.utime(folders["later"], (started + 60, started + 60))  # its report came after this run's
    assert _own_run(tmp_path, "batch-personalisation", started) == folders["mine"]
    assert _own_run(tmp_path, "textual-inversion", started) is None


def test_preflight_stops_a_run_before_any_training(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """An evaluator that cannot be found fails the run in preflight, naming it and the fix; no later step runs."""
    from oneword.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "run",
                "--images",
                str(DREAMBENCH / "cat"),
                "--token",
                "<cat-p>",
                "--init-word",
                "cat",
                "--base-model",
                str(tiny_model_dir),
                "--clip-model",
                str(tmp_path / "no-such-clip"),
                "--pipeline-root",
                str(tmp_path / "root"),
            ]
        )
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert "preflight found 1 problem" in err and "no-such-clip" in err and "--clip-model" in err, err
    ran = {p.name for p in (tmp_path / "root").glob("textual-inversion-*/*") if p.is_dir()}
    assert ran <= {"plan-concept", "preflight", "report-run"}, ran  # nothing after the preflight ran (but the exit)
    # a setting out of its range is told before any step: it stopped the run in `train`, after the photos were
    # encoded, as "Inner task failed: 'train'"
    args = ["run", "--images", str(DREAMBENCH / "cat"), "--token", "<cat-p>", "--init-word", "cat",
            "--base-model", str(tiny_model_dir), "--pipeline-root", str(tmp_path / "settings"),
            "--steps", "-3", "--mode", "zoom"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "invalid settings: steps=-3" in err and "mode='zoom'" in err, err
    assert not (tmp_path / "settings").exists()
    with pytest.raises(SystemExit) as exit_:  # so is a photo folder that is not there
        main([*args[:2], str(tmp_path / "no-photos"), *args[3:-4]])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "no-photos does not exist" in err and not (tmp_path / "settings").exists(), err


@pytest.mark.slow
def test_local_run_end_to_end(tiny_sd2_model_dir, tiny_clip_dir, tmp_path, monkeypatch, capsys):
    """The textual_inversion pipeline under kfp.local, on a tiny model shaped as SD 2.1 (v-prediction, `!`
    padding, 1024 wide): images in, a registered version with an alias out, which diffusers' own pipeline loads
    and draws with. A run whose register step fails prints that step's message; the rerun reuses the training."""
    import mlflow.artifacts
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline

    from oneword import embeddings
    from oneword.cli import main
    from oneword.cli.run import photo_lines
    from oneword.latents import LatentSet
    from oneword.pipelines.local import run_textual_inversion

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # mlflow.set_tracking_uri exports it
    token = "<cat-sd2>"
    photos = tmp_path / "photos"
    shutil.copytree(DREAMBENCH / "cat", photos)
    (photos / "notes.txt").write_text("where I took them")  # skipped, and said so on the terminal
    params = dict(
        images=str(photos),
        token=token,
        init_word="cat",
        base_model=str(tiny_sd2_model_dir),
        resolution=0,  # the model's native size, read from its folder: 32 px
        steps=6,
        checkpoint_every=3,
        n_images=2,
        sampling_steps=2,
        checkpoint_budget=1,
        clip_model=str(tiny_clip_dir),
    )
    # A file where the store keeps its artifacts: preflight passes (the server takes writes), register fails.
    (tmp_path / "mlartifacts").write_text("in the way")
    args = [a for k, v in params.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    with pytest.raises(SystemExit) as exit_:
        main(["run", *args, "--pipeline-root", str(tmp_path / "root"), "--log-file", str(tmp_path / "steps.log")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert "register failed:" in err and "mlartifacts" in err and str(tmp_path / "steps.log") in err, err
    assert "Traceback" not in err
    store = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")  # the failed register ended training's run
    assert not store.search_runs([e.experiment_id for e in store.search_experiments()], "attributes.status = 'RUNNING'")
    (tmp_path / "mlartifacts").unlink()

    out = run_textual_inversion(tmp_path / "root", **params)
    uri = out["tracking_uri"]
    assert out["registered"] == "cat-sd2/1@champion"
    assert out["gate"].startswith("the first champion: none before it")  # why that alias: `oneword run` prints it
    assert uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    for k in ("report", "grid", "metrics", "embedding", "photos"):
        assert Path(out[k]).exists(), k
    said = photo_lines(json.loads(Path(out["photos"]).read_text()))
    assert said[0].split() == ["photos", "5", "used,", "1", "skipped"], said
    assert " ".join(said[1].split()) == f"skipped {photos}/notes.txt: not an image file (suffix '.txt')", said
    assert all(len(line) <= 80 or " " not in line.strip() for line in said[1].splitlines()), said  # wrapped
    summaries = sorted(
        (tmp_path / "root").glob("textual-inversion-*/**/train/model/*/summary.json"), key=lambda p: p.stat().st_mtime
    )
    assert [json.loads(s.read_text())["steps_run"] for s in summaries] == [6, 0]  # the rerun did not train
    rows = catalogue.list_concepts(uri, alias="champion")
    assert [(r["name"], r["version"], r["model_family"]) for r in rows] == [("cat-sd2", "1", "sd2")]
    shown = catalogue.show_concept("cat-sd2@champion", uri)
    assert "reconstruction" in shown["metrics"] and shown["params"]["train.steps"] == "6"
    summary = mlflow.artifacts.download_artifacts(
        run_id=shown["run_id"], artifact_path="training/summary.json", dst_path=str(tmp_path), tracking_uri=uri
    )
    summary = json.loads(Path(summary).read_text())  # what the registered version was trained under
    assert (summary["profile"]["family"], summary["profile"]["resolution"]) == ("sd2", 32)
    latents = next((tmp_path / "root").glob("**/cache-latents/**/latents.safetensors"))
    assert LatentSet.load(latents).mean.shape[-3:] == (4, 4, 4)  # (C, h, w): 32 px over the VAE's 8x

    path, tags = catalogue.pull_concept("cat-sd2@champion", tmp_path / "learned_embeds.safetensors", "diffusers", uri)
    assert tags["oneword.token"] == token
    learned = embeddings.load(path).vectors
    assert learned.shape == (1, 1024)
    shown_file = embeddings.load(Path(out["embedding"]))  # the path `oneword run` prints: what was registered
    assert torch.equal(shown_file.vectors, learned)
    assert shown_file.meta["steps"] == str(json.loads(Path(out["metrics"]).read_text())["step"])
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd2_model_dir), local_files_only=True)
    pipe.load_textual_inversion(str(path), token=token)
    (token_id,) = pipe.tokenizer.convert_tokens_to_ids([token])
    assert token_id == 49408 and token_id in pipe.tokenizer(f"a photo of {token}").input_ids  # after SD's 49,408
    table = pipe.text_encoder.get_input_embeddings().weight.detach()
    assert torch.equal(table[token_id], learned[0])
    (cat_id,) = pipe.tokenizer("cat", add_special_tokens=False).input_ids
    assert not torch.equal(table[cat_id], learned[0])  # trained away from its initializer
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    image = pipe(
        f"a photo of {token}", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)
    ).images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()

    # the same photos and settings again: nothing is trained, drawn or registered anew, and the run says so
    capsys.readouterr()
    main(["run", *args, "--pipeline-root", str(tmp_path / "root"), "--log-file", str(tmp_path / "steps.log")])
    said = capsys.readouterr().out
    assert "unchanged cat-sd2/1" in said and "concepts pull cat-sd2/1" in said and "None" not in said, said
    draw = r"^  draw it:\n    oneword generate --concept cat-sd2/1 'a watercolor of <cat-sd2>'$"
    assert re.search(draw, said, re.M), said  # what to do next, to copy (the store is the default one here)
    # a line per finished step on the terminal, their logs in the file it names; none of its own lines past 80
    assert re.search(r"^ +\d+ s  changed-concepts done$", said, re.M) and "report-run done" in said
    assert f"their logs: {tmp_path / 'steps.log'}" in said and "Executing task" not in said
    assert "Executing task" in (tmp_path / "steps.log").read_text()
    assert max(len(line) for line in said.splitlines() if str(tmp_path) not in line) <= 80
    assert [r["version"] for r in catalogue.list_concepts(uri) if r["name"] == "cat-sd2"] == ["1"]
    last = max((tmp_path / "root").glob("textual-inversion-*"), key=lambda p: p.name)
    assert (last / "changed-concepts").is_dir() and not list(last.rglob("cache-latents"))  # told on CPU: no GPU step


class _FakeKfpApi(BaseHTTPRequestHandler):
    """Answers the KFP v2beta1 REST calls the client makes, and records them for the test to check."""

    calls: ClassVar[list] = []
    pipelines: ClassVar[dict[str, list]] = {}  # namespace ("" shared) -> the pipelines it holds
    refuse_run: ClassVar[int] = 0  # the run it answers 503 for (1: the first asked for), as a server that blinks
    # recurring runs it holds, made and deleted as asked (None: the fixed answers below); `listing` is waited on
    # by every first list of them (two `schedule`s that both list before either creates)
    schedules: ClassVar[dict | None] = None
    listing: ClassVar[threading.Barrier | None] = None
    lock = threading.Lock()

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        path = self.path.split("?")[0]
        self.calls.append((self.command, self.path, body))
        routes = {
            ("GET", "/apis/v2beta1/healthz"): {"multi_user": False},
            ("GET", "/apis/v2beta1/experiments"): {"experiments": []},
            ("POST", "/apis/v2beta1/experiments"): {"experiment_id": "exp-1", "display_name": "oneword"},
            ("GET", "/apis/v2beta1/pipelines"): {"pipelines": []},
            ("POST", "/apis/v2beta1/pipelines/upload"): {"pipeline_id": "p-1", "display_name": "oneword-batch"},
            ("POST", "/apis/v2beta1/pipelines/upload_version"): {"pipeline_version_id": "v-1", "pipeline_id": "p-1"},
            ("POST", "/apis/v2beta1/recurringruns"): {"recurring_run_id": "rr-1"},
            ("GET", "/apis/v2beta1/recurringruns"): {
                "recurringRuns": [{"recurring_run_id": "rr-old", "display_name": "oneword-batch"}]
            },
            ("DELETE", "/apis/v2beta1/recurringruns/rr-old"): {},
        }
        if self.schedules is not None and path.startswith("/apis/v2beta1/recurringruns"):
            self._schedule(path, body)
        elif (self.command, path) == ("POST", "/apis/v2beta1/runs"):
            asked = sum(c[:2] == ("POST", "/apis/v2beta1/runs") for c in self.calls)
            if asked == self.refuse_run:
                self._reply(503, {"error": "upstream connect error", "code": 14})
            else:
                self._reply(200, {"run_id": f"run-{asked}"})
        elif (self.command, path) == ("GET", "/apis/v2beta1/pipelines"):
            namespace = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query).get("namespace", [""])[0]
            self._reply(200, {"pipelines": self.pipelines.get(namespace, [])})
        elif (self.command, path) in routes:
            self._reply(200, routes[(self.command, path)])
        else:
            self._reply(404, {"error": f"unexpected {self.command} {path}"})

    def _schedule(self, path: str, body: bytes) -> None:
        if self.command == "GET":
            if self.listing is not None and sum(c[0] == "GET" and "recurringruns" in c[1] for c in self.calls) <= 2:
                self.listing.wait(timeout=30)  # both first lists answered before either creates
            with self.lock:
                self._reply(200, {"recurringRuns": list(self.schedules.values())})
        elif self.command == "POST":
            with self.lock:
                made = {**json.loads(body), "recurring_run_id": f"rr-{len(self.calls)}",
                        "created_at": f"2026-11-30T02:00:{len(self.schedules):02d}Z"}  # fmt: skip
                self.schedules[made["recurring_run_id"]] = made
            self._reply(200, made)
        else:
            with self.lock:
                gone = self.schedules.pop(path.rsplit("/", 1)[-1], None)
            self._reply(200, {}) if gone is not None else self._reply(404, {"error": "not found", "code": 5})

    do_GET = do_POST = do_DELETE = _handle

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def kfp_api():
    _FakeKfpApi.calls, _FakeKfpApi.pipelines, _FakeKfpApi.refuse_run = [], {}, 0
    _FakeKfpApi.schedules, _FakeKfpApi.listing = None, None
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _FakeKfpApi)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", _FakeKfpApi.calls
    srv.shutdown()


def test_submit_sends_the_pipeline_and_parameters(kfp_api):
    from oneword.pipelines.remote import submit

    host, calls = kfp_api
    out = submit(
        host,
        {"images": "s3://data/my-cat", "token": "<my-cat>", "init_word": "cat", "steps": 3000},
        run_name="my-cat-1",
        image_registry="registry.example.com:5000/ml",
    )
    assert out["run_id"] == "run-1" and out["url"].endswith("/#/runs/details/run-1")
    body = json.loads(next(b for m, p, b in calls if m == "POST" and p.startswith("/apis/v2beta1/runs")))
    assert body["display_name"] == "my-cat-1" and body["experiment_id"] == "exp-1"
    assert body["service_account"] == "oneword-pipeline-runner"  # k8s/base/pipeline-namespace/rbac.yaml
    assert body["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "textual-inversion"
    # oneword's bucket, given per run: KFP's own kfp-launcher ConfigMap is never touched
    assert body["runtime_config"]["pipeline_root"].startswith("s3://oneword-artifacts/pipeline-root?")
    assert "endpoint=http%3A%2F%2Fminio.oneword" in body["runtime_config"]["pipeline_root"]
    assert body["runtime_config"]["parameters"] == {
        "images": "s3://data/my-cat",
        "token": "<my-cat>",
        "init_word": "cat",
        "steps": 3000,
    }
    assert "kubernetes" in body["pipeline_spec"]["platform_spec"]["platforms"]  # GPU pool and secrets travel too
    images = {
        e["container"]["image"] for e in body["pipeline_spec"]["pipeline_spec"]["deploymentSpec"]["executors"].values()
    }
    assert images == {
        f"registry.example.com:5000/ml/oneword:{__version__}",
        f"registry.example.com:5000/ml/oneword-cuda:{__version__}",
    }


@pytest.mark.parametrize(
    "registry",
    [
        None,
        "",
        "https://registry.example.com/ml",
        "registry.example.com/ml/",
        "registry.example.com/ml:latest",
        "Registry.Example.com",
    ],
)
def test_submit_and_schedule_refuse_a_spec_whose_images_were_never_set(kfp_api, registry):
    """Without a registry the cluster can pull from, nothing is sent: no ImagePullBackOff an hour later."""
    from oneword.errors import OnewordError
    from oneword.pipelines.remote import schedule, submit

    host, calls = kfp_api
    with pytest.raises(OnewordError, match="image registry") as e:
        submit(host, {"images": "s3://data/my-cat", "token": "<my-cat>", "init_word": "cat"}, image_registry=registry)
    assert "--image-registry" in e.value.hint or "host[:port]/path" in e.value.hint
    with pytest.raises(OnewordError, match="image registry"):
        schedule(host, {"concepts_manifest": "s3://data/concepts.yaml"}, "0 0 2 * * *", image_registry=registry)
    assert calls == []  # the KFP API never heard of it


def test_the_cli_refuses_to_submit_without_an_image_registry(kfp_api, capsys, monkeypatch, tmp_path):
    from oneword.cli import main

    monkeypatch.delenv("ONEWORD_IMAGE_REGISTRY", raising=False)
    host, calls = kfp_api
    with pytest.raises(SystemExit) as exit_:
        main(["submit", "--host", host, "--images", "s3://data/my-cat", "--token", "<my-cat>", "--init-word", "cat"])
    assert exit_.value.code == 2 and "no image registry given" in capsys.readouterr().err
    # a schedule says so first, not after advice on its manifest (which this machine cannot even read)
    with pytest.raises(SystemExit) as exit_:
        main(["schedule", "--host", host, "--concepts-manifest", "s3://d/c.yaml", "--cron", "0 0 2 * * *"])
    said = capsys.readouterr()
    assert exit_.value.code == 2 and "no image registry given" in said.err and "could not read" not in said.out
    # a dry run lists the runs, and warns of what the real submit would refuse
    main(["submit", "--host", host, "--images", "s3://data/my-cat", "--token", "<my-cat>", "--init-word", "cat",
          "--dry-run"])  # fmt: skip
    said = " ".join(capsys.readouterr().out.split())
    assert "warning no image registry given" in said and "a submit without --dry-run refuses it" in said
    assert "1 run would start; none was" in said
    with pytest.raises(SystemExit) as exit_:  # what the checks from here find is said as a submit's
        main(["submit", "--host", host, "--images", "s3://data/my-cat", "--token", "<my-cat>", "--init-word", "cat",
              "--image-registry", REGISTRY, "-p", f"base_model={tmp_path / 'no-such-model'}"])  # fmt: skip
    said = " ".join(capsys.readouterr().err.split())
    assert exit_.value.code == 2 and "no-such-model' not found" in said and "no run was started" in said
    assert "nothing was trained" not in said
    assert calls == []


def test_submit_sends_each_param_as_the_pipeline_input_takes_it_and_refuses_a_typo(kfp_api, capsys):
    from oneword.cli import main

    host, calls = kfp_api
    base = ["submit", "--host", host, "--images", "s3://data/my-cat", "--token", "<my-cat>", "--init-word", "cat",
            "--image-registry", REGISTRY, "--no-preflight"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        main([*base, "-p", "step=3000"])
    assert exit_.value.code == 2 and "no parameter 'step'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main([*base, "-p", "steps=many"])
    assert exit_.value.code == 2 and "steps takes a whole number" in capsys.readouterr().err
    for bad, said in (("accelerator_limit=0", "String should match pattern"), ("learning_rate=nan", "takes a number"),
                      ("tracking_uri=./mlflow.db", "cannot log to a SQLite file"),
                      ("tracking_uri=sqlite:////tmp/m.db", "cannot log to a SQLite file"),
                      # the driver drops a misspelt field: {"operator": "Exists"} is left, which tolerates every taint
                      ('gpu_tolerations=[{"kye": "dedicated", "operator": "Exists"}]', "kye is not a toleration's"),
                      ('gpu_tolerations=[{"key": "a", "operator": "Exists", "value": "b"}]', "takes no value"),
                      ('gpu_tolerations=[{"operator": "Equal", "value": "b"}]', "needs a key"),
                      ('gpu_tolerations=[{"key": "a", "effect": "NoSchedule", "tolerationSeconds": 5}]', "NoExecute"),
                      ('gpu_tolerations=[{"key": "a", "effect": "NoExecute", "tolerationSeconds": true}]', "whole"),
                      ('gpu_tolerations={"key": "nvidia.com/gpu"}', "takes a JSON list")):  # fmt: skip
        with pytest.raises(SystemExit) as exit_:
            main([*base, "-p", bad])
        assert exit_.value.code == 2 and said in capsys.readouterr().err, bad
    assert calls == []  # the KFP API never heard of either
    two = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},  # a pool of two taints
           {"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true", "effect": "NoSchedule"},
           {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute",
            "tolerationSeconds": 60}]  # fmt: skip
    main([*base, "-p", "accelerator_limit=2", "-p", "steps=300", "-p", "scale_lr=false", "-p", "name=007",
          "-p", 'gpu_node_selector={"pool": "a100"}', "-p", f"gpu_tolerations={json.dumps(two)}"])  # fmt: skip
    body = json.loads(next(b for m, p, b in calls if m == "POST" and p.startswith("/apis/v2beta1/runs")))
    sent = body["runtime_config"]["parameters"]
    assert (sent["accelerator_limit"], sent["steps"], sent["scale_lr"], sent["name"]) == ("2", 300, False, "007")
    assert sent["gpu_node_selector"] == {"pool": "a100"} and sent["gpu_tolerations"] == two


def test_submit_checks_what_it_can_before_the_cluster_sees_the_run(
    kfp_api, tiny_model_dir, tiny_clip_dir, s3_bucket, capsys
):
    """A token the model knows is caught on the submitting machine: the KFP API never hears of the run."""
    from oneword.cli import main
    from oneword.storage import upload_dir

    host, calls = kfp_api
    upload_dir(DREAMBENCH / "cat", f"s3://{s3_bucket}/cat")
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "submit",
                "--host",
                host,
                "--images",
                f"s3://{s3_bucket}/cat",
                "--token",
                "cat",
                "--init-word",
                "cat",
                "--image-registry",
                "registry.example.com/ml",
                "-p",
                f"base_model={tiny_model_dir}",
                "-p",
                f"clip_model={tiny_clip_dir}",
            ]
        )
    assert exit_.value.code == 2 and "already in the vocabulary" in capsys.readouterr().err
    assert not [c for c in calls if c[0] == "POST"]


REGISTRY = "registry.example.com/ml"


def _task_caching(calls) -> dict[str, bool]:
    body = json.loads([b for m, p, b in calls if m == "POST" and p.startswith("/apis/v2beta1/runs")][-1])
    spec = body["pipeline_spec"]["pipeline_spec"]
    tasks = dict(spec["root"]["dag"]["tasks"])
    for comp in spec["components"].values():  # tasks inside sub-DAGs (the exit handler)
        tasks.update(comp.get("dag", {}).get("tasks", {}))
    return {name: bool(t.get("cachingOptions", {}).get("enableCache")) for name, t in tasks.items()}


def test_a_submitted_run_caches_no_step(kfp_api):
    """KFP's launcher reads another run's cached artifact with an S3 client that ignores the pipeline root's
    endpoint, and opens only a collected list's first artifact's bucket: a cached step would fail the next one."""
    from oneword.pipelines.remote import submit

    host, calls = kfp_api
    params = {"images": "s3://data/my-cat", "token": "<my-cat>", "init_word": "cat"}
    submit(host, params, image_registry=REGISTRY)
    caching = _task_caching(calls)
    assert "cache-latents" in caching and not any(caching.values()), caching


def test_a_second_schedule_in_a_namespace_finds_its_pipeline_there(kfp_api):
    """Multi-user KFP: the pipeline the first schedule uploaded is the namespace's, not a shared one."""
    from oneword.pipelines.remote import schedule

    host, calls = kfp_api
    _FakeKfpApi.pipelines = {"team-a": [{"pipeline_id": "p-team", "display_name": "oneword-batch"}]}
    out = schedule(host, {"concepts_manifest": "s3://data/c.yaml"}, "0 0 2 * * *", namespace="team-a",
                   image_registry=REGISTRY)  # fmt: skip
    assert out["pipeline_id"] == "p-team"
    paths = [p for _, p, _ in calls]
    assert not any(p.startswith("/apis/v2beta1/pipelines/upload?") for p in paths)
    assert any(p.startswith("/apis/v2beta1/pipelines/upload_version?") and "pipelineid=p-team" in p for p in paths)


def test_schedule_uploads_a_version_and_creates_a_recurring_run(kfp_api):
    from oneword.pipelines.remote import schedule

    host, calls = kfp_api
    out = schedule(
        host,
        {"concepts_manifest": "s3://data/concepts.yaml"},
        "0 0 2 * * *",
        version="v1",
        max_concurrency=2,
        catchup=False,
        image_registry=REGISTRY,
    )
    # the schedule of the same name is replaced, not doubled: the new one is made first, then the old one goes
    assert out == {"pipeline_id": "p-1", "version_id": "v-1", "recurring_run_id": "rr-1", "replaced": ["rr-old"]}
    order = [(m, p.split("?")[0]) for m, p, _ in calls if "recurringruns" in p]
    assert order == [
        ("GET", "/apis/v2beta1/recurringruns"),
        ("POST", "/apis/v2beta1/recurringruns"),
        ("GET", "/apis/v2beta1/recurringruns"),  # another made at the same moment? (the next test)
        ("DELETE", "/apis/v2beta1/recurringruns/rr-old"),
    ]
    deleted = next(p for m, p, _ in calls if m == "DELETE")
    assert "propagation_policy=ORPHAN" in deleted  # a run the old schedule started finishes: not deleted with it
    listed = next(p for m, p, _ in calls if m == "GET" and "recurringruns" in p)
    assert "oneword-batch" in urllib.parse.unquote(listed)  # filtered by name
    paths = [p for _, p, _ in calls]
    assert any(p.startswith("/apis/v2beta1/pipelines/upload?name=oneword-batch") for p in paths)
    assert any(p.startswith("/apis/v2beta1/pipelines/upload_version?name=v1&pipelineid=p-1") for p in paths)
    upload = next(b for m, p, b in calls if p.startswith("/apis/v2beta1/pipelines/upload_version"))
    assert b"name: batch-personalisation" in upload
    rr = json.loads(next(b for m, p, b in calls if p == "/apis/v2beta1/recurringruns"))
    assert rr["trigger"]["cron_schedule"]["cron"] == "0 0 2 * * *"
    assert rr["max_concurrency"] == "2" or rr["max_concurrency"] == 2
    assert rr["no_catchup"] is True and rr["mode"] == "ENABLE"
    assert rr["service_account"] == "oneword-pipeline-runner"
    assert rr["pipeline_version_reference"] == {"pipeline_id": "p-1", "pipeline_version_id": "v-1"}
    assert rr["runtime_config"]["parameters"] == {"concepts_manifest": "s3://data/concepts.yaml"}
    assert rr["runtime_config"]["pipeline_root"] == PIPELINE_ROOT


def test_two_schedules_of_one_name_at_once_leave_one(kfp_api):
    """Each listed the schedules of its name before the other made its own, and deleted only those: two nightly
    batches of one manifest. Both keep the newest; the other says it was overtaken."""
    from concurrent.futures import ThreadPoolExecutor

    from oneword.pipelines.remote import schedule

    host, _ = kfp_api
    _FakeKfpApi.schedules = {"rr-old": {"recurring_run_id": "rr-old", "display_name": "oneword-batch",
                                        "created_at": "2026-11-01T02:00:00Z"}}  # fmt: skip
    _FakeKfpApi.listing = threading.Barrier(2)

    def one(cron: str) -> dict:
        return schedule(host, {"concepts_manifest": "s3://data/c.yaml"}, cron, version=cron, image_registry=REGISTRY)

    with ThreadPoolExecutor(2) as pool:
        said = list(pool.map(one, ["0 0 2 * * *", "0 0 3 * * *"]))
    assert len(_FakeKfpApi.schedules) == 1, _FakeKfpApi.schedules
    (held,) = _FakeKfpApi.schedules
    holder = next(s for s in said if s["recurring_run_id"] == held and "overtaken_by" not in s)
    other = next(s for s in said if s is not holder)
    # the other saw the holder's and stood down, or finished first and was replaced: either way it says which
    assert other.get("overtaken_by") == held or other["recurring_run_id"] in holder["replaced"], said
    assert all("rr-old" in s["replaced"] for s in said)


def test_schedule_says_before_the_night_how_many_runs_a_manifest_needs_and_warns_of_a_limit_past_argos(
    kfp_api, s3_bucket, capsys
):
    """Argo keeps a run in one object of bounded size, so a run trains at most max_concepts_per_run: a manifest
    past it is told at `oneword schedule` how many runs its concepts need if all are new; a limit past the bound
    (or none) is warned of; a manifest not valid now is told as such. The schedule is made in every case (the
    manifest is read afresh each night)."""
    from oneword.batch import RUN_LIMIT
    from oneword.cli import main
    from oneword.storage import client

    host, calls = kfp_api

    def schedule(entries: list[dict], *param: str) -> str:
        body = yaml.safe_dump({"concepts": entries}).encode()
        client().put_object(s3_bucket, "concepts.yaml", __import__("io").BytesIO(body), len(body))
        main(["schedule", "--host", host, "--concepts-manifest", f"s3://{s3_bucket}/concepts.yaml",
              "--cron", "0 0 2 * * *", "--image-registry", REGISTRY, *param])  # fmt: skip
        return " ".join(capsys.readouterr().out.split())  # rich wraps at the terminal's width

    n = 2 * RUN_LIMIT + 1
    many = [{"images": f"s3://data/c{i}", "token": f"<c{i}>", "init_word": "cat"} for i in range(n)]
    said = schedule(many)
    assert f"if every concept is new: {n} concepts to train: a run trains {RUN_LIMIT} of them" in said
    assert "3 runs in all" in said and "warning" not in said and "recurring_run_id" in said
    assert "3 runs in all; `oneword submit --concepts-manifest` starts them together" in said
    assert "concepts to train" not in schedule(many[:3])
    said = schedule(many, "-p", "max_concepts_per_run=0")
    assert "warning max_concepts_per_run=0 (no limit)" in said and "concepts to train" not in said
    said = schedule(many, "-p", f"max_concepts_per_run={RUN_LIMIT + 1}")
    assert "may outgrow the size Argo can keep" in said and "2 runs in all" in said
    said = schedule([*many[:2], {"images": "s3://data/x", "token": "<c0>", "init_word": "cat"}])
    assert "warning" in said and "<c0>" in said and "fails at plan-batch" in said
    assert sum(m == "POST" and p == "/apis/v2beta1/recurringruns" for m, p, _ in calls) == 5


def test_submit_starts_a_manifest_one_run_cannot_carry_as_runs_of_its_concepts(kfp_api, s3_bucket, capsys):
    """A first fill of a catalogue at once: `oneword submit --concepts-manifest` splits a manifest past
    max_concepts_per_run into runs limited to their share of its concepts (only_concepts), in its order; one that
    fits is one run of the whole manifest, as a night of a schedule is. A name not in the manifest is refused with
    the one meant, before any run; a run the API refuses says which to start again from, and --first-run does."""
    from oneword.batch import RUN_LIMIT
    from oneword.cli import main
    from oneword.storage import client

    host, calls = kfp_api
    uri = f"s3://{s3_bucket}/team/catalogue.yaml"

    def submit(entries: list[dict], *args: str) -> tuple[int, str, list[dict]]:
        body = yaml.safe_dump({"concepts": entries}).encode()
        client().put_object(s3_bucket, "team/catalogue.yaml", __import__("io").BytesIO(body), len(body))
        before = len(calls)
        try:
            main(["submit", "--host", host, "--concepts-manifest", uri, "--image-registry", REGISTRY,
                  "--no-preflight", *args])  # fmt: skip
            code = 0
        except SystemExit as e:
            code = e.code
        runs = [json.loads(b) for m, p, b in calls[before:] if (m, p) == ("POST", "/apis/v2beta1/runs")]
        said = capsys.readouterr()
        return code, " ".join((said.out + said.err).split()), runs

    names = [f"c{i}" for i in range(2 * RUN_LIMIT + 1)]
    many = [{"images": f"s3://data/{n}", "token": f"<{n}>", "init_word": "cat"} for n in names]
    code, said, runs = submit(many)
    assert code == 0 and [r["display_name"] for r in runs] == ["catalogue 1/3", "catalogue 2/3", "catalogue 3/3"]
    shares = [r["runtime_config"]["parameters"]["only_concepts"] for r in runs]
    assert shares == [names[:RUN_LIMIT], names[RUN_LIMIT : 2 * RUN_LIMIT], names[2 * RUN_LIMIT :]]
    assert all(r["runtime_config"]["parameters"]["concepts_manifest"] == uri for r in runs)
    assert {r["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] for r in runs} == {"batch-personalisation"}
    assert re.search(r"started run 3/3: http://127\.0\.0\.1:\d+/#/runs/details/run-3", said)
    assert "Creating experiment" not in said
    assert "Run details" not in said  # one link a run, ours

    code, _, runs = submit(many[:3], "-p", "steps=100")  # fits one run: the manifest's own, with nothing left out
    assert code == 0 and len(runs) == 1 and runs[0]["runtime_config"]["parameters"] == {
        "concepts_manifest": uri, "steps": 100}  # fmt: skip

    code, _, runs = submit(many, "--only-concepts", "c5,c1", "--only-concepts", "c1", "--run-name", "redo")
    assert code == 0 and [(r["display_name"], r["runtime_config"]["parameters"]["only_concepts"]) for r in runs] == [
        ("redo", ["c1", "c5"])]  # fmt: skip

    code, said, runs = submit(many, "--only-concepts", "c1,cat3")
    assert code == 2 and not runs and "'cat3'" in said and "did you mean 'c3'" in said

    code, said, runs = submit(many, "--dry-run")
    assert code == 0 and not runs and "run catalogue 2/3: 8 concepts: c8, c9," in said and "3 runs would start" in said

    _FakeKfpApi.refuse_run = len([c for c in calls if c[:2] == ("POST", "/apis/v2beta1/runs")]) + 2
    code, said, runs = submit(many)
    assert code == 2 and len(runs) == 2 and "run 2/3 could not be started: HTTP 503 Service Unavailable" in said
    assert "run 1 was started (above); to start the rest, run the same command with --first-run 2" in said
    assert "HTTPHeaderDict" not in said
    _FakeKfpApi.refuse_run = 0
    code, said, runs = submit(many, "--first-run", "2")
    assert code == 0 and [r["display_name"] for r in runs] == ["catalogue 2/3", "catalogue 3/3"]


def test_submit_takes_one_concept_or_a_manifest(kfp_api, capsys):
    from oneword.cli import main

    host, calls = kfp_api
    cases = [
        (["--images", "s3://d/cat", "--concepts-manifest", "s3://d/c.yaml"],
         "give either --concepts-manifest or --images, not both"),
        (["--images", "s3://d/cat", "--token", "<cat>"], "missing --init-word"),
        (["--images", "s3://d/cat", "--token", "<cat>", "--init-word", "cat", "--only-concepts", "cat"],
         "--only-concepts chooses among a manifest's concepts"),
        (["--concepts-manifest", "concepts.yaml"], "not an s3:// URI: the cluster's pods cannot read a file here"),
        (["--images", "photos/cat", "--token", "<cat>", "--init-word", "cat"], "--images photos/cat is not an s3://"),
        (["--images", "s3://d/cat", "--token", "<cat>", "--init-word", "cat", "-p", "token=<dog>"],
         "--param token: give it as --token"),
        (["--concepts-manifest", "s3://d/c.yaml", "-p", 'only_concepts=["a"]'],
         "--param only_concepts: give it as --only-concepts"),
    ]  # fmt: skip
    for args, want in cases:
        with pytest.raises(SystemExit) as e:
            main(["submit", "--host", host, "--image-registry", REGISTRY, "--no-preflight", *args])
        said = capsys.readouterr()
        assert e.value.code == 2 and want in " ".join((said.out + said.err).split()), args
    with pytest.raises(SystemExit) as e:  # schedule has no --only-concepts: a schedule of some concepts is its own
        main(["schedule", "--host", host, "--image-registry", REGISTRY, "--concepts-manifest", "s3://d/c.yaml",
              "--cron", "0 0 2 * * *", "-p", "concepts_manifest=s3://d/other.yaml"])  # fmt: skip
    assert e.value.code == 2 and "--param concepts_manifest: give it as --concepts-manifest" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # a schedule would fail at plan-batch every night
        main(["schedule", "--host", host, "--image-registry", REGISTRY, "--concepts-manifest", "/home/me/c.yaml",
              "--cron", "0 0 2 * * *"])  # fmt: skip
    assert e.value.code == 2 and "not an s3:// URI" in capsys.readouterr().err
    for cron, want in (("0 2 * * *", "for the crontab line, --cron '0 0 2 * * *'"), ("daily", "six fields")):
        with pytest.raises(SystemExit) as e:  # robfig/cron would take five fields as an hourly schedule
            main(["schedule", "--host", host, "--image-registry", REGISTRY, "--concepts-manifest", "s3://d/c.yaml",
                  "--cron", cron])  # fmt: skip
        assert e.value.code == 2 and want in " ".join(capsys.readouterr().err.split())
    assert not [c for c in calls if c[0] == "POST"]


def test_a_batchs_progress_lines_name_the_concepts_of_each_shard():
    """kfp.local names every iteration's task alike ("train done" three times): the lines name the shard's
    concepts, read from plan-batch's outputs and the iteration in each task's output paths, as kfp.local logs
    them (coloured, from the iteration's own thread)."""
    import io
    import logging

    from oneword.pipelines.local import _TaskProgress

    out = io.StringIO()
    progress = _TaskProgress(out)

    def log(message: str, thread: int) -> None:
        record = logging.LogRecord("root", logging.INFO, __file__, 1, message, None, None)
        record.thread = thread
        progress.filter(record)

    cyan = "\x1b[96m'{}'\x1b[0m"
    ok = "\x1b[92mSUCCESS\x1b[0m"
    shards = [[{"name": "my-star", "token": "<my-star>"}], [{"name": "my-ring"}, {"name": "my-tri"}]]
    log(f"Task {cyan.format('plan-batch')} finished with status {ok}", 1)
    log(f"Task {cyan.format('plan-batch')} outputs:\n    Output: {shards!r}\n    metrics: Metrics(...)", 1)
    log(f"Task {cyan.format('train')} finished with status {ok}", 3)
    log(f"Task {cyan.format('train')} finished with status {ok}", 2)  # two iterations end at once
    log(f"Task {cyan.format('train')} outputs:\n    model: Model( uri='/r/batch/for-loop-2-iteration-0/"
        "for-loop-2-iteration-0/train/model' )", 2)  # fmt: skip
    log(f"Task {cyan.format('train')} outputs:\n    model: Model( uri='/r/batch/for-loop-2-iteration-1/"
        "for-loop-2-iteration-0/train/model' )", 3)  # fmt: skip
    log(f"Task {cyan.format('evaluate')} finished with status \x1b[91mFAILURE\x1b[0m", 2)
    log(f"Task {cyan.format('report-batch')} finished with status {ok}", 1)
    log(f"Task {cyan.format('report-batch')} has no outputs", 1)
    log(f"Task {cyan.format('exit')} finished with status {ok}", 4)  # its outputs never logged
    progress.flush()
    lines = [line.split(" s  ", 1)[1] for line in out.getvalue().splitlines()]
    assert lines == ["plan-batch done", "train done  (my-star)", "train done  (my-ring, my-tri)", "evaluate failure",
                     "report-batch done", "exit done"], lines  # fmt: skip
    # a run without a bundle: its bundle step's end is no news, unless it failed
    out = io.StringIO()
    progress = _TaskProgress(out, unsaid=frozenset({"bundle-concepts"}))
    log(f"Task {cyan.format('bundle-concepts')} finished with status {ok}", 5)
    log(f"Task {cyan.format('bundle-concepts')} has no outputs", 5)
    log(f"Task {cyan.format('bundle-concepts')} finished with status \x1b[91mFAILURE\x1b[0m", 6)
    progress.flush()
    assert [line.split(" s  ", 1)[1] for line in out.getvalue().splitlines()] == ["bundle-concepts failure"]


def test_a_long_training_says_its_step_speed_and_time_left_now_and_then(monkeypatch):
    """Between "cache-latents done" and "train done" (an hour, on a GPU) the terminal said nothing: every step
    was in the log file only. A line a minute from each training's own output, as kfp.local streams it."""
    import io
    import time

    from oneword.pipelines import local

    out, clock = io.StringIO(), [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    progress = local._TaskProgress(out)
    star, ring = progress.task(), progress.task()  # two shards' trainings, their lines interleaved
    kfp = "[KFP Executor 2026-11-29 03:38:36,231 INFO]: "
    star(kfp + "training 1 concepts together (<my-star>) for 3000 steps, batch 4 x 1, on cuda; checkpoints in /c\n")
    ring(kfp + "training <my-ring> (init 'ring', 1 vector(s)) for 3000 steps at lr 0.005 on cuda\n")
    ring(kfp + "resumed from /c/step-1000 (step 1000)\n")
    for step in range(100, 3001, 100):  # 10 steps/s
        clock[0] += 10
        star(kfp + f"step {step}/3000: loss 0.1000, embedding norm 0.4000\n")
        ring(f"{kfp}step {step + 1000}/3000: loss 0.1000, embedding norm 0.4000\n" if step <= 2000 else "x\n")
    ring(kfp + "early end at step 2400 of 3000: the vectors moved 0.001 of their norm over the last 200 steps\n")
    lines = [line.split(" s  ", 1)[1] for line in out.getvalue().splitlines()]
    assert lines[0] == "train resumed at step 1000  (<my-ring>)", lines
    star_said = [x for x in lines if "my-star" in x]
    # one a minute, the first a minute after the training began; none at its last step ("train done" says it)
    assert star_said[0] == "train at step 600/3000, 10 steps/s, 4 min left  (<my-star>)", star_said
    assert len(star_said) == 4 and "step 3000/" not in " ".join(star_said), star_said
    assert lines[-1] == "train ended early at step 2400 of 3000  (<my-ring>)"
    assert all(len(x) <= 80 for x in out.getvalue().splitlines())
    # `train --gpus 2`'s processes log as Python's logging does, without KFP's prefix
    gpus = progress.task()
    gpus("INFO oneword.train: training 2 concepts together (<a>, <b>) for 100 steps, batch 4 x 1, on cuda\n")
    gpus("INFO oneword.inversion: early end at step 60 of 100: the vectors moved 0.001 of their norm\n")
    assert out.getvalue().splitlines()[-1].endswith("train ended early at step 60 of 100  (<a>, <b>)")
    lines = [line.split(" s  ", 1)[1] for line in out.getvalue().splitlines()]
    assert [local._duration(s) for s in (40, 7199, 7260)] == ["40 s", "2 h 00 min", "2 h 01 min"]
    ev = progress.task()  # an evaluation's minutes of drawing: said as a training's steps are
    for drawn in range(40, 401, 40):  # 2 images/s
        clock[0] += 20
        ev(f"{kfp}evaluate <my-star>: drew {drawn} of 400 images\n")
    evaluate_said = [x.split(" s  ", 1)[1] for x in out.getvalue().splitlines() if " evaluate " in x]
    assert evaluate_said[0] == "evaluate at image 120/400, 2 images/s, 2 min left  (<my-star>)", evaluate_said
    assert "400/400" not in " ".join(evaluate_said)
    lines = [line.split(" s  ", 1)[1] for line in out.getvalue().splitlines()]
    progress.stopped.set()  # after Ctrl-C: nothing more
    star(kfp + "resumed from /c/step-1000 (step 1000)\n")
    assert len(out.getvalue().splitlines()) == len(lines)
