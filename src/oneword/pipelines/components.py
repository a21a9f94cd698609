"""The KFP v2 lightweight components: each a typed signature, a docstring and one call into the library.

Each docstring is given by `@doc`, above the `def`: KFP ships a component's source into the pod from its `def`
line on, and an Argo run keeps that source in several of each task's nodes, all within one size-capped object
(docs/deploy.md, "How many concepts in one run"). The descriptions still reach the compiled specs.

(No `from __future__ import annotations` here: KFP reads the annotations as types.)

Same names everywhere: component `preprocess` calls `oneword.images.preprocess` and is `oneword preprocess`.
Components run in the oneword image (`install_kfp_package=False`, no `packages_to_install`: pods never reach
PyPI). The GPU steps use the CUDA image, the others the slim CPU image.
"""


from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from oneword.pipelines.container import CPU_IMAGE, GPU_IMAGE


def doc(text: str):
    """Give the component below its docstring, kept out of the source KFP ships (which starts at `def`)."""

    def give(func):
        func.__doc__ = text
        return func

    return give


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
@doc("""Check everything the later steps need, in seconds and before any GPU work; list every problem with its fix.

    Args:
        concepts: planned concepts (their photos, tokens and initializers are checked); empty: shared checks only.
        base_model: the model reference: it must resolve and hold tokenizer, text_encoder, unet and vae.
        checks: the checks that passed (metadata), or failure.json listing every problem with its fix.
        clip_model: the evaluator (auto: the base model's profile's): it must exist at its path, prefix or hub id.
        tracking_uri: MLflow tracking URI: the server must answer and the experiment take writes.
        experiment: MLflow experiment.
        checkpoint_root: s3:// prefix for checkpoints: its bucket must answer.
        prompt_set: the evaluation's prompt set (empty: the profile's): a name it knows, or a file it can read.
        dino_model: the DINO evaluator (empty: none): it must exist, as the CLIP evaluator.
    """)
def preflight(concepts: list, base_model: str, checks: Output[Artifact], clip_model: str = "auto",
              tracking_uri: str = "", experiment: str = "oneword", checkpoint_root: str = "", prompt_set: str = "",
              dino_model: str = ""):
    from oneword.outcome import retrying, run_step
    from oneword.preflight import preflight as run

    # a server that did not answer is asked again in a while: a cluster's retry policy may retry no failed pod
    passed = run_step("preflight", checks.path, "fail",
                      lambda: retrying(lambda: run(base_model, concepts, clip_model, tracking_uri, experiment,
                                                   checkpoint_root, prompt_set, dino_model), "preflight"))
    checks.metadata["passed"] = passed


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
@doc("""Clean the concept's photos: EXIF orientation, RGB, square crop or pad, resize, de-duplicate.

    Args:
        images: folder or s3://bucket/prefix of 3-5 photos of the concept.
        dataset: processed images plus manifest.json.
        base_model: the model the images are for (its profile gives the resolution when it is 0).
        resolution: side of the square training images (0: the base model's native size; SD 1.x 512, SD 2.x 768,
            SDXL 1024).
        mode: crop (centre-crop to a square) or pad (pad with white).
        content_key: fingerprint of the photos' content (set by the planning step), recorded in the output's
            metadata.
        on_error: fail (the task fails) or record (a batch: the concept is marked failed, the others go on).
    """)
def preprocess(images: str, dataset: Output[Dataset], base_model: str = "", resolution: int = 0, mode: str = "crop",
               content_key: str = "", on_error: str = "fail"):
    from oneword.images import preprocess as run
    from oneword.outcome import run_step
    from oneword.profiles import image_side

    resolution = image_side(base_model, resolution)
    # an error a retry may cure fails the task even in a batch, so that the task's retries are for it
    m = run_step("preprocess", dataset.path, on_error, lambda: run(images, dataset.path, resolution=resolution,
                                                                   mode=mode), retried=True, images=images)
    if m is not None:
        dataset.metadata.update({"images": len(m.images), "skipped": len(m.skipped), "resolution": resolution,
                                 "content_key": content_key})


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
@doc("""Encode each image and its mirror once with the base model's VAE (posterior mean and std).

    Args:
        dataset: output of preprocess.
        latents: latents.safetensors, keyed by VAE fingerprint and image hash (and the images, for evaluation).
        base_model: toyworld, a hub id, an s3:// diffusers folder, or a path in the image.
        on_error: fail or record (see preprocess).
        accelerator_type: the GPU resource the task asked for (recorded in the output's metadata).
        accelerator_limit: how many (recorded too).
    """)
