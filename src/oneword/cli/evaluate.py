"""`oneword evaluate`: the paper's CLIP metrics for a trained concept, checkpoint selection and a report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from oneword.cli.app import app
from oneword.cli.options import default, option
from oneword.config import EvalConfig


@app.command("evaluate", short_help="Score a concept and pick its checkpoint.")
def evaluate_cmd(
    trained: Annotated[Path, typer.Argument(metavar="TRAINED", help="folder written by `oneword train`")],
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for metrics.json, report.html, grid.png, "
                                               "scatter.png and embedding/ (the selected step's files)")],
    data: Annotated[
        Path | None,
        typer.Option(
            help="the preprocessed images to score against (default: the copy of the training images that the "
            "training folder keeps); scores against other images compare with no other evaluation and are not "
            "registered"
        ),
    ] = None,
    base_model: Annotated[str | None, typer.Option(help="default: the model the concept was trained on")] = None,
    prompt_set: Annotated[str | None, option(EvalConfig, "prompt_set")] = default(EvalConfig, "prompt_set"),
    n_images: Annotated[int, option(EvalConfig, "n_images")] = default(EvalConfig, "n_images"),
    steps: Annotated[int | None, option(EvalConfig, "steps", "--sampling-steps", "--steps")] = default(
        EvalConfig, "steps"
    ),
    guidance_scale: Annotated[float | None, option(EvalConfig, "guidance_scale")] = default(
        EvalConfig, "guidance_scale"
    ),
    clip_model: Annotated[str, option(EvalConfig, "clip_model")] = default(EvalConfig, "clip_model"),
    dino_model: Annotated[str, option(EvalConfig, "dino_model")] = default(EvalConfig, "dino_model"),
    checkpoint_budget: Annotated[int, option(EvalConfig, "checkpoint_budget")] = default(
        EvalConfig, "checkpoint_budget"
    ),
    selection_tolerance: Annotated[float, option(EvalConfig, "selection_tolerance")] = default(
        EvalConfig, "selection_tolerance"
    ),
    selection_rule: Annotated[str, option(EvalConfig, "selection_rule")] = default(EvalConfig, "selection_rule"),
    baselines: Annotated[bool, option(EvalConfig, "baselines")] = default(EvalConfig, "baselines"),
    seed: Annotated[int, option(EvalConfig, "seed")] = default(EvalConfig, "seed"),
    device: Annotated[str, option(EvalConfig, "device")] = default(EvalConfig, "device"),
    gpus: Annotated[int, option(EvalConfig, "gpus")] = default(EvalConfig, "gpus"),
) -> None:
    """Score a concept (reconstruction, editability, DINO), pick a checkpoint and write a report.

    \b
    Example:
      oneword evaluate runs/my-cat/train -o runs/my-cat/eval \\
        --prompt-set neti15
    """
    from rich import print as rprint

    from oneword.evaluation.evaluate import evaluate

    cfg = EvalConfig(
        prompt_set=prompt_set,
        n_images=n_images,
        steps=steps,
        guidance_scale=guidance_scale,
        clip_model=clip_model,
        dino_model=dino_model,
        checkpoint_budget=checkpoint_budget,
        selection_tolerance=selection_tolerance,
        selection_rule=selection_rule,  # type: ignore[arg-type]
        baselines=baselines,
        seed=seed,
        device=device,
        gpus=gpus,
    )
    m = evaluate(trained, data, out, cfg, base_model=base_model)
    rprint(
        f"[green]{m['token']}[/] step {m['step']}: reconstruction {m['reconstruction']:.4f}, "
        f"editability {m['editability']:.4f} -> {out}/report.html"
    )
