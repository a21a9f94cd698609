"""Base models: find, load, identify and fingerprint a Stable Diffusion 1.x/2.x or SDXL model.

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
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from oneword import storage
from oneword.errors import OnewordError
from oneword.model_files import has_part, model_keys, weightless_parts, weights_variant
from oneword.profiles import FAMILY_BY_WIDTH
from oneword.toyworld import assets

log = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
MODEL_PARTS = ("tokenizer", "text_encoder", "unet", "vae")  # a diffusers folder's, each a folder of its own


@dataclass
class LoadedModel:
    """The parts of a loaded Stable Diffusion model that textual inversion uses.

    `vae` and `unet` may be None when a step does not need them (training from cached latents needs no VAE).
    `tokenizer_2` and `text_encoder_2` are SDXL's second text encoder (OpenCLIP ViT-bigG, with the projection
    whose pooled output also conditions the UNet); None for SD 1.x/2.x.
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
    tokenizer_2: CLIPTokenizer | None = None
    text_encoder_2: CLIPTextModelWithProjection | None = None
    # a single file's prediction type as the LDM config beside it states (`single_file_prediction`); None: the
    # model's own scheduler config, or diffusers' guess
    stated_prediction: str | None = None

    @property
    def width_2(self) -> int | None:
        """The second text encoder's width (SDXL: 1280), or None."""
        return None if self.text_encoder_2 is None else int(self.text_encoder_2.config.hidden_size)

    @property
    def prediction_type(self) -> str:
        """`epsilon` or `v_prediction`, from the scheduler config."""
        return self.scheduler_config.get("prediction_type", "epsilon")


