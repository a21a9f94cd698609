"""`oneword cache-latents`: encode a preprocessed dataset with the base model's VAE, once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from oneword.cli.app import app
from oneword.cli.options import BASE_MODEL_HELP
from oneword.profiles import TOYWORLD


@app.command("cache-latents", short_help="Encode the photos with the model's VAE, once.")
def cache_latents_cmd(
    data: Annotated[Path, typer.Argument(metavar="DATA", help="dataset folder written by `oneword preprocess`")],
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for latents.safetensors")],
    base_model: Annotated[
        str, typer.Option(help=BASE_MODEL_HELP)
    ] = TOYWORLD,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, ...")] = "auto",
    cache_dir: Annotated[
        Path | None, typer.Option(help="shared latent cache (default $ONEWORD_CACHE/latents, ~/.cache/oneword/latents)")
    ] = None,
) -> None:
    """Encode each image and its mirror with the VAE (mean and std), reusing the shared cache.

    \b
    Example:
      oneword cache-latents runs/my-cat/data -o runs/my-cat/latents \\
        --base-model toyworld
    """
    from rich import print as rprint

    from oneword.device import resolve_device
    from oneword.latents import cache_latents

    lat = cache_latents(data, base_model, out, cache_dir=cache_dir, device=str(resolve_device(device)))
    rprint(f"[green]{len(lat)} image(s)[/] x 2 flips -> {out}/latents.safetensors")
