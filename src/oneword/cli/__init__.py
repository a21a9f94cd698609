"""The `oneword` command line: one module per subcommand, each a thin call into the library."""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

from oneword.cli.app import STATE, app
from oneword.errors import OnewordError

# Each import registers its subcommand(s) on `app`.
from oneword.cli import (  # noqa: F401  isort: skip
    preprocess,
    cache_latents,
    train,
    generate,
    export,
    bench,
    evaluate,
    compare,
    register,
    concepts,
    compile,
    run,
    submit,
    toyworld,
    demo,
    profiles,
    preflight,
)


def setup_logging(level: int = logging.INFO) -> None:
    """Route oneword's logging through rich and quiet the libraries' own chatter."""
    from rich.console import Console
    from rich.logging import RichHandler

    logging.basicConfig(
        level=level,
        format="%(message)s",
        datefmt="[%X]",
        # on stderr: a command's answer (a table, JSON) is its stdout, which a pipe reads
        handlers=[RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=False)],
        force=True,
    )
    from oneword.tracking import HideCredentials

    HideCredentials.install()
    # Read by transformers and diffusers when a command first imports them: importing them here would cost
    # every command, `--help` included, seconds.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # not "Creating initial MLflow database tables..."
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar for each file of a few KB
    for name in ("transformers", "diffusers", "huggingface_hub", "urllib3", "botocore", "mlflow"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _exit_with(e: OnewordError) -> None:
    """Print `e` and its hint as `error:`/`hint:` lines (its traceback too with --verbose) and exit with status 2."""
    from rich.console import Console
    from rich.markup import escape

    err = Console(stderr=True, soft_wrap=True)
    if STATE["verbose"]:
        err.print_exception()
    # messages quote paths, values and other processes' errors, which may hold "[...]"
    from oneword.tracking import shown  # a store's URI with its password in it, quoted by a message or hint

    err.print(f"[bold red]error:[/] {escape(shown(e.message))}", highlight=False, markup=True)
    if e.hint:
        err.print(f"[yellow]hint:[/] {escape(shown(e.hint))}", highlight=False)
    sys.exit(2)


def _invalid_settings(e, command: str = "COMMAND") -> OnewordError:
    """A pydantic `ValidationError` of a config model as one line per setting: its name, the rule, the value."""
    problems = []
    for item in e.errors():
        name = ".".join(str(part) for part in item["loc"]) or e.title
        # a validator's own message says the value already
        said = item["type"] != "value_error" and not isinstance(item.get("input"), dict)
        got = f" (got {item['input']!r})" if said else ""
        problems.append(f"{name}: {item['msg'].removeprefix('Value error, ')}{got}")
    return OnewordError(
        "invalid setting" + ("s" if len(problems) > 1 else "") + ": " + "; ".join(problems),
        hint=f"`oneword {command} --help` says what each option takes (its option is the setting's name, with -)",
    )


def _tracking_error(e: Exception) -> OnewordError | None:
    """An MLflow server's refusal or silence as one line and what to check, or None for any other error (a bug's
    traceback stays whole)."""
    from mlflow.exceptions import MlflowException

    from oneword.tracking import said

    if not isinstance(e, MlflowException):
        return None
    text = said(e, 400)
    import mlflow

    from oneword.tracking import sqlite_path, store_hint

    uri = mlflow.get_tracking_uri()
    if text.startswith("the store's database said") and (db := sqlite_path(uri)) is not None:  # not a server's
        return OnewordError(f"MLflow: {text}", hint=store_hint(str(e), db, uri))
    return OnewordError(
        f"MLflow: {text}",
        hint="check --tracking-uri (or $MLFLOW_TRACKING_URI), that the server answers there, and "
        "MLFLOW_TRACKING_USERNAME/PASSWORD; with artifacts in S3 the server's MLFLOW_S3_ENDPOINT_URL and AWS keys",
    )


def _object_store_error(e: Exception) -> OnewordError | None:
    """An object store (S3, MinIO) that refused a request or did not answer, as one line and what to check; a
    server that did not answer, as such; None for any other error. The library raises the store's own errors
    (a cluster step's retries and resumes tell them apart); they are said here."""
    import urllib3.exceptions as u
    from minio.error import S3Error

    from oneword.storage import ENDPOINT_VARS

    settings = f"{ENDPOINT_VARS[0]}, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    # minio's S3Error is frozen: typer's mark on it as it passes fails, and the AttributeError carries it
    refused = e.__context__ if isinstance(e, AttributeError) and isinstance(e.__context__, S3Error) else e
    if isinstance(refused, S3Error):
        where = "/".join(x for x in (refused.bucket_name, refused.object_name) if x)
        return OnewordError(
            f"the object store refused {where or 'a request'}: {refused.code}: {refused.message}",
            hint=f"check {settings}, and that the object exists and these keys may read it",
        )
    if isinstance(e, u.MaxRetryError):
        pool = getattr(e, "pool", None)
        host = f"{pool.host}:{pool.port}" if pool is not None else "the server"
        endpoint = next((os.environ[v] for v in ENDPOINT_VARS if os.environ.get(v)), "")
        store = pool is not None and f"{pool.host}:{pool.port}" in endpoint
        return OnewordError(f"could not reach {host}: {e.reason or e}",
                            hint=f"check {settings} (an s3:// path is read there), and that it answers" if store
                            else f"check that the server at {host} answers")  # fmt: skip
    return None


# What oneword writes first and renames into place once whole (`.data.tmp-x1y2`, `x.pt.part`): no name a person gave
_SCRATCH = re.compile(r"^\..+\.tmp-\w+$|\.part$|^\.tmp\w+$")


def _file_in_hand(e: BaseException) -> str | None:
    """The file opened for writing in the innermost frame of `e`'s traceback that holds one (the last bound there,
    where it holds several): what a write that failed was writing."""
    import io

    tb, frames = e.__traceback__, []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        writing = [  # by its mode: a failed write's `with` has closed it by now
            v.name for v in frame.f_locals.values()
            if isinstance(v, io.IOBase) and set(str(getattr(v, "mode", ""))) & set("wax+")
            and isinstance(getattr(v, "name", None), str) and not v.name.startswith("<")
        ]  # fmt: skip
        if writing:
            return writing[-1]
    return None


def _os_error(e: OSError) -> OnewordError:
    """A file system's refusal as one line that names the path the person gave: the folder a scratch file was to
    be written in, not the scratch file; a file met where a folder was to be made, as such."""
    hint = "check the path, its permissions and the free space; --verbose shows where"
    # a write into an open file (a full disk) names none: the file it was writing, if found
    if not (name := e.filename or _file_in_hand(e)):
        return OnewordError(f"cannot read or write: {e.strerror}", hint=hint)
    path = Path(os.fsdecode(name))
    if isinstance(e, (FileExistsError, NotADirectoryError)):
        # a file where a folder was to be made (mkdir's error names it), or among the folders above the path; not
        # the path of a read through a file (listdir's NotADirectoryError names the file itself)
        looked = (path, *path.parents) if isinstance(e, FileExistsError) else path.parents
        blocking = next((p for p in looked if p.is_file()), None)
        if blocking is not None:
            return OnewordError(f"{blocking} is a file, where a folder was to be made ({path})",
                                hint="give a path whose folders are folders, or move the file away")  # fmt: skip
    scratch = next((p for p in (path, *path.parents) if _SCRATCH.search(p.name)), None)
    if scratch is not None:  # in it, or it: the folder it was to be renamed into place in
        return OnewordError(f"cannot write in {scratch.parent}: {e.strerror}", hint=hint)
    return OnewordError(f"cannot read or write {path}: {e.strerror}", hint=hint)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `oneword` console script. Bad input exits with status 2 and a hint, no traceback."""
    setup_logging()
    import rich

    rich.reconfigure(soft_wrap=True)  # a printed path stays on one line (copyable) in a narrow terminal
    args = list(sys.argv[1:] if argv is None else argv)
    if "--verbose" in args[1:] and "--" not in args:  # after the command too, where a rerun to see why adds it
        args = ["--verbose", *(a for a in args if a != "--verbose")]
    STATE["argv"] = args
    try:
        code = app(args=args, standalone_mode=False)  # a command's typer.Exit(n) comes back as n here
    except OnewordError as e:
        _exit_with(e)
    except SystemExit:
        raise
    except Exception as e:
        import typer
        from pydantic import ValidationError

        if isinstance(e, ValidationError):  # an option's value out of its config field's range or choices
            words = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")]
            _exit_with(_invalid_settings(e, " ".join(words[:2] if words[:1] == ["concepts"] else words[:1])))

        # click's usage errors (a missing option, a bad value), shown as click shows them; typer ships its own copy
        # of click, so they are known by what they do, not by the `click` package's classes
        if callable(getattr(e, "show", None)) and isinstance(getattr(e, "exit_code", None), int):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, typer.Abort):  # Ctrl-C (click has printed a new line)
            print("interrupted", file=sys.stderr)
            sys.exit(130)
        if (said := _tracking_error(e) or _object_store_error(e)) is not None:
            _exit_with(said)
        if isinstance(e, OSError) and e.strerror:  # a folder not writable, a full disk, a path through a file
            _exit_with(_os_error(e))
        raise
    if isinstance(code, int) and code:
        sys.exit(code)
