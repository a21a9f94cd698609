"""`oneword compile`: write components/*.yaml and pipelines/*.yaml, or check they are up to date."""

from pathlib import Path
from typing import Annotated

import typer

from oneword.cli.app import app


@app.command("compile", short_help="Compile the KFP components and pipelines.")
def compile_cmd(
    root: Annotated[Path, typer.Option(help="repository root holding components/ and pipelines/")] = Path("."),
    check: Annotated[bool, typer.Option("--check", help="fail if the checked-in specs are stale")] = False,
    image_registry: Annotated[
        str | None,
        typer.Option(
            help="registry the specs pull oneword's images from (default: the published ones, ghcr.io/oneword-ml)",
            envvar="ONEWORD_IMAGE_REGISTRY",
        ),
    ] = None,
) -> None:
    """Compile the KFP components and pipelines (what users upload to the dashboard).

    \b
    Examples:
      oneword compile
      oneword compile --check      # in CI: fails if a checked-in spec is stale
    """
    from rich import print as rprint

    from oneword.errors import OnewordError
    from oneword.pipelines.compile import compile_all, stale_files
    from oneword.pipelines.container import PUBLISHED_REGISTRY

    if image_registry and image_registry.rstrip("/") == PUBLISHED_REGISTRY:  # what the released specs name
        image_registry = None

    if check:
        if image_registry:
            raise OnewordError(
                "--check compares with the checked-in specs, which use the published images",
                hint="drop --image-registry (or unset ONEWORD_IMAGE_REGISTRY) for --check",
            )
        problems = stale_files(root)
        if problems:
            raise OnewordError(
                "compiled specs are stale:\n" + "\n".join(problems),
                hint="run `oneword compile` and commit components/ and pipelines/",
            )
        rprint("[green]components/ and pipelines/ are up to date[/]")
        return
    if image_registry and (root / "src" / "oneword").is_dir():  # e.g. ONEWORD_IMAGE_REGISTRY set for `submit`
        raise OnewordError(
            f"{root.resolve()} is oneword's repository: its components/ and pipelines/ are the released specs, "
            f"which pull the published images, and would be rewritten to pull from {image_registry}",
            hint="write your registry's specs elsewhere (--root my-specs), or unset ONEWORD_IMAGE_REGISTRY to "
            "compile the released ones",
        )
    for p in compile_all(root, image_registry):
        rprint(f"wrote {p}")
