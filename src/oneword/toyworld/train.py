"""Train the toy-world text-to-image model: `oneword toyworld train --work-dir DIR`.

Stages, each resumable (its output is kept in the work folder and reused on a rerun):
1. `data`: render `n_images` world pictures (seeded) with their scenes.
2. `vae`: train the AutoencoderKL (32x32x3 -> 8x8x4); its scaling factor is set to 1/std of the latents.
3. `latents`: encode every picture once (posterior mean and std).
4. `unet`: train the CLIPTextModel and UNet2DConditionModel jointly on captions drawn afresh at every step
   (10% empty, for classifier-free guidance); v-prediction with zero-terminal-SNR (Lin et al. 2024),
   min-SNR-5 loss weighting (Hang et al. 2023) and an EMA of the weights.
5. `oracle`: train the oracle's shape/pattern/size/position CNN on VAE round-tripped pictures.
6. `clip`: train the toy-world CLIP evaluator contrastively on pictures and captions.
7. `dino`: train the toy-world subject-fidelity evaluator to tell objects apart across contexts.
8. `export`: write an ordinary diffusers folder in fp16.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from tqdm.auto import tqdm

from oneword.toyworld import architecture as arch
from oneword.toyworld import world

log = logging.getLogger(__name__)


class ToyTrainConfig(BaseModel):
    """Settings of `oneword toyworld train`; the defaults made the shipped model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    seed: int = 0
    n_images: int = 120_000  # rendered once; captions are redrawn at every step
    vae_steps: int = 2500
    vae_batch: int = 48
    vae_lr: float = 1e-3
    unet_steps: int = 10_000
    unet_batch: int = 128
    unet_lr: float = 4e-4
    text_lr: float = 2e-4
    warmup: int = 300
    ema_decay: float = 0.999
    min_snr_gamma: float = 5.0
    checkpoint_every: int = 500
    oracle_steps: int = 1500
    clip_steps: int = 1000
    clip_batch: int = 256
    dino_steps: int = 1500


def _to_tensor(images: list) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).contiguous()


def stage_data(work: Path, cfg: ToyTrainConfig) -> dict:
    """Render the training pictures; returns {"images": uint8 (N, 3, 32, 32), "scenes": [dict]}."""
    path = work / "data.pt"
    if path.exists():
        return torch.load(path, weights_only=False)
    rng = random.Random(cfg.seed)
    scenes, images = [], []
    for _ in tqdm(range(cfg.n_images), desc="render", mininterval=5):
        s = world.sample_scene(rng)
        scenes.append(s)
        images.append(world.render(s))
    data = {"images": _to_tensor(images), "scenes": [s.as_dict() for s in scenes]}
    torch.save(data, path)
    return data


def _images_float(u8: torch.Tensor) -> torch.Tensor:
    return u8.float() / 127.5 - 1.0


def stage_vae(work: Path, cfg: ToyTrainConfig, data: dict):
    """Train the VAE (MSE + a small KL term, as in the LDM's first stage); returns it."""
    from diffusers import AutoencoderKL

    out = work / "vae"
    if (out / "config.json").exists():
        return AutoencoderKL.from_pretrained(out)
    torch.manual_seed(cfg.seed)
    vae = arch.make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.vae_lr, total_steps=cfg.vae_steps, pct_start=0.05)
    images = data["images"]
    bar = tqdm(range(cfg.vae_steps), desc="vae", mininterval=5)
    for step in bar:
        x = _images_float(images[torch.randint(len(images), (cfg.vae_batch,))])
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        mse = F.mse_loss(rec, x)
        loss = mse + F.l1_loss(rec, x) * 0.5 + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(psnr=f"{10 * math.log10(4 / mse.item()):.1f}")
    vae.eval()
    with torch.no_grad():
        x = _images_float(images[:2048])
        z = torch.cat([vae.encode(x[i : i + 256]).latent_dist.mean for i in range(0, len(x), 256)])
        rec = torch.cat([vae.decode(z[i : i + 256]).sample for i in range(0, len(z), 256)])
        psnr = 10 * math.log10(4 / F.mse_loss(rec.clamp(-1, 1), x).item())
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    vae.save_pretrained(out)
    (work / "vae_report.json").write_text(json.dumps({"psnr_db": psnr, "scaling_factor": 1.0 / float(z.std())}))
    log.info("VAE: %.1f dB PSNR on 2,048 pictures", psnr)
    return vae


