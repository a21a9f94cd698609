"""Model profiles: the settings that depend on the model family, one profile per family.

A profile says, for the toy world, SD 1.x, SD 2.x and SDXL, the native resolution, the training templates and
recipe (learning rate, steps, checkpoint spacing), the sampler (steps, guidance), the evaluation prompts and the
CLIP evaluator. `oneword run`, `batch`, `demo`, `train`, `evaluate` and the pipelines ask the profile for every
setting the user leaves unset; nothing else in oneword compares a model's name.

SD 1.x, 2.x and SDXL use the paper's recipe (Gal et al. 2022, Sec. 4: 5,000 steps, base LR 5e-3 scaled by the batch;
the evaluation: 50 DDIM steps, guidance 5.0) at their native resolution. `TrainConfig` and `EvalConfig` leave
these settings unset (None) and take them from here (`TrainConfig.resolved(profile)`).
The toy world's recipe was tuned by `oneword toyworld quality` (see `oneword.toyworld.quality`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from oneword.config import PreprocessConfig
from oneword.errors import OnewordError
from oneword.model_files import has_part
from oneword.toyworld import assets

log = logging.getLogger(__name__)

TOYWORLD, TOYWORLD_CLIP = assets.NAME, assets.CLIP_NAME
DEFAULT_CLIP = "openai/clip-vit-base-patch32"  # the evaluator the paper used


class ModelProfile(BaseModel):
    """The settings one model family trains and evaluates with, unless the user says otherwise."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    family: str = Field(description="toyworld, sd1, sd2, sdxl")
    resolution: int = Field(description="native image side in pixels")
    templates: str = Field(description="training prompt templates")
    learning_rate: float = Field(description="base learning rate (times the batch size)")
    steps: int = Field(description="optimiser steps")
    checkpoint_every: int = Field(description="steps between checkpoints (evaluation picks the best one)")
    prompt_set: str = Field(description="evaluation prompts")
    sampling_steps: int = Field(description="DDIM steps of evaluation images")
    guidance_scale: float = Field(description="classifier-free guidance of evaluation images")
    clip_model: str = Field(description="CLIP evaluator")


def _paper(family: str, resolution: int) -> ModelProfile:
    """The paper's recipe (Sec. 4 and its LDM code) at a family's native resolution."""
    return ModelProfile(
        family=family,
        resolution=resolution,
        templates="object",
        learning_rate=5e-3,  # the paper's base rate, scaled by the batch as its code does (times 4: 0.02)
        steps=5000,
        checkpoint_every=500,  # ten checkpoints for the evaluation to choose from
        prompt_set="paper",
        sampling_steps=50,
        guidance_scale=5.0,
        clip_model=DEFAULT_CLIP,
    )


PROFILES: dict[str, ModelProfile] = {
    # The world is simple and its 96-wide embeddings small: at the paper's 5e-3 the token soon absorbs the
    # context and edits fail; 1e-3 for 400 steps meets the quality targets (oneword toyworld quality).
    TOYWORLD: ModelProfile(
        family=TOYWORLD,
        resolution=32,
        templates=TOYWORLD,  # its text encoder knows only the words of its captions
        learning_rate=1e-3,
        steps=400,
        checkpoint_every=50,
        prompt_set=TOYWORLD,
        sampling_steps=25,
        guidance_scale=4.0,
        clip_model=TOYWORLD_CLIP,
    ),
    "sd1": _paper("sd1", PreprocessConfig().resolution),
    "sd2": _paper("sd2", 768),  # SD 2.x at 768 px, v-prediction (the 512 px "base" models read 512 from config)
    "sdxl": _paper("sdxl", 1024),
}
FAMILY_BY_WIDTH = {768: "sd1", 1024: "sd2"}  # the text encoder's width: CLIP ViT-L (SD 1.x), OpenCLIP ViT-H (SD 2.x)
DEFAULT_FAMILY = "sd1"  # what a hub id resolves to when its config cannot be read (no hub access)