def recorded_source(source: str) -> str:
    """The reference a model loaded from `source` records (trainings, embeddings, the registry): a local folder or
    file as an absolute path, which names it from any working directory; `toyworld`, `s3://` and hub ids as given.
    """
    if source == assets.NAME or storage.is_s3(source):
        return source
    p = Path(source).expanduser()
    # absolute, links kept: a hub cache's checkpoint is a link whose target has no .safetensors suffix
    return os.path.abspath(p) if p.exists() else source


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
        return str(storage.download_prefix(source, cache=storage.model_cache_root(), pick=model_keys))
    p = Path(source).expanduser()
    if p.exists():
        if p.is_dir() and not (p / "model_index.json").exists() and not (p / "unet").is_dir():
            raise OnewordError(
                f"{p} is a folder but not a diffusers model (no model_index.json)",
                hint="pass the folder that holds model_index.json, tokenizer/, text_encoder/, unet/, vae/",
            )
        if p.is_file() and not p.name.lower().endswith(SINGLE_FILE_SUFFIXES):
            raise OnewordError(
                f"{p} is neither a diffusers model folder nor a single-file checkpoint "
                f"({', '.join(SINGLE_FILE_SUFFIXES)})",
                hint="pass a diffusers folder, a .safetensors or .ckpt checkpoint, a hub id, or `toyworld`",
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


def detect_family(text_encoder_config, xl: bool = False) -> tuple[str, int]:
    """Return `(family, width)`: sdxl where the model has a second text encoder (`xl`), else sd1 (width 768), sd2
    (1024), or custom for other widths."""
    if xl:
        return "sdxl", text_encoder_config.hidden_size
    width = text_encoder_config.hidden_size
    return FAMILY_BY_WIDTH.get(width, "custom"), width


def fingerprint(
    tokenizer: CLIPTokenizer,
    text_encoder: CLIPTextModel,
    unet_config: dict | None,
    text_encoder_2: CLIPTextModelWithProjection | None = None,
) -> str:
    """A stable sha256 of what a learned embedding depends on.

    It covers the tokenizer's vocabulary, the text encoders' token-embedding tables (rounded to fp16, so fp32
    and fp16 copies of one model agree), the UNet config, and for SDXL where its pooled text is read.

    Returns:
        `sha256:` followed by 64 hex digits.
    """
    h = hashlib.sha256()
    vocab = tokenizer.get_vocab()
    base = {t: i for t, i in vocab.items() if t not in tokenizer.get_added_vocab()}
    h.update(json.dumps(base, sort_keys=True, ensure_ascii=False).encode())
    table = text_encoder.get_input_embeddings().weight.detach()
    h.update(table[: len(base)].to("cpu", torch.float16).contiguous().numpy().tobytes())
    if text_encoder_2 is not None:
        table_2 = text_encoder_2.get_input_embeddings().weight.detach()
        h.update(table_2[: len(base)].to("cpu", torch.float16).contiguous().numpy().tobytes())
        # SDXL's pooled text read at the end token (`pool_at_end_token`), not at the placeholder as before: what an
        # embedding learns under it differs, so its trainings and evaluations are not those of before
        h.update(b"pooled at the end token")
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


def load_base_model(
    source: str,
    *,
    parts: tuple[str, ...] = ("unet", "vae"),
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    model_config: str | None = None,
    encoder_dtype: torch.dtype = torch.float32,
) -> LoadedModel:
    """Load a Stable Diffusion 1.x/2.x or SDXL model's tokenizers, text encoders and (optionally) UNet and VAE.

    Args:
        source: see the module docstring.
        parts: which of "unet" and "vae" to load besides the tokenizers and text encoders.
        device: where to put the modules.
        dtype: weight dtype of the UNet and VAE (the text encoders stay fp32 for exact embedding lookups).
        model_config: for a single-file checkpoint, a diffusers folder or hub id with its configs.
        encoder_dtype: the text encoders' dtype (a diffusers folder or hub id): fp32 for training; fp16 where only
            the fingerprint is wanted (it is taken in fp16), in half the memory.

    Returns:
        A `LoadedModel`, every module frozen and in eval mode.
    """
    source = recorded_source(source)
    resolved = resolve(source)
    if resolved.endswith(SINGLE_FILE_SUFFIXES) and Path(resolved).is_file():
        return _load_single_file(source, resolved, parts, device, dtype, model_config)
    from diffusers import AutoencoderKL, UNet2DConditionModel

    is_local = Path(resolved).exists()
    kw = {"local_files_only": True} if is_local else {}
    try:
        model_index = _load_json(resolved, "model_index.json", kw)
    except OSError:
        model_index = None  # a bare folder of parts (tokenizer/, text_encoder/, unet/, vae/)
    xl = has_part(model_index, "text_encoder_2")
    if is_local and (problems := folder_problems(Path(resolved), ("tokenizer", "text_encoder", *parts), xl)):
        raise OnewordError(
            f"base model {resolved}: {'; '.join(problems)}",
            hint="pass a complete diffusers folder (model_index.json, scheduler/ and a folder per part, each with "
            "its config and weights, as save_pretrained writes it); a download cut short: download it again",
        )

    def variant(part: str) -> dict:  # a folder saved or downloaded with variant="fp16" holds only those weights
        return {"variant": v} if is_local and (v := weights_variant(Path(resolved), part)) else {}

    try:
        tokenizer = CLIPTokenizer.from_pretrained(resolved, subfolder="tokenizer", **kw)
        text_encoder = CLIPTextModel.from_pretrained(resolved, subfolder="text_encoder", dtype=encoder_dtype, **kw,
                                                     **variant("text_encoder"))  # fmt: skip
        tokenizer_2 = text_encoder_2 = None
        if xl:
            tokenizer_2 = CLIPTokenizer.from_pretrained(resolved, subfolder="tokenizer_2", **kw)
            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
                resolved, subfolder="text_encoder_2", dtype=encoder_dtype, **kw, **variant("text_encoder_2")
            )
        unet = (
            UNet2DConditionModel.from_pretrained(resolved, subfolder="unet", torch_dtype=dtype, **kw, **variant("unet"))
            if "unet" in parts
            else None
        )
        unet_config = unet.config if unet is not None else _unet_config(_load_json(resolved, "unet/config.json", kw))
        vae = (
            AutoencoderKL.from_pretrained(resolved, subfolder="vae", torch_dtype=dtype, **kw, **variant("vae"))
            if "vae" in parts
            else None
        )
        scheduler_config = _load_json(resolved, "scheduler/scheduler_config.json", kw)
    except OSError as e:
        raise OnewordError(
            f"could not load base model {source!r}: {e}",
            hint="check that the folder is a complete diffusers model, as save_pretrained writes it" if is_local
            else "check the hub id; hub ids need network access and, for gated models, HF_TOKEN" + _nearby(source),
        ) from e
    return _finish(
        source,
        (tokenizer, text_encoder, tokenizer_2, text_encoder_2),
        unet,
        vae,
        scheduler_config,
        unet_config,
        device,
        Path(resolved) if is_local else None,
    )


def _nearby(source: str) -> str:
    """Where a hub id `ORG/NAME` is also a path in a local folder `ORG/` (a mistyped local path is read as a hub
    id), what that folder holds that looks like it."""
    import difflib

    org, _, name = source.partition("/")
    if not Path(org).is_dir():
        return ""
    held = sorted(p.name for p in Path(org).iterdir() if p.is_dir())
    near = difflib.get_close_matches(name, held, n=3) or held[:3]
    return f"; a local folder? {source} is none" + (f" ({org}/ holds {', '.join(near)})" if near else "")