def cache_latents(dataset: Input[Dataset], latents: Output[Artifact], base_model: str,
                  on_error: str = "fail", accelerator_type: str = "nvidia.com/gpu", accelerator_limit: str = "1"):
    from oneword.device import resolve_device
    from oneword.images import Manifest
    from oneword.latents import cache_latents as run
    from oneword.outcome import run_step

    device = resolve_device("auto").type  # CUDA where the pod has it
    # a failure names the photos, by which train matches this folder to its concept
    lat = run_step("cache_latents", latents.path, on_error,
                   lambda: run(dataset.path, base_model, latents.path, device=device), upstream=[dataset.path],
                   retried=True, images=Manifest.photos_of(dataset.path))
    if lat is not None:
        from oneword.device import devices_seen

        # what the pod had (a CPU-only machine, under kfp.local, too), beside what the run asked for
        latents.metadata.update({"images": len(lat), "vae_fingerprint": lat.meta["vae_fingerprint"],
                                 "accelerator": devices_seen(),
                                 "accelerator_requested": f"{accelerator_limit} x {accelerator_type}"})


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
@doc("""Learn the concepts' embeddings together, in one batch of K x batch_size (resumes from its checkpoints).

    Args:
        latents: each concept's cache_latents output, in the order of `concepts`.
        concepts: the planned concepts (name, token, init_word, n_vectors, templates, optional learning_rate).
        model: one folder per concept name (embedding files, curve.json, summary.json, the training images).
        metrics: per concept: final loss, embedding norm; steps per second.
        base_model: default: the model the latents were encoded with.
        steps: optimiser steps (0: the model's profile; SD: 5000 as the paper).
        batch_size: samples per concept per step (paper: 4).
        learning_rate: base learning rate, times batch size when scale_lr (0: the model's profile; SD: 0.005).
        scale_lr: scale the learning rate by the batch size, as the paper does.
        progressive_every: add vector k at step k*N (paper: 2000); 0 = off.
        init_l2: weight of an L2 pull toward the initializer embedding.
        init_l2_schedule: constant, decay (init_l2 to 0 over the run) or rise (0 to init_l2).
        early_end: end training once every embedding moved less than this fraction of its norm over
            early_end_window steps (0: off).
        early_end_window: steps over which early_end measures the movement.
        init_cos: weight of a pull toward the initializer's direction (1 - cosine); the norm stays free.
        direction_only: Directional TI (Kim et al., arXiv 2512.13672): hold each vector at the vocabulary's
            mean norm and learn its direction by Riemannian SGD, with a von Mises-Fisher prior.
        direction_lr: with direction_only: radians each vector turns per step.
        vmf_kappa: with direction_only: the prior's pull toward the initializer's direction.
        seed: random seed.
        checkpoint_every: steps between checkpoints (0: the model's profile; SD: 500).
        checkpoint_root: s3:// prefix for checkpoints that outlive the pod, keyed by what is trained, so a
            retried or resubmitted task resumes, and for each concept's finished training, which a later shard
            that holds the concept takes instead of training it again; empty = inside the model artifact.
        on_error: fail (any concept's failure fails the task) or record (failed concepts are marked, see
            preprocess).
        log_every: steps between loss/norm reports: a log line, and live metrics in each concept's MLflow run.
        sample_every: steps between sample pictures logged to each concept's MLflow run; 0 = none.
        compile: off; default: torch.compile the UNet; max: the whole step as one graph replayed as CUDA graphs
            (minutes to compile, then fastest: worth it for thousands of steps).
        tracking_uri: MLflow tracking URI of the live runs (empty: $MLFLOW_TRACKING_URI; neither: no live runs).
            Each stays RUNNING for register, which completes and ends it.
        experiment: MLflow experiment.
        kfp_run_id: the KFP run's id (run tag kfp.run_id).
        kfp_run_name: the KFP run's name (run tag kfp.run_name).
        accelerator_limit: the GPUs this step's pod has: above 1, one process per GPU (accelerate's launcher),
            each taking a share of every step's batch (oneword.distributed).

    Returns:
        The concept names, in order (the evaluate/register fan-out iterates over them).
    """)
