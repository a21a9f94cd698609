"""`oneword preprocess`: photos in, square training images + manifest.json out."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from oneword.cli.app import app
from oneword.cli.options import default, option
from oneword.config import PreprocessConfig


@app.command("preprocess")
def preprocess_cmd(
    images: Annotated[
        str, typer.Argument(metavar="IMAGES", help="folder or s3://bucket/prefix of 3-5 photos of the concept")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="dataset folder to write")],
    resolution: Annotated[int, option(PreprocessConfig, "resolution")] = default(PreprocessConfig, "resolution"),
    mode: Annotated[str, option(PreprocessConfig, "mode")] = default(PreprocessConfig, "mode"),
) -> None:
    """Clean a folder of photos for training.

    \b
    Example:
      oneword preprocess ./photos/my-cat -o runs/my-cat/data --resolution 512
    """
    from rich import print as rprint

    from oneword.images import preprocess

    settings = PreprocessConfig(resolution=resolution, mode=mode)  # type: ignore[arg-type]  # its rules, checked
    m = preprocess(images, out, resolution=settings.resolution, mode=settings.mode)
    # each skipped file was logged with why, above
    rprint(f"[green]{len(m.images)} image(s)[/] -> {out} ({len(m.skipped)} skipped{', above' * bool(m.skipped)})")
