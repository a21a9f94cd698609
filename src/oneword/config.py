"""Every setting's default, with its reason, stated once.

The library's config models live here, free of torch so that the CLI can read them at once. CLI options, KFP
component signatures and pipeline parameters take their defaults and help texts from these models (see
`oneword.cli.options` and `oneword.pipelines.parameters`); `tests/test_parameters.py` proves every surface agrees.
Settings that depend on the model family (resolution, templates, learning rate, steps, sampling) are in
`oneword.profiles`, not here.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

# A registered-model name oneword makes or takes (a concept's, a bundle's): MLflow itself refuses only `/` and `:`,
# but a quote breaks every registry search that names it, and `@` a reference (`NAME@alias`).
REGISTERED_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
NAME_LENGTH = 200

# The settings each model family chooses for itself (`oneword.profiles.ModelProfile` fields), by config field.
MODEL_DEPENDENT_TRAIN = ("steps", "learning_rate", "checkpoint_every")
MODEL_DEPENDENT_EVAL = {
    "prompt_set": "prompt_set",
    "steps": "sampling_steps",
    "guidance_scale": "guidance_scale",
    "clip_model": "clip_model",
}


class PreprocessConfig(BaseModel):
    """How photos become training images."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    resolution: int = Field(
        512, ge=8, multiple_of=8, description="side of the square training images (SD 1.x: 512; a multiple of 8, "
        "as the diffusers pipelines draw)"
    )
    mode: Literal["crop", "pad"] = Field("crop", description="crop (centre-crop to a square) or pad (with white)")


class ConceptSpec(BaseModel):
    """What to learn: a placeholder token, its initializer word and how many vectors it gets."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    token: str = Field(description="the new pseudo-word, e.g. '<my-cat>'")
    init_word: str = Field(description="one-token word the vectors start from, e.g. 'cat'")
    n_vectors: int = Field(1, ge=1, le=75, description="vectors per token (the paper uses 1)")
    templates: str | None = Field(
        None, description="prompt templates: object, style, toyworld or a file (None: the model's profile)"
    )
    learning_rate: float | None = Field(
        None, gt=0, description="this concept's base LR, scaled like TrainConfig's (None: TrainConfig's)"
    )

    @field_validator("token", "init_word")
    @classmethod
    def _one_word(cls, value: str, info) -> str:
        # what no tokenizer is needed to tell; `tokens.check_new_token` and `tokens.initializer_id` say the rest
        # (of "red car", which words to pick)
        example = "'<my-cat>'" if info.field_name == "token" else "'cat'"
        if not value.strip():
            raise ValueError(f"is empty: give one word, e.g. {example}")
        if info.field_name == "token" and any(c.isspace() for c in value):  # an initializer's words are named
            raise ValueError(f"{value!r} is not one word (it holds a space): give one word, e.g. {example}")
        return value

    def resolved(self, profile) -> ConceptSpec:
        """This concept with the templates of `profile` (a `ModelProfile`) when it names none."""
        return self if self.templates else self.model_copy(update={"templates": profile.templates})


class TrainConfig(BaseModel):
    """Optimisation settings. Defaults are the paper's (Sec. 4 and its LDM config), unless noted."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    steps: int | None = Field(None, ge=1, description="optimiser steps (None: the model's profile)")
    batch_size: int = Field(4, ge=1, description="samples per concept per step (paper: 4)")
    learning_rate: float | None = Field(
        None, gt=0, description="base LR, times batch size unless scale_lr is off (None: the model's profile)"
    )
    scale_lr: bool = Field(True, description="multiply the LR by the batch size, as the paper does")
    weight_decay: float = Field(1e-2, ge=0, description="AdamW decay; 0.01 is torch's default the paper used")
    progressive_every: int = Field(0, ge=0, description="add vector k at step k*N (paper: 2000); 0 = all at once")
    init_l2: float = Field(0.0, ge=0, description="weight of an L2 pull toward the initializer embedding")
    init_l2_schedule: Literal["constant", "decay", "rise"] = Field(
        "constant",
        description="how init_l2's weight changes over the run: constant; decay: linearly from init_l2 to 0 (the "
        "schedule of cloneofsimo/lora's norm prior); rise: linearly from 0 to init_l2 (free early, held late)",
    )
    init_cos: float = Field(
        0.0, ge=0, description="weight of a pull toward the initializer's direction (1 - cosine); the norm stays free"
    )
    direction_only: bool = Field(
        False,
        description="Directional TI (Kim et al., arXiv 2512.13672): hold each vector at the vocabulary's mean norm "
        "and learn its direction by Riemannian SGD, with a von Mises-Fisher prior toward the initializer "
        "(direction_lr replaces the learning rate, a concept's own one too)",
    )
    direction_lr: float = Field(
        0.01, gt=0, description="with direction_only: radians each vector turns per step (DTI's code default)"
    )
    vmf_kappa: float = Field(
        1e-4, ge=0, description="with direction_only: the prior's pull toward the initializer (DTI's code default)"
    )
    flip_p: float = Field(0.5, ge=0, le=1, description="probability of the mirrored image (paper: 0.5)")
    seed: int = Field(0, description="seeds every random draw; CPU runs reproduce bit for bit")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 on GPUs of compute capability 8.0+, fp16 (loss-scaled) on 7.x, else fp32"
    )
    compile: Literal["off", "default", "max"] = Field(
        "off",
        description="off; default: torch.compile the UNet; max: compile text encoders, UNet and loss as one graph "
        "with no host sync, replayed as CUDA graphs on a GPU (minutes to compile; fastest after)",
    )
    gradient_checkpointing: bool = Field(False, description="recompute UNet activations: less memory, slower")
    gpus: int = Field(
        0,
        ge=0,
        description="processes to train over, one per GPU, each taking a share of every step's batch (whole "
        "concepts when several train together); 0: every visible GPU (1 on a CPU). Any count resumes any other's "
        "checkpoints",
    )
    checkpoint_every: int | None = Field(
        None, ge=0, description="steps between checkpoints; 0 = only the last (None: the model's profile)"
    )
    early_end: float = Field(
        0.0,
        ge=0,
        description="end the run once every concept's vectors moved less than this fraction of their norm over the "
        "last early_end_window steps: the embedding has settled (0: off, the default until its saving is shown "
        "at equal quality)",
    )
    early_end_window: int = Field(
        100, ge=1, description="steps over which early_end measures how far the vectors still move"
    )
    log_every: int = Field(
        10, ge=1, description="steps between loss/norm reports (log line, live MLflow metrics) and NaN checks"
    )
    sample_every: int = Field(
        500,
        ge=0,
        description="steps between sample pictures logged to the live MLflow run (ten in a paper-length run of "
        "5000 steps, a few seconds each on a GPU); 0 = none",
    )
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1, ...")

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_flag(cls, v):
        # configs and checkpoints written when this was an on/off flag
        return {True: "default", False: "off"}.get(v, v) if isinstance(v, bool) else v

    def resolved(self, profile) -> TrainConfig:
        """These settings with the unset model-dependent ones taken from `profile` (a `ModelProfile`)."""
        unset = {k: getattr(profile, k) for k in MODEL_DEPENDENT_TRAIN if getattr(self, k) is None}
        return self.model_copy(update=unset) if unset else self

    @property
    def lr(self) -> float:
        """The learning rate actually used."""
        return self.lr_for(None)

    def lr_for(self, concept: ConceptSpec | None) -> float:
        """The learning rate a concept trains with: its own base LR if it has one, scaled the same way."""
        base = (
            concept.learning_rate if concept is not None and concept.learning_rate is not None else self.learning_rate
        )
        if base is None:
            raise ValueError("learning_rate is unset: resolve the config with the model's profile first")
        return base * (self.batch_size if self.scale_lr else 1)


