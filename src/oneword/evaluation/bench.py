"""`oneword bench --eval`: how fast evaluation draws and scores pictures (images per second)."""

import time
from dataclasses import replace

from oneword.bench import BenchResult, load_bench_model
from oneword.config import EvalConfig
from oneword.device import resolve_device
from oneword.evaluation.metrics import ClipScorer
from oneword.generate import SamplerConfig, build_pipeline, sample
from oneword.profiles import profile_of


def bench_eval(
    base_model: str | None,
    shape: str = "",
    device: str = "auto",
    n_images: int = EvalConfig().batch_size,
    steps: int = 50,
    batch_size: int = EvalConfig().batch_size,
    clip_model: str | None = None,
) -> BenchResult:
    """Time drawing `n_images` pictures at `steps` DDIM steps (batched as evaluation batches them), plus
    CLIP scoring when `clip_model` is given. Returns images per second."""
    dev = resolve_device(device)
    model = load_bench_model(base_model, shape, parts=("unet", "vae"))
    pipe = build_pipeline(model, str(dev))
    sampler = SamplerConfig(steps=steps).resolved(profile_of(model))
    clip = ClipScorer(clip_model, str(dev)) if clip_model else None  # loading it is not what is timed
    sample(pipe, ["a photo of a cat"], min(2, n_images), 0, replace(sampler, steps=2), batch_size)  # warm-up
    prompts = ["a photo of a cat", "a painting of a dog"][: min(2, n_images)]
    t0 = time.perf_counter()
    images = sample(pipe, prompts, -(-n_images // len(prompts)), 0, sampler, batch_size)
    drawn = [im for row in images for im in row]
    if clip is not None:
        clip.images(drawn)
    dt = time.perf_counter() - t0
    n = len(drawn)  # what was drawn: n_images rounded up to a whole number per prompt
    return BenchResult(f"evaluation ({steps} DDIM steps)", str(dev), batch_size, 1, n, dt, n / dt, n / dt, None)