def folder_problems(folder: Path, parts: Sequence[str] = MODEL_PARTS, xl: bool | None = None) -> list[str]:
    """What a diffusers folder lacks of what a load of `parts` reads (`no unet/ folder`, `no weights in vae/`,
    `no scheduler/scheduler_config.json`), SDXL's second tokenizer and encoder too where `xl` (None: where its
    model_index.json names them); none for a file."""
    if not folder.is_dir():
        return []
    if xl is None:
        try:
            xl = has_part(json.loads((folder / "model_index.json").read_text()), "text_encoder_2")
        except (OSError, ValueError):
            xl = False
    wanted = [*parts, *(("tokenizer_2", "text_encoder_2") if xl else ())]
    problems = [f"no {part}/ folder" for part in wanted if not (folder / part).is_dir()]
    problems += [f"no weights in {part}/" for part in weightless_parts(folder, wanted)]
    if not (folder / "scheduler" / "scheduler_config.json").is_file():
        problems.append("no scheduler/scheduler_config.json")
    return problems


def _unet_config(saved: dict):
    """The UNet's config as a loaded UNet holds it: every argument of its constructor, this diffusers' defaults
    filled in where `config.json` was saved by an older one (SD 1.5's and SDXL's lack a dozen), so that a model
    loaded without its UNet has the fingerprint of the model loaded with it. The UNet is built without weights."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        return UNet2DConditionModel.from_config(saved).config


def _load_json(resolved: str, rel: str, kw: dict) -> dict:
    if Path(resolved).exists():
        p = Path(resolved) / rel
        if not p.exists():
            raise OSError(f"{p} is missing")
        return json.loads(p.read_text())
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(resolved, rel, **kw)).read_text())


# Keys of the original (Stability) checkpoint layouts: SDXL's second text encoder (OpenCLIP ViT-bigG), and SD 2.x's
# one text encoder (OpenCLIP ViT-H); SD 1.x's (CLIP ViT-L) is under `cond_stage_model.transformer.`
SDXL_SINGLE_FILE_KEY = "conditioner.embedders.1.model."
SD2_SINGLE_FILE_KEY = "cond_stage_model.model."
SINGLE_FILE_KINDS = {  # family -> (what it is, a hub id whose configs fit it)
    "sdxl": ("an SDXL", "stabilityai/stable-diffusion-xl-base-1.0"),
    "sd2": ("a Stable Diffusion 2.x", "stabilityai/stable-diffusion-2-1"),
    "sd1": ("a Stable Diffusion 1.x", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
}


def single_file_family(path: str | Path) -> str:
    """`sdxl`, `sd2` or `sd1`, by the text encoders a single-file checkpoint holds.

    Reads only the tensor names (a `.safetensors` header); a `.ckpt` is unpickled by diffusers later, not here, and
    is taken for SD 1.x until then.
    """
    if not str(path).endswith(".safetensors"):
        return "sd1"
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError) as e:
        raise OnewordError(
            f"{path} is not a readable safetensors checkpoint ({e})",
            hint="check that the download finished; re-download it, or pass a diffusers folder",
        ) from e
    if any(k.startswith(SDXL_SINGLE_FILE_KEY) for k in keys):
        return "sdxl"
    return "sd2" if any(k.startswith(SD2_SINGLE_FILE_KEY) for k in keys) else "sd1"


def single_file_prediction(path: str | Path) -> str | None:
    """The prediction type the LDM config beside a single-file checkpoint states (`<name>.yaml`, where A1111 reads
    it): `v_prediction` where it says `parameterization: v`, else `epsilon`; None where there is no such file.

    diffusers reads no such thing: it takes every SD 2.x file for SD 2.1's v-prediction (`from_single_file`).
    """
    import yaml

    config = Path(path).with_suffix(".yaml")
    if not config.is_file():
        return None
    try:
        found = yaml.safe_load(config.read_text())
        said = found["model"]["params"].get("parameterization", "eps")
    except (yaml.YAMLError, KeyError, TypeError, AttributeError) as e:
        raise OnewordError(
            f"{config} is not an LDM model config (model.params) ({type(e).__name__}: {e})",
            hint=f"it is read as {Path(path).name}'s config: put the model's own there (e.g. v2-inference.yaml), "
            "or move it away",
        ) from e
    return "v_prediction" if said == "v" else "epsilon"


def _load_single_file(source, path, parts, device, dtype, model_config) -> LoadedModel:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    family = single_file_family(path)
    stated = None if model_config else single_file_prediction(path)
    pipeline_class = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    kw = {"config": model_config} if model_config else {}
    extra = {} if family == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    what, example = SINGLE_FILE_KINDS[family]
    try:
        pipe = pipeline_class.from_single_file(path, torch_dtype=dtype, **extra, **kw)
    except Exception as e:  # diffusers raises several types here
        raise OnewordError(
            f"could not load single-file checkpoint {path} (read as {what} checkpoint): {e}",
            hint=f"diffusers reads such a file's configs from the hub ({example}): run where the hub or its cache "
            "(HF_HOME) is reachable, or save the model once as a diffusers folder "
            "(from_single_file(...).save_pretrained(folder)) and pass the folder",
        ) from e
    scheduler_config = dict(pipe.scheduler.config) | ({"prediction_type": stated} if stated else {})
    said = scheduler_config.get("prediction_type", "epsilon")
    if family == "sd2" and not stated and not model_config:
        log.warning(
            "%s: read as %s checkpoint with %s's configs (%s, %d px), as diffusers reads every such file; an SD 2.x "
            "base model (epsilon, 512 px) or a fine-tune of one would train on the wrong target: put its LDM config "
            "beside it as %s (v2-inference.yaml) and give --resolution 512",
            path, what, example, said, pipe.unet.config.sample_size * pipe.vae_scale_factor,
            Path(path).with_suffix(".yaml").name,
        )  # fmt: skip
    elif family == "sd2" and said == "epsilon":  # diffusers built it at SD 2.1's size whatever the config said
        log.warning("%s: read as an SD 2.x base model (epsilon, as %s says): give --resolution 512, its native size, "
                    "unless it was trained at 768 px", path, Path(path).with_suffix(".yaml").name)  # fmt: skip
    else:
        log.info("%s: read as %s checkpoint, predicting %s", path, what, said)
    encoders = (
        pipe.tokenizer,
        pipe.text_encoder.float(),
        getattr(pipe, "tokenizer_2", None),
        pipe.text_encoder_2.float() if getattr(pipe, "text_encoder_2", None) is not None else None,
    )
    return _finish(
        source,
        encoders,
        pipe.unet if "unet" in parts else None,
        pipe.vae if "vae" in parts else None,
        scheduler_config,
        dict(pipe.unet.config),
        device,
        Path(path),
        stated_prediction=stated,
    )


def _finish(
    source, encoders, unet, vae, scheduler_config, unet_config, device, path, stated_prediction: str | None = None
) -> LoadedModel:
    tokenizer, text_encoder, tokenizer_2, text_encoder_2 = encoders
    family, width = detect_family(text_encoder.config, xl=text_encoder_2 is not None)
    for m in (text_encoder, text_encoder_2, unet, vae):
        if m is not None:
            m.requires_grad_(False).eval().to(device)
    for tok, enc in ((tokenizer, text_encoder), (tokenizer_2, text_encoder_2)):
        if enc is not None:
            pool_at_end_token(enc, tok)
    return LoadedModel(
        source=source,
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        unet=unet,
        vae=vae,
        scheduler_config=dict(scheduler_config),
        family=family,
        width=width,
        fingerprint=cached_fingerprint(tokenizer, text_encoder, dict(unet_config), path, text_encoder_2),
        path=path,
        tokenizer_2=tokenizer_2,
        text_encoder_2=text_encoder_2,
        stated_prediction=stated_prediction,
    )


def pool_at_end_token(text_encoder: CLIPTextModel | CLIPTextModelWithProjection, tokenizer: CLIPTokenizer) -> None:
    """Make the encoder's pooled output read the end token, as the model was trained to, even after new tokens.

    A CLIP text encoder converted with `eos_token_id: 2` in its config (SDXL's second, SD 2.x's) pools at the
    highest token id, the end token's in the model's own vocabulary, but an added placeholder's once one is in the
    prompt (huggingface/diffusers#10754). SDXL conditions the UNet on that pooled text: A1111, ComfyUI and kohya's
    scripts take it at the end token, so an SDXL embedding is trained, and oneword samples, as they read it.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        return
    for module in text_encoder.modules():  # the transformer that pools: the encoder itself, or its text_model
        if isinstance(getattr(module, "eos_token_id", None), int):
            module.eos_token_id = eos
    text_encoder.config.eos_token_id = eos


_FINGERPRINTS: dict[tuple[str, int], str] = {}


def cached_fingerprint(tokenizer, text_encoder, unet_config: dict, path: Path | None, text_encoder_2=None) -> str:
    """`fingerprint`, memoised per local model folder (by its path and modification time)."""
    if path is None:
        return fingerprint(tokenizer, text_encoder, unet_config, text_encoder_2)
    key = (str(path.resolve()), path.stat().st_mtime_ns)
    if key not in _FINGERPRINTS:
        _FINGERPRINTS[key] = fingerprint(tokenizer, text_encoder, unet_config, text_encoder_2)
    return _FINGERPRINTS[key]
