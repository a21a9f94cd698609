"""Speed benchmarks: optimiser steps per second and images per second, ours and diffusers' textual-inversion example.

`bench_reference_script` runs diffusers' own `examples/textual_inversion/textual_inversion.py`, unchanged, as a
subprocess on the same model (its path is the user's: the script is not ours to ship). `bench_diffusers_style`
reproduces what diffusers' `examples/textual_inversion/textual_inversion.py` does per step,
for a like-for-like comparison on the same model: encode the images with the VAE at every step, train the
whole token-embedding table with AdamW and copy the frozen rows back after the step, at batch 1 with
gradient accumulation. oneword's loop (`InversionTrainer`) reads cached latents and trains only the new rows.
"""

from __future__ import annotations

import atexit
import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from oneword import distributed, profiles
from oneword.config import ConceptSpec, TrainConfig
from oneword.device import resolve_device
from oneword.inversion import InversionTrainer
from oneword.latents import LatentSet
from oneword.models import LoadedModel, load_base_model


@dataclass
class BenchResult:
    """One benchmark's figures."""

    name: str
    device: str
    batch_size: int
    grad_accum: int
    steps: int
    seconds: float
    steps_per_second: float
    images_per_second: float
    peak_memory_mb: float | None
    warmup_seconds: float | None = None  # untimed first steps: compilation and CUDA-graph capture land here
    latent_side: int | None = None  # the latents' side the loop trained on: loops compare only at equal sides
    profile: str | None = None  # with a profile: one line on where a step's time went, and the files that say more

    def as_dict(self) -> dict:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _latent_shape(model: LoadedModel, resolution: int | None) -> tuple[int, int]:
    """(channels, side) of the latents for `resolution` (default: the UNet's native size)."""
    cfg = model.unet.config
    if resolution is None:
        return cfg.in_channels, cfg.sample_size
    return cfg.in_channels, resolution // vae_factor(model)


def vae_factor(model: LoadedModel) -> int:
    """How many pixels a side one latent covers: from the VAE, or its config when the VAE was not loaded.

    The loops that train from cached latents load no VAE, yet must train on the latents the VAE makes of
    `resolution` px, as the loops that encode images do (the tiny model's VAE halves twice, not three times).
    """
    if model.vae is not None:
        return profiles.vae_factor_of(model.vae.config)
    return profiles.vae_factor(model.source)