def train(
    latents: Input[list[Artifact]],
    concepts: list,
    model: Output[Model],
    metrics: Output[Metrics],
    base_model: str = "",
    steps: int = 0,
    batch_size: int = 4,
    learning_rate: float = 0.0,
    scale_lr: bool = True,
    progressive_every: int = 0,
    init_l2: float = 0.0,
    init_l2_schedule: str = "constant",
    early_end: float = 0.0,
    early_end_window: int = 100,
    init_cos: float = 0.0,
    direction_only: bool = False,
    direction_lr: float = 0.01,
    vmf_kappa: float = 0.0001,
    seed: int = 0,
    checkpoint_every: int = 0,
    checkpoint_root: str = "",
    on_error: str = "fail",
    log_every: int = 10,
    sample_every: int = 500,
    compile: str = "off",
    tracking_uri: str = "",
    experiment: str = "oneword",
    kfp_run_id: str = "",
    kfp_run_name: str = "",
    accelerator_limit: str = "1",
) -> list:
    import json
    from pathlib import Path

    from oneword.batch import spec_of
    from oneword.config import TrainConfig
    from oneword.errors import OnewordError
    from oneword.live import LiveTracking, kfp_tags
    from oneword.pipelines.parameters import config_of
    from oneword.train import SUMMARY_FILE, match_latents, train_shard

    members = [(c["name"], spec_of(c), lat)
               for c, lat in zip(concepts, match_latents(concepts, [lat.path for lat in latents]))]
    settings = dict(locals())
    rows = train_shard(
        members, model.path, lambda: config_of(TrainConfig, settings, gpus=int(accelerator_limit)), on_error,
        base_model=base_model or None, checkpoint_root=checkpoint_root or None, resume=True, progress=False,
        tracking=LiveTracking.configured(tracking_uri, experiment, kfp_tags(kfp_run_id, kfp_run_name)),
    )
    failed = [r for r in rows if r["status"] != "trained"]
    if failed and on_error == "fail":
        raise OnewordError("; ".join(f"{r['name']} failed at {r['stage']}: {r['error']}" for r in failed))
    before = 0
    for r in rows:
        if r["status"] == "trained":
            summary = json.loads(Path(model.path, r["name"], SUMMARY_FILE).read_text())
            metrics.log_metric(f"{r['name']}.final_loss", summary["final_loss"])
            metrics.log_metric(f"{r['name']}.embedding_norm", summary["embedding_norm"])
            before += "trained_before" in summary
            if "trained_before" not in summary:
                metrics.log_metric("steps_per_second", summary["steps_per_second"])
    model.metadata.update({"trained": len(rows) - len(failed), "failed": len(failed), "trained_before": before,
                           "steps": steps})
    return [r["name"] for r in rows]


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
@doc("""Score the concept as the paper does (CLIP reconstruction and editability), pick a checkpoint, draw pictures.

    A concept whose newest version was registered from the same training, evaluated with the same settings and
    judged by the same gate (a scheduled batch's unchanged concept) is not evaluated again: `unchanged.json`
    names that version, and register keeps it.

    Args:
        model: output of train.
        concept: the concept's name (its folder in the train output; the training images are there too).
        evaluation: metrics.json, grid.png, scatter.png, report.html and the selected embedding.
        metrics: reconstruction, editability, DINO and the baselines.
        report: the HTML report (shown in the KFP UI).
        prompt_set: paper, neti15, dreambench-object, dreambench-live, toyworld or a file (empty: the model's).
        n_images: images per prompt (paper: 64).
        sampling_steps: DDIM steps (0: the model's profile; SD: 50 as the paper).
        guidance_scale: classifier-free guidance (0: the model's profile; SD: 5.0 as the paper).
        clip_model: CLIP evaluator (auto: the model's profile: toyworld-clip, else openai/clip-vit-base-patch32).
        dino_model: DINO ViT for subject fidelity, e.g. facebook/dino-vits16; empty = skip.
        checkpoint_budget: images per prompt when scoring each checkpoint; 0 = final step only.
        on_error: fail or record (see preprocess).
        accelerator_type: the GPU resource the task asked for (recorded in the metrics' metadata).
        accelerator_limit: how many (recorded too); above 1, one process per GPU, each drawing a share of the
            images.
        tracking_uri: MLflow tracking URI, where an earlier result of the same training is looked up (empty:
            $MLFLOW_TRACKING_URI, else ./mlflow.db).
        min_reconstruction: register's quality gate (part of what makes a result the same).
        min_editability: register's quality gate.
        margin_se: register's quality gate.
    """)
