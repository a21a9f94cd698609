"""The toy world's subject-fidelity evaluator (`--dino-model toyworld-dino`): a tiny ViT that sees what an object is.

DreamBench scores subject fidelity with DINO ViT-S/16 (Ruiz et al. 2023) because CLIP's image features miss much of
what makes one subject differ from another of its kind. The toy CLIP has the same blind spot on its world: it weighs
colour over shape (docs/toyworld-quality.md). No DINO can be trained here on natural images, so the toy world gets an
evaluator for the same job, trained for it directly: its CLS embedding must tell an object's shape, colour and
pattern (three linear heads, cross-entropy) from pictures that draw it at any size, place and background (half of
them through the VAE, as generated pictures are), so its features hold what an object is and drop where it stands.
It is supervised, not DINO's self-distillation: a contrastive version (SimCLR's loss on two views of one object)
collapsed to constant features on this world and was dropped.

It is saved as a transformers `ViTModel` with its image processor, so the evaluation loads it through the classes it
loads facebook/dino-vits16 with (`DinoScorer`) and scores it the same way (the CLS embedding's cosine). Held-out
colour-shape pairs are never rendered for it, as for every other toy-world model.
"""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from oneword.evaluation.metrics import mean_pairwise_cosine
from oneword.toyworld import world
from oneword.toyworld.architecture import vae_roundtrip

log = logging.getLogger(__name__)


def identities() -> list[tuple[str, str, str]]:
    """Every (shape, colour, pattern) the training world may draw: what the evaluator must tell apart."""
    return [(s, c, p) for s in world.SHAPES for c in world.COLOURS for p in world.PATTERNS if world.allowed(c, s)]


def make_dino():
    """A 0.3 M-parameter ViT over 4-pixel patches of the world's 32-pixel pictures."""
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(
        image_size=world.SIZE,
        patch_size=4,
        hidden_size=96,
        intermediate_size=384,
        num_hidden_layers=3,
        num_attention_heads=4,
    )
    return ViTModel(config, add_pooling_layer=False)


def make_processor():
    from transformers import ViTImageProcessor

    return ViTImageProcessor(
        size={"height": world.SIZE, "width": world.SIZE}, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]
    )


def render_views(ids: list[tuple[str, str, str]], per_identity: int, seed: int, training: bool = True) -> torch.Tensor:
    """`per_identity` pictures of each (shape, colour, pattern), each at its own size, place and background:
    uint8 (len(ids), per_identity, 3, 32, 32)."""
    rng = random.Random(seed)
    out = np.stack(
        [
            np.stack(
                [
                    np.asarray(world.render(world.sample_scene(rng, s, c, p, training=training)))
                    for _ in range(per_identity)
                ]
            )
            for s, c, p in ids
        ]
    )
    return torch.from_numpy(out).permute(0, 1, 4, 2, 3).contiguous()


