"""The two pipelines: `textual_inversion` (one concept) and `batch_personalisation` (a manifest of concepts).

Both build the same per-concept DAG: preprocess -> cache_latents -> train -> evaluate -> register. Cluster
settings (GPU pool, secrets) are Kubernetes platform config; `kfp.local` ignores them, so the very same
pipeline runs on one machine.
"""



from kfp import dsl, kubernetes

from oneword.pipelines import components as c
from oneword.pipelines.parameters import (
    CHECKPOINT_ROOT,
    DEFAULT_BASE_MODEL,
    MODEL_CACHE_MOUNT,
    RESOLUTION_FROM_PROFILE,
)
from oneword.pipelines.parameters import DEFAULTS as D

# Secrets and config reach pods as environment variables, never as parameters (docs/deploy.md makes them).
S3_SECRET = "oneword-s3"  # keys AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY
MLFLOW_SECRET = "oneword-mlflow"  # keys MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD (optional)
CONFIG_MAP = "oneword-config"  # keys S3_ENDPOINT_URL, MLFLOW_S3_ENDPOINT_URL, MLFLOW_TRACKING_URI
HF_SECRET = "oneword-hf"  # key HF_TOKEN (optional): gated or private models on the Hugging Face hub
TRAIN_RETRIES = 3  # spot/preemptible GPU nodes are the norm; a retry resumes from the last checkpoint
STEP_RETRIES = 2  # preprocess and cache_latents: an object store or model hub that did not answer, tried again
# How long one attempt's pod may run before Kubernetes stops it (activeDeadlineSeconds): a step that hangs (a NCCL
# collective or a read that never returns) would otherwise hold its node, and a GPU, until someone noticed; the
# next scheduled run resumes from the last checkpoint. Far beyond what a step takes (a shard of concepts trains in
# minutes on one GPU, docs/benchmarks.md), and short enough that a step hanging at every attempt (a pod stopped
# so ends Failed, which Argo's OnFailure policy retries) ends within a day, time Pending aside: 4 x 5 h.
GPU_STEP_DEADLINE_S = 5 * 3600
CPU_STEP_DEADLINE_S = 3 * 3600  # plan-batch reads every concept's photos: thousands of concepts take long too
# Argo allows a task's retries a window from its first pod's creation (`retryStrategy.backoff.maxDuration`): it
# tries no retry past it and stops a retry at it (workflow/controller/operator.go, "Max duration limit exceeded").
# KFP's SDK writes 1 hour when none is given, which cut a 5-hour training's retries to the first hour. The window
# holds every attempt at its deadline and the backoffs, and this much time Pending for a node (a GPU pool scaling
# up from zero, a night's runs queued), which counts too.
RETRY_PENDING_S = 12 * 3600


def _cluster_env(task: dsl.PipelineTask) -> dsl.PipelineTask:
    kubernetes.use_secret_as_env(task, S3_SECRET, {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
                                                   "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"})
    kubernetes.use_secret_as_env(task, MLFLOW_SECRET, {"MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
                                                       "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD"},
                                 optional=True)
    kubernetes.use_config_map_as_env(task, CONFIG_MAP, {"S3_ENDPOINT_URL": "S3_ENDPOINT_URL",
                                                        "MLFLOW_S3_ENDPOINT_URL": "MLFLOW_S3_ENDPOINT_URL",
                                                        "MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI"})
    # optional: a ConfigMap made before they were added still starts the pods. With a region, minio's client
    # asks no GetBucketLocation first (which a policy limited to a team's prefixes refuses)
    kubernetes.use_config_map_as_env(task, CONFIG_MAP, {"AWS_REGION": "AWS_REGION",
                                                        "MLFLOW_BOTO_CLIENT_ADDRESSING_STYLE":
                                                        "MLFLOW_BOTO_CLIENT_ADDRESSING_STYLE"}, optional=True)
    return task


def _carry(task: dsl.PipelineTask, p: dict, names: list[str]) -> None:
    # KFP's compiler (2.17) carries a channel into a ParallelFor body only if a task there registers it; the
    # resource and accelerator setters don't, which would leave the loop's pods asking for an undefined input.
    task.register_pipeline_channels([p[n] for n in names if isinstance(p[n], dsl.pipeline_channel.PipelineChannel)])


def _resources(task: dsl.PipelineTask, p: dict, kind: str) -> dsl.PipelineTask:
    names = [f"{kind}_step_{r}" for r in ("cpu_request", "cpu_limit", "memory_request", "memory_limit")]
    cpu_request, cpu_limit, memory_request, memory_limit = (p[n] for n in names)
    task.set_cpu_request(cpu_request).set_cpu_limit(cpu_limit)
    task.set_memory_request(memory_request).set_memory_limit(memory_limit)
    _carry(task, p, names)
    return task