class EvalConfig(BaseModel):
    """Evaluation settings. The sampler and evaluator depend on the model (`oneword.profiles`); eta 0 as the paper."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    prompt_set: str | None = Field(
        None,
        description="paper, neti15, dreambench-object, dreambench-live, toyworld or a file (None: the model's profile)",
    )
    n_images: int = Field(64, ge=1, description="images per prompt (the paper: 64)")
    steps: int | None = Field(None, ge=1, description="DDIM steps (None: the model's profile)")
    guidance_scale: float | None = Field(
        None, ge=0, description="classifier-free guidance (None: the model's profile)"
    )
    eta: float = Field(0.0, description="DDIM eta")
    seed: int = Field(0, description="image j of every prompt uses seed + j")
    clip_model: str = Field("auto", description="CLIP evaluator (auto: the model's profile)")
    dino_model: str = Field("", description="DINO ViT for subject fidelity, e.g. facebook/dino-vits16; empty = skip")
    checkpoint_budget: int = Field(
        8, ge=0, description="images per prompt when scoring each checkpoint; 0 = score the final step only"
    )
    selection_tolerance: float = Field(
        0.02, ge=0, description="scores this close count as equal in selection (so do scores within 2 standard errors)"
    )
    # latest-editable met the toy world's targets on 8 of 12 concept x seed runs against 5 for balanced (mean
    # oracle editability 0.86 against 0.79), docs/toyworld-quality.md
    selection_rule: Literal["balanced", "latest-editable"] = Field(
        "latest-editable",
        description="latest-editable: the latest of the best-reconstructing checkpoints whose editability equals the "
        "most editable's; balanced: the most editable of them",
    )
    baselines: bool = Field(True, description="compute the image-only and prompt-only reference points")
    grid_seeds: int = Field(8, ge=1, description="columns of the sample grid")
    batch_size: int = Field(32, ge=1, description="images per sampling call")
    device: str = Field("auto", description="auto, cpu, cuda, ...")
    gpus: int = Field(
        0,
        ge=0,
        description="processes to sample over, one per GPU, each drawing a share of the images (the same images "
        "as one process: each has its own seed); 0: every visible GPU (1 on a CPU)",
    )

    def resolved(self, profile) -> EvalConfig:
        """These settings with the unset model-dependent ones taken from `profile` (a `ModelProfile`)."""
        unset = {k: getattr(profile, v) for k, v in MODEL_DEPENDENT_EVAL.items() if getattr(self, k) in (None, "auto")}
        return self.model_copy(update=unset) if unset else self


class GenerateConfig(BaseModel):
    """Drawing with learned concepts (`oneword generate`); steps and guidance unset are the model's profile's."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    n: int = Field(4, ge=1, description="images per prompt")
    seed: int = Field(0, description="seed of the first image of each prompt (image j: seed + j)")
    steps: int | None = Field(None, ge=1, description="DDIM steps (None: the model's profile)")
    guidance_scale: float | None = Field(
        None, ge=0, description="classifier-free guidance (None: the model's profile)"
    )
    device: str = Field("auto", description="auto, cpu, cuda, ...")


