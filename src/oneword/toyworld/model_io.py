"""Write the toy-world model as an ordinary diffusers folder (fp16 safetensors, real CLIP tokenizer files)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from oneword.tokenizer import BOS, EOS, bundled_files_dir, load_clip_tokenizer
from oneword.toyworld import architecture as arch


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
    """Save the four parts plus a DDIM scheduler config as a diffusers folder with fp16 weights.

    Returns:
        `out`.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae.to(torch.float16),
        text_encoder=text_encoder.to(torch.float16),
        tokenizer=toy_tokenizer(),
        unet=unet.to(torch.float16),
        scheduler=DDIMScheduler(**arch.SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    shutil.rmtree(out / "tokenizer")
    write_tokenizer(out / "tokenizer")
    for m in (vae, text_encoder, unet):
        m.to(torch.float32)
    return out