def evaluate(
    model: Input[Model],
    concept: str,
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
    report: Output[HTML],
    prompt_set: str = "",
    n_images: int = 64,
    sampling_steps: int = 0,
    guidance_scale: float = 0.0,
    clip_model: str = "auto",
    dino_model: str = "",
    checkpoint_budget: int = 8,
    on_error: str = "fail",
    accelerator_type: str = "nvidia.com/gpu",
    accelerator_limit: str = "1",
    tracking_uri: str = "",
    min_reconstruction: float = -1.0,
    min_editability: float = -1.0,
    margin_se: float = 1.0,
):
    import os
    import shutil

    from oneword.config import EvalConfig, GateThresholds
    from oneword.evaluation.evaluate import evaluate as run
    from oneword.outcome import run_step
    from oneword.pipelines.parameters import config_of

    trained = os.path.join(model.path, concept)
    config = config_of(EvalConfig, locals(), gpus=int(accelerator_limit))
    from oneword.outcome import UNCHANGED_FILE, read_failure
    from oneword.registry import earlier_result

    gate = config_of(GateThresholds, locals())
    found = None if read_failure(trained) else earlier_result(tracking_uri or None, trained, concept, config, gate)
    if found:
        import html
        import json

        os.makedirs(evaluation.path, exist_ok=True)
        with open(os.path.join(evaluation.path, UNCHANGED_FILE), "w") as f:
            json.dump(found, f)
        with open(report.path, "w") as f:
            f.write(f"<p>{html.escape(concept)} is unchanged: version {found['version']} was registered from the same "
                    "training, evaluated with the same settings; see its report in the registry.</p>")
        return
    try:
        m = run_step("evaluate", evaluation.path, on_error, lambda: run(trained, None, evaluation.path, config),
                     upstream=[trained])
    except Exception:  # the run stops here: training's live run, left open for register, ends with why
        from oneword.live import end_training_run

        why = read_failure(evaluation.path) or {}
        end_training_run(tracking_uri or None, trained, "evaluate", str(why.get("error", "")))
        raise
    if m is None:
        import html

        why = read_failure(evaluation.path) or {}
        with open(report.path, "w") as f:  # the names and errors are the user's, and may hold <, & or quotes
            f.write(f"<p>{html.escape(concept)} was not evaluated: it failed at {html.escape(str(why.get('stage')))}"
                    f"</p><pre>{html.escape(str(why.get('error')))}</pre>")
        return
    import math

    # only finite numbers, which KFP's metrics carry: one training image leaves the image-only baseline undefined
    # (nan), and a nan would make the task's output invalid JSON after all its sampling
    scores = {k: m.get(k) for k in ("reconstruction", "editability", "dino")}
    scores |= {f"baseline_{k}": v for k, v in (m.get("baselines") or {}).items()}  # "points" stays in metrics.json
    for k, v in scores.items():
        if isinstance(v, (int, float)) and math.isfinite(v):
            metrics.log_metric(k, v)
    metrics.log_metric("chosen_step", m["step"])
    from oneword.device import devices_seen

    metrics.metadata["accelerator"] = devices_seen()  # what the pod had, beside what the run asked for
    metrics.metadata["accelerator_requested"] = f"{accelerator_limit} x {accelerator_type}"
    shutil.copyfile(f"{evaluation.path}/report.html", report.path)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
