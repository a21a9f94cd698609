"""The MLflow pyfunc model of a registered concept: prompts in, images out.

The version holds the embedding file and oneword's own code (MLflow puts it on the path when it loads the
model); the base model is loaded by reference (its source and fingerprint are in the model config), never
copied into the registry. Its requirements are the packages that loading and predicting import, pinned to the
versions installed where it was registered (the oneword image), so a serving environment built on that image
installs nothing, and one built elsewhere gets the same versions from any index that has them.
"""

from __future__ import annotations

import base64
import io
import math
import shutil
import threading
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow.pyfunc

from oneword.profiles import TOYWORLD, ModelProfile, profile_of

# The distributions that loading and predicting import (tests/test_live_tracking.py checks the list against
# what a load and a prediction do import); mlflow adds itself.
RUNTIME_PACKAGES = (
    "torch",
    "diffusers",
    "transformers",
    "tokenizers",
    "huggingface_hub",
    "safetensors",
    "accelerate",
    "numpy",
    "pandas",
    "pillow",
    "pydantic",
    "pyyaml",
    "requests",
    "tqdm",
    "filelock",
    "minio",
    "boto3",
)


def pip_requirements() -> list[str]:
    """`RUNTIME_PACKAGES` pinned to the installed versions, without a local label such as `+cpu`: no public index
    holds `torch==2.13.0+cpu`, so the environment `mlflow models serve` builds (`--env-manager virtualenv`, its
    default) could not install it, and a GPU server that found it would take a CPU build (MLflow strips such
    labels from the requirements it infers, for the same reasons)."""
    return [f"{name}=={metadata.version(name).split('+')[0]}" for name in RUNTIME_PACKAGES]  # PEP 440: label after +


def code_folder(dst: Path, base_model: str) -> Path:
    """A copy of the oneword package to ship with a model, in `dst`; returns the package folder.

    The toy world's assets stay behind (40 MB), except its model when the concept was trained on it: the
    reference `toyworld` means the model inside the package.
    """
    src = Path(__file__).resolve().parent
    toyworld = src / "data" / TOYWORLD

    def ignore(folder: str, names: list[str]) -> set[str]:
        skip = {n for n in names if n == "__pycache__" or n.endswith(".pyc")}
        if Path(folder) == toyworld.parent and base_model != TOYWORLD:
            skip.add(TOYWORLD)
        elif Path(folder) == toyworld:
            skip.update(n for n in names if n != "model")
        return skip

    return Path(shutil.copytree(src, Path(dst) / "oneword", ignore=ignore))


def input_example(token: str) -> tuple[list[str], dict[str, Any]]:
    """A request that draws one picture of the concept: the prompts, and the sampling options it sets."""
    return [f"A photo of {token}"], {"n": 1, "seed": 0}


def predict_params(profile: ModelProfile) -> dict[str, Any]:
    """The sampling options a request may set, with their defaults: the base model's sampler (its profile)."""
    return {"n": 1, "seed": 0, "steps": profile.sampling_steps, "guidance_scale": profile.guidance_scale}


def signature(profile: ModelProfile):
    """The pyfunc signature: a list of prompts in, one row per image out, sampling options as params."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    defaults = predict_params(profile)

    return ModelSignature(
        inputs=Schema([ColSpec("string")]),  # a list of prompts
        outputs=Schema([ColSpec("string", "prompt"), ColSpec("long", "seed"), ColSpec("string", "png_base64")]),
        params=ParamSchema(
            [
                ParamSpec("n", "long", defaults["n"]),
                ParamSpec("seed", "long", defaults["seed"]),
                ParamSpec("steps", "long", defaults["steps"]),
                ParamSpec("guidance_scale", "double", defaults["guidance_scale"]),
            ]
        ),
    )


class _Pyfunc:
    """`mlflow.pyfunc` as a flavor of `Model.log`, which takes `validate_serving_input`; pyfunc's own save does not."""

    @staticmethod
    def save_model(validate_serving_input: bool = True, **kwargs) -> None:
        mlflow.pyfunc.save_model(**kwargs)