class GateThresholds(BaseModel):
    """Minimum scores a version needs before it may become champion (-1, the lowest cosine, disables one)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    min_reconstruction: float = Field(-1.0, ge=-1, le=1, description="quality gate: least reconstruction (-1: off)")
    min_editability: float = Field(-1.0, ge=-1, le=1, description="quality gate: least editability (-1: off)")
    margin_se: float = Field(
        1.0,
        ge=0,
        description="quality gate: standard errors (of the two scores' difference) by which a candidate must beat "
        "the champion; a smaller lead is noise",
    )


class TrackingConfig(BaseModel):
    """Where runs and concepts are recorded."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    tracking_uri: str = Field(
        "",
        description="MLflow URI, or a SQLite file's path (empty: $MLFLOW_TRACKING_URI, else ./mlflow.db)",
    )
    experiment: str = Field("oneword", description="MLflow experiment")
    # a catalogue retrained for months holds every candidate its gate ever judged; the newest version is what
    # the next run compares with, the two before it what a person looks at to see a concept's trend
    keep_versions: int = Field(3, ge=1, description="newest versions `concepts prune` keeps per concept")


class BatchConfig(BaseModel):
    """How a batch is split into GPU jobs, and into runs."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    concepts_per_shard: int = Field(
        1, ge=1, description="concepts trained together in one GPU job (more: faster per concept, see bench)"
    )
    # Argo keeps a run's node statuses in its one Workflow object: at most 1 MiB with them compressed, unless the
    # workflow controller offloads them to a database, which KFP's own manifests do not set up (the run then ends
    # "workflow is longer than maximum allowed size"; kubeflow/pipelines#4170, #13738). Every task of a concept
    # that trains adds nodes holding its component spec and code: a model of the compiled batch spec's statuses
    # (tests/argo_size.py) gives about 350 KiB for the spec and 63 KiB per concept that trains with KFP 2.17's
    # retry nodes (31 without), so 8 concepts come to 0.8 MiB and 12 past 1 MiB (docs/deploy.md, "How many
    # concepts in one run"): an estimate, not measured on a cluster. Unchanged concepts add nothing: the plan
    # leaves them out. `oneword batch` (kfp.local, no Argo) takes no limit.
    max_concepts_per_run: int = Field(
        8, ge=0, description="concepts one cluster run trains at most; the others that changed wait for the next "
        "runs of the manifest, those that waited longest first (0: no limit)"
    )
    # A run of a few of the manifest's concepts: `oneword submit --concepts-manifest` splits a manifest that one run
    # cannot carry into runs of this; a person retrains one concept from the dashboard without editing the manifest.
    only_concepts: list[str] = Field(
        default_factory=list, description="names of the manifest's concepts the run is limited to (empty: all)"
    )
    # A team serves its manifest from one server (a bundle: `oneword.bundles`); the run that changed a champion is
    # the one to refresh it, so a schedule needs no second job that might run before the concepts are registered.
    bundle: str = Field(
        "", pattern=rf"^({REGISTERED_NAME})?$", max_length=NAME_LENGTH,
        description="after the run, register a version of this bundle holding the @champion of every concept of "
        "the manifest: one server for them all (empty: none)",
    )


TOLERATION_FIELDS = ("key", "operator", "value", "effect", "tolerationSeconds")


def _kubernetes_tolerations(tolerations: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Refuse what Kubernetes would refuse, or read otherwise than meant: KFP's driver decodes the JSON leniently,
    so a misspelt field was dropped (a toleration without `key` and `operator: Exists` tolerates every taint)."""
    for t in tolerations:
        if unknown := sorted(set(t) - set(TOLERATION_FIELDS)):
            raise ValueError(f"toleration {t}: {', '.join(unknown)} is not a toleration's field (its fields: "
                             f"{', '.join(TOLERATION_FIELDS)})")  # fmt: skip
        operator, effect = t.get("operator", "Equal"), t.get("effect", "")
        if operator not in ("Equal", "Exists"):
            raise ValueError(f"toleration {t}: operator is Equal or Exists")
        if effect not in ("", "NoSchedule", "PreferNoSchedule", "NoExecute"):
            raise ValueError(f"toleration {t}: effect is NoSchedule, PreferNoSchedule or NoExecute (none: all)")
        if operator == "Exists" and t.get("value"):
            raise ValueError(f"toleration {t}: an Exists toleration takes no value")
        if operator == "Equal" and not t.get("key"):
            raise ValueError(f"toleration {t}: an Equal toleration needs a key (Exists without one tolerates all)")
        if "tolerationSeconds" in t and (effect != "NoExecute" or type(t["tolerationSeconds"]) is not int):
            raise ValueError(f"toleration {t}: tolerationSeconds is a whole number, with effect NoExecute only")
        if any(not isinstance(t[k], str) for k in t if k != "tolerationSeconds"):
            raise ValueError(f"toleration {t}: its fields but tolerationSeconds are strings")
    return tolerations


