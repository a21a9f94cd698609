"""`oneword register`: log a trained, evaluated concept to MLflow and register a version (with the gate)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from oneword.cli.app import app, person_waits
from oneword.cli.options import default, option
from oneword.config import GateThresholds, TrackingConfig


@app.command("register", short_help="Register a concept in the MLflow registry.")
def register_cmd(
    trained: Annotated[Path, typer.Argument(metavar="TRAINED", help="folder written by `oneword train`")],
    evaluation: Annotated[Path | None, typer.Option("--eval", help="folder written by `oneword evaluate`")] = None,
    tracking_uri: Annotated[str, option(TrackingConfig, "tracking_uri")] = default(TrackingConfig, "tracking_uri"),
    name: Annotated[str | None, typer.Option(help="registered-model name (default: from the token)")] = None,
    experiment: Annotated[str, option(TrackingConfig, "experiment")] = default(TrackingConfig, "experiment"),
    min_reconstruction: Annotated[float, option(GateThresholds, "min_reconstruction")] = default(
        GateThresholds, "min_reconstruction"
    ),
    min_editability: Annotated[float, option(GateThresholds, "min_editability")] = default(
        GateThresholds, "min_editability"
    ),
    margin_se: Annotated[float, option(GateThresholds, "margin_se")] = default(GateThresholds, "margin_se"),
) -> None:
    """Register a concept; it becomes `champion` if it passes the gate and beats the current one (or passes
    thresholds the current one does not).

    \b
    Example:
      oneword register runs/my-cat/train --eval runs/my-cat/eval \\
        --tracking-uri http://mlflow:5000
    """
    from rich import print as rprint

    from oneword.registry import register

    with person_waits():
        r = register(
            trained,
            evaluation,
            tracking_uri or None,
            name=name,
            experiment=experiment,
            thresholds=GateThresholds(
                min_reconstruction=min_reconstruction, min_editability=min_editability, margin_se=margin_se
            ),
        )
    rprint(f"[green]{r.name}[/] version {r.version} -> [bold]{r.alias}[/] ({r.reason}); run {r.run_id}")