def log_model(
    embeddings: dict[str, Path],
    config: dict[str, Any],
    profile: ModelProfile,
    example_token: str,
    name: str = "concept",
):
    """Log a `ConceptModel` (in the active run) that draws with `embeddings`, its artifacts by key (`embedding`,
    or `embedding:NAME` each for a bundle's members); `config` is its model config (`base_model`,
    `model_fingerprint`); `name` the logged model's (a bundle's: `bundle`). Returns MLflow's `ModelInfo`."""
    import tempfile

    from mlflow.models import Model

    with tempfile.TemporaryDirectory() as code:
        return Model.log(
            artifact_path=None,
            name=name,
            flavor=_Pyfunc,
            flavor_name="pyfunc.CustomPythonModel",  # what mlflow.pyfunc.log_model records
            python_model=ConceptModel(),
            artifacts={key: str(f) for key, f in embeddings.items()},
            model_config=config,
            signature=signature(profile),
            input_example=input_example(example_token),
            # oneword's own code travels with the model; its imports are pinned to what is installed here
            code_paths=[str(code_folder(Path(code), config["base_model"]))],
            pip_requirements=pip_requirements(),
            # MLflow would load the model and predict the example to check it: that loads the base model
            # (gigabytes) in the register step's small CPU pod. The serving tests load and predict instead.
            validate_serving_input=False,  # (mlflow.pyfunc.log_model has no such switch: hence `_Pyfunc`)
        )


def artifact_uris(mlflow_module, model_id: str, flavors: dict) -> dict[str, str]:
    """`{key: URI}` of a logged `ConceptModel`'s embedding artifacts, where pyfunc put them (its MLmodel says:
    files whose names differ only in case go to folders of their own)."""
    root = mlflow_module.get_logged_model(model_id).artifact_location
    return {key: f"{root}/{a['path']}" for key, a in flavors["python_function"]["artifacts"].items()}


def check_copy(mlflow_module, info, key: str, embedding: Path) -> None:
    """Raise unless the logged model `info` holds an intact copy of `embedding` as its artifact `key` (read back
    from the store)."""
    import tempfile

    from oneword.errors import OnewordError
    from oneword.registry import sha256_file

    copy = artifact_uris(mlflow_module, info.model_id, info.flavors)[key]
    with tempfile.TemporaryDirectory() as d:
        try:
            back = Path(mlflow_module.artifacts.download_artifacts(artifact_uri=copy, dst_path=d))
        except Exception as e:  # a missing file and an unreachable store come as whatever the store raises
            raise OnewordError(
                f"the embedding could not be read back from the logged model {info.model_uri}: "
                f"{str(e).splitlines()[0][:300] if str(e) else type(e).__name__}",
                hint="check the artifact store (its endpoint and credentials), then run again",
            ) from e
        if sha256_file(back) != sha256_file(embedding):
            raise OnewordError(
                f"the logged model {info.model_uri} does not hold the embedding {embedding.name} intact",
                hint="check the artifact store, then run again",
            )


MAX_IMAGES_PER_REQUEST = 64  # prompts x n: one request must not hold a serving replica for an hour
# and as many denoising steps as those images take at the model's own sampling steps: more steps per image buy
# fewer images, never a longer hold (a thousand steps were 40 times the default's time, the drawing lock held)


def _prompts(model_input: Any) -> list[str]:
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "columns"):  # a pandas DataFrame
        col = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        cells = model_input[col].tolist()
    else:
        cells = list(model_input)
    # {"prompt": ["a", "b"]} reaches pyfunc as one row holding the list
    listed = lambda c: isinstance(c, list | tuple) or getattr(c, "ndim", 0) > 0  # noqa: E731 - a cell holding a list
    return [str(p) for c in cells for p in (list(c) if listed(c) else [c])]


