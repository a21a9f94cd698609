"""`oneword concepts list|show|pull|promote|prune`: query the concept registry, and keep it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from oneword.cli.app import app, person_waits
from oneword.cli.options import default, option
from oneword.config import TrackingConfig
from oneword.tracking import existing_store

concepts = typer.Typer(help="Query the registry of learned concepts (MLflow).", no_args_is_help=True)
app.add_typer(concepts, name="concepts")


@concepts.callback()
def _query_patience(ctx: typer.Context) -> None:
    ctx.with_resource(person_waits())  # for the subcommand, which runs inside this context


TRACKING = option(TrackingConfig, "tracking_uri")


@concepts.command("list")
def list_cmd(
    base_model: Annotated[
        str | None,
        typer.Option(
            help="only concepts trained on this base model: as given to train (a hub id, folder or s3://), "
            "or a prefix of its fingerprint"
        ),
    ] = None,
    alias: Annotated[str | None, typer.Option(help="only versions with this alias, e.g. champion")] = None,
    tracking_uri: Annotated[str, TRACKING] = default(TrackingConfig, "tracking_uri"),
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """List registered concept versions.

    \b
    Example:
      oneword concepts list --alias champion
    """
    from rich.console import Console

    from oneword.catalogue import list_concepts

    uri = existing_store(tracking_uri)
    rows = list_concepts(uri, base_model=base_model, alias=alias)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        what = f" with @{alias}" if alias else (f" on {base_model}" if base_model else "")
        Console().print(f"no oneword concepts{what} in the registry at {uri}",
                        highlight=False, soft_wrap=True)  # fmt: skip
        return
    Console().print(concepts_table(rows))


def concepts_table(rows: list[dict]):
    """`concepts list`'s table of `list_concepts` rows (a rich `Table`)."""
    from rich import box
    from rich.table import Table

    # In 80 columns the aliases (one a line) and scores stay whole; a long name or token folds onto more lines
    # (whole, not cut) before they would; the base model shows as its last path part and a fingerprint prefix
    # (what --base-model filters by), folded if it must be.
    t = Table(title="concepts", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    t.add_column("name", overflow="fold", min_width=12)
    t.add_column("ver", justify="right", no_wrap=True)
    t.add_column("alias", no_wrap=True)
    t.add_column("token", overflow="fold", min_width=7)
    t.add_column("base model", overflow="fold")
    t.add_column("recon", justify="right", no_wrap=True, min_width=5)
    t.add_column("edit", justify="right", no_wrap=True, min_width=5)
    for r in rows:
        t.add_row(
            r["name"],
            str(r["version"]),
            "\n".join(r["aliases"]),
            r["token"] or "",
            f"{_short_model(r['base_model'])}\n{r['base_model_fingerprint'][7:15]}",
            _score(r["reconstruction"]),
            _score(r["editability"]),
        )
    return t


def _score(value) -> str:
    return "-" if value in (None, "") else f"{float(value):.2f}"


def _short_model(source: str | None) -> str:
    return (source or "?").rstrip("/").rsplit("/", 1)[-1]


@concepts.command("show")
def show_cmd(
    ref: Annotated[str, typer.Argument(help="NAME, NAME@alias or NAME/version")],
    tracking_uri: Annotated[str, TRACKING] = default(TrackingConfig, "tracking_uri"),
) -> None:
    """Show one concept version: tags, aliases, metrics and params.

    \b
    Example:
      oneword concepts show my-cat@champion
    """
    from rich import print_json

    from oneword.catalogue import show_concept

    print_json(data=show_concept(ref, existing_store(tracking_uri)))


@concepts.command("pull")
def pull_cmd(
    ref: Annotated[str, typer.Argument(help="NAME, NAME@alias or NAME/version")],
    out: Annotated[Path, typer.Option("--out", "-o", help="file to write")],
    format: Annotated[str, typer.Option("--format", "-f", help="diffusers, a1111 or kohya")] = "diffusers",
    tracking_uri: Annotated[str, TRACKING] = default(TrackingConfig, "tracking_uri"),
    force: Annotated[bool, typer.Option("--force", help="replace an existing output file")] = False,
) -> None:
    """Download a concept's embedding in another tool's format.

    \b
    Example:
      oneword concepts pull my-cat@champion --format a1111 -o my-cat.pt
    """
    from rich import print as rprint
    from rich.markup import escape

    from oneword.catalogue import pull_concept
    from oneword.cli.export import refuse_existing
    from oneword.embeddings import FORMATS
    from oneword.errors import OnewordError

    if format not in FORMATS:
        raise OnewordError(f"unknown format {format!r}", hint=f"use one of {', '.join(FORMATS)}")
    refuse_existing(out, force)
    path, tags = pull_concept(ref, out, format, existing_store(tracking_uri))
    ref_said = f"{tags['oneword.name']}/{tags['oneword.version']}"
    rprint(f"[green]{escape(ref_said)}[/] ({escape(str(tags.get('oneword.token')))}) -> {path} ({format})")


@concepts.command("promote")
def promote_cmd(
    ref: Annotated[str, typer.Argument(help="NAME/VERSION")],
    alias: Annotated[str, typer.Option(help="the alias to point at it")] = "champion",
    reason: Annotated[str, typer.Option(help="why, recorded on the version")] = "",
    tracking_uri: Annotated[str, TRACKING] = default(TrackingConfig, "tracking_uri"),
) -> None:
    """Point an alias at a version by hand (a rollback, say).

    \b
    Example:
      oneword concepts promote my-cat/3 --reason "v4 draws the ears wrong"
    """
    from rich import print as rprint
    from rich.markup import escape

    from oneword.catalogue import promote

    done = promote(ref, alias, reason, existing_store(tracking_uri))
    was = f" (was version {done['before']})" if done["before"] is not None else ""
    rprint(f"[green]{escape(done['name'])}@{escape(alias)}[/] -> version {done['version']}{was}")


@concepts.command("prune")
def prune_cmd(
    names: Annotated[list[str] | None, typer.Argument(help="concepts to prune (default: every concept)")] = None,
    keep_versions: Annotated[int, option(TrackingConfig, "keep_versions", "--keep", min=1)] = default(
        TrackingConfig, "keep_versions"
    ),
    dry_run: Annotated[bool, typer.Option("--dry-run", help="delete nothing; list what would go")] = False,
    tracking_uri: Annotated[str, TRACKING] = default(TrackingConfig, "tracking_uri"),
) -> None:
    """Delete old versions that no alias points at (their runs stay).

    Keeps each concept's --keep newest versions, every version an alias points at, and any whose register is
    still deciding.

    \b
    Example:
      oneword concepts prune --keep 3 --dry-run
    """
    from rich.console import Console

    from oneword.catalogue import prune_versions

    rows = prune_versions(existing_store(tracking_uri), keep_versions, names or (), dry_run)
    console = Console()
    if rows:
        table = concepts_table(rows)
        table.title = "would delete" if dry_run else "deleted"
        console.print(table)
    n, did = len({r["name"] for r in rows}), "would delete" if dry_run else "deleted"
    console.print(f"{did} {len(rows)} version{'s' * (len(rows) != 1)} of {n} concept{'s' * (n != 1)} (their "
                  "MLflow runs stay)", highlight=False)  # fmt: skip
