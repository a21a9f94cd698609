"""The KFP v2 lightweight components: each a typed signature, a docstring and one call into the library.

(No `from __future__ import annotations` here: KFP reads the annotations as types.)

Same names everywhere: component `preprocess` calls `oneword.images.preprocess` and is `oneword preprocess`.
Components run in the oneword image (`install_kfp_package=False`, no `packages_to_install`: pods never reach
PyPI). The GPU steps use the CUDA image, the others the slim CPU image.
"""


from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from oneword.pipelines.container import CPU_IMAGE, GPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def preprocess(images: str, dataset: Output[Dataset], resolution: int = 512, mode: str = "crop"):
    """Clean the concept's photos: EXIF orientation, RGB, square crop or pad, resize, de-duplicate.

    Args:
        images: folder or s3://bucket/prefix of 3-5 photos of the concept.
        dataset: processed images plus manifest.json.
        resolution: side of the square training images (SD 1.x: 512, SD 2.x: 768).
        mode: crop (centre-crop to a square) or pad (pad with white).
    """
    from oneword.images import preprocess as run

    m = run(images, dataset.path, resolution=resolution, mode=mode)
    dataset.metadata.update({"images": len(m.images), "skipped": len(m.skipped), "resolution": resolution})


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def cache_latents(dataset: Input[Dataset], latents: Output[Artifact], base_model: str = "toyworld"):
    """Encode each image and its mirror once with the base model's VAE (posterior mean and std).

    Args:
        dataset: output of preprocess.
        latents: latents.safetensors, keyed by VAE fingerprint and image hash.
        base_model: toyworld, a hub id, an s3:// diffusers folder, or a path in the image.
    """
    import torch

    from oneword.latents import cache_latents as run

    lat = run(dataset.path, base_model, latents.path, device="cuda" if torch.cuda.is_available() else "cpu")
    latents.metadata.update({"images": len(lat), "vae_fingerprint": lat.meta["vae_fingerprint"]})


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def train(
    latents: Input[Artifact],
    token: str,
    init_word: str,
    model: Output[Model],
    metrics: Output[Metrics],
    base_model: str = "",
    n_vectors: int = 1,
    templates: str = "object",
    steps: int = 5000,
    batch_size: int = 4,
    learning_rate: float = 0.005,
    scale_lr: bool = True,
    progressive_every: int = 0,
    init_l2: float = 0.0,
    seed: int = 0,
    checkpoint_every: int = 500,
    checkpoint_root: str = "",
    run_id: str = "local",
):
    """Learn the token's embedding from the cached latents (resumes from the last checkpoint on retry).

    Args:
        latents: output of cache_latents.
        token: the new pseudo-word, e.g. <my-cat>.
        init_word: one-token word the embedding starts from, e.g. cat.
        model: embedding files (diffusers, A1111, kohya), curve.json, summary.json.
        metrics: final loss, embedding norm, steps per second.
        base_model: default: the model the latents were encoded with.
        n_vectors: vectors per token.
        templates: object or style prompt templates.
        steps: optimiser steps (paper: 5000).
        batch_size: samples per step (paper: 4).
        learning_rate: base learning rate, times batch size when scale_lr.
        scale_lr: scale the learning rate by the batch size, as the paper does.
        progressive_every: add vector k at step k*N (paper: 2000); 0 = off.
        init_l2: weight of an L2 pull toward the initializer embedding.
        seed: random seed.
        checkpoint_every: steps between checkpoints.
        checkpoint_root: s3:// prefix for checkpoints that outlive the pod (retries resume from it); empty =
            inside the model artifact.
        run_id: the pipeline run's id (keeps each run's checkpoints apart).
    """
    from oneword.inversion import ConceptSpec, TrainConfig
    from oneword.train import train as run

    ckpt = f"{checkpoint_root.rstrip('/')}/{run_id}/{token.strip('<>')}" if checkpoint_root else None
    r = run(
        latents.path,
        model.path,
        ConceptSpec(token=token, init_word=init_word, n_vectors=n_vectors, templates=templates),
        TrainConfig(steps=steps, batch_size=batch_size, learning_rate=learning_rate, scale_lr=scale_lr,
                    progressive_every=progressive_every, init_l2=init_l2, seed=seed,
                    checkpoint_every=checkpoint_every),
        base_model=base_model or None,
        checkpoint_dir=ckpt,
        resume=True,
        progress=False,
    )
    metrics.log_metric("final_loss", r.curve[-1]["loss"])
    metrics.log_metric("embedding_norm", r.curve[-1]["embedding_norm"])
    metrics.log_metric("steps_per_second", r.steps_per_second)
    model.metadata.update({"token": token, "steps": r.steps})


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def evaluate(
    model: Input[Model],
    dataset: Input[Dataset],
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
    report: Output[HTML],
    prompt_set: str = "paper",
    n_images: int = 64,
    sampling_steps: int = 50,
    guidance_scale: float = 5.0,
    clip_model: str = "auto",
    dino_model: str = "",
    checkpoint_budget: int = 8,
):
    """Score the concept as the paper does (CLIP reconstruction and editability), pick a checkpoint, draw pictures.

    Args:
        model: output of train.
        dataset: output of preprocess (the training images).
        evaluation: metrics.json, grid.png, scatter.png, report.html and the selected embedding.
        metrics: reconstruction, editability, DINO and the baselines.
        report: the HTML report (shown in the KFP UI).
        prompt_set: paper, neti15, dreambench-object, dreambench-live or toyworld.
        n_images: images per prompt (paper: 64).
        sampling_steps: DDIM steps (paper: 50).
        guidance_scale: classifier-free guidance (paper: 5.0).
        clip_model: CLIP evaluator; auto = toyworld-clip for the toy model, else openai/clip-vit-base-patch32.
        dino_model: DINO ViT for subject fidelity, e.g. facebook/dino-vits16; empty = skip.
        checkpoint_budget: images per prompt when scoring each checkpoint; 0 = final step only.
    """
    import shutil

    from oneword.evaluation import EvalConfig
    from oneword.evaluation import evaluate as run

    m = run(model.path, dataset.path, evaluation.path,
            EvalConfig(prompt_set=prompt_set, n_images=n_images, steps=sampling_steps, guidance_scale=guidance_scale,
                       clip_model=clip_model, dino_model=dino_model, checkpoint_budget=checkpoint_budget))
    for k in ("reconstruction", "editability", "dino"):
        if m.get(k) is not None:
            metrics.log_metric(k, m[k])
    for k, v in (m.get("baselines") or {}).items():
        metrics.log_metric(f"baseline_{k}", v)
    metrics.log_metric("chosen_step", m["step"])
    shutil.copyfile(f"{evaluation.path}/report.html", report.path)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def register(
    model: Input[Model],
    evaluation: Input[Artifact],
    registration: Output[Artifact],
    tracking_uri: str = "",
    name: str = "",
    experiment: str = "oneword",
    min_reconstruction: float = -1.0,
    min_editability: float = -1.0,
    batch_id: str = "",
) -> str:
    """Log the run to MLflow and register the concept; champion only if it passes the gate and beats the last.

    Args:
        model: output of train.
        evaluation: output of evaluate.
        registration: JSON with the registered name, version, alias and run id.
        tracking_uri: MLflow tracking URI (empty: $MLFLOW_TRACKING_URI, else ./mlflow.db).
        name: registered-model name (empty: from the token).
        experiment: MLflow experiment.
        min_reconstruction: quality gate: minimum reconstruction (-1 = none).
        min_editability: quality gate: minimum editability (-1 = none).
        batch_id: set by batch_personalisation.
    """
    import json

    from oneword.evaluation.gate import GateThresholds
    from oneword.registry import register as run

    r = run(model.path, evaluation.path, tracking_uri or None, name=name or None, experiment=experiment,
            thresholds=GateThresholds(min_reconstruction, min_editability), batch_id=batch_id)
    with open(registration.path, "w") as f:
        json.dump(r.as_dict(), f)
    registration.metadata.update(r.as_dict())
    return f"{r.name}/{r.version}@{r.alias}"


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def plan_batch(concepts_manifest: str, concepts_per_shard: int = 1) -> list:
    """Read and validate the concepts manifest and split it into shards (one GPU job each).

    Args:
        concepts_manifest: YAML at an s3:// URI or a path.
        concepts_per_shard: concepts per shard.
    """
    from oneword.batch import load_concepts_manifest, shard

    return shard(load_concepts_manifest(concepts_manifest), concepts_per_shard)


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def personalise_shard(
    shard: list,
    work: Output[Artifact],
    batch_id: str,
    base_model: str = "toyworld",
    resolution: int = 512,
    mode: str = "crop",
    steps: int = 5000,
    batch_size: int = 4,
    learning_rate: float = 0.005,
    scale_lr: bool = True,
    progressive_every: int = 0,
    init_l2: float = 0.0,
    seed: int = 0,
    checkpoint_every: int = 500,
    checkpoint_root: str = "",
    prompt_set: str = "paper",
    n_images: int = 64,
    sampling_steps: int = 50,
    guidance_scale: float = 5.0,
    clip_model: str = "auto",
    dino_model: str = "",
    checkpoint_budget: int = 8,
    tracking_uri: str = "",
    experiment: str = "oneword",
    min_reconstruction: float = -1.0,
    min_editability: float = -1.0,
    accelerator_type: str = "",
    accelerator_limit: int = 0,
) -> list:
    """Run a shard's concepts through preprocess, cache_latents, train (all together), evaluate and register.

    The concepts train in one batch on the pod's GPU. A concept that fails is reported (stage and error) and
    the others go on; a rerun shard resumes training from the group's checkpoints under checkpoint_root (keyed
    by what is trained, not by the run) and does not register a concept twice. Parameters are the batch
    pipeline's (accelerator_type and accelerator_limit are recorded in the output's metadata).
    """
    import json
    import os

    from oneword.batch import BatchSettings, ConceptEntry, personalise_shard

    settings = BatchSettings(
        base_model=base_model, resolution=resolution, mode=mode, steps=steps, batch_size=batch_size,
        learning_rate=learning_rate, scale_lr=scale_lr, progressive_every=progressive_every, init_l2=init_l2,
        seed=seed, checkpoint_every=checkpoint_every, checkpoint_root=checkpoint_root, prompt_set=prompt_set,
        n_images=n_images, sampling_steps=sampling_steps, guidance_scale=guidance_scale, clip_model=clip_model,
        dino_model=dino_model, checkpoint_budget=checkpoint_budget, experiment=experiment,
        min_reconstruction=min_reconstruction, min_editability=min_editability,
    )
    os.makedirs(work.path, exist_ok=True)
    statuses = personalise_shard([ConceptEntry(**c) for c in shard], settings, work.path, tracking_uri or None,
                                 batch_id)
    with open(os.path.join(work.path, "statuses.json"), "w") as f:
        json.dump(statuses, f, indent=2)
    work.metadata["registered"] = sum(s["status"] == "registered" for s in statuses)
    work.metadata["failed"] = sum(s["status"] != "registered" for s in statuses)
    work.metadata["accelerator"] = f"{accelerator_limit} x {accelerator_type}"
    return statuses


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def report_batch(concepts_manifest: str, batch_id: str, status: dsl.PipelineTaskFinalStatus,
                 summary: Output[Artifact], tracking_uri: str = ""):
    """Exit handler: record which concepts of the batch registered and which failed.

    Args:
        concepts_manifest: the batch's manifest.
        batch_id: the batch's id (the pipeline run's).
        status: the batch's final status.
        summary: JSON per-concept status.
        tracking_uri: MLflow tracking URI.
    """
    import json

    from oneword.batch import batch_report, load_concepts_manifest

    report = batch_report(tracking_uri or None, batch_id, load_concepts_manifest(concepts_manifest))
    report["pipeline_state"] = status.state
    with open(summary.path, "w") as f:
        json.dump(report, f, indent=2)
    summary.metadata.update({k: report[k] for k in ("registered", "failed")})
    print(json.dumps(report, indent=2))


ALL = [preprocess, cache_latents, train, evaluate, register, plan_batch, personalise_shard, report_batch]