def train_dino(
    out: Path,
    steps: int = 1500,
    batch: int = 128,
    views_per_identity: int = 24,
    seed: int = 0,
    vae=None,
    lr: float = 1e-3,
) -> dict[str, float]:
    """Train the evaluator and save it (fp16 weights) with its processor into `out`.

    Args:
        out: folder to write.
        steps: optimiser steps.
        batch: pictures a step.
        views_per_identity: pictures drawn of each (shape, colour, pattern) beforehand, each in its own context.
        seed: seed.
        vae: if given, each picture is also kept as the VAE returns it, and a picture is that copy half the time.
        lr: AdamW's peak learning rate (linear warm-up over the first tenth, then cosine).

    Returns:
        `shape_margin` and `colour_margin` on the held-out pairs (never drawn in training): the mean cosine of a
        held-out object's pictures with each other, less that with the same colour in other shapes (with the same
        shape in other colours); and `top1`: how often a held-out picture's nearest other picture is its object.
    """
    torch.manual_seed(seed)
    ids = identities()
    pool = render_views(ids, views_per_identity, seed)  # (I, V, 3, 32, 32)
    pools = [pool.float() / 127.5 - 1]
    if vae is not None:
        through = vae_roundtrip(vae, pools[0].flatten(0, 1))
        pools.append(through.view_as(pools[0]))
    labels = torch.tensor(
        [[world.SHAPES.index(s), list(world.COLOURS).index(c), world.PATTERNS.index(p)] for s, c, p in ids]
    )
    model = make_dino()
    head = _head(model.config.hidden_size)
    params = [*model.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    g = torch.Generator().manual_seed(seed)
    n_ids, n_views = pool.shape[:2]
    sizes = (len(world.SHAPES), len(world.COLOURS), len(world.PATTERNS))
    model.train()
    for step in range(steps):
        who = torch.randint(n_ids, (batch,), generator=g)
        view = torch.randint(n_views, (batch,), generator=g)
        src = torch.randint(len(pools), (batch,), generator=g)
        x = torch.stack([pools[k][i, j] for k, i, j in zip(src.tolist(), who.tolist(), view.tolist())])
        logits = head(model(pixel_values=x).last_hidden_state[:, 0]).split(sizes, dim=-1)
        loss = sum(F.cross_entropy(lg, labels[who, k]) for k, lg in enumerate(logits))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            log.info("dino step %d: loss %.4f", step, loss.item())
    model.eval()
    report = held_out_margins(lambda px: model(pixel_values=px).last_hidden_state[:, 0], seed=seed + 1)
    out.mkdir(parents=True, exist_ok=True)
    model.half().save_pretrained(out)
    make_processor().save_pretrained(out)
    return report


def _head(width: int) -> torch.nn.Module:
    """Shape, colour and pattern logits from the CLS embedding; the evaluator keeps the embedding, not the head."""
    return torch.nn.Linear(width, len(world.SHAPES) + len(world.COLOURS) + len(world.PATTERNS))


@torch.no_grad()
def held_out_margins(features, n: int = 16, seed: int = 1) -> dict[str, float]:
    """How well an image encoder separates the held-out objects (never drawn in training) from their neighbours
    in colour and in shape (see `train_dino`).

    Args:
        features: pixels in [-1, 1] (N, 3, 32, 32) -> features (N, D).
        n: pictures of each object.
        seed: seed of the pictures.
    """
    shape_m, colour_m, hits, total = [], [], 0, 0
    for colour, shape in world.HELD_OUT:
        others_shape = [s for s in world.SHAPES if s != shape and world.allowed(colour, s)][:3]
        others_colour = [c for c in world.COLOURS if c != colour and world.allowed(c, shape)][:3]
        ids = [(shape, colour, "plain")] + [(s, colour, "plain") for s in others_shape]
        ids += [(shape, c, "plain") for c in others_colour]
        px = render_views(ids, n, seed, training=False).float().flatten(0, 1) / 127.5 - 1
        f = F.normalize(features(px).float(), dim=-1)
        f = f.view(len(ids), n, -1)
        same = mean_pairwise_cosine(f[0], f[0], exclude_diagonal=True)
        near_shape = range(1, 1 + len(others_shape))
        near_colour = range(1 + len(others_shape), len(ids))
        shape_m.append(same - sum(mean_pairwise_cosine(f[0], f[i]) for i in near_shape) / len(near_shape))
        colour_m.append(same - sum(mean_pairwise_cosine(f[0], f[i]) for i in near_colour) / len(near_colour))
        sim = f.flatten(0, 1) @ f[0].T  # every picture against the held-out object's
        sim[:n].fill_diagonal_(float("-inf"))
        hits += int((sim.argmax(0) < n).sum())
        total += n
    return {
        "shape_margin": sum(shape_m) / len(shape_m),
        "colour_margin": sum(colour_m) / len(colour_m),
        "top1": hits / total,
    }