def _retry(task: dsl.PipelineTask, retries: int, first_wait_s: int, deadline_s: int) -> dsl.PipelineTask:
    """Retry `task` up to `retries` times, the first after `first_wait_s` and each next twice as long, within a
    window that holds every attempt at its deadline (`RETRY_PENDING_S`)."""
    waits = sum(first_wait_s * 2**i for i in range(retries))
    window = (retries + 1) * deadline_s + waits + RETRY_PENDING_S
    return task.set_retry(num_retries=retries, backoff_duration=f"{first_wait_s}s", backoff_factor=2.0,
                          backoff_max_duration=f"{window}s")  # fmt: skip


def _cpu_step(task: dsl.PipelineTask, p: dict) -> dsl.PipelineTask:
    """A step on any node: the cluster environment, the CPU steps' requests and limits, and their deadline."""
    kubernetes.set_timeout(task, CPU_STEP_DEADLINE_S)
    return _resources(_cluster_env(task), p, "cpu")


def _with_models(task: dsl.PipelineTask, p: dict) -> dsl.PipelineTask:
    """A step that loads models: the shared Hugging Face cache (downloaded once per cluster) and the hub token."""
    kubernetes.mount_pvc(task, pvc_name=p["model_cache_pvc"], mount_path=MODEL_CACHE_MOUNT)
    kubernetes.use_secret_as_env(task, HF_SECRET, {"HF_TOKEN": "HF_TOKEN"}, optional=True)
    # HF_HOME (inside the mount) is the images' own setting, not a task env: kfp.local applies task envs too,
    # and a local run must keep the user's cache.
    return task


def _gpu_step(task: dsl.PipelineTask, p: dict) -> dsl.PipelineTask:
    """A step on the GPU pool: its GPUs, node selector and tolerations, requests and limits, the model cache, and
    its deadline."""
    _with_models(_cluster_env(task), p)
    kubernetes.set_timeout(task, GPU_STEP_DEADLINE_S)
    task.set_accelerator_type(p["accelerator_type"]).set_accelerator_limit(p["accelerator_limit"])
    _carry(task, p, ["accelerator_type", "accelerator_limit"])
    _resources(task, p, "gpu")
    kubernetes.add_node_selector_json(task, p["gpu_node_selector"])
    kubernetes.add_toleration_json(task, p["gpu_tolerations"])
    # Processes on one pod's GPUs (accelerator_limit > 1) talk through NCCL, which puts its buffers in /dev/shm:
    # Kubernetes gives a container 64 MB there, which NCCL can outgrow. A memory-backed volume lifts the cap.
    kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory")
    return task


@dsl.pipeline(name="personalise", description="The five steps for a group of concepts: preprocess and "
              "cache_latents per concept, one train for the group, evaluate and register per concept.")