@doc("""Log the run to MLflow and register the concept; champion if it passes the gate and beats the last one (or
    passes thresholds the last one does not).

    Args:
        model: output of train.
        evaluation: output of evaluate.
        concept: the concept's name: its folder in the train output and its registered-model name.
        registration: JSON with the registered name, version, alias and run id (or the failure).
        tracking_uri: MLflow tracking URI (empty: $MLFLOW_TRACKING_URI, else ./mlflow.db).
        experiment: MLflow experiment.
        min_reconstruction: quality gate: minimum reconstruction (-1 = none).
        min_editability: quality gate: minimum editability (-1 = none).
        margin_se: quality gate: standard errors by which a candidate must beat the champion.
        batch_id: the run's id; the batch report finds the batch's versions and failures by it.
        on_error: fail or record (see preprocess); a concept that failed at an earlier step is recorded as a
            FAILED MLflow run with the step and the error.
        kfp_run_id: the KFP run's id (run tag kfp.run_id).
        kfp_run_name: the KFP run's name (run tag kfp.run_name).

    Returns:
        name/version@alias, or "name failed at STEP".
    """)
def register(
    model: Input[Model],
    evaluation: Input[Artifact],
    concept: str,
    registration: Output[Artifact],
    tracking_uri: str = "",
    experiment: str = "oneword",
    min_reconstruction: float = -1.0,
    min_editability: float = -1.0,
    margin_se: float = 1.0,
    batch_id: str = "",
    on_error: str = "fail",
    kfp_run_id: str = "",
    kfp_run_name: str = "",
) -> str:
    import json
    import os
    from pathlib import Path

    from oneword.batch_records import record_failure, record_unchanged
    from oneword.config import GateThresholds
    from oneword.live import end_training_run, kfp_tags
    from oneword.outcome import UNCHANGED_FILE, read_failure, run_step
    from oneword.registry import register as run

    trained = os.path.join(model.path, concept)
    tags = kfp_tags(kfp_run_id, kfp_run_name)
    unchanged = Path(evaluation.path, UNCHANGED_FILE)
    gate = GateThresholds(min_reconstruction=min_reconstruction, min_editability=min_editability, margin_se=margin_se)
    try:
        if unchanged.is_file():  # evaluate found this training registered: no new version, the live run ends
            r = run_step("register", registration.path, on_error,
                         lambda: record_unchanged(tracking_uri or None, Path(trained), concept,
                                                  json.loads(unchanged.read_text()), batch_id, experiment, tags))
        else:
            r = run_step("register", registration.path, on_error,
                         lambda: run(trained, evaluation.path, tracking_uri or None, name=concept,
                                     experiment=experiment, thresholds=gate, batch_id=batch_id, run_tags=tags),
                         upstream=[evaluation.path])
    except Exception:  # the run stops here: training's live run, left open for this step, ends with why
        why = read_failure(registration.path) or {}
        end_training_run(tracking_uri or None, trained, "register", str(why.get("error", "")))
        raise
    if r is None:
        why = read_failure(registration.path)
        if why.get("unrecorded"):  # erased meanwhile: no run may name it again
            registration.metadata.update({"failed": why["stage"]})
            return f"{concept} failed at {why['stage']}"
        end_training_run(tracking_uri or None, trained, why["stage"], why["error"])
        group = json.loads(Path(model.path, "concepts.json").read_text())
        token = next((c["token"] for c in group if c["name"] == concept), "")
        record_failure(tracking_uri or None, concept, token, batch_id, why["stage"], why["error"], experiment, tags,
                       why.get("hint", ""))  # fmt: skip
        registration.metadata.update({"failed": why["stage"]})
        return f"{concept} failed at {why['stage']}"
    os.makedirs(registration.path, exist_ok=True)
    with open(os.path.join(registration.path, "registration.json"), "w") as f:
        json.dump(r.as_dict(), f)
    registration.metadata.update(r.as_dict())
    return f"{r.name}/{r.version}@{r.alias}" + (" (unchanged)" if r.unchanged else "")


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
@doc("""The concepts to train, evaluate and register; the others (their newest version came from the same photos,
    spec, model and settings, judged the same way) are recorded as unchanged, on CPU, before any GPU is asked for.

    Args:
        concepts: planned concepts (plan_concept or one shard of plan_batch).
        batch_id: the run's id, recorded with each unchanged concept.
        to_train: the concepts to train, in order.
        metrics: how many concepts are unchanged and how many to train (the run's dashboard shows them).
        base_model: the model, as preprocess and train are given it.
        resolution: as preprocess is given it.
        mode: as preprocess is given it.
        tracking_uri: MLflow tracking URI of the registry.
        experiment: MLflow experiment.
        kfp_run_id: the KFP run's id (run tag kfp.run_id).
        kfp_run_name: the KFP run's name (run tag kfp.run_name).
        on_error: fail (the steps meet every error) or record (a batch: a concept that a step would fail at every
            attempt, its photos that do not read or a token the model has, is recorded failed at that step here,
            and starts no GPU pod).
        Others: as train, evaluate and register are given them (what makes their result the same).

    Returns:
        How many concepts to train: 0, no GPU step runs. (The pipelines branch on it, a number: kfp.local reads a
        condition's value from a task's `Output` only.)
    """)
