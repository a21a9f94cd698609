"""`oneword compile`: write components/*.yaml and pipelines/*.yaml, or check they are up to date."""

from pathlib import Path
from typing import Annotated

import typer

from oneword.cli.app import app


@app.command("compile")
def compile_cmd(
    root: Annotated[Path, typer.Option(help="repository root holding components/ and pipelines/")] = Path("."),
    check: Annotated[bool, typer.Option("--check", help="fail if the checked-in specs are stale")] = False,
    image_registry: Annotated[
        str | None,
        typer.Option(help="registry of the oneword images (default ghcr.io/oneword-ml, or $ONEWORD_IMAGE_REGISTRY)"),
    ] = None,
) -> None:
    """Compile the KFP components and pipelines (what users upload to the dashboard).

    Examples: oneword compile; oneword compile --check (CI)
    """
    import os

    from rich import print as rprint

    if image_registry:  # read when the components module is imported, just below
        os.environ["ONEWORD_IMAGE_REGISTRY"] = image_registry

    from oneword.errors import OnewordError
    from oneword.pipelines.compile import compile_all, stale_files

    if check:
        problems = stale_files(root)
        if problems:
            raise OnewordError(
                "compiled specs are stale:\n" + "\n".join(problems),
                hint="run `oneword compile` and commit components/ and pipelines/",
            )
        rprint("[green]components/ and pipelines/ are up to date[/]")
        return
    for p in compile_all(root):
        rprint(f"wrote {p}")
