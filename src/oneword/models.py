"""Base models: find, load, identify and fingerprint a Stable Diffusion 1.x/2.x model.

A base model is given as one of:
- `toyworld`: the small model oneword ships (see `oneword.toyworld`);
- a local diffusers folder (with `model_index.json`);
- an `s3://bucket/prefix` diffusers folder, downloaded once into the cache;
- a single-file checkpoint (`.safetensors`/`.ckpt`), converted by diffusers' `from_single_file`;
- a hub id such as `stable-diffusion-v1-5/stable-diffusion-v1-5` (needs hub access).

The model is frozen: oneword never changes its weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import CLIPTextModel, CLIPTokenizer

from oneword import storage
from oneword.errors import OnewordError
from oneword.profiles import FAMILY_BY_WIDTH
from oneword.toyworld import assets

log = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


@dataclass
class LoadedModel:
    """The parts of a loaded Stable Diffusion model that textual inversion uses.

    `vae` and `unet` may be None when a step does not need them (training from cached latents needs no VAE).
    """

    source: str
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    unet: torch.nn.Module | None
    vae: torch.nn.Module | None
    scheduler_config: dict
    family: str
    width: int
    fingerprint: str
    path: Path | None = None

    @property
    def prediction_type(self) -> str:
        """`epsilon` or `v_prediction`, from the scheduler config."""
        return self.scheduler_config.get("prediction_type", "epsilon")


def resolve(source: str) -> str:
    """Turn a base-model reference into something diffusers can load: a local path or a hub id.

    Args:
        source: `toyworld`, a local folder or single file, an `s3://` prefix or a hub id.

    Returns:
        A local folder or file path, or the hub id unchanged.
    """
    if source == assets.NAME:
        p = assets.model_path()
        if not (p / "model_index.json").exists():
            raise OnewordError(
                f"the toy-world model is missing from the package ({p})",
                hint="reinstall oneword, or train it with `oneword toyworld train`",
            )
        return str(p)
    if storage.is_s3(source):
        return str(storage.download_prefix(source))
    p = Path(source).expanduser()
    if p.exists():
        if p.is_dir() and not (p / "model_index.json").exists() and not (p / "unet").is_dir():
            raise OnewordError(
                f"{p} is a folder but not a diffusers model (no model_index.json)",
                hint="pass the folder that holds model_index.json, tokenizer/, text_encoder/, unet/, vae/",
            )
        return str(p)
    looks_like_path = source.startswith((".", "/", "~")) or source.endswith(SINGLE_FILE_SUFFIXES)
    if looks_like_path or source.count("/") != 1:
        raise OnewordError(
            f"base model {source!r} not found: it is not a local folder or file, an s3:// URI or a hub id",
            hint="pass a diffusers folder, a .safetensors checkpoint, s3://BUCKET/PREFIX, "
            "a hub id like stable-diffusion-v1-5/stable-diffusion-v1-5, or `toyworld`",
        )
    return source  # a hub id


def detect_family(text_encoder_config, model_index: dict | None) -> tuple[str, int]:
    """Return `(family, width)`: sd1 (width 768), sd2 (1024), sdxl, or custom for other widths."""
    if model_index and "text_encoder_2" in model_index:
        return "sdxl", text_encoder_config.hidden_size
    width = text_encoder_config.hidden_size
    return FAMILY_BY_WIDTH.get(width, "custom"), width


def fingerprint(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, unet_config: dict | None) -> str:
    """A stable sha256 of what a learned embedding depends on.

    It covers the tokenizer's vocabulary, the text encoder's token-embedding table (rounded to fp16, so fp32
    and fp16 copies of one model agree) and the UNet config.

    Returns:
        `sha256:` followed by 64 hex digits.
    """
    h = hashlib.sha256()
    vocab = tokenizer.get_vocab()
    base = {t: i for t, i in vocab.items() if t not in tokenizer.get_added_vocab()}
    h.update(json.dumps(base, sort_keys=True, ensure_ascii=False).encode())
    table = text_encoder.get_input_embeddings().weight.detach()
    h.update(table[: len(base)].to("cpu", torch.float16).contiguous().numpy().tobytes())
    h.update(json.dumps(_config_dict(unet_config), sort_keys=True, default=str).encode())
    return "sha256:" + h.hexdigest()


def module_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over a module's config and weights (fp16-rounded); used to key the VAE latent cache."""
    h = hashlib.sha256()
    h.update(json.dumps(_config_dict(getattr(module, "config", None)), sort_keys=True, default=str).encode())
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float16).contiguous().numpy().tobytes())
    return "sha256:" + h.hexdigest()


_VOLATILE_CONFIG_KEYS = {"transformers_version", "torch_dtype", "dtype", "architectures"}


def _config_dict(cfg) -> dict:
    """A model config as a plain dict, without keys that change with library version, path or dtype."""
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg or {})
    return {k: v for k, v in d.items() if not k.startswith("_") and k not in _VOLATILE_CONFIG_KEYS}


