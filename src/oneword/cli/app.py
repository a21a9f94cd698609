"""The `oneword` Typer app that every subcommand module registers on."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import typer

from oneword import tracking


def _wrap_whole_words() -> None:
    """Help text wraps at spaces only: click's wrapper also breaks at hyphens and inside long words, which cut
    hosts, paths and flags in two in an 80-column terminal ("ml-pipeline-" / "ui.kubeflow", "textua" /
    "l_inversion.py"), so that a copied value no longer works. A word longer than a line gets a line of its own,
    and an option's "[default: ...]" counts as one word."""
    try:
        from typer._click import _textwrap  # typer's own copy of click, whose formatter wraps the help
    except ImportError:  # another typer layout: its default wrapping
        return

    class WholeWords(_textwrap.TextWrapper):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **{**kwargs, "break_on_hyphens": False})

        def _handle_long_word(self, reversed_chunks, cur_line, cur_len, width) -> None:
            if not cur_line:  # as textwrap does with break_long_words=False
                cur_line.append(reversed_chunks.pop())

        def _split_chunks(self, text: str) -> list[str]:
            # "[default: 64]" is one word: broken after "default:", the value stood alone on the next line
            chunks, out = super()._split_chunks(text), []
            for chunk in chunks:
                if out and out[-1].startswith("[default:") and not out[-1].endswith("]"):
                    out[-1] += chunk
                else:
                    out.append(chunk)
            return out

    _textwrap.TextWrapper = WholeWords  # the formatter imports it from there each time it wraps


_wrap_whole_words()

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
STATE: dict = {"verbose": False, "argv": []}  # argv: the arguments `main` was given, to print a command again


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print oneword's version (the image tag) and exit."
    ),
    verbose: bool = typer.Option(False, "--verbose", help="On an error, print the traceback too."),
) -> None:
    """Textual Inversion as production software."""
    STATE["verbose"] = verbose


def person_waits():
    """A context in which MLflow's client is as a command a person waits at should use it (`tracking.QUERY_HTTP`,
    where not set otherwise): the commands that ask MLflow and nothing else."""
    return tracking.briefly()


@contextlib.contextmanager
def on_interrupt(message: str) -> Iterator[None]:
    """On Ctrl-C, print `message` (what stopped, how to go on; `{by}` in it says what stopped it) and exit 130, a
    shell's status for SIGINT, not a blank line; on SIGTERM or SIGHUP, which stop a local run too
    (`interrupt.Stopped`), the same with its status."""
    from oneword.processes import Stopped

    try:
        yield
    except KeyboardInterrupt:
        print(f"\ninterrupted: {message.replace('{by}', 'Ctrl-C')}", file=sys.stderr)
        raise typer.Exit(130) from None
    except Stopped as e:  # `timeout`, a scheduler's stop: its log says why the command ended
        print(f"\nstopped by {e.signal}: {message.replace('{by}', e.signal)}", file=sys.stderr)
        raise typer.Exit(e.code) from None