class ClusterConfig(BaseModel):
    """Where and with what the pipelines' steps run on Kubernetes (`kfp.local` ignores all of it).

    The defaults fit SD 1.5 at 512 px on a common GPU node (8 vCPUs, 32 GiB, one 24 GB GPU): its weights load in
    fp32 (about 5 GB in memory before the UNet is cast) and evaluation holds the pipeline and a CLIP beside them.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    accelerator_type: str = Field("nvidia.com/gpu", description="GPU resource of the GPU steps, e.g. nvidia.com/gpu")
    # A string: KFP's driver reads a pod's resource fields from string parameters only (a number reads as "", and the
    # pod would ask for no GPU at all), as its own example pipelines declare them.
    accelerator_limit: str = Field("1", pattern=r"^[1-9][0-9]*$", description="GPUs per GPU step")
    gpu_node_selector: dict[str, str] = Field(
        default_factory=lambda: {"nvidia.com/gpu.present": "true"},
        description="node selector of the GPU steps (default: the label NVIDIA's GPU feature discovery puts on "
        'every GPU node; or your cloud\'s, e.g. {"cloud.google.com/gke-accelerator": "nvidia-l4"}; {}: none)',
    )
    # A list: a pool often has a second taint (a dedicated team's, a spot pool's), each needing its own. Values
    # as given, typed by the check: what is checked is what KFP sends (a JSON true would pass as 1).
    gpu_tolerations: Annotated[list[dict[str, Any]], AfterValidator(_kubernetes_tolerations)] = Field(
        default_factory=lambda: [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        description="tolerations of the GPU steps, one per taint of the GPU pool (default: any nvidia.com/gpu "
        'NoSchedule taint, GKE\'s included; add e.g. {"key": "dedicated", "operator": "Equal", "value": "ml", '
        '"effect": "NoSchedule"}; []: none)',
    )
    gpu_step_cpu_request: str = Field("4", description="CPUs requested by cache_latents, train and evaluate")
    gpu_step_cpu_limit: str = Field("8", description="CPU limit of the GPU steps")
    gpu_step_memory_request: str = Field("16Gi", description="memory requested by the GPU steps (SD 1.5: ~10 GiB)")
    gpu_step_memory_limit: str = Field("24Gi", description="memory limit of the GPU steps")
    cpu_step_cpu_request: str = Field("500m", description="CPUs requested by the CPU steps (plan, preprocess, ...)")
    cpu_step_cpu_limit: str = Field("2", description="CPU limit of the CPU steps")
    cpu_step_memory_request: str = Field("1Gi", description="memory requested by the CPU steps")
    cpu_step_memory_limit: str = Field("4Gi", description="memory limit of the CPU steps (register loads torch)")
    model_cache_pvc: str = Field(
        "oneword-model-cache",
        description="PVC (ReadWriteMany) the model-loading steps share as Hugging Face cache at /models: each "
        "model is downloaded once per cluster (k8s/ makes it)",
    )