def _checked(params: dict[str, Any], n_prompts: int, own_steps: int, most_steps: int) -> dict[str, Any]:
    """The request's sampling options, refused (as the client's error, 400) where no picture could come of them,
    or where they would hold the server longer than `MAX_IMAGES_PER_REQUEST` images at the model's `own_steps`;
    `most_steps`: the sampler's limit (the scheduler's training timesteps)."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    n, steps, scale = int(params["n"]), int(params["steps"]), float(params["guidance_scale"])
    work = MAX_IMAGES_PER_REQUEST * own_steps
    problems = [
        (n < 1, "n must be at least 1"),
        (not 1 <= steps <= most_steps, f"steps must be from 1 to {most_steps}"),
        (not math.isfinite(scale), "guidance_scale must be a finite number"),
        (n_prompts == 0, "the request holds no prompt"),
        (n_prompts * n > MAX_IMAGES_PER_REQUEST,
         f"{n_prompts} prompts x n={n} is over {MAX_IMAGES_PER_REQUEST} images a request; send fewer"),
        (n_prompts * n <= MAX_IMAGES_PER_REQUEST and 1 <= steps <= most_steps and n_prompts * n * steps > work,
         f"{n_prompts} prompts x n={n} x steps={steps} is over {work} denoising steps a request "
         f"({MAX_IMAGES_PER_REQUEST} images at the model's {own_steps}); send fewer images or steps"),
    ]  # fmt: skip
    if said := [why for wrong, why in problems if wrong]:
        raise MlflowException("; ".join(said), error_code=INVALID_PARAMETER_VALUE)
    return {**params, "n": n, "steps": steps, "guidance_scale": scale, "seed": int(params["seed"])}


class ConceptModel(mlflow.pyfunc.PythonModel):
    """Generates images of prompts that use the concept's token (a bundle's: any of its members' tokens)."""

    # MLflow would wrap `predict` to validate its input by the method's type hints, and, finding none, advise them
    # (a UserWarning at every import, which no warnings filter quiets: MLflow sets its own around it). The model's
    # signature, given when it is logged, is what checks a request's input.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        from oneword.errors import OnewordError
        from oneword.generate import build_pipeline, load_embeddings
        from oneword.models import load_base_model

        cfg = context.model_config
        model = load_base_model(cfg["base_model"])
        if cfg.get("model_fingerprint") and model.fingerprint != cfg["model_fingerprint"]:
            raise OnewordError(
                f"base model {cfg['base_model']!r} has fingerprint {model.fingerprint[:19]}…, but the concept was "
                f"trained on {cfg['model_fingerprint'][:19]}…",
                hint="point the model config's base_model at the model the concept was trained on",
            )
        self.defaults = predict_params(profile_of(model))
        self.pipe = build_pipeline(model, cfg.get("device", "auto"))
        # a concept's one embedding, or a bundle's members' (`embedding:NAME`), by name
        keys = sorted(k for k in context.artifacts if k == "embedding" or k.startswith("embedding:"))
        self.tokens = load_embeddings(self.pipe, model, [context.artifacts[k] for k in keys])
        # MLflow's scoring server runs each request in a thread of its own; a diffusers pipeline's scheduler keeps
        # the timesteps of its one sampling loop, so two at once would mix them. One GPU draws one batch at a time.
        self.drawing = threading.Lock()

    def predict(self, context, model_input, params: dict | None = None):
        """Draw `n` images per prompt. Returns a DataFrame: prompt, seed, png_base64."""
        import pandas as pd

        from oneword.generate import SamplerConfig, sample

        prompts = _prompts(model_input)
        p = _checked({**self.defaults, **(params or {})}, len(prompts), self.defaults["steps"],
                     self.pipe.scheduler.config.num_train_timesteps)  # fmt: skip
        sampler = SamplerConfig(steps=p["steps"], guidance_scale=p["guidance_scale"])
        with self.drawing:
            images = sample(self.pipe, prompts, p["n"], p["seed"], sampler)
        rows = []
        for prompt, row in zip(prompts, images):
            for j, im in enumerate(row):
                buf = io.BytesIO()
                im.save(buf, format="PNG")
                rows.append(
                    {
                        "prompt": prompt,
                        "seed": int(p["seed"]) + j,
                        "png_base64": base64.b64encode(buf.getvalue()).decode(),
                    }
                )
        return pd.DataFrame(rows, columns=["prompt", "seed", "png_base64"])