def changed_concepts(
    concepts: list,
    batch_id: str,
    to_train: dsl.OutputPath(list),
    metrics: Output[Metrics],
    base_model: str = "",
    resolution: int = 0,
    mode: str = "crop",
    steps: int = 0,
    batch_size: int = 4,
    learning_rate: float = 0.0,
    scale_lr: bool = True,
    progressive_every: int = 0,
    init_l2: float = 0.0,
    init_l2_schedule: str = "constant",
    early_end: float = 0.0,
    early_end_window: int = 100,
    init_cos: float = 0.0,
    direction_only: bool = False,
    direction_lr: float = 0.01,
    vmf_kappa: float = 0.0001,
    seed: int = 0,
    checkpoint_every: int = 0,
    log_every: int = 10,
    prompt_set: str = "",
    n_images: int = 64,
    sampling_steps: int = 0,
    guidance_scale: float = 0.0,
    clip_model: str = "auto",
    dino_model: str = "",
    checkpoint_budget: int = 8,
    min_reconstruction: float = -1.0,
    min_editability: float = -1.0,
    margin_se: float = 1.0,
    tracking_uri: str = "",
    experiment: str = "oneword",
    kfp_run_id: str = "",
    kfp_run_name: str = "",
    on_error: str = "fail",
) -> int:
    import json

    from oneword.live import kfp_tags
    from oneword.pipelines.parameters import lookup_settings
    from oneword.unchanged import changed_concepts as run

    try:
        given = lookup_settings(locals())
    except ValueError as e:  # a setting no step takes: train records it as each concept's failure
        print(f"cannot tell which concepts changed: {e}")
        todo = concepts
    else:
        todo = run(concepts, given, tracking_uri or None, batch_id, experiment, kfp_tags(kfp_run_id, kfp_run_name),
                   on_error)
    with open(to_train, "w") as f:
        json.dump(todo, f)
    metrics.log_metric("told", len(concepts) - len(todo))  # unchanged, or recorded as failed
    metrics.log_metric("to_train", len(todo))
    return len(todo)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
@doc("""Plan a single concept as a batch of one: its registered-model name and its photos' content key.

    Args:
        images: folder or s3://bucket/prefix of 3-5 photos of the concept.
        token: the new pseudo-word, e.g. <my-cat>.
        init_word: one-token word the embedding starts from.
        name: registered-model name (empty: from the token).
        n_vectors: vectors per token.
        templates: training prompt templates: object, style, toyworld or a file (empty: the model's profile).
    """)
def plan_concept(images: str, token: str, init_word: str, name: str = "", n_vectors: int = 1,
                 templates: str = "") -> list:
    from oneword.batch import ConceptEntry, plan_concepts

    return plan_concepts([ConceptEntry(images=images, token=token, init_word=init_word, name=name,
                                       n_vectors=n_vectors, templates=templates or None)])


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
@doc("""Read and validate the concepts manifest, record the plan in MLflow, leave out what a run need not train,
    and split the rest into shards.

    The concepts found unchanged (in the plan's run, all in one file) and those a step would fail at every attempt
    (a FAILED run each, as changed_concepts records them) are recorded here, after one load of the model's
    tokenizers and text encoders, on CPU: they add no task to the run. Of the others, it takes at most
    max_concepts_per_run, those the manifest's runs left most often in a row first; the rest are recorded in the
    plan as deferred, for the next runs.

    Args:
        concepts_manifest: YAML at an s3:// URI or a path.
        batch_id: the run's id (the report reads the plan back by it).
        metrics: how many concepts are unchanged or failing (told), to train, and deferred.
        concepts_per_shard: concepts trained together in one GPU job.
        max_concepts_per_run: concepts this run trains at most (0: every one that changed).
        only_concepts: names of the manifest's concepts the run is limited to (empty: all).
        bundle: the bundle bundle_concepts refreshes after the run (empty: none): checked here, before any GPU is
            asked for, to be no concept's name.
        tracking_uri: MLflow tracking URI.
        experiment: MLflow experiment.
        kfp_run_id: the KFP run's id (run tag kfp.run_id).
        kfp_run_name: the KFP run's name (run tag kfp.run_name).
        Others: as changed_concepts is given them.

    Returns:
        The shards: lists of planned concepts, each marked as found changed.
    """)
