"""Write the toy-world model as an ordinary diffusers folder (fp16 safetensors, real CLIP tokenizer files).

The stock loaders' defaults must give one dtype: `StableDiffusionPipeline.from_pretrained(folder)` with no
dtype argument has to draw, on a CPU too. diffusers loads its models (UNet, VAE) in fp32 by default whatever
the files hold, while transformers >= 5 loads `CLIPTextModel` in the dtype its config names (`dtype="auto"`),
else in the checkpoint's. So the weights stay fp16 on disk (half the size) and the text encoder's config names
float32, the dtype every part then runs in: fp16 -> fp32 is exact, so nothing is lost. (With `dtype: float16`
there, the first release's fp16 text encoder fed fp16 states to an fp32 UNet: "mat1 and mat2 must have the same
dtype".) `STORAGE_DTYPE = torch.float32` would store fp32 files instead (twice the size, same values).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from oneword.tokenizer import BOS, EOS, bundled_files_dir, load_clip_tokenizer
from oneword.toyworld import architecture as arch

STORAGE_DTYPE = torch.float16  # the weights' dtype on disk (each value is an fp16 number either way)
RUN_DTYPE = "float32"  # the dtype the stock loaders give every part by default


def toy_tokenizer():
    """Stable Diffusion's CLIP tokenizer, padding to the toy model's 20 positions instead of 77."""
    tok = load_clip_tokenizer()
    tok.model_max_length = arch.MAX_TOKENS
    return tok


def write_tokenizer(folder: Path, max_length: int = arch.MAX_TOKENS) -> None:
    """Write `vocab.json`, `merges.txt` and `tokenizer_config.json` (what `CLIPTokenizer` loads)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(bundled_files_dir() / name, folder / name)
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def save_model(out: Path, text_encoder, unet, vae) -> Path:
    """Save the four parts plus a DDIM scheduler config as a diffusers folder, weights in `STORAGE_DTYPE`.

    The weights are rounded to fp16 precision (in place: the modules are left fp32 with those values), so saving
    a folder loaded from this one gives the same files. Every config names fp32 as the dtype to run in
    (`text_encoder/config.json`'s `dtype`; diffusers' configs name none and load fp32).

    Returns:
        `out`.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    out = Path(out)
    for m in (vae, text_encoder, unet):
        _round_to_fp16(m)
        if m.dtype != STORAGE_DTYPE:
            m.to(STORAGE_DTYPE)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=toy_tokenizer(),
        unet=unet,
        scheduler=DDIMScheduler(**arch.SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    for m in (vae, text_encoder, unet):
        m.to(torch.float32)
    _edit_json(out / "text_encoder" / "config.json", dtype=RUN_DTYPE)  # what transformers' default loads
    for name in ("unet", "vae"):  # where the weights were loaded from is not part of the model
        _edit_json(out / name / "config.json", drop=("_name_or_path",))
    shutil.rmtree(out / "tokenizer")
    write_tokenizer(out / "tokenizer")
    return out


def _edit_json(path: Path, drop: tuple[str, ...] = (), **changes) -> None:
    """Set keys of a config file and remove those in `drop`, keeping diffusers' and transformers' layout."""
    cfg = json.loads(path.read_text())
    new = {k: v for k, v in {**cfg, **changes}.items() if k not in drop}
    if new != cfg:
        path.write_text(json.dumps(new, indent=2, sort_keys=True) + "\n")


@torch.no_grad()
def _round_to_fp16(module: torch.nn.Module) -> None:
    """Make `module` fp32 with every floating-point weight rounded to the nearest fp16 value, in place."""
    if any(t.dtype != torch.float32 for t in module.parameters()):
        module.to(torch.float32)
    for t in (*module.parameters(), *module.buffers()):
        if t.is_floating_point():
            t.copy_(t.to(torch.float16))


def resave_model(folder: Path, out: Path | None = None) -> Path:
    """Load a toy-world diffusers folder's weights (any dtype) and save them again with `save_model`.

    Loading in fp32 is exact for fp16 files, and on a folder `save_model` wrote this rewrites the same files: it
    is how the first release's folder got its float32 text-encoder config without retraining. Run as
    `python -c "from oneword.toyworld.model_io import resave_model; resave_model(FOLDER)"`.

    Args:
        folder: the diffusers folder to read.
        out: where to write (default: `folder` itself, replacing its weights and configs).

    Returns:
        The folder written.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = Path(folder)
    out = Path(out) if out is not None else folder
    f32 = torch.float32
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", dtype=f32, local_files_only=True)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=f32, local_files_only=True)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=f32, local_files_only=True)
    if out.resolve() != folder.resolve():
        return save_model(out, text_encoder, unet, vae)
    # In place: write next to it first (the loaded weights may still map the old files), then swap each part in;
    # files save_model does not write (README.md) stay.
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        save_model(tmp, text_encoder, unet, vae)
        for item in sorted(tmp.iterdir()):
            dst = folder / item.name
            if dst.is_dir():
                shutil.rmtree(dst)
            elif dst.exists():
                dst.unlink()
            shutil.move(str(item), str(dst))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
