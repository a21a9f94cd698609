"""`oneword toyworld ...`: the toy world's model, concepts and quality benchmark."""

from pathlib import Path
from typing import Annotated

import typer

from oneword.cli.app import app
from oneword.cli.options import default, option
from oneword.config import EvalConfig
from oneword.profiles import TOYWORLD

toy = typer.Typer(help="The toy world: a small text-to-image model oneword trains and ships.", no_args_is_help=True)
app.add_typer(toy, name=TOYWORLD, short_help="The toy world: a small model oneword ships.")


@toy.command("train", short_help="Train the toy-world model and its evaluators.")
def train_cmd(
    work_dir: Annotated[Path, typer.Option(help="working folder (each finished stage is kept and reused)")],
    seed: Annotated[int, typer.Option(help="seed of the world's pictures and of every model")] = 0,
    unet_steps: Annotated[int, typer.Option(help="joint text-encoder + UNet steps at batch 128")] = 10_000,
    install: Annotated[bool, typer.Option(help="copy the result into the package (--base-model toyworld)")] = False,
) -> None:
    """Train the toy-world model, its CLIP and DINO evaluators and its oracle from scratch.

    \b
    Example:
      oneword toyworld train --work-dir runs/toyworld --install   # 3 h, 2 cores
    """
    from rich import print as rprint

    from oneword.toyworld.export import install_assets
    from oneword.toyworld.train import ToyTrainConfig, train

    model = train(work_dir, ToyTrainConfig(seed=seed, unet_steps=unet_steps))
    rprint(f"[green]model[/] -> {model}")
    if install:
        rprint(f"[green]installed[/] -> {install_assets(work_dir)}")


@toy.command("concept")
def concept_cmd(
    name: Annotated[str, typer.Argument(metavar="NAME", help="a held-out concept, e.g. purple-star (or red-heart)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for the pictures")],
    n: Annotated[int, typer.Option(help="how many pictures")] = 5,
    seed: Annotated[int, typer.Option(help="seed")] = 0,
) -> None:
    """Write the training pictures of a held-out concept.

    \b
    Example:
      oneword toyworld concept purple-star -o photos/purple-star
    """
    from rich import print as rprint

    from oneword.toyworld.concepts import write_concept

    files = write_concept(name, out, n=n, seed=seed)
    rprint(f"[green]{len(files)} pictures[/] -> {out}")


@toy.command("quality", short_help="Learn each held-out concept and measure it.")
def quality_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for quality.json, quality.md and pictures")] = Path(
        "runs/quality"
    ),
    concept: Annotated[list[str] | None, typer.Option(metavar="NAME", help="only these concepts (repeatable)")] = None,
    sweep: Annotated[bool, typer.Option(help="also sweep learning rate, the regularisers and steps")] = True,
    setting: Annotated[
        list[str] | None,
        typer.Option(metavar="NAME", help="only these settings (repeatable), e.g. default, l2-decay, cos-on"),
    ] = None,
    n_images: Annotated[int, typer.Option(help="pictures per prompt for the oracle and CLIP")] = 32,
    seed: Annotated[
        list[int] | None, typer.Option(metavar="INT", help="seed (repeatable: every run once per seed)")
    ] = None,
    fresh: Annotated[bool, typer.Option(help="redo runs already recorded in OUT/runs.jsonl")] = False,
    checkpoint_budget: Annotated[int, option(EvalConfig, "checkpoint_budget")] = default(
        EvalConfig, "checkpoint_budget"
    ),
) -> None:
    """Learn each held-out concept, then measure it with the oracle and the toy CLIP.

    \b
    Example:
      oneword toyworld quality -o runs/quality --setting default \\
        --setting l2-decay --seed 0 --seed 1 --seed 2
    """
    from rich import print as rprint
    from rich.table import Table

    from oneword.toyworld.quality import measure_quality

    report = measure_quality(
        out,
        concept,
        sweep=sweep,
        n_images=n_images,
        seeds=tuple(seed or [0]),
        settings=setting,
        fresh=fresh,
        checkpoint_budget=checkpoint_budget,
    )
    table = Table("setting", "runs", "targets met", "oracle rec. ± sd", "oracle edit. ± sd", title="toy-world quality")
    for name, row in report["summary"]["by_setting"].items():
        table.add_row(
            name,
            str(row["runs"]),
            f"{row['targets_met']} / {row['runs']}",
            f"{row['reconstruction_oracle']:.2f} ± {row['reconstruction_oracle_sd']:.2f}",
            f"{row['editability_oracle']:.2f} ± {row['editability_oracle_sd']:.2f}",
        )
    rprint(table)
    rprint(f"every run: {out / 'quality.md'}")


@toy.command("base-accuracy", short_help="Check that the base model draws its captions.")
def base_accuracy_cmd(
    n_prompts: Annotated[int, typer.Option(help="grammar captions to draw, one picture each")] = 256,
    base_model: Annotated[str, typer.Option(help="the toy model to check")] = TOYWORLD,
    seed: Annotated[int, typer.Option(help="seed")] = 0,
) -> None:
    """Check that the base model draws what its captions ask (oracle accuracy per attribute).

    \b
    Example:
      oneword toyworld base-accuracy --n-prompts 512
    """
    from rich import print as rprint

    from oneword.toyworld.quality import base_model_accuracy

    rprint(base_model_accuracy(n_prompts, seed, base_model))