def personalise(
    concepts: list,
    batch_id: str,
    on_error: str = "fail",
    base_model: str = DEFAULT_BASE_MODEL,
    resolution: int = RESOLUTION_FROM_PROFILE,
    mode: str = D["mode"],
    steps: int = D["steps"],
    batch_size: int = D["batch_size"],
    learning_rate: float = D["learning_rate"],
    scale_lr: bool = D["scale_lr"],
    progressive_every: int = D["progressive_every"],
    init_l2: float = D["init_l2"],
    init_l2_schedule: str = D["init_l2_schedule"],
    early_end: float = D["early_end"],
    early_end_window: int = D["early_end_window"],
    init_cos: float = D["init_cos"],
    direction_only: bool = D["direction_only"],
    direction_lr: float = D["direction_lr"],
    vmf_kappa: float = D["vmf_kappa"],
    seed: int = D["seed"],
    checkpoint_every: int = D["checkpoint_every"],
    checkpoint_root: str = "",
    prompt_set: str = D["prompt_set"],
    n_images: int = D["n_images"],
    sampling_steps: int = D["sampling_steps"],
    guidance_scale: float = D["guidance_scale"],
    clip_model: str = D["clip_model"],
    dino_model: str = D["dino_model"],
    checkpoint_budget: int = D["checkpoint_budget"],
    log_every: int = D["log_every"],
    sample_every: int = D["sample_every"],
    compile: str = D["compile"],
    tracking_uri: str = D["tracking_uri"],
    experiment: str = D["experiment"],
    min_reconstruction: float = D["min_reconstruction"],
    min_editability: float = D["min_editability"],
    margin_se: float = D["margin_se"],
    accelerator_type: str = D["accelerator_type"],
    accelerator_limit: str = D["accelerator_limit"],
    gpu_node_selector: dict = D["gpu_node_selector"],
    gpu_tolerations: list = D["gpu_tolerations"],
    gpu_step_cpu_request: str = D["gpu_step_cpu_request"],
    gpu_step_cpu_limit: str = D["gpu_step_cpu_limit"],
    gpu_step_memory_request: str = D["gpu_step_memory_request"],
    gpu_step_memory_limit: str = D["gpu_step_memory_limit"],
    cpu_step_cpu_request: str = D["cpu_step_cpu_request"],
    cpu_step_cpu_limit: str = D["cpu_step_cpu_limit"],
    cpu_step_memory_request: str = D["cpu_step_memory_request"],
    cpu_step_memory_limit: str = D["cpu_step_memory_limit"],
    model_cache_pvc: str = D["model_cache_pvc"],
):
    """The one place where the five steps are chained; both pipelines run it (a single concept is a group of one).

    First, on CPU, the concepts whose newest version is what this run would register again are recorded as
    unchanged (`oneword.unchanged`); the five steps run for the others, and not at all when none is left, so an
    unchanged concept asks for no GPU. What each concept became is in MLflow, where the exit handlers read it.

    Args:
        concepts: planned concepts (plan_concept or one shard of plan_batch).
        batch_id: the run's id; versions and failures are tagged with it.
        on_error: fail (a single concept: its failure fails the run) or record (a batch: a failed concept is
            recorded with its step and error, and the others go on).
        Other parameters: as in textual_inversion.
    """
    p = dict(locals())
    todo = _cpu_step(c.changed_concepts(
        concepts=concepts, batch_id=batch_id, base_model=base_model, resolution=resolution, mode=mode, steps=steps,
        batch_size=batch_size, learning_rate=learning_rate, scale_lr=scale_lr, progressive_every=progressive_every,
        init_l2=init_l2, init_l2_schedule=init_l2_schedule, early_end=early_end, early_end_window=early_end_window,
        init_cos=init_cos, direction_only=direction_only, direction_lr=direction_lr, vmf_kappa=vmf_kappa, seed=seed,
        checkpoint_every=checkpoint_every, log_every=log_every, prompt_set=prompt_set, n_images=n_images,
        sampling_steps=sampling_steps, guidance_scale=guidance_scale, clip_model=clip_model, dino_model=dino_model,
        checkpoint_budget=checkpoint_budget, min_reconstruction=min_reconstruction, min_editability=min_editability,
        margin_se=margin_se, tracking_uri=tracking_uri, experiment=experiment,
        kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, kfp_run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER, on_error=on_error,
    ), p)
    # it reads the model's tokenizers and text encoders (fp16, no UNet or VAE) into the cache the GPU steps use
    _with_models(todo, p).set_caching_options(False)  # it asks MLflow, every run
    _retry(todo, STEP_RETRIES, 30, CPU_STEP_DEADLINE_S)  # a pod lost with its node
    with dsl.If(todo.outputs["Output"] > 0, name="any-changed"):
        concepts = todo.outputs["to_train"]
        with dsl.ParallelFor(concepts, name="each-concept") as concept:
            pre = _cpu_step(c.preprocess(images=concept.images, content_key=concept.content_key, base_model=base_model,
                                            resolution=resolution, mode=mode, on_error=on_error), p)
            # Not KFP-cached: the launcher reads a cached artifact of another run with an S3 client of its own that
            # ignores the pipeline root's endpoint (MinIO), and opens the bucket of a collected list's first artifact
            # only (backend/src/v2/component/launcher_v2.go, fetchNonDefaultBuckets): a cached concept's latents could
            # not be read by train. The photos are small; what is costly, training, oneword keys itself.
            pre.set_caching_options(False)
            _retry(pre, STEP_RETRIES, 30, CPU_STEP_DEADLINE_S)  # transient errors
            # The accelerator settings are also inputs: the step records them in its output's metadata.
            lat = _gpu_step(c.cache_latents(dataset=pre.outputs["dataset"], base_model=base_model, on_error=on_error,
                                            accelerator_type=accelerator_type, accelerator_limit=accelerator_limit), p)
            lat.set_caching_options(False)
            _retry(lat, STEP_RETRIES, 30, GPU_STEP_DEADLINE_S)
        tr = c.train(
            latents=dsl.Collected(lat.outputs["latents"]), concepts=concepts, base_model=base_model, steps=steps,
            batch_size=batch_size, learning_rate=learning_rate, scale_lr=scale_lr, progressive_every=progressive_every,
            init_l2=init_l2, init_l2_schedule=init_l2_schedule, early_end=early_end, early_end_window=early_end_window,
            init_cos=init_cos,
            direction_only=direction_only, direction_lr=direction_lr, vmf_kappa=vmf_kappa, seed=seed,
            checkpoint_every=checkpoint_every, checkpoint_root=checkpoint_root, on_error=on_error,
            log_every=log_every, sample_every=sample_every, compile=compile, tracking_uri=tracking_uri,
            experiment=experiment, kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            kfp_run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER, accelerator_limit=accelerator_limit,
        )
        _gpu_step(tr, p)
        # Honoured inside sub-DAGs from KFP 2.14 (docs/deploy.md); a retry resumes from the checkpoints under
        # checkpoint_root, which are keyed by what is trained. Locally (kfp.local) retries are removed: see local.py.
        _retry(tr, TRAIN_RETRIES, 60, GPU_STEP_DEADLINE_S)
        tr.set_caching_options(False)
        with dsl.ParallelFor(tr.outputs["Output"], name="each-trained") as name:
            ev = c.evaluate(
                model=tr.outputs["model"], concept=name, prompt_set=prompt_set, n_images=n_images,
                sampling_steps=sampling_steps, guidance_scale=guidance_scale, clip_model=clip_model,
                dino_model=dino_model,
                checkpoint_budget=checkpoint_budget, on_error=on_error, accelerator_type=accelerator_type,
                accelerator_limit=accelerator_limit, tracking_uri=tracking_uri, min_reconstruction=min_reconstruction,
                min_editability=min_editability, margin_se=margin_se,
            )
            _gpu_step(ev, p).set_caching_options(False)  # it asks MLflow whether the concept changed, every run
            # no retry: its retry node per concept would take the Argo Workflow of a run at RUN_LIMIT past what
            # test_a_batch_run_at_the_limit_fits_in_what_argo_keeps_of_a_run keeps spare; a preempted evaluate
            # fails its concept, and the next run evaluates it (its training is kept)
            reg = c.register(
                model=tr.outputs["model"], evaluation=ev.outputs["evaluation"], concept=name,
                tracking_uri=tracking_uri, experiment=experiment, min_reconstruction=min_reconstruction,
                min_editability=min_editability, margin_se=margin_se,
                batch_id=batch_id, on_error=on_error, kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                kfp_run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
            )
            _cpu_step(reg, p).set_caching_options(False)