def profile(base_model: str, strict: bool = False) -> ModelProfile:
    """The profile of a base model reference (`toyworld`, a diffusers folder, `s3://...`, a hub id).

    The family and native resolution come from the model's own config files (text encoder width, a second text
    encoder, UNet sample size and VAE depth), so a fine-tune of SD 2.1 gets SD 2's profile whatever its name.
    Where they cannot be read (a hub id without the hub), the sd1 profile; `strict`: an error instead (a person
    who asked for this model's profile).
    """
    if base_model == TOYWORLD:
        return PROFILES[TOYWORLD]
    if (single := _single_file(base_model)) is not None:
        # a single-file checkpoint has no config files; its tensor names tell SDXL from SD 1.x/2.x
        from oneword.models import single_file_family

        return PROFILES[single_file_family(single)]
    configs = _read_configs(base_model)
    if configs is None:
        if strict:
            raise OnewordError(
                f"could not read the config files of base model {base_model!r}",
                hint="pass a diffusers folder, an s3:// folder, or a hub id where the hub (or its cache) is reachable",
            )
        log.info("could not read %s's config; using the %s profile", base_model, DEFAULT_FAMILY)
        return PROFILES[DEFAULT_FAMILY]
    family, resolution = _family_and_resolution(configs)
    return PROFILES.get(family, PROFILES[DEFAULT_FAMILY]).model_copy(update={"resolution": resolution})


def image_side(base_model: str, resolution: int | None) -> int:
    """The training image side: `resolution` if set (not 0/None), else the base model's native size."""
    if resolution:
        return resolution
    return profile(base_model).resolution if base_model else PreprocessConfig().resolution


def profile_of(model) -> ModelProfile:
    """The profile of a loaded model (`oneword.models.LoadedModel`)."""
    if model.source == TOYWORLD:
        return PROFILES[TOYWORLD]
    p = PROFILES.get(model.family, PROFILES[DEFAULT_FAMILY])
    # the family is the loaded model's own; the native size is in its configs: its folder's, else (a hub id, held
    # in the hub's cache) the hub's, as `profile` reads them (SD 2's 512 px "base" models are not 768 px)
    if model.path is not None and Path(model.path).is_file():  # a single file: its family's (diffusers' too)
        return p
    configs = _read_folder(Path(model.path)) if model.path is not None else _read_configs(model.source)
    if configs is not None:
        p = p.model_copy(update={"resolution": _family_and_resolution(configs)[1]})
    return p


_CONFIG_FILES = {
    "index": "model_index.json",
    "text_encoder": "text_encoder/config.json",
    "unet": "unet/config.json",
    "vae": "vae/config.json",
}


def _read_folder(folder: Path) -> dict | None:
    files = {k: folder / v for k, v in _CONFIG_FILES.items()}
    if not all(f.is_file() for f in files.values()):
        return None
    return {k: json.loads(f.read_text()) for k, f in files.items()}


def _single_file(base_model: str) -> Path | None:
    """The file of a single-file checkpoint reference (`.safetensors`/`.ckpt` on this machine), else None."""
    from oneword import storage
    from oneword.models import resolve

    if storage.is_s3(base_model):
        return None
    where = Path(resolve(base_model))
    return where if where.is_file() else None


def _read_configs(base_model: str) -> dict | None:
    """The four small config files of a model reference, without loading or downloading the model itself."""
    import tempfile

    from oneword import hub, storage
    from oneword.models import resolve

    if storage.is_s3(base_model):
        with tempfile.TemporaryDirectory() as tmp:
            try:
                for f in _CONFIG_FILES.values():
                    storage.download_file(f"{base_model.rstrip('/')}/{f}", Path(tmp) / f)
            except Exception:  # not there or not reachable: the loader will say which
                return None
            return _read_folder(Path(tmp))
    where = resolve(base_model)
    if Path(where).is_dir():
        return _read_folder(Path(where))
    if Path(where).exists():
        return None  # a single-file checkpoint: its family is read when it is loaded
    files = {k: hub.small_file(where, f) for k, f in _CONFIG_FILES.items()}  # a hub id
    return None if None in files.values() else {k: json.loads(f.read_text()) for k, f in files.items()}


def _family_and_resolution(configs: dict) -> tuple[str, int]:
    width = configs["text_encoder"].get("hidden_size", 768)
    family = "sdxl" if has_part(configs["index"], "text_encoder_2") else FAMILY_BY_WIDTH.get(width, DEFAULT_FAMILY)
    return family, int(configs["unet"]["sample_size"] * vae_factor_of(configs["vae"]))


def vae_factor_of(vae_config: dict) -> int:
    """How many pixels a side one latent covers: the VAE halves the picture once per block after the first."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def vae_config(base_model: str) -> dict | None:
    """A model reference's VAE config, read alone (None for a single-file checkpoint, or where it cannot be read)."""
    configs = _read_configs(base_model)
    return None if configs is None else configs["vae"]


def vae_factor(base_model: str) -> int:
    """`vae_factor_of` a model reference's VAE, read from its config alone (8, every Stable Diffusion family's,
    for a single-file checkpoint, whose configs are read only when it loads)."""
    configs = _read_configs(base_model)
    return 8 if configs is None else vae_factor_of(configs["vae"])
