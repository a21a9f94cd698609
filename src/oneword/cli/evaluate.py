"""`oneword evaluate`: the paper's CLIP metrics for a trained concept, checkpoint selection and a report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from oneword.cli.app import app


@app.command("evaluate")
def evaluate_cmd(
    trained: Annotated[Path, typer.Argument(help="folder written by `oneword train`")],
    data: Annotated[Path, typer.Option("--data", help="the preprocessed training images (oneword preprocess)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for metrics.json, report.html, grid.png")],
    base_model: Annotated[str | None, typer.Option(help="default: the model the concept was trained on")] = None,
    prompt_set: Annotated[
        str, typer.Option(help="paper, neti15, dreambench-object, dreambench-live, toyworld, or a file")
    ] = "paper",
    n_images: Annotated[int, typer.Option(help="images per prompt (paper: 64)")] = 64,
    steps: Annotated[int, typer.Option(help="DDIM steps (paper: 50)")] = 50,
    guidance_scale: Annotated[float, typer.Option(help="guidance (paper: 5.0)")] = 5.0,
    clip_model: Annotated[
        str, typer.Option(help="CLIP evaluator: auto, toyworld-clip, a folder, s3://, hub id")
    ] = "auto",
    dino_model: Annotated[str, typer.Option(help="DINO ViT, e.g. facebook/dino-vits16 (empty: skip)")] = "",
    checkpoint_budget: Annotated[int, typer.Option(help="images per prompt per checkpoint (0: no selection)")] = 8,
    selection_tolerance: Annotated[
        float, typer.Option(help="pick the most editable checkpoint within this much of the best reconstruction")
    ] = 0.02,
    baselines: Annotated[bool, typer.Option(help="compute image-only / prompt-only ceilings")] = True,
    seed: Annotated[int, typer.Option(help="seed of image 0 of each prompt")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, ...")] = "auto",
) -> None:
    """Score a concept (reconstruction, editability, DINO), pick a checkpoint and write a report.

    Example: oneword evaluate runs/my-cat/train --data runs/my-cat/data -o runs/my-cat/eval --prompt-set neti15
    """
    from rich import print as rprint

    from oneword.evaluation import EvalConfig, evaluate

    cfg = EvalConfig(
        prompt_set=prompt_set,
        n_images=n_images,
        steps=steps,
        guidance_scale=guidance_scale,
        clip_model=clip_model,
        dino_model=dino_model,
        checkpoint_budget=checkpoint_budget,
        selection_tolerance=selection_tolerance,
        baselines=baselines,
        seed=seed,
        device=device,
    )
    m = evaluate(trained, data, out, cfg, base_model=base_model)
    rprint(
        f"[green]{m['token']}[/] step {m['step']}: reconstruction {m['reconstruction']:.4f}, "
        f"editability {m['editability']:.4f} -> {out}/report.html"
    )
