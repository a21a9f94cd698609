"""`oneword export`: convert an embedding file between formats."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from oneword.cli.app import app


@app.command("export")
def export_cmd(
    embedding: Annotated[Path, typer.Argument(help="embedding file in any supported format")],
    format: Annotated[str, typer.Option("--format", "-f", help="diffusers, a1111 or kohya")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="output file (default: beside the input)")] = None,
    token: Annotated[str | None, typer.Option(help="rename the token")] = None,
) -> None:
    """Write an embedding in another tool's format.

    Example: oneword export runs/my-cat/train/learned_embeds.safetensors --format a1111 -o my-cat.pt
    """
    from rich import print as rprint

    from oneword import embeddings as E
    from oneword.errors import OnewordError

    if format not in E.FORMATS:
        raise OnewordError(f"unknown format {format!r}", hint=f"use one of {', '.join(E.FORMATS)}")
    emb = E.load(embedding)
    if token:
        emb.token = token
    dest = out or embedding.with_name(E.default_filename(emb.token, format))  # type: ignore[arg-type]
    if dest.resolve() == embedding.resolve():
        raise OnewordError(f"{dest} is the input file", hint="pass --out")
    E.save(emb, dest, format)  # type: ignore[arg-type]
    rprint(f"[green]{emb.token}[/] ({emb.n_vectors}x{emb.width}) -> {dest} ({format})")
