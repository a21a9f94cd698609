"""`oneword profiles`: the settings each model family trains and evaluates with, unless told otherwise."""

from __future__ import annotations

from typing import Annotated

import typer

from oneword.cli.app import app


@app.command("profiles", short_help="Print the per-model-family defaults.")
def profiles_cmd(
    base_model: Annotated[
        str | None, typer.Option(help="show the profile this model gets (read from its config files)")
    ] = None,
) -> None:
    """Print the model profiles (or one model's): resolution, templates, recipe, sampler, evaluator.

    \b
    Example:
      oneword profiles --base-model ./my-sd21-finetune
    """
    from rich.console import Console
    from rich.table import Table

    from oneword.profiles import PROFILES, ModelProfile, profile

    shown = {base_model: profile(base_model, strict=True)} if base_model else PROFILES
    t = Table(title="model profiles" if not base_model else f"profile of {base_model}")
    t.add_column("setting", no_wrap=True)
    for name in shown:
        t.add_column(name if not base_model else shown[name].family, overflow="fold")
    for field in ModelProfile.model_fields:
        if field not in ("family", "clip_model"):
            t.add_row(field, *(str(getattr(p, field)) for p in shown.values()))
    # The evaluators' hub ids are too long for a column each in 80 columns: they go under the table.
    by_clip: dict[str, list[str]] = {}
    for name, p in shown.items():
        by_clip.setdefault(p.clip_model, []).append(name if not base_model else p.family)
    console = Console()
    console.print(t)
    for clip, names in by_clip.items():  # a line each, left as the table is: a caption is centred under it
        console.print(f"CLIP evaluator of {', '.join(names)}: {clip}", highlight=False)
