"""`oneword compare`: several runs or concepts on one distortion-editability scatter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from oneword.cli.app import app, person_waits
from oneword.cli.options import default, option
from oneword.config import TrackingConfig


@app.command("compare", short_help="Plot several runs' scores on one chart.")
def compare_cmd(
    runs: Annotated[
        list[str],
        typer.Argument(
            metavar="RUN",
            help="evaluation folders (with metrics.json), or registered concepts (NAME, NAME/3, NAME@alias) or "
            "MLflow run ids of the store --tracking-uri names",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG to write")] = Path("compare.png"),
    tracking_uri: Annotated[str, option(TrackingConfig, "tracking_uri")] = default(TrackingConfig, "tracking_uri"),
    label: Annotated[
        list[str] | None, typer.Option(metavar="LABEL", help="a label per run (default: folder name or run id)")
    ] = None,
) -> None:
    """Plot runs on one chart to see the effect of learning rate, vectors or regularisers.

    \b
    Example:
      oneword compare runs/lr-low/eval runs/lr-high/eval -o lr.png
      oneword compare my-cat/3 my-cat@champion -o my-cat.png
    """
    from rich import box
    from rich import print as rprint
    from rich.markup import escape
    from rich.table import Table

    from oneword.evaluation.compare import compare

    with person_waits():
        path = compare(runs, out, labels=label, tracking_uri=tracking_uri)
    scores = path.with_suffix(".json")
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("run", overflow="fold")
    for name in ("step", "reconstruction", "editability"):
        table.add_column(name, justify="right", no_wrap=True)
    for row in json.loads(scores.read_text()):
        table.add_row(escape(str(row["run"])), str(row.get("step") or ""), f"{row['reconstruction']:.4f}",
                      f"{row['editability']:.4f}")  # fmt: skip
    rprint(table)
    rprint(f"[green]scatter[/] -> {path}  (scores: {scores})")
