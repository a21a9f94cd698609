"""`oneword preflight`: check, in seconds, everything a run will need before it trains."""

from __future__ import annotations

from typing import Annotated

import typer

from oneword.cli.app import app
from oneword.cli.options import BASE_MODEL_HELP, parameter
from oneword.cli.run import BASE_MODEL
from oneword.pipelines.parameters import DEFAULTS as D


@app.command("preflight", short_help="Check what a run will need, in seconds.")
def preflight_cmd(
    base_model: Annotated[str, typer.Option(help=BASE_MODEL_HELP)] = BASE_MODEL,
    images: Annotated[str | None, typer.Option(help="folder or s3:// prefix of the concept's photos")] = None,
    token: Annotated[str | None, typer.Option(help="the new pseudo-word, e.g. '<my-cat>'")] = None,
    init_word: Annotated[str | None, typer.Option(help="one-token word to start from, e.g. cat")] = None,
    clip_model: Annotated[str, parameter("clip_model")] = D["clip_model"],
    tracking_uri: Annotated[str, parameter("tracking_uri")] = D["tracking_uri"],
    experiment: Annotated[str, parameter("experiment")] = D["experiment"],
    checkpoint_root: Annotated[str, typer.Option(help="folder or s3:// prefix for checkpoints")] = "",
    prompt_set: Annotated[str, parameter("prompt_set")] = D["prompt_set"],
    dino_model: Annotated[str, parameter("dino_model")] = D["dino_model"],
) -> None:
    """Check the base model, the evaluators, the prompt set, the tracking server, the buckets and the concept.

    \b
    Example:
      oneword preflight --base-model ./sd15 --images photos/my-cat \\
        --token '<my-cat>' --init-word cat
    """
    from oneword.preflight import preflight

    given = {"images": images, "token": token, "init_word": init_word}
    missing = [k for k, v in given.items() if v is None]
    if 0 < len(missing) < len(given):
        from oneword.errors import OnewordError

        options = ", ".join("--" + k.replace("_", "-") for k in missing)
        raise OnewordError(f"the concept's check needs {options} too",
                           hint="give --images, --token and --init-word together, or none of them")  # fmt: skip
    import logging

    from rich import print as rprint

    concepts = [] if missing else [given]
    quiet = logging.getLogger("oneword.preflight")
    level, _ = quiet.level, quiet.setLevel(logging.WARNING)  # its log line would say the answer twice
    try:
        passed = preflight(base_model, concepts, clip_model, tracking_uri, experiment, checkpoint_root, prompt_set,
                           dino_model)  # fmt: skip
    finally:
        quiet.setLevel(level)
    rprint(f"[green]preflight passed[/]: {', '.join(passed)}")
    if not concepts:
        rprint("  no concept checked: give --images, --token and --init-word to check one")
