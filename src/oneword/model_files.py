"""What of a diffusers model folder oneword reads: its parts, and which of a part's weight files.

A hub repository or a mirror of one holds more than a pipeline loads: weights for other frameworks (Flax,
ONNX, OpenVINO), the same weights in two formats (`.safetensors` and `.bin`), variants (`fp16`, `non_ema`) and
single-file checkpoints beside the folders; SD 1.5's holds tens of GB that no load reads. A folder downloaded with
`variant="fp16"` holds only `*.fp16.safetensors`, which a plain `from_pretrained` does not find. One choice serves
both what an `s3://` model downloads (`model_keys`) and which variant a load asks for (`weights_variant`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

# every part folder a text-to-image pipeline of the SD families loads (SDXL's second encoder included)
PIPELINE_PARTS = ("scheduler", "tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "unet", "vae")
WEIGHTED_PARTS = ("text_encoder", "text_encoder_2", "unet", "vae")  # the parts whose folder holds weights
WEIGHT_FORMATS = (".safetensors", ".bin")  # in the order transformers and diffusers prefer them
INDEX_SUFFIX = ".index.json"  # a sharded checkpoint's map of tensors to shards: `model.safetensors.index.json`
# weights for other frameworks, and single-file checkpoints inside a part: nothing oneword loads
UNUSED_SUFFIXES = (".msgpack", ".onnx", ".onnx_data", ".pb", ".h5", ".ckpt", ".xml", ".tflite", ".mlmodel")
PREFERRED_VARIANTS = ("fp16", "bf16")  # where a part holds variants alone: the one a load takes first
# the names transformers and diffusers save a part's weights under (`pytorch_model.fp16-00001-of-00002.bin`, ...):
# other files of those formats in a part (OpenVINO's `openvino_model.bin`, LoRA weights) are not its weights
WEIGHT_STEMS = ("model", "pytorch_model", "diffusion_pytorch_model")
_SHARD = re.compile(r"-\d{5}-of-\d{5}")


def _format(name: str) -> str | None:
    """A file's weight format (`.safetensors`, `.bin`), a shard index's included; None for other files."""
    stem = name.removesuffix(INDEX_SUFFIX)
    return next((f for f in WEIGHT_FORMATS if stem.endswith(f)), None)


def _weight_file(name: str) -> tuple[str | None, str] | None:
    """`(variant, format)` of a part's own weight file (named as `WEIGHT_STEMS`; the variant `fp16` of
    `diffusion_pytorch_model.fp16.safetensors` and of a shard, `...fp16-00001-of-00002.safetensors`, None for the
    plain weights); None for every other file."""
    fmt = _format(name)
    if fmt is None:
        return None
    stem, _, variant = _SHARD.sub("", name.removesuffix(INDEX_SUFFIX).removesuffix(fmt)).partition(".")
    return (variant or None, fmt) if stem in WEIGHT_STEMS else None


def choose_weights(names: Iterable[str]) -> tuple[str | None, set[str]]:
    """Of the file names in one part folder, the variant a load takes (None: the plain weights) and the weight
    files it reads: the plain weights where there are any, else a variant (`PREFERRED_VARIANTS` first); in one
    format, `.safetensors` where that variant has it."""
    weights = {n: found for n in names if (found := _weight_file(n))}
    variants = {v for v, _ in weights.values()}
    if not variants:
        return None, set()
    order = [None, *PREFERRED_VARIANTS, *sorted(v for v in variants if v and v not in PREFERRED_VARIANTS)]
    variant = next(v for v in order if v in variants)
    mine = {n: f for n, (v, f) in weights.items() if v == variant}
    fmt = next(f for f in WEIGHT_FORMATS if f in mine.values())
    return variant, {n for n, f in mine.items() if f == fmt}


def weights_variant(folder: Path, part: str) -> str | None:
    """The variant `from_pretrained` must be given to load `part` of a local diffusers folder."""
    where = folder / part
    return choose_weights(p.name for p in where.iterdir())[0] if where.is_dir() else None


def has_part(model_index: dict | None, part: str) -> bool:
    """Whether a pipeline's `model_index.json` names `part` (`text_encoder_2: [null, null]` names none)."""
    entry = (model_index or {}).get(part)
    return isinstance(entry, list) and bool(entry) and entry[0] is not None


def model_keys(keys: Sequence[str]) -> set[str]:
    """Of the keys under a diffusers folder's prefix (`unet/config.json`, ...), those a load reads:
    `model_index.json`, and in each pipeline part's folder its configs and the weights `choose_weights` takes.
    Keys of a layout that is no diffusers folder are all taken (the load then says what it lacks)."""
    parts: dict[str, list[str]] = {}
    for k in keys:
        top, _, rest = k.partition("/")
        if top in PIPELINE_PARTS and rest:
            parts.setdefault(top, []).append(rest)
    if "model_index.json" not in keys and not parts:
        return set(keys)
    taken = {"model_index.json"} & set(keys)
    for part, names in parts.items():
        names = [n for n in names if not n.endswith(UNUSED_SUFFIXES)]
        _, weights = choose_weights(names)
        taken |= {f"{part}/{n}" for n in names if n in weights or not _format(n)}
    return taken


def weightless_parts(folder: Path, parts: Sequence[str]) -> list[str]:
    """The weighted parts among `parts` whose folder in `folder` holds no weight file (a download cut short)."""
    return [p for p in parts if p in WEIGHTED_PARTS and (folder / p).is_dir()
            and not choose_weights(f.name for f in (folder / p).iterdir())[1]]  # fmt: skip
