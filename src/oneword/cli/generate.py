"""`oneword generate`: draw prompts with learned concepts."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from oneword.cli.app import app, person_waits
from oneword.cli.options import default, option
from oneword.config import GenerateConfig, TrackingConfig

DRAWN = "generated"


@app.command("generate")
def generate_cmd(
    prompts: Annotated[list[str], typer.Argument(metavar="PROMPT", help="prompts, e.g. 'an oil painting of <my-cat>'")],
    embedding: Annotated[
        list[Path] | None, typer.Option("--embedding", "-e", metavar="FILE", help="embedding file (repeatable)")
    ] = None,
    concept: Annotated[
        list[str] | None,
        typer.Option(
            metavar="REF",
            help="registered concept NAME@alias or NAME/version (repeatable; a bundle: its concepts), from the "
            "MLflow registry",
        ),
    ] = None,
    tracking_uri: Annotated[str, option(TrackingConfig, "tracking_uri")] = default(TrackingConfig, "tracking_uri"),
    base_model: Annotated[
        str | None,
        typer.Option(help="default: the model the (first) embedding or concept was trained on, else toyworld"),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="folder for the images and grid.png, replaced whole (default: a new numbered folder "
            f"under ./{DRAWN}/, which keeps every earlier call's)",
        ),
    ] = None,
    n: Annotated[int, option(GenerateConfig, "n")] = default(GenerateConfig, "n"),
    seed: Annotated[int, option(GenerateConfig, "seed")] = default(GenerateConfig, "seed"),
    steps: Annotated[int | None, option(GenerateConfig, "steps", "--sampling-steps", "--steps")] = default(
        GenerateConfig, "steps"
    ),
    guidance_scale: Annotated[float | None, option(GenerateConfig, "guidance_scale")] = default(
        GenerateConfig, "guidance_scale"
    ),
    device: Annotated[str, option(GenerateConfig, "device")] = default(GenerateConfig, "device"),
    force: Annotated[
        bool, typer.Option("--force", help="load embeddings trained on another model of the same width")
    ] = False,
) -> None:
    """Generate N images per prompt and a grid.

    \b
    Example:
      oneword generate "a photo of <my-cat> on the moon" \\
        -e runs/my-cat/eval/embedding/learned_embeds.safetensors
    """
    from rich import print as rprint

    files = list(embedding or [])
    numbered = out is None
    out = out or next_folder(Path(DRAWN))
    try:
        grid = _draw(
            prompts,
            files,
            concept,
            tracking_uri,
            base_model,
            out,
            force,
            GenerateConfig(n=n, seed=seed, steps=steps, guidance_scale=guidance_scale, device=device),
        )
    except BaseException:
        if numbered and out.is_dir() and not any(out.iterdir()):  # made for this call, and empty: not left behind
            out.rmdir()
        raise
    rprint(f"[green]grid[/] -> {grid}")


def _draw(
    prompts: list[str],
    files: list[Path],
    concept: list[str] | None,
    tracking_uri: str,
    base_model: str | None,
    out: Path,
    force: bool,
    config: GenerateConfig,
) -> Path:
    """Pull the registered concepts, pick the model and draw."""
    import tempfile

    from oneword.generate import generate
    from oneword.profiles import TOYWORLD

    with tempfile.TemporaryDirectory(prefix="oneword-pull-") as pulled_into:  # gone once drawn
        if concept:
            from oneword.catalogue import pull_concepts
            from oneword.tracking import existing_store

            with person_waits():
                pulled, model_source = pull_concepts(concept, existing_store(tracking_uri), Path(pulled_into))
            files += pulled
            base_model = base_model or model_source
        if not base_model and files:  # the model the first file was trained on, as a registered concept's
            from oneword.embeddings import load

            base_model = load(files[0]).meta.get("model_source") or None
            named_only = base_model and "/" not in base_model and "\\" not in base_model
            if named_only and base_model != TOYWORLD and not Path(base_model).exists():
                from oneword.errors import OnewordError

                raise OnewordError(
                    f"{files[0]} names the model it was trained on ({base_model!r}) but not where it is: a file "
                    "exported or pulled for sharing keeps no local path or bucket",
                    hint=f"pass --base-model: where {base_model!r} is (its folder, checkpoint, s3:// prefix or hub id)",
                )
        return generate(base_model or TOYWORLD, files, prompts, out, config, force=force)


def next_folder(root: Path) -> Path:
    """A new folder under `root`, numbered one past the highest there (0001, 0002, ...), made at once: two calls
    at the same moment get one each.

    The hidden names count too (`.0001.tmp-*`, `.0001.lock`, `.0001.old-*`: `storage.atomic_dir`'s): while a
    call moves its pictures in, `0001` is briefly absent, and another call must not take it then.
    """
    root.mkdir(parents=True, exist_ok=True)
    taken = (re.match(r"\.?(\d+)(?:\.|$)", p.name) for p in root.iterdir())
    n = max((int(m.group(1)) for m in taken if m), default=0)
    while True:
        n += 1
        try:
            (root / f"{n:04d}").mkdir()
            return root / f"{n:04d}"
        except FileExistsError:  # another call took it first
            continue