def _preflight(concepts, p: dict) -> dsl.PipelineTask:
    """The first task: everything later steps need is checked before any GPU is asked for."""
    check = _cpu_step(c.preflight(concepts=concepts, base_model=p["base_model"], clip_model=p["clip_model"],
                                  tracking_uri=p["tracking_uri"], experiment=p["experiment"],
                                  checkpoint_root=p["checkpoint_root"], prompt_set=p["prompt_set"],
                                  dino_model=p["dino_model"]), p)
    _with_models(check, p)  # it reads the model's tokenizer and configs: into the cache the GPU steps then use
    _retry(check, STEP_RETRIES, 30, CPU_STEP_DEADLINE_S)  # a pod lost with its node (a server that blinks: inside)
    return check.set_caching_options(False)  # what it checks (servers, buckets) changes without its inputs


# The parameters both pipelines hand to `personalise` as they are.
SHARED = [k for k in personalise.component_spec.inputs if k not in ("concepts", "batch_id", "on_error")]


@dsl.pipeline(name="textual-inversion", description="Learn one new word for a concept from 3-5 photos, evaluate "
              "it and register it in MLflow (Textual Inversion, Gal et al. 2022).")
def textual_inversion(
    images: str,
    token: str,
    init_word: str,
    base_model: str = DEFAULT_BASE_MODEL,
    name: str = "",
    resolution: int = RESOLUTION_FROM_PROFILE,
    mode: str = D["mode"],
    n_vectors: int = D["n_vectors"],
    templates: str = D["templates"],
    steps: int = D["steps"],
    batch_size: int = D["batch_size"],
    learning_rate: float = D["learning_rate"],
    scale_lr: bool = D["scale_lr"],
    progressive_every: int = D["progressive_every"],
    init_l2: float = D["init_l2"],
    init_l2_schedule: str = D["init_l2_schedule"],
    early_end: float = D["early_end"],
    early_end_window: int = D["early_end_window"],
    init_cos: float = D["init_cos"],
    direction_only: bool = D["direction_only"],
    direction_lr: float = D["direction_lr"],
    vmf_kappa: float = D["vmf_kappa"],
    seed: int = D["seed"],
    checkpoint_every: int = D["checkpoint_every"],
    checkpoint_root: str = CHECKPOINT_ROOT,
    prompt_set: str = D["prompt_set"],
    n_images: int = D["n_images"],
    sampling_steps: int = D["sampling_steps"],
    guidance_scale: float = D["guidance_scale"],
    clip_model: str = D["clip_model"],
    dino_model: str = D["dino_model"],
    checkpoint_budget: int = D["checkpoint_budget"],
    log_every: int = D["log_every"],
    sample_every: int = D["sample_every"],
    compile: str = D["compile"],
    tracking_uri: str = D["tracking_uri"],
    experiment: str = D["experiment"],
    min_reconstruction: float = D["min_reconstruction"],
    min_editability: float = D["min_editability"],
    margin_se: float = D["margin_se"],
    accelerator_type: str = D["accelerator_type"],
    accelerator_limit: str = D["accelerator_limit"],
    gpu_node_selector: dict = D["gpu_node_selector"],
    gpu_tolerations: list = D["gpu_tolerations"],
    gpu_step_cpu_request: str = D["gpu_step_cpu_request"],
    gpu_step_cpu_limit: str = D["gpu_step_cpu_limit"],
    gpu_step_memory_request: str = D["gpu_step_memory_request"],
    gpu_step_memory_limit: str = D["gpu_step_memory_limit"],
    cpu_step_cpu_request: str = D["cpu_step_cpu_request"],
    cpu_step_cpu_limit: str = D["cpu_step_cpu_limit"],
    cpu_step_memory_request: str = D["cpu_step_memory_request"],
    cpu_step_memory_limit: str = D["cpu_step_memory_limit"],
    model_cache_pvc: str = D["model_cache_pvc"],
) -> str:
    """Textual inversion of one concept.

    Args:
        images: s3://bucket/prefix (or a path in the image) of 3-5 photos of the concept.
        token: the new pseudo-word to learn, e.g. <my-cat>; it must not be a word the model knows.
        init_word: one-token word the embedding starts from, e.g. cat (object) or painting (style).
        base_model: Stable Diffusion 1.x/2.x or SDXL: a hub id, an s3:// diffusers folder, a path in the image, or
            toyworld.
        name: registered-model name in MLflow (empty: the token without brackets).
        resolution: side of the square training images (0: the base model's native size: SD 1.x 512, SD 2.x 768,
            SDXL 1024).
        mode: crop (centre-crop photos to a square) or pad (pad with white).
        n_vectors: vectors per token (1 as in the paper; more captures detail, edits less well).
        templates: training prompt templates: object, style, toyworld or a file in the image (empty: the model's).
        steps: optimiser steps (0: the model's profile; SD: 5000 as the paper).
        batch_size: samples per concept per step (paper: 4).
        learning_rate: base learning rate, times batch_size when scale_lr (0: the model's; SD: 0.005 as the paper).
        scale_lr: multiply the learning rate by the batch size, as the paper does.
        progressive_every: add vector k at step k*N (paper: 2000); 0 = all vectors from the start.
        init_l2: weight of an L2 pull toward the initializer embedding (more editable, less faithful).
        init_l2_schedule: constant, decay (init_l2 to 0 over the run) or rise (0 to init_l2).
        early_end: end training once every embedding moved less than this fraction of its norm over
            early_end_window steps (0: off).
        early_end_window: steps over which early_end measures the movement.
        init_cos: weight of a pull toward the initializer's direction (1 - cosine); the norm stays free.
        direction_only: Directional TI (Kim et al., arXiv 2512.13672): hold each vector at the vocabulary's
            mean norm and learn its direction by Riemannian SGD, with a von Mises-Fisher prior.
        direction_lr: with direction_only: radians each vector turns per step.
        vmf_kappa: with direction_only: the prior's pull toward the initializer's direction.
        seed: random seed of training (evaluation draws image j of every prompt with seed j, run after run).
        checkpoint_every: steps between checkpoints, the evaluation picks the best (0: the model's; SD: 500).
        checkpoint_root: s3:// prefix for checkpoints that survive a preempted GPU node; empty = in the artifact.
        prompt_set: evaluation prompts: paper, neti15, dreambench-object, dreambench-live, toyworld ("": the model's).
        n_images: evaluation images per prompt (paper: 64).
        sampling_steps: DDIM steps for evaluation images (0: the model's profile; SD: 50 as the paper).
        guidance_scale: classifier-free guidance for evaluation images (0: the model's profile; SD: 5.0).
        clip_model: CLIP evaluator (auto: the model's profile: toyworld-clip, else openai/clip-vit-base-patch32).
        dino_model: DINO ViT for subject fidelity, e.g. facebook/dino-vits16 (empty: skip).
        checkpoint_budget: evaluation images per prompt for each checkpoint (0: evaluate the final step only).
        log_every: steps between loss/norm reports: a log line, and live metrics in the concept's MLflow run.
        sample_every: steps between sample pictures logged to the concept's MLflow run during training (0: none).
        compile: off; default: torch.compile the UNet; max: the whole step as one graph replayed as CUDA graphs
            (minutes to compile, then fastest: worth it for thousands of steps; docs/benchmarks.md).
        tracking_uri: MLflow tracking URI (empty: MLFLOW_TRACKING_URI of the oneword-config ConfigMap).
        experiment: MLflow experiment.
        min_reconstruction: quality gate: minimum reconstruction to become champion (-1: none).
        min_editability: quality gate: minimum editability to become champion (-1: none).
        margin_se: quality gate: standard errors by which a candidate must beat the champion.
        accelerator_type: GPU resource of the GPU steps, e.g. nvidia.com/gpu.
        accelerator_limit: GPUs per GPU step.
        gpu_node_selector: node selector of the GPU pool (default: nvidia.com/gpu.present=true, the label of NVIDIA's
            GPU feature discovery), e.g. {"cloud.google.com/gke-accelerator": "nvidia-l4"}; {}: none.
        gpu_tolerations: tolerations of the GPU steps, one per taint of the GPU pool (default: any
            nvidia.com/gpu NoSchedule taint); []: none.
        gpu_step_cpu_request: CPUs requested by cache_latents, train and evaluate.
        gpu_step_cpu_limit: CPU limit of the GPU steps.
        gpu_step_memory_request: memory requested by the GPU steps (SD 1.5: ~10 GiB).
        gpu_step_memory_limit: memory limit of the GPU steps.
        cpu_step_cpu_request: CPUs requested by the CPU steps (plan, preflight, preprocess, register, report).
        cpu_step_cpu_limit: CPU limit of the CPU steps.
        cpu_step_memory_request: memory requested by the CPU steps.
        cpu_step_memory_limit: memory limit of the CPU steps.
        model_cache_pvc: PVC shared as Hugging Face cache (at /models) by the steps that load models.

    Returns:
        The registered version, as name/version@alias (" (unchanged)": registered before from the same
        training), or why none was.
    """
    p = dict(locals())
    run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
    # The exit handler says what was registered (read from MLflow: it may read no task's output), and ends the
    # live run training left open where a lost pod kept register from ending it
    done = _cpu_step(c.report_run(batch_id=run_id, images=images, token=token, init_word=init_word, name=name,
                                  tracking_uri=tracking_uri, experiment=experiment), p)
    done.set_caching_options(False)
    with dsl.ExitHandler(done, name="the-concept"):
        plan = _cpu_step(c.plan_concept(images=images, token=token, init_word=init_word, name=name,
                                        n_vectors=n_vectors, templates=templates), p)
        plan.set_caching_options(False)  # it fingerprints the photos: it must look at them every time
        check = _preflight(plan.output, p)
        personalise(concepts=plan.output, batch_id=run_id, on_error="fail",
                    **{k: p[k] for k in SHARED}).after(check).set_caching_options(False)  # (see personalise)
    return done.output