def plan_batch(
    concepts_manifest: str,
    batch_id: str,
    metrics: Output[Metrics],
    concepts_per_shard: int = 1,
    max_concepts_per_run: int = 8,
    only_concepts: list = [],  # noqa: B006  KFP reads the default from the signature; the step never changes it
    bundle: str = "",
    base_model: str = "",
    resolution: int = 0,
    mode: str = "crop",
    steps: int = 0,
    batch_size: int = 4,
    learning_rate: float = 0.0,
    scale_lr: bool = True,
    progressive_every: int = 0,
    init_l2: float = 0.0,
    init_l2_schedule: str = "constant",
    early_end: float = 0.0,
    early_end_window: int = 100,
    init_cos: float = 0.0,
    direction_only: bool = False,
    direction_lr: float = 0.01,
    vmf_kappa: float = 0.0001,
    seed: int = 0,
    checkpoint_every: int = 0,
    log_every: int = 10,
    prompt_set: str = "",
    n_images: int = 64,
    sampling_steps: int = 0,
    guidance_scale: float = 0.0,
    clip_model: str = "auto",
    dino_model: str = "",
    checkpoint_budget: int = 8,
    min_reconstruction: float = -1.0,
    min_editability: float = -1.0,
    margin_se: float = 1.0,
    tracking_uri: str = "",
    experiment: str = "oneword",
    kfp_run_id: str = "",
    kfp_run_name: str = "",
) -> list[list]:
    # not `-> list`: KFP types a plain list's loop item STRING, which a cluster's driver then refuses as
    # personalise's LIST input ("type mismatch: expect LIST, got string"); kfp.local does not check
    from oneword.live import kfp_tags
    from oneword.outcome import retrying
    from oneword.plan import plan_batch as run

    given = dict(locals())
    # a store or bucket that blinks is tried again here: a cluster's retry policy may retry no failed pod
    plan = retrying(lambda: run(concepts_manifest, batch_id, given, concepts_per_shard, max_concepts_per_run,
                                only_concepts, tracking_uri or None, experiment, kfp_tags(kfp_run_id, kfp_run_name),
                                bundle),
                    "plan-batch")  # fmt: skip
    metrics.log_metric("told", plan.told)  # unchanged, or recorded as failed
    metrics.log_metric("to_train", plan.to_train)
    metrics.log_metric("deferred", plan.deferred)
    return plan.shards


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
@doc("""After every concept of the batch: register a version of `bundle` holding the @champion version of
    every concept of the manifest trained on the run's base model, so that one server serves them all; none where
    those are what its newest version holds. A concept with no champion (not trained yet, or short of the gate),
    or whose champion is on another base model, is left out. What became of the bundle is recorded in the batch's
    plan, where its report reads it; a bundle that could not be made fails the step (the concepts stay registered).

    Args:
        bundle: the bundle's registered-model name (empty: the step does nothing).
        concepts_manifest: YAML at an s3:// URI or a path (read again: the run's plan may hold some concepts only).
        batch_id: the batch's id (the pipeline run's).
        base_model: the run's base model (empty: every concept's champion; they must share one base model).
        tracking_uri: MLflow tracking URI.
        experiment: MLflow experiment (the batch's plan is there; bundles log to oneword-bundles).
    """)
