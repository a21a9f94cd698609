"""The toy-world CLIP evaluator: a tiny CLIPModel trained contrastively on world pictures and their captions.

It is saved with a CLIPProcessor, so the evaluation step loads it with transformers' CLIP classes exactly as it
loads OpenAI's CLIP, and computes the paper's metrics unchanged (`--clip-model toyworld-clip`).
"""

import logging
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from oneword.toyworld import world
from oneword.toyworld.architecture import MAX_TOKENS, vae_roundtrip

log = logging.getLogger(__name__)


def make_clip():
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    from oneword.tokenizer import VOCAB_SIZE

    text = CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    vision = CLIPVisionConfig(
        image_size=world.SIZE,
        patch_size=4,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
    )
    return CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=64))


def make_processor():
    from transformers import CLIPImageProcessor, CLIPProcessor

    from oneword.toyworld.model_io import toy_tokenizer

    image = CLIPImageProcessor(
        size={"shortest_edge": world.SIZE},
        crop_size={"height": world.SIZE, "width": world.SIZE},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return CLIPProcessor(image_processor=image, tokenizer=toy_tokenizer())


def train_clip(
    images_u8: torch.Tensor, scenes: list[dict], out: Path, steps: int = 3000, batch: int = 256, seed: int = 0, vae=None
) -> dict[str, float]:
    """Train the evaluator contrastively (InfoNCE both ways, as CLIP) and save it with its processor.

    Args:
        images_u8: rendered training pictures, uint8 (N, 3, 32, 32).
        scenes: their scenes.
        out: folder to write (config, weights in fp16, processor).
        steps: optimiser steps.
        batch: pictures per step.
        seed: seed.
        vae: if given, half of each batch goes through it (encode, decode), like generated pictures.

    Returns:
        Zero-shot accuracy (picture -> its full caption among 64) on held-out pictures.
    """
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model, proc = make_clip(), make_processor()
    tok = proc.tokenizer
    cache: dict[str, torch.Tensor] = {}

    def ids(captions: list[str]) -> torch.Tensor:
        missing = [c for c in set(captions) if c not in cache]
        if missing:
            t = tok(missing, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
            cache.update(zip(missing, t.input_ids))
        return torch.stack([cache[c] for c in captions])

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-3, total_steps=steps, pct_start=max(0.05, 3 / steps))
    n = len(scenes)
    model.train()
    for step in range(steps):
        idx = torch.randint(n, (batch,))
        x = images_u8[idx].float() / 127.5 - 1
        if vae is not None:
            x[: batch // 2] = vae_roundtrip(vae, x[: batch // 2])
        caps = []
        for i in idx.tolist():
            c = ""
            while not c:  # empty captions (for CFG) teach CLIP nothing
                c = world.caption(world.Scene(**scenes[i]), rng)
            caps.append(c)
        out_ = model(input_ids=ids(caps), pixel_values=x, return_loss=True)
        opt.zero_grad(set_to_none=True)
        out_.loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0:
            log.info("clip step %d: loss %.4f", step, out_.loss.item())
    model.eval()
    # zero-shot check on fresh scenes: does each picture pick its own full caption among 64?
    r = random.Random(seed + 7)
    test = [world.sample_scene(r) for _ in range(64)]
    px = torch.from_numpy(np.stack([np.asarray(world.render(s)) for s in test])).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        img = model.get_image_features(pixel_values=px / 127.5 - 1)
        txt = model.get_text_features(input_ids=ids([world.full_caption(s) for s in test]))
        img = F.normalize(getattr(img, "pooler_output", img), dim=-1)
        txt = F.normalize(getattr(txt, "pooler_output", txt), dim=-1)
    acc = float(((img @ txt.T).argmax(-1) == torch.arange(64)).float().mean())
    out.mkdir(parents=True, exist_ok=True)
    model.half().save_pretrained(out)
    proc.save_pretrained(out)
    _slim_tokenizer(out)
    return {"zero_shot_top1_of_64": acc}


def _slim_tokenizer(out: Path) -> None:
    """Keep vocab.json/merges.txt (1.5 MB) instead of transformers 5's 3.6 MB tokenizer.json."""
    from oneword.toyworld.model_io import write_tokenizer

    (out / "tokenizer.json").unlink(missing_ok=True)
    write_tokenizer(out)
