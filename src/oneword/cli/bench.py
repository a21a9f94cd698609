"""`oneword bench`: print training speed (steps/s, images/s), ours beside a diffusers-example-style loop."""

from __future__ import annotations

import json
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from oneword.cli.app import STATE, app
from oneword.cli.options import default, option
from oneword.config import EvalConfig, TrainConfig


@app.command("bench")
def bench_cmd(
    base_model: Annotated[str | None, typer.Option(help="model to time (default: a tiny random model)")] = None,
    sd15_shape: Annotated[
        bool, typer.Option("--sd15-shape", help="random weights with SD1.5's architecture (for a GPU)")
    ] = False,
    sdxl_shape: Annotated[
        bool,
        typer.Option("--sdxl-shape", help="random weights with SDXL base 1.0's architecture (for a GPU, 1024 px)"),
    ] = False,
    batch_size: Annotated[int, typer.Option(help="oneword's batch size")] = default(TrainConfig, "batch_size"),
    steps: Annotated[int, typer.Option(help="timed optimiser steps (with --eval: DDIM steps per picture)")] = 50,
    resolution: Annotated[int | None, typer.Option(help="image side (default: the model's native size)")] = None,
    device: Annotated[str, option(TrainConfig, "device")] = default(TrainConfig, "device"),
    precision: Annotated[str, option(TrainConfig, "precision")] = default(TrainConfig, "precision"),
    compile: Annotated[
        bool,
        typer.Option(
            "--compile", help="also time compile default (the UNet) and max (one graph; CUDA graphs on a GPU)"
        ),
    ] = False,
    compile_modes: Annotated[
        str, typer.Option(help="with --compile: which compiled loops to time, comma-separated")
    ] = "default,max",
    reference_script: Annotated[
        Path | None,
        typer.Option(
            help="diffusers' textual_inversion.py (examples/textual_inversion): also time it, run unchanged "
            "(its README recipe; on a GPU also bf16 at batch 4) on the same model",
            exists=True, dir_okay=False,  # checked before any loop is timed, not after them all
        ),
    ] = None,
    sequential: Annotated[
        bool, typer.Option(help="with --concepts: also time the K concepts one after another")
    ] = True,
    baseline: Annotated[
        bool,
        typer.Option(
            help="also time the diffusers-example-style loop (batch 1 x accumulation = equal effective batch)"
        ),
    ] = True,
    eval: Annotated[bool, typer.Option("--eval", help="time evaluation sampling (images/s) instead")] = False,
    eval_images: Annotated[
        int, typer.Option(min=1, help="with --eval: pictures to draw (in evaluation's batches)")
    ] = EvalConfig().batch_size,
    clip_model: Annotated[
        str | None, typer.Option(help="with --eval: also time CLIP scoring with this evaluator")
    ] = None,
    gpus: Annotated[
        int,
        typer.Option(
            help="above 1 (0: every visible GPU): time K concepts on one process beside N x K over N processes, "
            "one per GPU (K: the first of --concepts, default 1), and print the scaling"
        ),
    ] = 1,
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the figures to this file")] = None,
    profile_dir: Annotated[
        Path | None,
        typer.Option(
            "--profile",
            help="also record 5 steps of each of oneword's loops with torch.profiler into this folder (a Chrome "
            "trace and the ops by time) and print where a step's time went",
        ),
    ] = None,
    concepts: Annotated[
        str,
        typer.Option(help="comma-separated Ks: K concepts trained together beside one after another, e.g. 1,2,4,8"),
    ] = "",
) -> None:
    """Benchmark textual-inversion training speed.

    \b
    Examples:
      oneword bench
      oneword bench --concepts 1,2,4,8
      oneword bench --sd15-shape --resolution 512 --compile     # on a GPU
      oneword bench --sdxl-shape --resolution 1024              # on a GPU
    """
    from rich.console import Console
    from rich.table import Table

    from oneword import bench, distributed
    from oneword.device import resolve_device
    from oneword.profiles import profile

    if sd15_shape and sdxl_shape:
        raise typer.BadParameter("choose one of --sd15-shape and --sdxl-shape")
    shape = "sd15" if sd15_shape else "sdxl" if sdxl_shape else ""
    try:
        ks = [int(k) for k in concepts.split(",") if k.strip()] if concepts else []
    except ValueError:
        ks = [0]
    if min(ks, default=1) < 1:
        raise typer.BadParameter(f"{concepts!r}: give whole numbers from 1, comma-separated, e.g. 1,2,4,8",
                                 param_hint="'--concepts'")  # fmt: skip
    if baseline and not eval and (sdxl_shape or (base_model and profile(base_model).family == "sdxl")):
        baseline = False  # diffusers' textual-inversion example is SD 1.x/2.x's; its SDXL script is another loop
        typer.echo("SDXL: no diffusers-example-style baseline (that loop is SD 1.x/2.x's)", err=True)
    results: list[bench.BenchResult] = []
    failures: list[str] = []

    def timed(loop: Callable[[], bench.BenchResult | list[bench.BenchResult]]) -> None:
        """Run one loop; a failure is printed and the others still run (a GPU's time is short)."""
        try:
            out = loop()
        except Exception as e:  # reported, and the bench goes on
            if STATE["verbose"]:
                traceback.print_exc()
            typer.echo(f"a loop failed: {type(e).__name__}: {e}", err=True)
            failures.append(str(e))
            return
        results.extend(out if isinstance(out, list) else [out])
        if json_out:  # after every loop, so a bench cut short keeps what it measured
            json_out.write_text(json.dumps([r.as_dict() for r in results], indent=2))

    if eval:
        from oneword.evaluation.bench import bench_eval

        timed(
            lambda: bench_eval(
                base_model, shape, device=device, n_images=eval_images, steps=steps, clip_model=clip_model
            )
        )
    elif (n := distributed.processes(gpus, device)) > 1:
        per = ks[0] if ks else 1
        timed(
            lambda: bench.bench_processes(
                bench.bench_model_path(base_model, shape),
                n,
                batch_size,
                steps,
                per,
                resolution=resolution,
                device=device,
                precision=precision,
                compile="max" if compile else "off",
            )
        )
    elif ks:
        for k in ks:
            timed(  # one K at a time: the largest K running out of memory keeps the figures of the others
                lambda k=k: bench.bench_concepts(
                    lambda: bench.load_bench_model(base_model, shape, parts=("unet",)),
                    [k],
                    batch_size,
                    steps,
                    sequential=sequential,
                    resolution=resolution,
                    device=device,
                    precision=precision,
                    compile="max" if compile else "off",  # a shard's K concepts at the fastest setting
                )
            )
    else:
        modes = ["off"] + ([m.strip() for m in compile_modes.split(",") if m.strip()] if compile else [])
        for mode in modes:
            timed(
                lambda mode=mode: bench.bench_oneword(
                    bench.load_bench_model(base_model, shape, parts=("unet",)),
                    batch_size,
                    steps,
                    resolution=resolution,
                    device=device,
                    precision=precision,
                    compile=mode,
                    profile_dir=profile_dir,
                )
            )
        if baseline:
            timed(
                lambda: bench.bench_diffusers_style(
                    bench.load_bench_model(base_model, shape),
                    1,
                    batch_size,
                    max(3, steps // 10),
                    resolution=resolution,
                    device=device,
                    precision=precision,
                )
            )
        if reference_script is not None and (
            sdxl_shape or profile(bench.bench_model_path(base_model, shape)).family == "sdxl"
        ):
            typer.echo("SDXL: diffusers' textual_inversion.py is SD 1.x/2.x's (its SDXL script is another)", err=True)
        elif reference_script is not None:
            path = bench.bench_model_path(base_model, shape)
            side = resolution or profile(path).resolution
            short = max(2, steps // 10)
            on_gpu = resolve_device(device).type == "cuda"
            for recipe in bench.REFERENCE_RECIPES:
                if recipe.cuda_only and not on_gpu:
                    continue
                timed(
                    lambda recipe=recipe: bench.bench_reference_script(
                        reference_script, path, recipe, side, (short, short + max(5, steps // 2)), device=device
                    )
                )
    # every loop runs on one device: it goes in the title, and the loops' names get the width (80 columns)
    sides = sorted({r.latent_side for r in results if r.latent_side})
    latents = f", {sides[0]} x {sides[0]} latents" if len(sides) == 1 else ""
    table = Table(title=f"oneword bench on {', '.join(dict.fromkeys(r.device for r in results)) or device}{latents}")
    table.add_column("loop", overflow="fold", ratio=1)
    for col in ("batch\nx accum", "steps/s", "images/s", "peak\nMB", "warm-up\ns"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in results:
        table.add_row(
            r.name,
            f"{r.batch_size} x {r.grad_accum}",
            _rate(r.steps_per_second),
            _rate(r.images_per_second),
            "-" if r.peak_memory_mb is None else f"{r.peak_memory_mb:.0f}",
            "-" if r.warmup_seconds is None else f"{r.warmup_seconds:.1f}",
        )
    Console().print(table)
    spread = [r for r in results if ", over " in r.name]
    for many in spread:  # beside the one-process figure bench_processes puts before it
        one, n = results[results.index(many) - 1], int(many.name.rsplit(" over ", 1)[1].split()[0])
        Console().print(
            f"{n} processes: {many.images_per_second / one.images_per_second:.2f}x the images/s of one, "
            f"{many.images_per_second / (n * one.images_per_second):.0%} of linear scaling"
        )
    ours = [r for r in results if r.name.startswith("oneword") and r not in spread]
    for r in results:
        if r.profile:
            Console().print(f"profile of {r.profile}")
    if len(sides) > 1:
        Console().print(f"the loops trained on latents of different sides ({sides}): their figures do not compare")
    for ref in (r for r in results if r.name.startswith("diffusers")):
        if ours and ref.latent_side == ours[0].latent_side:
            best = max(ours, key=lambda r: r.steps_per_second)
            if best.batch_size * best.grad_accum == ref.batch_size * ref.grad_accum:
                ratio = (
                    f"{best.steps_per_second / ref.steps_per_second:.1f}x optimiser steps/s at equal effective batch"
                )
            else:  # steps of different sizes: only images/s compare
                ratio = f"{best.images_per_second / ref.images_per_second:.1f}x images/s (effective batches differ)"
            Console().print(
                f"{best.name} against {ref.name}: {ratio} "
                f"({best.batch_size} x {best.grad_accum} against {ref.batch_size} x {ref.grad_accum})"
            )
    if failures or not results:
        raise typer.Exit(1)  # after the table: what did run is printed and written


def _rate(per_second: float) -> str:
    """A rate with two decimals, or three significant digits below 0.1/s (an SDXL-shaped model on a CPU)."""
    return f"{per_second:.2f}" if per_second >= 0.1 else f"{per_second:.3g}"
