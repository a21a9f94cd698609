"""The pipelines' parameters: where each default comes from.

Every parameter the pipelines and components share with the library takes its default from a config model
(`oneword.config`). KFP parameters cannot be None, so a setting that depends on the model family (`oneword.profiles`)
defaults to 0, "" or "auto", which the components pass on as None: the library then asks the base model's profile.
`oneword run` and `oneword batch` use the same convention.

Component signatures must be literal (KFP ships their source into the pod), so they are checked against this
module rather than written from it: `tests/test_parameters.py`.
"""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

from pydantic import BaseModel

from oneword.config import (
    BatchConfig,
    ClusterConfig,
    ConceptSpec,
    EvalConfig,
    GateThresholds,
    PreprocessConfig,
    TrackingConfig,
    TrainConfig,
)

M = TypeVar("M", bound=BaseModel)

# parameter name -> (config model, field); the parameter names are the pipelines'.
SOURCES: dict[str, tuple[type[BaseModel], str]] = {
    "mode": (PreprocessConfig, "mode"),
    "n_vectors": (ConceptSpec, "n_vectors"),
    "templates": (ConceptSpec, "templates"),
    "steps": (TrainConfig, "steps"),
    "batch_size": (TrainConfig, "batch_size"),
    "learning_rate": (TrainConfig, "learning_rate"),
    "scale_lr": (TrainConfig, "scale_lr"),
    "progressive_every": (TrainConfig, "progressive_every"),
    "init_l2": (TrainConfig, "init_l2"),
    "init_l2_schedule": (TrainConfig, "init_l2_schedule"),
    "early_end": (TrainConfig, "early_end"),
    "early_end_window": (TrainConfig, "early_end_window"),
    "init_cos": (TrainConfig, "init_cos"),
    "direction_only": (TrainConfig, "direction_only"),
    "direction_lr": (TrainConfig, "direction_lr"),
    "vmf_kappa": (TrainConfig, "vmf_kappa"),
    "seed": (TrainConfig, "seed"),
    "checkpoint_every": (TrainConfig, "checkpoint_every"),
    "log_every": (TrainConfig, "log_every"),
    "sample_every": (TrainConfig, "sample_every"),
    "compile": (TrainConfig, "compile"),
    "prompt_set": (EvalConfig, "prompt_set"),
    "n_images": (EvalConfig, "n_images"),
    "sampling_steps": (EvalConfig, "steps"),
    "guidance_scale": (EvalConfig, "guidance_scale"),
    "clip_model": (EvalConfig, "clip_model"),
    "dino_model": (EvalConfig, "dino_model"),
    "checkpoint_budget": (EvalConfig, "checkpoint_budget"),
    "min_reconstruction": (GateThresholds, "min_reconstruction"),
    "min_editability": (GateThresholds, "min_editability"),
    "margin_se": (GateThresholds, "margin_se"),
    "tracking_uri": (TrackingConfig, "tracking_uri"),
    "experiment": (TrackingConfig, "experiment"),
    "concepts_per_shard": (BatchConfig, "concepts_per_shard"),
    "max_concepts_per_run": (BatchConfig, "max_concepts_per_run"),
    "only_concepts": (BatchConfig, "only_concepts"),
    "bundle": (BatchConfig, "bundle"),
    **{name: (ClusterConfig, name) for name in ClusterConfig.model_fields},
}

DEFAULT_BASE_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # the pipelines' (oneword run's: toyworld)
# Where KFP writes the runs' artifacts: oneword's MinIO, given per run (KFP's own kfp-launcher ConfigMap stays as
# it is). The query makes KFP's launcher open the bucket with the pod's AWS_* credentials (oneword-s3) instead of
# kfp-launcher's providers (KFP 2.17 backend/src/v2/config/s3.go); gocloud's s3blob reads these four keys.
PIPELINE_ROOT = (
    "s3://oneword-artifacts/pipeline-root?region=us-east-1&endpoint=http%3A%2F%2Fminio.oneword.svc.cluster.local"
    "%3A9000&use_path_style=true&disable_https=true"
)
LOCAL_PIPELINE_ROOT = "runs/kfp"  # where `oneword run`/`batch` (kfp.local) write each task's artifacts
SERVICE_ACCOUNT = "oneword-pipeline-runner"  # the pods' service account: k8s/base/pipeline-namespace/rbac.yaml
KFP_EXPERIMENT = "oneword"  # the KFP experiment runs are submitted to (MLflow's is TrackingConfig.experiment)
CHECKPOINT_ROOT = "s3://oneword-artifacts/checkpoints"  # the bucket docs/deploy.md makes; outlives a preempted pod
MODEL_CACHE_MOUNT = "/models"  # where model_cache_pvc is mounted; the images' HF_HOME lies inside it
HF_HOME = f"{MODEL_CACHE_MOUNT}/huggingface"
# torch.compile's cache (inductor's FX graphs and Triton kernels) on the same volume: a GPU pod starts with an empty
# /tmp, so every train task compiled from nothing (140 s for SD 1.5 on an H100); with the cache on the volume only
# the first does (on 2 CPU cores, the tiny model's compile max warm-up: 94 s cold, 15 s from the cache)
INDUCTOR_CACHE = f"{MODEL_CACHE_MOUNT}/torchinductor"

