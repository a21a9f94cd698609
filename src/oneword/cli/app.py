"""The `oneword` Typer app that every subcommand module registers on."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="oneword",
    help="Textual Inversion as production software: learn one new word for a concept in a frozen text-to-image model.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # click's own help: rich's option table cut long option names ("--progressive-eve…") in an 80-column terminal
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        from oneword import __version__

        print(__version__)
        raise typer.Exit()


# Set by the root options; read by `oneword.cli.main` when a command fails.
STATE = {"verbose": False}


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print oneword's version (the image tag) and exit."
    ),
    verbose: bool = typer.Option(False, "--verbose", help="On an error, print the traceback too."),
) -> None:
    """Textual Inversion as production software."""
    STATE["verbose"] = verbose
