"""`oneword run` and `oneword batch`: the pipelines on this machine (kfp.local), no cluster needed."""

import json
from pathlib import Path
from typing import Annotated

import typer

from oneword.cli.app import app


def _auto(base_model: str, resolution: int, templates: str, prompt_set: str) -> tuple[int, str, str]:
    from oneword.models import native_resolution

    toy = base_model == "toyworld"
    return (
        resolution or native_resolution(base_model),
        templates or ("toyworld" if toy else "object"),
        prompt_set or ("toyworld" if toy else "paper"),
    )


@app.command("run")
def run_cmd(
    images: Annotated[str, typer.Option(help="folder or s3:// prefix of 3-5 photos of the concept")],
    token: Annotated[str, typer.Option(help="the new pseudo-word, e.g. '<my-cat>'")],
    init_word: Annotated[str, typer.Option(help="one-token word to start from, e.g. cat")],
    base_model: Annotated[str, typer.Option(help="toyworld, a diffusers folder, s3://..., or a hub id")] = "toyworld",
    name: Annotated[str, typer.Option(help="registered-model name (default: from the token)")] = "",
    steps: Annotated[int, typer.Option(help="optimiser steps (paper: 5000)")] = 5000,
    batch_size: Annotated[int, typer.Option(help="images per step (paper: 4)")] = 4,
    learning_rate: Annotated[float, typer.Option(help="base LR, times the batch size")] = 0.005,
    scale_lr: Annotated[bool, typer.Option(help="multiply the LR by the batch size (paper)")] = True,
    progressive_every: Annotated[int, typer.Option(help="add vector k at step k*N (paper: 2000); 0: all")] = 0,
    n_vectors: Annotated[int, typer.Option(help="vectors per token")] = 1,
    init_l2: Annotated[float, typer.Option(help="L2 pull toward the initializer")] = 0.0,
    resolution: Annotated[int, typer.Option(help="training image side (0: the model's native size)")] = 0,
    mode: Annotated[str, typer.Option(help="crop or pad the photos to a square")] = "crop",
    templates: Annotated[str, typer.Option(help="object, style, toyworld (default: by model)")] = "",
    checkpoint_every: Annotated[int, typer.Option(help="steps between checkpoints")] = 500,
    prompt_set: Annotated[str, typer.Option(help="evaluation prompts (default: toyworld or paper)")] = "",
    n_images: Annotated[int, typer.Option(help="evaluation images per prompt")] = 64,
    sampling_steps: Annotated[int, typer.Option(help="DDIM steps for evaluation (0: 25 for toyworld, else 50)")] = 0,
    guidance_scale: Annotated[float, typer.Option(help="evaluation guidance (0: 4 for toyworld, else 5)")] = 0.0,
    clip_model: Annotated[str, typer.Option(help="CLIP evaluator (auto: by model)")] = "auto",
    dino_model: Annotated[str, typer.Option(help="DINO model for subject fidelity ('' = off)")] = "",
    checkpoint_budget: Annotated[int, typer.Option(help="images per prompt per checkpoint")] = 8,
    min_reconstruction: Annotated[float, typer.Option(help="quality gate: least reconstruction (-1: off)")] = -1.0,
    min_editability: Annotated[float, typer.Option(help="quality gate: least editability (-1: off)")] = -1.0,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow URI (default: ./mlflow.db)")] = None,
    experiment: Annotated[str, typer.Option(help="MLflow experiment")] = "oneword",
    pipeline_root: Annotated[Path, typer.Option(help="where KFP writes artifacts")] = Path("runs/kfp"),
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    log_file: Annotated[Path | None, typer.Option(help="write the steps' logs here instead of the terminal")] = None,
) -> None:
    """Run the whole textual_inversion pipeline on this machine with kfp.local, then print where it all is.

    Example: oneword run --images photos/my-cat --token '<my-cat>' --init-word cat --base-model ./sd15
    """
    from rich import print as rprint

    from oneword.pipelines.local import run_textual_inversion

    resolution, templates, prompt_set = _auto(base_model, resolution, templates, prompt_set)
    out = run_textual_inversion(
        pipeline_root,
        tracking_uri,
        log_file,
        images=images,
        token=token,
        init_word=init_word,
        base_model=base_model,
        name=name,
        steps=steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        scale_lr=scale_lr,
        progressive_every=progressive_every,
        n_vectors=n_vectors,
        init_l2=init_l2,
        resolution=resolution,
        mode=mode,
        templates=templates,
        checkpoint_every=checkpoint_every,
        prompt_set=prompt_set,
        n_images=n_images,
        sampling_steps=sampling_steps or (25 if base_model == "toyworld" else 50),
        guidance_scale=guidance_scale or (4.0 if base_model == "toyworld" else 5.0),
        clip_model=clip_model,
        dino_model=dino_model,
        checkpoint_budget=checkpoint_budget,
        min_reconstruction=min_reconstruction,
        min_editability=min_editability,
        experiment=experiment,
        seed=seed,
    )
    rprint(f"[bold green]registered[/] {out['registered']}  ({out['seconds']:.0f} s)")
    if out.get("metrics"):
        m = json.loads(Path(out["metrics"]).read_text())
        rprint(
            f"  reconstruction {m['reconstruction']:.4f}, editability {m['editability']:.4f} "
            f"(step {m['step']}; baselines {m.get('baselines')})"
        )
    for k in ("report", "grid", "embedding", "run_dir", "tracking_uri"):
        rprint(f"  {k:13s} {out.get(k)}")


@app.command("batch")
def batch_cmd(
    concepts_manifest: Annotated[str, typer.Argument(help="YAML listing images, token and init_word per concept")],
    base_model: Annotated[str, typer.Option(help="toyworld, a diffusers folder, s3://..., or a hub id")] = "toyworld",
    steps: Annotated[int, typer.Option(help="optimiser steps")] = 5000,
    resolution: Annotated[int, typer.Option(help="training image side (0: the model's native size)")] = 0,
    prompt_set: Annotated[str, typer.Option(help="evaluation prompts (default: toyworld or paper)")] = "",
    n_images: Annotated[int, typer.Option(help="evaluation images per prompt")] = 64,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow URI (default: ./mlflow.db)")] = None,
    pipeline_root: Annotated[Path, typer.Option(help="where KFP writes artifacts")] = Path("runs/kfp"),
    concepts_per_shard: Annotated[int, typer.Option(help="concepts trained together in one job")] = 4,
) -> None:
    """Run batch_personalisation on this machine: every concept of a manifest, each registered on its own.

    Example: oneword batch k8s/examples/concepts.yaml --base-model toyworld --steps 300
    """
    from rich import print as rprint

    from oneword.pipelines.local import run_batch

    resolution, _, prompt_set = _auto(base_model, resolution, "", prompt_set)
    report = run_batch(
        concepts_manifest,
        pipeline_root,
        tracking_uri,
        base_model=base_model,
        steps=steps,
        resolution=resolution,
        prompt_set=prompt_set,
        n_images=n_images,
        concepts_per_shard=concepts_per_shard,
    )
    rprint(report)