def bundle_concepts(bundle: str, concepts_manifest: str, batch_id: str, base_model: str = "",
                    tracking_uri: str = "", experiment: str = "oneword"):
    if not bundle:
        print("no bundle asked for (the run's bundle parameter is empty)")
        return
    import json

    from oneword.batch_records import record_bundle
    from oneword.bundles import bundle_concepts as run
    from oneword.outcome import retrying

    uri = tracking_uri or None
    try:
        done = retrying(lambda: run(bundle, manifest=concepts_manifest, tracking_uri=uri,
                                    base_model=base_model or None, batch_id=batch_id), "bundle-concepts")  # fmt: skip
    except Exception as e:
        said = getattr(e, "message", None) or f"{type(e).__name__}: {e}"
        hint = getattr(e, "hint", None)
        try:
            record_bundle(uri, batch_id, {"name": bundle, "error": said + (f" ({hint})" if hint else "")},
                          experiment)  # fmt: skip
        except Exception as unrecorded:  # a registry that is down: its error is the one to raise
            print(f"could not record why the bundle failed: {unrecorded}")
        raise
    record_bundle(uri, batch_id, done.summary(), experiment)
    print(json.dumps(done.summary(), indent=2))


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
@doc("""Exit handler: which concepts of the batch registered, which failed at which step and why, and which left
    the manifest since its last run while still holding an alias.

    Args:
        batch_id: the batch's id (the pipeline run's).
        status: the batch's final status.
        summary: JSON per-concept status.
        overview: every concept on one page: status, alias and why, scores, sample grid (shown in the KFP UI).
        tracking_uri: MLflow tracking URI.
        experiment: MLflow experiment.
    """)
def report_batch(batch_id: str, status: dsl.PipelineTaskFinalStatus, summary: Output[Artifact],
                 overview: Output[HTML], tracking_uri: str = "", experiment: str = "oneword"):
    import json
    from pathlib import Path

    from oneword.batch import final_report
    from oneword.batch_overview import overview_page
    from oneword.batch_records import batch_bundle, batch_plan, previous_plan

    uri = tracking_uri or None
    report = final_report(uri, batch_id, lambda: batch_plan(uri, batch_id, experiment), experiment, status.state,
                          lambda: previous_plan(uri, batch_id, experiment), lambda: batch_bundle(uri, batch_id,
                                                                                                 experiment))
    with open(summary.path, "w") as f:
        json.dump(report, f, indent=2)
    try:
        overview_page(report, Path(overview.path), uri, status.state)
    except Exception as e:  # the summary is what alerts read: a page that could not be made does not fail the run
        import html

        said = html.escape(f"{type(e).__name__}: {e}")
        Path(overview.path).write_text(f"<p>the overview could not be made: {said}</p>")
    # an alert on `failed` alone would miss a night whose report could not be made: `error` says so
    counts = {k: report.get(k, 0) for k in ("registered", "unchanged", "failed", "deferred")}
    summary.metadata.update(counts | {"error": report.get("error", ""), "left": len(report.get("left", [])),
                                      "left_error": report.get("left_error", "")})
    print(json.dumps(report, indent=2))


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
@doc("""Exit handler of a single-concept run: what it registered, and the live MLflow run its training left open
    ended where register never ran (a pod lost for good, a cancelled run).

    Args:
        batch_id: the run's id.
        images: the concept's photos (as the run was given them).
        token: the concept's token.
        init_word: its initializer word.
        status: the run's final status.
        name: its registered-model name (default: from the token).
        tracking_uri: MLflow tracking URI.
        experiment: MLflow experiment.

    Returns:
        name/version@alias (with " (unchanged)" for a version registered before from the same training), or why
        nothing was registered.
    """)
def report_run(batch_id: str, images: str, token: str, init_word: str, status: dsl.PipelineTaskFinalStatus,
               name: str = "", tracking_uri: str = "", experiment: str = "oneword") -> str:
    import json

    from oneword.batch import final_report, run_answer
    from oneword.registry import concept_name

    def plan() -> list[dict]:  # a name the registry cannot hold is the report's error, not the handler's crash
        return [{"images": images, "token": token, "init_word": init_word, "name": concept_name(token, name)}]

    report = final_report(tracking_uri or None, batch_id, plan, experiment, status.state)
    print(json.dumps(report, indent=2))
    return run_answer(report, status.error_message or "")  # a cluster's driver fills no error message yet


ALL = [preflight, preprocess, cache_latents, train, evaluate, register, plan_concept, plan_batch, changed_concepts,
       bundle_concepts, report_batch, report_run]