def synthetic_latents(channels: int, side: int, n_images: int = 5, seed: int = 0) -> LatentSet:
    """Random latents shaped like a cached concept (compute does not depend on their values)."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(n_images, 2, channels, side, side, generator=g)
    std = torch.rand(n_images, 2, channels, side, side, generator=g) * 0.1
    return LatentSet(mean, std, [f"{i:064x}" for i in range(n_images)], 0.18215, 0.0, {})


def bench_oneword(
    model: LoadedModel,
    batch_size: int = 4,
    steps: int = 50,
    warmup: int = 5,
    resolution: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    compile: str = "off",
    concepts: int = 1,
    profile_dir: Path | None = None,
    profile_steps: int = 5,
) -> BenchResult:
    """Time oneword's training loop on `model` (the model is modified: tokens are added).

    With `concepts` > 1, that many concepts train together in one batch of `concepts` x `batch_size` (a batch
    job's shard); images/s counts every concept's images. `compile` is `TrainConfig.compile` (off, default,
    max); its compilation happens in the `warmup` steps, which are timed apart. With `profile_dir`,
    `profile_steps` more steps after the timed ones are recorded by `torch.profiler` (see `profile_steps`).
    """
    dev = resolve_device(device)
    c, side = _latent_shape(model, resolution)
    cfg = TrainConfig(
        steps=steps + warmup,
        batch_size=batch_size,
        device=str(dev),
        precision=precision,  # type: ignore[arg-type]
        compile=compile,
    )
    members = [
        (ConceptSpec(token=f"<bench-{k}>", init_word="object"), synthetic_latents(c, side, seed=k))
        for k in range(concepts)
    ]
    trainer = InversionTrainer(model, members, cfg)
    if dev.type == "cuda":
        # from before the warm-up: CUDA graphs allocate their memory pool while they are captured there, and a
        # replay allocates nothing, so a peak taken over the timed steps alone misses it
        torch.cuda.reset_peak_memory_stats(dev)
    t_warm = time.perf_counter()
    for s in range(warmup):
        trainer.train_step(s)
    _sync(dev)
    warm = time.perf_counter() - t_warm
    t0 = time.perf_counter()
    for s in range(warmup, warmup + steps):
        trainer.train_step(s)
    _sync(dev)
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None
    mode = {
        "off": "",
        "default": " (compiled)",
        "max": " (compile max" + (", CUDA graphs)" if dev.type == "cuda" else ")"),
    }
    name = "oneword" + (f", {concepts} concepts together" if concepts > 1 else "") + mode[cfg.compile]
    if trainer.world.size > 1:
        name += f", over {trainer.world.size} processes"
    images = steps * batch_size * concepts
    summary = None
    if profile_dir is not None:
        first = warmup + steps
        try:
            summary = record_profile(trainer.train_step, range(first, first + profile_steps), dev, profile_dir, name)
        except Exception as e:  # the profiler (CUPTI under CUDA graphs, a full disk) must not cost the timing
            summary = f"{name}: not recorded, the profiler failed ({type(e).__name__}: {e})"
    return BenchResult(
        name,
        str(dev),
        batch_size * concepts,
        1,
        steps,
        dt,
        steps / dt,
        images / dt,
        peak,
        warm,
        latent_side=side,
        profile=summary,
    )


def record_profile(step: Callable[[int], object], steps: range, device: torch.device, out_dir: Path, name: str) -> str:
    """Record `steps` of a loop with `torch.profiler`; returns one line on where the time went.

    Writes `<name>.trace.json.gz` (a Chrome trace: chrome://tracing or ui.perfetto.dev) and `<name>.ops.txt` (the
    ops by self time, on the GPU where there is one). On a GPU the line says what share of the wall time its
    kernels ran: far below 100% means the host, not the GPU, sets the pace (launches, Python, synchronisation).
    """
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = device.type == "cuda"
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=activities, record_shapes=True) as prof:
        t0 = time.perf_counter()
        for s in steps:
            step(s)
        _sync(device)
        wall = time.perf_counter() - t0
    trace, ops = out_dir / f"{slug}.trace.json.gz", out_dir / f"{slug}.ops.txt"
    prof.export_chrome_trace(str(trace))
    averages = prof.key_averages()
    line = f"{name}: {wall / len(steps) * 1e3:.1f} ms a step under the profiler"
    if cuda:
        kernels = sum(getattr(e, "self_device_time_total", 0.0) for e in averages) / 1e6
        line += f"; the GPU ran kernels {kernels / wall:.0%} of it"
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    ops.write_text(f"{line}\n\n{averages.table(sort_by=sort, row_limit=30, max_name_column_width=60)}\n")
    return f"{line} ({ops}, {trace})"


def bench_concepts(
    load: Callable[[], LoadedModel],
    counts: Sequence[int],
    batch_size: int = 4,
    steps: int = 50,
    sequential: bool = True,
    **kwargs,
) -> list[BenchResult]:
    """For each K in `counts`: K concepts trained together, beside K trained one after another.

    Args:
        load: makes a fresh model (each loop adds its own tokens).
        counts: the Ks to time.
        batch_size: images per concept per step.
        steps: timed optimiser steps per loop.
        sequential: also time the K concepts one after another (K more compilations with compile max).
        **kwargs: passed to `bench_oneword` (resolution, device, precision, compile).

    Returns:
        Per K, the together figure and then, with `sequential`, the one-after-another figure (`steps` is per
        concept there).
    """
    out = []
    for k in counts:
        out.append(bench_oneword(load(), batch_size, steps, concepts=k, **kwargs))
        if k > 1 and sequential:
            one = [bench_oneword(load(), batch_size, steps, **kwargs) for _ in range(k)]
            seconds = sum(r.seconds for r in one)
            out.append(
                BenchResult(
                    f"oneword, {k} concepts one after another",
                    one[0].device,
                    batch_size,
                    1,
                    steps,
                    seconds,
                    steps * k / seconds,
                    steps * k * batch_size / seconds,
                    max((r.peak_memory_mb or 0) for r in one) or None,
                    latent_side=one[0].latent_side,
                )
            )
    return out


def bench_processes(
    model_path: str, n: int, batch_size: int = 4, steps: int = 50, concepts: int = 1, **kwargs
) -> list[BenchResult]:
    """Concept-parallel scaling: `concepts` concepts in one process, beside n x `concepts` over `n` processes
    (`oneword.distributed`: each process trains `concepts` of them, as a batch job's shard on an n-GPU pod would).

    Args:
        model_path: a model folder or hub id (each process loads its own copy).
        n: processes, one per GPU.
        batch_size, steps, concepts: as in `bench_oneword` (`concepts` per process).
        **kwargs: passed to `bench_oneword` (resolution, device, precision, compile).

    Returns:
        [one process, n processes]; the scaling is the second's images/s over n times the first's.
    """
    one = bench_oneword(load_base_model(model_path, parts=("unet",)), batch_size, steps, concepts=concepts, **kwargs)
    many = distributed.launch(
        "oneword.bench:_bench_launched", n, model_path=model_path, batch_size=batch_size, steps=steps,
        concepts=n * concepts, **kwargs,
    )  # fmt: skip
    return [one, many]


def _bench_launched(model_path: str, **kwargs) -> BenchResult:
    """`bench_oneword` in each launched process (the main one's timing is returned)."""
    return bench_oneword(load_base_model(model_path, parts=("unet",)), **kwargs)


def bench_diffusers_style(
    model: LoadedModel,
    batch_size: int = 1,
    grad_accum: int = 4,
    steps: int = 10,
    warmup: int = 2,
    resolution: int | None = None,
    device: str = "auto",
    precision: str = "auto",
) -> BenchResult:
    """Time a loop that does per step what diffusers' textual-inversion example does (module docstring)."""
    from diffusers import DDPMScheduler

    dev = resolve_device(device)
    if model.vae is None:
        raise ValueError("the diffusers-style loop encodes images at every step: load the model with its VAE")
    if model.text_encoder_2 is not None:
        raise ValueError("the diffusers-style loop is SD 1.x/2.x's example script; it has no SDXL form here")
    use_bf16 = precision == "bf16" or (precision == "auto" and dev.type == "cuda")
    wdtype = torch.bfloat16 if use_bf16 else torch.float32
    te, unet, vae, tok = (
        model.text_encoder.to(dev),
        model.unet.to(dev, wdtype),
        model.vae.to(dev, wdtype),
        model.tokenizer,
    )
    tok.add_tokens(["<bench-d>"])
    te.resize_token_embeddings(len(tok))
    table = te.get_input_embeddings().weight
    table.requires_grad_(True)
    orig = table.detach().clone()
    keep = torch.ones(len(tok), dtype=torch.bool, device=dev)
    keep[-1] = False
    opt = torch.optim.AdamW([table], lr=5e-4)
    sched = DDPMScheduler.from_config(model.scheduler_config)
    side = resolution or model.vae.config.sample_size
    pixels = torch.rand(batch_size, 3, side, side, device=dev) * 2 - 1
    ids = tok(
        ["a photo of a <bench-d>"] * batch_size,
        padding="max_length",
        max_length=tok.model_max_length,
        return_tensors="pt",
    ).input_ids.to(dev)
    auto = torch.autocast(dev.type, dtype=torch.bfloat16) if use_bf16 else torch.autocast(dev.type, enabled=False)

    def micro_step() -> None:
        with auto:
            lat = vae.encode(pixels.to(wdtype)).latent_dist.sample().detach() * vae.config.scaling_factor
            noise = torch.randn_like(lat)
            t = torch.randint(0, sched.config.num_train_timesteps, (batch_size,), device=dev)
            noisy = sched.add_noise(lat, noise, t)
            hidden = te(ids)[0].to(wdtype)
            pred = unet(noisy, t, hidden).sample
        target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(lat, noise, t)
        (F.mse_loss(pred.float(), target.float()) / grad_accum).backward()

    def step() -> None:
        for _ in range(grad_accum):
            micro_step()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            table[keep] = orig[keep]

    for _ in range(warmup):
        step()
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(dev)
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None
    return BenchResult(
        "diffusers-example-style",
        str(dev),
        batch_size,
        grad_accum,
        steps,
        dt,
        steps / dt,
        steps * batch_size * grad_accum / dt,
        peak,
        latent_side=side // vae_factor(model),
    )


@dataclass(frozen=True)
class ReferenceRecipe:
    """One way of running diffusers' textual-inversion script: its batch, accumulation and precision flags."""

    name: str
    batch_size: int
    grad_accum: int
    mixed_precision: str  # the script's --mixed_precision: no, bf16, fp16
    cuda_only: bool = False  # bf16 on a CPU says nothing about what a user runs


# The script's README recipe (examples/textual_inversion/README.md: batch 1 x accumulation 4 in fp32), and bf16 at
# batch 4, its best that a user is likely to choose on a GPU.
REFERENCE_RECIPES = (
    ReferenceRecipe("diffusers script, README recipe (fp32)", 1, 4, "no"),
    ReferenceRecipe("diffusers script, bf16", 4, 1, "bf16", cuda_only=True),
)


def reference_command(
    script: Path, model: str, photos: Path, out: Path, recipe: ReferenceRecipe, resolution: int, steps: int
) -> list[str]:
    """The script's command line: its README's arguments, with the recipe's batch and precision and `steps`."""
    return [
        sys.executable,
        str(script),
        f"--pretrained_model_name_or_path={model}",
        f"--train_data_dir={photos}",
        "--learnable_property=object",
        "--placeholder_token=<bench-ref>",
        "--initializer_token=object",
        f"--resolution={resolution}",
        f"--train_batch_size={recipe.batch_size}",
        f"--gradient_accumulation_steps={recipe.grad_accum}",
        f"--max_train_steps={steps}",
        "--learning_rate=5.0e-04",
        "--scale_lr",
        "--lr_scheduler=constant",
        "--lr_warmup_steps=0",
        f"--mixed_precision={recipe.mixed_precision}",
        "--seed=0",
        f"--output_dir={out}",
        # its saves (every 500 steps by default) past the run's end: a save in the long run only would not cancel
        f"--save_steps={steps + 1}",
        f"--checkpointing_steps={steps + 1}",
    ]


def bench_reference_script(
    script: Path,
    model: str,
    recipe: ReferenceRecipe,
    resolution: int,
    steps: tuple[int, int] = (5, 25),
    device: str = "auto",
    timeout: float | None = None,
) -> BenchResult:
    """Time diffusers' textual-inversion script, run unchanged on `model` (a diffusers folder or hub id).

    The script is run twice, for `steps[0]` and `steps[1]` optimiser steps, and its rate is the difference of the
    step counts over the difference of the wall times: start-up, model loading and saving cancel out, as the
    warm-up steps do for oneword's loops (the result's `warmup_seconds` is the whole short run). Its arguments are
    its README's, with its intermediate saves moved past the run's end. It trains on five random photos written to
    a scratch folder.

    Raises:
        OnewordError: the script is missing, exits with an error (its last output is in the message), or writes
            no embedding.
    """
    from PIL import Image

    from oneword.errors import OnewordError

    script = Path(script)
    if not 0 < steps[0] < steps[1]:
        raise ValueError(f"reference steps must be a short and a longer run, not {steps}")
    if not script.is_file():
        raise OnewordError(
            f"reference script {script} does not exist",
            hint="pass the path of examples/textual_inversion/textual_inversion.py from a diffusers checkout "
            "(docs/benchmarks.md names the commit)",
        )
    dev = resolve_device(device)
    env = dict(os.environ)
    if dev.type == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # accelerate takes a GPU whenever it sees one
    elif dev.type == "cuda":
        if dev.index is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(dev.index)
        torch.cuda.empty_cache()  # the memory oneword's loops cached is the script's to use
    walls = []
    with tempfile.TemporaryDirectory(prefix="oneword-ref-") as tmp:
        photos = Path(tmp) / "photos"
        photos.mkdir()
        g = torch.Generator().manual_seed(0)
        for i in range(5):
            pixels = torch.randint(0, 256, (resolution, resolution, 3), generator=g, dtype=torch.uint8)
            Image.fromarray(pixels.numpy()).save(photos / f"{i}.png")
        for n in steps:
            out = Path(tmp) / f"out-{n}"
            cmd = reference_command(script, model, photos, out, recipe, resolution, n)
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
            walls.append(time.perf_counter() - t0)
            if proc.returncode != 0 or not (out / "learned_embeds.safetensors").is_file():
                tail = (proc.stderr or proc.stdout)[-2000:]
                raise OnewordError(
                    f"the reference script {script} failed ({recipe.name}, {n} steps, exit {proc.returncode}):\n{tail}",
                    hint="check that diffusers, torchvision and tensorboard are installed for "
                    f"{sys.executable}, and that the script matches the installed diffusers",
                )
    timed = steps[1] - steps[0]
    seconds = walls[1] - walls[0]
    if seconds <= 0:
        raise OnewordError(
            f"the reference script's longer run was not slower ({walls[0]:.1f} s, {walls[1]:.1f} s)",
            hint="give it more steps (oneword bench --steps)",
        )
    per_step = recipe.batch_size * recipe.grad_accum
    return BenchResult(
        recipe.name,
        str(dev),
        recipe.batch_size,
        recipe.grad_accum,
        timed,
        seconds,
        timed / seconds,
        timed * per_step / seconds,
        None,
        warmup_seconds=walls[0],
        latent_side=resolution // profiles.vae_factor(model),
    )


SHAPES = ("sd15", "sdxl")  # random-weight models with a real family's architecture (`oneword.random_models`)


def load_bench_model(base_model: str | None, shape: str = "", parts=("unet", "vae")) -> LoadedModel:
    """The model to benchmark: a given one, a real architecture with random weights (`shape`: sd15 or sdxl,
    built once per process), or the tiny model."""
    return load_base_model(bench_model_path(base_model, shape), parts=parts)


def bench_model_path(base_model: str | None, shape: str = "") -> str:
    """Where the model to benchmark is: `base_model`, or the random-weight model of `shape`, built on first use."""
    return base_model or str(_built(shape))


@functools.cache
def _built(shape: str) -> Path:
    from oneword.random_models import build_sd15_shape_model, build_sdxl_shape_model, build_tiny_model

    builders = {"": build_tiny_model, "sd15": build_sd15_shape_model, "sdxl": build_sdxl_shape_model}
    if shape not in builders:
        raise ValueError(f"unknown model shape {shape!r}: use one of {', '.join(SHAPES)}")
    d = Path(tempfile.mkdtemp(prefix="oneword-bench-"))
    atexit.register(shutil.rmtree, d, ignore_errors=True)  # SDXL's shape alone is 14 GB of random weights
    return builders[shape](d / "model")