# What stands for "unset" (None: the model's profile decides) in a KFP parameter, by the parameter's type.
_UNSET = {int: 0, float: 0.0, str: ""}
_KINDS = {
    "templates": str,
    "steps": int,
    "learning_rate": float,
    "checkpoint_every": int,
    "prompt_set": str,
    "sampling_steps": int,
    "guidance_scale": float,
}
RESOLUTION_FROM_PROFILE = 0  # preprocess's resolution: 0 = the base model's native size


def source_default(name: str) -> Any:
    """The library's default of parameter `name` (None: the model's profile decides)."""
    model, field = SOURCES[name]
    return model.model_fields[field].get_default(call_default_factory=True)


def kfp_default(name: str) -> Any:
    """The default that pipeline or component parameter `name` has."""
    value = source_default(name)
    return _UNSET[_KINDS[name]] if value is None else value


def unset_to_none(value: Any) -> Any:
    """A KFP parameter's value as the library takes it: 0, 0.0 and "" mean unset (None)."""
    return None if not isinstance(value, bool) and value in (0, "") else value


DEFAULTS: dict[str, Any] = {name: kfp_default(name) for name in SOURCES}

# Where a parameter means something else in the pipelines than in the library: checkpoint_every's 0 (there: only
# the last); seed, which reaches training only (evaluation's seeds are fixed, so that runs compare).
PIPELINE_HELP = {
    "checkpoint_every": "steps between checkpoints (0: the model's profile; = steps: only the last)",
    "seed": "seeds training's random draws (evaluation's are fixed: image j of every prompt uses seed j)",
}


def invalid(params: dict[str, Any]) -> list[str]:
    """What is wrong with pipeline parameters by their config fields' own rules (a step count of at least 1, a
    choice among a field's values), one line per parameter: checked before a run starts, not in the step that
    would meet it after the ones before had run. A model-dependent parameter left unset (0, "") is not checked.
    """
    from pydantic import TypeAdapter, ValidationError

    problems = []
    if params.get("resolution", RESOLUTION_FROM_PROFILE) != RESOLUTION_FROM_PROFILE:
        try:
            PreprocessConfig(resolution=params["resolution"])
        except ValidationError as e:
            problems.append(f"resolution={params['resolution']!r}: {e.errors()[0]['msg']}, or "
                            f"{RESOLUTION_FROM_PROFILE}: the model's native size")
    for name, value in params.items():
        if name not in SOURCES:
            continue
        model, field = SOURCES[name]
        info = model.model_fields[field]
        if name in _KINDS and unset_to_none(value) is None:
            continue
        try:
            # the model's own config (no inf or NaN) with the field's rules: a bare field does not carry it
            TypeAdapter(Annotated[info.annotation, info], config=model.model_config).validate_python(value)
        except ValidationError as e:
            unset = {int: 0, float: 0.0, str: '""'}.get(_KINDS.get(name))  # as its help says: the other value it takes
            also = f", or {unset}: the model's profile" if unset is not None else ""
            problems.append(f"{name}={value!r}: {e.errors()[0]['msg']}{also}")
    return problems


def lookup_settings(params: dict[str, Any]):
    """What the lookup of unchanged concepts (`oneword.unchanged.Settings`) is given, from pipeline parameters by
    name: the model, preprocess's resolution and mode, and the configs train, evaluate and register build.

    Raises:
        ValueError: a setting no step takes.
    """
    from oneword.unchanged import Settings

    return Settings(params.get("base_model", ""), config_of(TrainConfig, params), config_of(EvalConfig, params),
                    config_of(GateThresholds, params), unset_to_none(params.get("resolution", RESOLUTION_FROM_PROFILE)),
                    params.get("mode", PreprocessConfig.model_fields["mode"].default))  # fmt: skip


def config_of(model: type[M], params: dict[str, Any], **runtime: Any) -> M:
    """Config `model` (TrainConfig, EvalConfig, GateThresholds) from pipeline parameters, by name (`SOURCES`); a
    model-dependent one left unset (0, "") passes as None, for the model's profile.

    The components build their configs with it (passing `locals()`): the step that looks for unchanged concepts
    before any GPU is asked for then keys exactly the configs that `train` and `evaluate` would use.
    """
    fields = {
        field: unset_to_none(params[name]) if name in _KINDS else params[name]
        for name, (source, field) in SOURCES.items()
        if source is model and name in params
    }
    return model(**fields, **runtime)