@torch.no_grad()
def stage_latents(work: Path, data: dict, vae) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode every picture once; returns (mean, std), each (N, 4, 8, 8)."""
    path = work / "latents.pt"
    if path.exists():
        d = torch.load(path, weights_only=True)
        return d["mean"], d["std"]
    vae.eval()
    means, stds = [], []
    images = data["images"]
    for i in tqdm(range(0, len(images), 512), desc="encode", mininterval=5):
        dist = vae.encode(_images_float(images[i : i + 512])).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    mean, std = torch.cat(means), torch.cat(stds)
    torch.save({"mean": mean, "std": std}, path)
    return mean, std


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        p = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))  # cosine to 10%

    return f


class _CaptionIds:
    """Tokenise captions once each (there are only a few thousand distinct ones)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        missing = [c for c in set(captions) if c not in self.cache]
        if missing:
            ids = self.tokenizer(
                missing, padding="max_length", max_length=arch.MAX_TOKENS, truncation=True, return_tensors="pt"
            ).input_ids
            self.cache.update(zip(missing, ids))
        return torch.stack([self.cache[c] for c in captions])


def stage_unet(
    work: Path, cfg: ToyTrainConfig, data: dict, latents: tuple[torch.Tensor, torch.Tensor], scaling_factor: float
):
    """Train the text encoder and UNet jointly; returns their EMA copies."""
    from diffusers import DDPMScheduler

    from oneword.toyworld.model_io import toy_tokenizer

    done_path = work / "unet_final.pt"
    text_encoder, unet = arch.make_text_encoder(), arch.make_unet()
    if done_path.exists():
        d = torch.load(done_path, weights_only=True)
        text_encoder.load_state_dict(d["text_encoder"])
        unet.load_state_dict(d["unet"])
        return text_encoder.eval(), unet.eval()
    torch.manual_seed(cfg.seed)
    text_encoder, unet = arch.make_text_encoder(), arch.make_unet()
    ema_te, ema_unet = copy.deepcopy(text_encoder).requires_grad_(False), copy.deepcopy(unet).requires_grad_(False)
    # No weight decay on the token table: rows of words the captions never use must stay as initialised.
    table = text_encoder.get_input_embeddings().weight
    other_te = [p for p in text_encoder.parameters() if p is not table]
    opt = torch.optim.AdamW(
        [
            {"params": list(unet.parameters()), "lr": cfg.unet_lr, "weight_decay": 0.01},
            {"params": other_te, "lr": cfg.text_lr, "weight_decay": 0.01},
            {"params": [table], "lr": cfg.text_lr, "weight_decay": 0.0},
        ]
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup, cfg.unet_steps))
    noise_sched = DDPMScheduler.from_config(arch.SCHEDULER)
    ac = noise_sched.alphas_cumprod.float()
    snr = ac / (1 - ac).clamp(min=1e-8)
    weight = torch.minimum(snr, torch.full_like(snr, cfg.min_snr_gamma)) / (snr + 1)  # min-SNR for v targets
    tok = _CaptionIds(toy_tokenizer())
    scenes = [world.Scene(**s) for s in data["scenes"]]
    mean, std = latents
    rng, gen = random.Random(cfg.seed + 1), torch.Generator().manual_seed(cfg.seed + 2)
    start, curve = 0, []
    ckpt = work / "unet_ckpt.pt"
    if ckpt.exists():
        d = torch.load(ckpt, weights_only=False)
        for m, k in ((text_encoder, "te"), (unet, "unet"), (ema_te, "ema_te"), (ema_unet, "ema_unet")):
            m.load_state_dict(d[k])
        opt.load_state_dict(d["opt"])
        sched.load_state_dict(d["sched"])
        rng.setstate(d["rng"])
        gen.set_state(d["gen"])
        start, curve = d["step"], d["curve"]
        log.info("resumed UNet training at step %d", start)
    params = list(text_encoder.parameters()) + list(unet.parameters())
    ema_params = list(ema_te.parameters()) + list(ema_unet.parameters())
    text_encoder.train()
    unet.train()
    bar = tqdm(range(start, cfg.unet_steps), initial=start, total=cfg.unet_steps, desc="unet", mininterval=10)
    t0, acc = time.time(), []
    for step in bar:
        idx = torch.randint(len(scenes), (cfg.unet_batch,), generator=gen)
        captions = [world.caption(scenes[i], rng) for i in idx.tolist()]
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scaling_factor
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(idx),), generator=gen)
        a, s = ac[t].sqrt().view(-1, 1, 1, 1), (1 - ac[t]).sqrt().view(-1, 1, 1, 1)
        noisy, target = a * z0 + s * noise, a * noise - s * z0
        hidden = text_encoder(tok(captions))[0]
        pred = unet(noisy, t, encoder_hidden_states=hidden).sample
        loss = (weight[t] * ((pred - target) ** 2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1 - decay)
        acc.append(loss.item())
        if (step + 1) % 50 == 0:
            curve.append({"step": step + 1, "loss": float(np.mean(acc)), "seconds": time.time() - t0})
            bar.set_postfix(loss=f"{np.mean(acc):.4f}")
            acc = []
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.unet_steps:
            tmp = ckpt.with_suffix(".part")
            torch.save(
                {
                    "te": text_encoder.state_dict(),
                    "unet": unet.state_dict(),
                    "ema_te": ema_te.state_dict(),
                    "ema_unet": ema_unet.state_dict(),
                    "opt": opt.state_dict(),
                    "sched": sched.state_dict(),
                    "rng": rng.getstate(),
                    "gen": gen.get_state(),
                    "step": step + 1,
                    "curve": curve,
                },
                tmp,
            )
            tmp.replace(ckpt)
    torch.save({"text_encoder": ema_te.state_dict(), "unet": ema_unet.state_dict()}, done_path)
    (work / "unet_curve.json").write_text(json.dumps(curve))
    return ema_te.eval(), ema_unet.eval()


def stage_oracle(work: Path, cfg: ToyTrainConfig, vae) -> Path:
    """Train the oracle's CNN (see `oneword.toyworld.oracle`); returns its weights file."""
    from oneword.toyworld.oracle import train_oracle

    out = work / "oracle.safetensors"
    if not out.exists():
        acc = train_oracle(vae, out, steps=cfg.oracle_steps, seed=cfg.seed)
        (work / "oracle_report.json").write_text(json.dumps(acc, indent=2))
        log.info("oracle accuracy on VAE round-tripped pictures: %s", acc)
    return out


def stage_clip(work: Path, cfg: ToyTrainConfig, data: dict, vae) -> Path:
    """Train the toy-world CLIP evaluator (see `oneword.toyworld.evaluator`); returns its folder."""
    from oneword.toyworld.evaluator import train_clip

    out = work / "clip"
    if not (out / "config.json").exists():
        report = train_clip(
            data["images"], data["scenes"], out, steps=cfg.clip_steps, batch=cfg.clip_batch, seed=cfg.seed, vae=vae
        )
        (work / "clip_report.json").write_text(json.dumps(report, indent=2))
        log.info("toy CLIP: %s", report)
    return out


def stage_dino(work: Path, cfg: ToyTrainConfig, vae) -> Path:
    """Train the toy-world subject-fidelity evaluator (see `oneword.toyworld.dino`); returns its folder."""
    from oneword.toyworld.dino import train_dino

    out = work / "dino"
    if not (out / "config.json").exists():
        report = train_dino(out, steps=cfg.dino_steps, seed=cfg.seed, vae=vae)
        (work / "dino_report.json").write_text(json.dumps(report, indent=2))
        log.info("toy DINO: %s", report)
    return out


def train(work: Path, cfg: ToyTrainConfig = ToyTrainConfig(), out: Path | None = None) -> Path:
    """Run every stage in `work` and write the diffusers folder to `out` (default `work/model`).

    Returns:
        The model folder.
    """
    from oneword.toyworld.model_io import save_model

    work.mkdir(parents=True, exist_ok=True)
    (work / "config.json").write_text(cfg.model_dump_json(indent=2))
    times = {}
    t = time.time()
    data = stage_data(work, cfg)
    times["data_s"] = time.time() - t
    t = time.time()
    vae = stage_vae(work, cfg, data)
    times["vae_s"] = time.time() - t
    t = time.time()
    lat = stage_latents(work, data, vae)
    times["latents_s"] = time.time() - t
    t = time.time()
    text_encoder, unet = stage_unet(work, cfg, data, lat, vae.config.scaling_factor)
    times["unet_s"] = time.time() - t
    t = time.time()
    stage_oracle(work, cfg, vae)
    times["oracle_s"] = time.time() - t
    t = time.time()
    stage_clip(work, cfg, data, vae)
    times["clip_s"] = time.time() - t
    t = time.time()
    stage_dino(work, cfg, vae)
    times["dino_s"] = time.time() - t
    (work / "times.json").write_text(json.dumps(times, indent=2))
    out = out or work / "model"
    save_model(out, text_encoder, unet, vae)
    return out