def _read_model_index(path: str) -> dict | None:
    p = Path(path) / "model_index.json"
    return json.loads(p.read_text()) if p.exists() else None


def load_base_model(
    source: str,
    *,
    parts: tuple[str, ...] = ("unet", "vae"),
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    model_config: str | None = None,
) -> LoadedModel:
    """Load a Stable Diffusion 1.x/2.x model's tokenizer, text encoder and (optionally) UNet and VAE.

    Args:
        source: see the module docstring.
        parts: which of "unet" and "vae" to load besides the tokenizer and text encoder.
        device: where to put the modules.
        dtype: weight dtype of the UNet and VAE (the text encoder stays fp32 for exact embedding lookups).
        model_config: for a single-file checkpoint, a diffusers folder or hub id with its configs.

    Returns:
        A `LoadedModel`, every module frozen and in eval mode.
    """
    resolved = resolve(source)
    if resolved.endswith(SINGLE_FILE_SUFFIXES) and Path(resolved).is_file():
        return _load_single_file(source, resolved, parts, device, dtype, model_config)
    from diffusers import AutoencoderKL, UNet2DConditionModel

    is_local = Path(resolved).exists()
    kw = {"local_files_only": True} if is_local else {}
    try:
        tokenizer = CLIPTokenizer.from_pretrained(resolved, subfolder="tokenizer", **kw)
        text_encoder = CLIPTextModel.from_pretrained(resolved, subfolder="text_encoder", dtype=torch.float32, **kw)
        unet = (
            UNet2DConditionModel.from_pretrained(resolved, subfolder="unet", torch_dtype=dtype, **kw)
            if "unet" in parts
            else None
        )
        unet_config = unet.config if unet is not None else _load_json(resolved, "unet/config.json", kw)
        vae = (
            AutoencoderKL.from_pretrained(resolved, subfolder="vae", torch_dtype=dtype, **kw)
            if "vae" in parts
            else None
        )
        scheduler_config = _load_json(resolved, "scheduler/scheduler_config.json", kw)
    except OSError as e:
        raise OnewordError(
            f"could not load base model {source!r}: {e}",
            hint="check the path or hub id; hub ids need network access and, for gated models, HF_TOKEN",
        ) from e
    model_index = _read_model_index(resolved) if is_local else None
    return _finish(
        source,
        tokenizer,
        text_encoder,
        unet,
        vae,
        scheduler_config,
        unet_config,
        model_index,
        device,
        Path(resolved) if is_local else None,
    )


def _load_json(resolved: str, rel: str, kw: dict) -> dict:
    if Path(resolved).exists():
        p = Path(resolved) / rel
        if not p.exists():
            raise OSError(f"{p} is missing")
        return json.loads(p.read_text())
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(resolved, rel, **kw)).read_text())


def _load_single_file(source, path, parts, device, dtype, model_config) -> LoadedModel:
    from diffusers import StableDiffusionPipeline

    kw = {"config": model_config} if model_config else {}
    try:
        pipe = StableDiffusionPipeline.from_single_file(
            path, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False, **kw
        )
    except Exception as e:  # diffusers raises several types here
        raise OnewordError(
            f"could not load single-file checkpoint {path}: {e}",
            hint="pass --model-config with a diffusers folder or hub id holding the model's configs",
        ) from e
    text_encoder = pipe.text_encoder.float()
    return _finish(
        source,
        pipe.tokenizer,
        text_encoder,
        pipe.unet if "unet" in parts else None,
        pipe.vae if "vae" in parts else None,
        dict(pipe.scheduler.config),
        dict(pipe.unet.config),
        None,
        device,
        Path(path),
    )


def _finish(
    source, tokenizer, text_encoder, unet, vae, scheduler_config, unet_config, model_index, device, path
) -> LoadedModel:
    family, width = detect_family(text_encoder.config, model_index)
    if family == "sdxl":
        raise OnewordError(
            f"{source!r} is an SDXL model; training on SDXL is not supported yet",
            hint="use a Stable Diffusion 1.x or 2.x model",
        )
    for m in (text_encoder, unet, vae):
        if m is not None:
            m.requires_grad_(False).eval().to(device)
    return LoadedModel(
        source=source,
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        unet=unet,
        vae=vae,
        scheduler_config=dict(scheduler_config),
        family=family,
        width=width,
        fingerprint=cached_fingerprint(tokenizer, text_encoder, dict(unet_config), path),
        path=path,
    )


_FINGERPRINTS: dict[tuple[str, int], str] = {}


def cached_fingerprint(tokenizer, text_encoder, unet_config: dict, path: Path | None) -> str:
    """`fingerprint`, memoised per local model folder (by its path and modification time)."""
    if path is None:
        return fingerprint(tokenizer, text_encoder, unet_config)
    key = (str(path.resolve()), path.stat().st_mtime_ns)
    if key not in _FINGERPRINTS:
        _FINGERPRINTS[key] = fingerprint(tokenizer, text_encoder, unet_config)
    return _FINGERPRINTS[key]
