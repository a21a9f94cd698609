"""`oneword register`: log a trained, evaluated concept to MLflow and register a version (with the gate)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from oneword.cli.app import app


@app.command("register")
def register_cmd(
    trained: Annotated[Path, typer.Argument(help="folder written by `oneword train`")],
    evaluation: Annotated[Path | None, typer.Option("--eval", help="folder written by `oneword evaluate`")] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI (default: ./mlflow.db)")] = None,
    name: Annotated[str | None, typer.Option(help="registered-model name (default: from the token)")] = None,
    experiment: Annotated[str, typer.Option(help="MLflow experiment")] = "oneword",
    min_reconstruction: Annotated[float, typer.Option(help="quality gate: minimum reconstruction")] = -1.0,
    min_editability: Annotated[float, typer.Option(help="quality gate: minimum editability")] = -1.0,
) -> None:
    """Register a concept; it becomes `champion` only if it passes the gate and beats the current one.

    Example: oneword register runs/my-cat/train --eval runs/my-cat/eval --tracking-uri http://mlflow:5000
    """
    from rich import print as rprint

    from oneword.evaluation.gate import GateThresholds
    from oneword.registry import register

    r = register(
        trained,
        evaluation,
        tracking_uri,
        name=name,
        experiment=experiment,
        thresholds=GateThresholds(min_reconstruction, min_editability),
    )
    rprint(f"[green]{r.name}[/] version {r.version} -> [bold]{r.alias}[/] ({r.reason}); run {r.run_id}")