# Shards at a time (ParallelFor's parallelism is fixed at compile time): one train pod each, but a shard's
# cache_latents and evaluate run one pod per concept, so up to PARALLEL_SHARDS x concepts_per_shard GPU pods
PARALLEL_SHARDS = 4


@dsl.pipeline(name="batch-personalisation", description="Textual inversion of every concept of a manifest, in "
              "parallel shards; one concept's failure does not lose the others.")
def batch_personalisation(
    concepts_manifest: str,
    concepts_per_shard: int = D["concepts_per_shard"],
    max_concepts_per_run: int = D["max_concepts_per_run"],
    only_concepts: list = D["only_concepts"],
    bundle: str = D["bundle"],
    base_model: str = DEFAULT_BASE_MODEL,
    resolution: int = RESOLUTION_FROM_PROFILE,
    mode: str = D["mode"],
    steps: int = D["steps"],
    batch_size: int = D["batch_size"],
    learning_rate: float = D["learning_rate"],
    scale_lr: bool = D["scale_lr"],
    progressive_every: int = D["progressive_every"],
    init_l2: float = D["init_l2"],
    init_l2_schedule: str = D["init_l2_schedule"],
    early_end: float = D["early_end"],
    early_end_window: int = D["early_end_window"],
    init_cos: float = D["init_cos"],
    direction_only: bool = D["direction_only"],
    direction_lr: float = D["direction_lr"],
    vmf_kappa: float = D["vmf_kappa"],
    seed: int = D["seed"],
    checkpoint_every: int = D["checkpoint_every"],
    checkpoint_root: str = CHECKPOINT_ROOT,
    prompt_set: str = D["prompt_set"],
    n_images: int = D["n_images"],
    sampling_steps: int = D["sampling_steps"],
    guidance_scale: float = D["guidance_scale"],
    clip_model: str = D["clip_model"],
    dino_model: str = D["dino_model"],
    checkpoint_budget: int = D["checkpoint_budget"],
    log_every: int = D["log_every"],
    sample_every: int = D["sample_every"],
    compile: str = D["compile"],
    tracking_uri: str = D["tracking_uri"],
    experiment: str = D["experiment"],
    min_reconstruction: float = D["min_reconstruction"],
    min_editability: float = D["min_editability"],
    margin_se: float = D["margin_se"],
    accelerator_type: str = D["accelerator_type"],
    accelerator_limit: str = D["accelerator_limit"],
    gpu_node_selector: dict = D["gpu_node_selector"],
    gpu_tolerations: list = D["gpu_tolerations"],
    gpu_step_cpu_request: str = D["gpu_step_cpu_request"],
    gpu_step_cpu_limit: str = D["gpu_step_cpu_limit"],
    gpu_step_memory_request: str = D["gpu_step_memory_request"],
    gpu_step_memory_limit: str = D["gpu_step_memory_limit"],
    cpu_step_cpu_request: str = D["cpu_step_cpu_request"],
    cpu_step_cpu_limit: str = D["cpu_step_cpu_limit"],
    cpu_step_memory_request: str = D["cpu_step_memory_request"],
    cpu_step_memory_limit: str = D["cpu_step_memory_limit"],
    model_cache_pvc: str = D["model_cache_pvc"],
):
    """Batch personalisation: every concept of a manifest, each registered on its own.

    First, on CPU, the plan records the concepts that are unchanged since their newest version, or that a step
    would fail at every attempt, and leaves them out; of the others it takes at most max_concepts_per_run. Each
    shard runs its concepts through the five steps of textual_inversion: preprocess and cache_latents per
    concept, one GPU train task for the shard's concepts together, evaluate and register per concept. A
    concept that fails is recorded with the step and the error, and the others go on. The exit handler writes
    every concept's status.

    Args:
        concepts_manifest: YAML (s3:// URI or path) listing, per concept, images, token and init_word.
        concepts_per_shard: concepts trained together in one GPU job; shards run in parallel (at most 4 at a time).
        max_concepts_per_run: concepts this run trains at most; the others that changed are left to the next runs
            of the manifest, those that waited longest first (0: no limit; above 8, Argo may not keep the run:
            docs/deploy.md).
        only_concepts: names of the manifest's concepts the run is limited to, as a JSON list, e.g. ["my-cat"]
            (empty: all). Such a run is no night of the manifest's schedule: it defers nothing to the schedule's
            runs, and they do not count it.
        bundle: after the run, register a version of this bundle holding the @champion of every concept of the
            manifest on base_model: one server serves them all (docs/deploy.md; empty: none). A concept without
            one is left out; a run that failed leaves the bundle as it was.
        base_model: Stable Diffusion 1.x/2.x or SDXL: a hub id, an s3:// diffusers folder, a path in the image, or
            toyworld.
        resolution: side of the square training images (0: the base model's native size: SD 1.x 512, SD 2.x 768,
            SDXL 1024).
        mode: crop (centre-crop photos to a square) or pad (pad with white).
        steps: optimiser steps (0: the model's profile; SD: 5000 as the paper).
        batch_size: samples per concept per step (paper: 4).
        learning_rate: base learning rate, times batch_size when scale_lr (0: the model's; SD: 0.005 as the paper).
        scale_lr: multiply the learning rate by the batch size, as the paper does.
        progressive_every: add vector k at step k*N (paper: 2000); 0 = all vectors from the start.
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
        seed: random seed of training (evaluation draws image j of every prompt with seed j, run after run).
        checkpoint_every: steps between checkpoints (0: the model's profile; SD: 500).
        checkpoint_root: s3:// prefix for checkpoints that survive a preempted GPU node; empty = in the artifact.
        prompt_set: evaluation prompts: paper, neti15, dreambench-object, dreambench-live, toyworld ("": the model's).
        n_images: evaluation images per prompt (paper: 64).
        sampling_steps: DDIM steps for evaluation images (0: the model's profile; SD: 50 as the paper).
        guidance_scale: classifier-free guidance for evaluation images (0: the model's profile; SD: 5.0).
        clip_model: CLIP evaluator (auto: the model's profile: toyworld-clip, else openai/clip-vit-base-patch32).
        dino_model: DINO ViT for subject fidelity (empty: skip).
        checkpoint_budget: evaluation images per prompt for each checkpoint (0: final step only).
        log_every: steps between loss/norm reports: a log line, and live metrics in the concept's MLflow run.
        sample_every: steps between sample pictures logged to the concept's MLflow run during training (0: none).
        compile: off; default: torch.compile the UNet; max: the whole step as one graph replayed as CUDA graphs
            (minutes to compile, then fastest: worth it for thousands of steps; docs/benchmarks.md).
        tracking_uri: MLflow tracking URI (empty: MLFLOW_TRACKING_URI of the oneword-config ConfigMap).
        experiment: MLflow experiment.
        min_reconstruction: quality gate: minimum reconstruction to become champion (-1: none).
        min_editability: quality gate: minimum editability to become champion (-1: none).
        margin_se: quality gate: standard errors by which a candidate must beat the champion.
        accelerator_type: GPU resource of the GPU steps.
        accelerator_limit: GPUs per GPU step.
        gpu_node_selector: node selector of the GPU pool (default: nvidia.com/gpu.present=true; {}: none).
        gpu_tolerations: tolerations of the GPU steps, one per taint of the GPU pool (default: any
            nvidia.com/gpu NoSchedule taint); []: none.
        gpu_step_cpu_request: CPUs requested by cache_latents, train and evaluate.
        gpu_step_cpu_limit: CPU limit of the GPU steps.
        gpu_step_memory_request: memory requested by the GPU steps (SD 1.5: ~10 GiB).
        gpu_step_memory_limit: memory limit of the GPU steps.
        cpu_step_cpu_request: CPUs requested by the CPU steps (plan, preflight, preprocess, register, report).
        cpu_step_cpu_limit: CPU limit of the CPU steps.
        cpu_step_memory_request: memory requested by the CPU steps.
        cpu_step_memory_limit: memory limit of the CPU steps.
        model_cache_pvc: PVC shared as Hugging Face cache (at /models) by the steps that load models.
    """
    p = dict(locals())
    batch_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
    # The exit handler may read no other task's output, so the plan goes to MLflow and the report reads it there.
    done = _cpu_step(c.report_batch(batch_id=batch_id, tracking_uri=tracking_uri, experiment=experiment), p)
    done.set_caching_options(False)
    with dsl.ExitHandler(done, name="every-concept"):
        plan = _cpu_step(c.plan_batch(
            concepts_manifest=concepts_manifest, batch_id=batch_id, concepts_per_shard=concepts_per_shard,
            max_concepts_per_run=max_concepts_per_run, only_concepts=only_concepts, bundle=bundle,
            base_model=base_model,
            resolution=resolution, mode=mode,
            steps=steps, batch_size=batch_size, learning_rate=learning_rate, scale_lr=scale_lr,
            progressive_every=progressive_every, init_l2=init_l2, init_l2_schedule=init_l2_schedule,
            early_end=early_end, early_end_window=early_end_window, init_cos=init_cos, direction_only=direction_only,
            direction_lr=direction_lr, vmf_kappa=vmf_kappa, seed=seed, checkpoint_every=checkpoint_every,
            log_every=log_every, prompt_set=prompt_set, n_images=n_images, sampling_steps=sampling_steps,
            guidance_scale=guidance_scale, clip_model=clip_model, dino_model=dino_model,
            checkpoint_budget=checkpoint_budget, min_reconstruction=min_reconstruction,
            min_editability=min_editability, margin_se=margin_se, tracking_uri=tracking_uri, experiment=experiment,
            kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, kfp_run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
        ), p)
        # it looks for unchanged concepts as changed_concepts does: the model's tokenizers and text encoders, once
        _with_models(plan, p)
        plan.set_caching_options(False)  # a recurring run must read tonight's manifest, not replay the first one
        # it reads the manifest and records the plan in MLflow: a store that blinks must not cost the night
        _retry(plan, STEP_RETRIES, 60, CPU_STEP_DEADLINE_S)
        check = _preflight([], p)  # shared resources only: one concept's bad photos must not stop the others
        with dsl.ParallelFor(plan.outputs["Output"], parallelism=PARALLEL_SHARDS, name="shards") as shard:
            shards = personalise(concepts=shard, batch_id=batch_id, on_error="record",
                                 **{k: p[k] for k in SHARED}).after(check).set_caching_options(False)
        # after every shard (a concept that failed was recorded, so its shard ended well), inside the exit handler,
        # which reports what it did. Not under a dsl.If: a condition's nodes would cost the Argo workflow of a run
        # that bundles (tests/argo_size.py) more than a pod that ends at once costs a run that does not
        made = _cpu_step(c.bundle_concepts(bundle=bundle, concepts_manifest=concepts_manifest, batch_id=batch_id,
                                           base_model=base_model, tracking_uri=tracking_uri,
                                           experiment=experiment), p).after(shards)
        made.set_caching_options(False)  # it reads the registry's champions, every run
        _retry(made, STEP_RETRIES, 30, CPU_STEP_DEADLINE_S)  # a pod lost with its node


PIPELINES = {"textual_inversion": textual_inversion, "batch_personalisation": batch_personalisation}
