"""`oneword concepts list|show|pull|promote|bundle|delete|prune`: query the concept registry, and keep it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer

from oneword.cli.app import app, person_waits
from oneword.cli.options import default, option
from oneword.config import TrackingConfig
from oneword.tracking import existing_store, shown

concepts = typer.Typer(help="Query the registry of learned concepts (MLflow).", no_args_is_help=True)
app.add_typer(concepts, name="concepts")


@concepts.callback()
def _query_patience(ctx: typer.Context) -> None:
    ctx.with_resource(person_waits())  # for the subcommand, which runs inside this context


TRACKING = option(TrackingConfig, "tracking_uri")


@concepts.command("list")
def list_cmd(
    names: Annotated[
        list[str] | None,
        typer.Argument(metavar="NAME", help="only these concepts; * and ? match any (quote them: 'cat*')"),
    ] = None,
    base_model: Annotated[
        str | None,
        typer.Option(
            help="only concepts trained on this base model: as given to train (a hub id, folder or s3://), "
            "or a prefix of its fingerprint"
        ),
    ] = None,
    alias: Annotated[str | None, typer.Option(help="only versions with this alias, e.g. champion")] = None,
    batch: Annotated[
        str | None, typer.Option(help="only the versions this batch registered (its id, in `oneword batch`'s table)")
    ] = None,
    tracking_uri: Annotated[str, TRACKING] = default(TrackingConfig, "tracking_uri"),
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """List registered concept versions.

    \b
    Example:
      oneword concepts list --alias champion
      oneword concepts list 'team-a-*' --alias champion
      oneword concepts list --batch 77842948
    """
    from rich.console import Console

    from oneword.catalogue import list_concepts

    uri = existing_store(tracking_uri)
    rows = list_concepts(uri, base_model=base_model, alias=alias, batch=batch, names=names or ())
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        what = f" with @{alias}" if alias else (f" on {base_model}" if base_model else "")
        what += f" registered by batch {batch}" if batch else ""
        what += f" named {' or '.join(names)}" if names else ""
        Console().print(f"no oneword concepts{what} in the registry at {shown(uri)}",
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
            score_cell(r["reconstruction"]),
            score_cell(r["editability"]),
        )
    return t


def score_cell(value) -> str:
    """A score in a table of concepts (`concepts list`, `oneword batch`): two decimals, "-" where there is none."""
    return "-" if value in (None, "") else f"{float(value):.2f}"


def _short_model(source: str | None) -> str:
    return (source or "?").rstrip("/").rsplit("/", 1)[-1]


@concepts.command("show")
def show_cmd(
    ref: Annotated[str, typer.Argument(metavar="REF", help="NAME, NAME@alias, NAME/version or NAME/latest")],
    tracking_uri: Annotated[str, TRACKING] = default(TrackingConfig, "tracking_uri"),
    as_json: Annotated[bool, typer.Option("--json", help="print every tag, metric and param as JSON")] = False,
) -> None:
    """Show one concept version: its word, scores, gate and training.

    \b
    Example:
      oneword concepts show my-cat@champion
      oneword concepts show my-cat/3 --json
    """
    from rich.console import Console

    from oneword.bundles import MEMBERS_TAG
    from oneword.catalogue import show_concept

    info = show_concept(ref, existing_store(tracking_uri))
    if as_json:
        print(json.dumps(info, indent=2))
        return
    Console().print(bundle_card(info) if MEMBERS_TAG in info["tags"] else concept_card(info))


@concepts.command("bundles", short_help="List the bundles: newest versions, members, who keeps them.")
def bundles_cmd(
    tracking_uri: Annotated[str, TRACKING] = default(TrackingConfig, "tracking_uri"),
    as_json: Annotated[bool, typer.Option("--json", help="print JSON, every member named")] = False,
) -> None:
    """List the bundles: each one's newest version (what its server serves), how many concepts it holds, its base
    model, and the manifest whose batches keep it.

    \b
    Example:
      oneword concepts bundles
      oneword concepts show studio      # a bundle's newest version, its members
    """
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from oneword.bundles import list_bundles

    uri = existing_store(tracking_uri)
    rows = list_bundles(uri)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        Console().print(f"no bundles in the registry at {shown(uri)}", highlight=False, soft_wrap=True)
        return
    t = Table(title="bundles", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    t.add_column("name", overflow="fold", min_width=10)
    t.add_column("ver", justify="right", no_wrap=True)
    t.add_column("concepts", justify="right", no_wrap=True)
    t.add_column("base model", overflow="fold")
    t.add_column("kept by", overflow="fold")
    t.add_column("created", no_wrap=True)
    for r in rows:
        t.add_row(r["name"], r["version"] or "-", str(len(r["members"])),
                  _short_model(r["base_model"]) if r["version"] else "-", r["manifest"] or "by hand",
                  (r["created"] or "-")[:10])  # fmt: skip
    console = Console()
    console.print(t)
    for r in rows:
        if not r["version"]:  # its versions went with a concept they held (`concepts delete`), or by hand
            console.print(f"{r['name']} has no versions left: `oneword concepts bundle {r['name']} ...` makes one",
                          highlight=False, soft_wrap=True)  # fmt: skip
        elif pinned := [f"@{a} is version {v}" for a, v in r["aliases"].items() if v != r["version"]]:
            # a server on `models:/NAME@alias` serves that one, not the newest (a rollback)
            console.print(f"{r['name']}: {', '.join(pinned)}, not its newest", highlight=False)


def bundle_card(info: dict):
    """`concepts show`'s view of a bundle's version (a rich renderable): its members, and how to serve it."""
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    from oneword.bundles import MEMBERS_TAG, parse_members
    from oneword.catalogue import promotions

    tags = info["tags"]
    aliases = " ".join(f"@{a}" for a in info["aliases"]) or "no alias"
    title = Text.assemble((f"{info['name']}/{info['version']}", "bold"), f"  bundle, {aliases}")
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="dim", no_wrap=True)
    grid.add_column(overflow="fold")
    members = [f"{n}/{v}" for n, v in parse_members(tags[MEMBERS_TAG]).items()]
    grid.add_row("concepts", escape(", ".join(members)))
    grid.add_row("tokens", escape(tags.get("oneword.tokens", "?")))
    fingerprint = tags.get("oneword.base_model_fingerprint", "")
    grid.add_row("base model", escape(f"{tags.get('oneword.base_model', '?')} ({fingerprint[:19]})"))
    for said in promotions(tags, info["aliases"]):
        grid.add_row("promoted", escape(said))
    uri = f"models:/{info['name']}/{info['version']}"
    grid.add_row("serve", escape(f"mlflow models serve -m {uri} --env-manager local"))
    grid.add_row("run", escape(info["run_id"]))
    grid.add_row("created", escape(info.get("created") or "-"))
    return Group(title, grid)


def concept_card(info: dict):
    """`concepts show`'s view of a `show_concept` dict for a person (a rich renderable): what serving and review
    ask of a version, each on a line, in 80 columns; `--json` has the rest."""
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    from oneword.catalogue import promotions
    from oneword.registry import GATE_ALIAS_TAG

    tags, params, metrics = info["tags"], info["params"], info["metrics"]

    def pm(name: str) -> str:
        value, se = tags.get(name, metrics.get(name)), tags.get(f"{name}_se", metrics.get(f"{name}_se"))
        known = se not in (None, "") and not math.isnan(float(se))  # nan: one image a prompt, no spread to tell
        return f"{name} {_score3(value)}" + (f" ± {_score3(se)}" if known else "")

    aliases = " ".join(f"@{a}" for a in info["aliases"]) or "no alias"
    title = Text.assemble((f"{info['name']}/{info['version']}", "bold"), f"  {aliases}")
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="dim", no_wrap=True)
    grid.add_column(overflow="fold")
    vectors = params.get("n_vectors", "1")
    grid.add_row("token", escape(f"{tags.get('oneword.token', '?')} (from {params.get('init_word', '?')!r}, "
                                 f"{vectors} vector{'s' if vectors != '1' else ''})"))  # fmt: skip
    fingerprint = tags.get("oneword.base_model_fingerprint", "")
    grid.add_row("base model", escape(f"{tags.get('oneword.base_model', '?')} ({fingerprint[:19]})"))
    grid.add_row("scores", f"{pm('reconstruction')}, {pm('editability')}")
    evaluated = [f"by {tags['evaluator']}" if tags.get("evaluator") else "",
                 f"{params['eval.n_images']} image{'' if params['eval.n_images'] == '1' else 's'} a prompt"
                 if params.get("eval.n_images") else "",
                 f"checkpoint of step {tags['chosen_step']}" if tags.get("chosen_step") else ""]  # fmt: skip
    grid.add_row("evaluated", escape(", ".join(x for x in evaluated if x) or "-"))
    gave = tags.get(GATE_ALIAS_TAG, "")  # none on versions before it was kept
    if gave:  # a version demoted or promoted since holds another alias now: what the gate gave was then
        gave = f"@{gave}" + ("" if gave in info["aliases"] else " when registered") + ": "
    grid.add_row("gate", escape(gave + tags.get("gate", "-")))
    for said in promotions(tags, info["aliases"]):  # by hand, to the aliases it holds now
        grid.add_row("promoted", escape(said))
    trained = [f"{params['train.steps']} steps" if params.get("train.steps") else "", _learning_rate(params),
               f"batch {params['train.batch_size']}" if params.get("train.batch_size") else "",
               f"{params['n_images']} photos" if params.get("n_images") else ""]  # fmt: skip
    grid.add_row("trained", escape(", ".join(x for x in trained if x) or "-"))
    if info.get("bundled_in"):
        grid.add_row("bundled in", escape(", ".join(info["bundled_in"])))
    grid.add_row("run", escape(f"{info['run_id']}" + (f" (batch {tags['oneword.batch_id']})"
                                                      if tags.get("oneword.batch_id") else "")))  # fmt: skip
    grid.add_row("created", escape(info.get("created") or "-"))
    return Group(title, grid, Text("every tag, metric and param: --json", style="dim"))


def _learning_rate(params: dict) -> str:
    """The rate the steps took, and the base rate it was scaled from (by the batch) where it was: the option's
    value is the base rate, and a card that showed only the other read as a different setting."""
    used = params.get("train.learning_rate_used")
    if not used:
        return ""
    from oneword.catalogue import as_number

    # the concept's own rate where its manifest gave one ("None": it gave none), else the run's
    base = next((r for r in (params.get("learning_rate"), params.get("train.learning_rate")) if as_number(r)), None)
    scaled = params.get("train.scale_lr") == "True" and base is not None and float(base) != float(used)
    return f"learning rate {used}" + (f" (base {base}, scaled by the batch)" if scaled else "")


def _score3(value) -> str:
    return "-" if value in (None, "") else f"{float(value):.3f}"


@concepts.command("pull")
def pull_cmd(
    ref: Annotated[str, typer.Argument(metavar="REF", help="NAME, NAME@alias, NAME/version or NAME/latest")],
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
    from oneword.cli.export import refuse_existing, warn_model_word
    from oneword.embeddings import FORMATS, second_file
    from oneword.errors import OnewordError

    if format not in FORMATS:
        raise OnewordError(f"unknown format {format!r}", hint=f"use one of {', '.join(FORMATS)}")
    refuse_existing(out, force)
    path, tags = pull_concept(ref, out, format, existing_store(tracking_uri), replace=force, shared=True)
    ref_said = f"{tags['oneword.name']}/{tags['oneword.version']}"
    pair = format == "diffusers" and tags.get("oneword.model_family") == "sdxl"  # diffusers' two files
    also = f" and {second_file(path)}" if pair else ""
    rprint(f"[green]{escape(ref_said)}[/] ({escape(str(tags.get('oneword.token')))}) -> {escape(f'{path}{also}')} "
           f"({format})")
    if format in ("a1111", "kohya"):  # those tools name an embedding by its file, not by the token it was learned as
        rprint(escape(f"  in prompts there, write {Path(path).stem} (the file's name, without its suffix)"))
        warn_model_word(Path(path))


@concepts.command("promote")
def promote_cmd(
    ref: Annotated[
        str, typer.Argument(metavar="REF", help="NAME/VERSION, or NAME@alias (the version that alias names)")
    ],
    alias: Annotated[str, typer.Option(help="the alias to point at it")] = "champion",
    reason: Annotated[str, typer.Option(help="why, recorded on the version")] = "",
    tracking_uri: Annotated[str, TRACKING] = default(TrackingConfig, "tracking_uri"),
) -> None:
    """Point an alias at a version by hand (a rollback, say).

    \b
    Example:
      oneword concepts promote my-cat/3 --reason "v4 draws the ears wrong"
      oneword concepts promote my-cat@candidate
    """
    from rich.console import Console
    from rich.markup import escape

    from oneword.catalogue import promote

    done = promote(ref, alias, reason, existing_store(tracking_uri))
    console, held = Console(highlight=False, soft_wrap=True), f"{escape(done['name'])}@{escape(alias)}"
    if done["before"] == done["version"]:
        kept = " (nor the reason recorded: the version keeps the one it has)" if reason else ""
        console.print(f"{held} is version {done['version']} already: nothing changed{kept}")
        return
    was = f" (was version {done['before']})" if done["before"] is not None else ""
    console.print(f"[green]{held}[/] -> version {done['version']}{was}")
    if done["before_token"] != done["token"]:
        console.print(f"[yellow]note[/]: its token is {escape(str(done['token']))}, version {done['before']}'s was "
                      f"{escape(str(done['before_token']))}: prompts that name {escape(str(done['before_token']))} "
                      f"must name {escape(str(done['token']))} now")  # fmt: skip


@concepts.command("bundle", short_help="Register many concepts as one model, served by one server.")
def bundle_cmd(
    name: Annotated[str, typer.Argument(metavar="NAME", help="the bundle's name (a registered model of its own)")],
    members: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="CONCEPT",
            help="NAME, NAME@alias, NAME/version, or a pattern of names (quote it: 'team-a-*', 'team-a-*@candidate')",
        ),
    ] = None,
    manifest: Annotated[
        str,
        typer.Option(metavar="MANIFEST", help="a concepts manifest (as `oneword batch` takes): each of its concepts "
                     "too; one with no version of --alias, or on another --base-model, is left out"),
    ] = "",
    alias: Annotated[str, typer.Option(help="the version a bare NAME or a pattern takes")] = "champion",
    base_model: Annotated[
        str | None,
        typer.Option(help="a pattern or the manifest takes only concepts trained on this base model (as "
                     "`concepts list` filters)"),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="register nothing; list the versions it would hold")] = (
        False
    ),
    tracking_uri: Annotated[str, TRACKING] = default(TrackingConfig, "tracking_uri"),
) -> None:
    """Register a version of a bundle: copies of these concept versions' embeddings, all of one base model, as
    one servable model. One `mlflow models serve` of it loads the base model once and draws every member's
    token; a prompt may name several.

    A version never changes: after a promotion, bundle again (a new version; none where the members are the
    same) and restart the server on `models:/NAME/latest`. Deleting a member concept deletes the bundle versions
    that hold it.

    \b
    Example:
      oneword concepts bundle studio my-cat mug 'team-a-*'
      oneword concepts bundle studio my-cat/3 mug@candidate --dry-run
      oneword concepts bundle sd15 '*' \\
        --base-model stable-diffusion-v1-5/stable-diffusion-v1-5
      oneword concepts bundle studio --manifest concepts.yaml
    """
    from rich.console import Console
    from rich.markup import escape

    from oneword.bundles import bundle_concepts

    uri = existing_store(tracking_uri)
    done = bundle_concepts(name, members or [], alias, uri, dry_run=dry_run, base_model=base_model,
                           manifest=manifest)  # fmt: skip
    console = Console(highlight=False, soft_wrap=True)
    for concept, why in done.left_out.items():
        console.print(f"[yellow]left out[/] {escape(concept)}: {escape(why)}")
    n = len(done.members)
    if not n:
        console.print(f"nothing to bundle: no concept of {escape(manifest)} has a version to hold. Nothing was "
                      "registered.")  # fmt: skip
        return
    held = f"{n} concept{'s' * (n != 1)} on {escape(done.members[0].base_model)}"
    if done.unchanged:
        console.print(f"{escape(done.name)}/{done.version} holds these versions already ({held}): nothing "
                      "registered")  # fmt: skip
    elif done.version is None:
        console.print(f"would register a version of {escape(done.name)} holding {held}. Nothing was registered.")
    else:
        console.print(f"[green]registered[/] {escape(done.name)}/{done.version}: {held}")
    console.print(_members_table(done.members))
    if done.version is not None:
        console.print(f"serve it:\n    MLFLOW_TRACKING_URI={escape(shown(uri))} mlflow models serve -m "
                      f"{done.model_uri} --env-manager local -p 5001")  # fmt: skip


def _members_table(members):
    from rich import box
    from rich.table import Table

    t = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    t.add_column("concept", overflow="fold", min_width=12)
    t.add_column("ver", justify="right", no_wrap=True)
    t.add_column("token", overflow="fold")
    for m in members:
        t.add_row(m.name, m.version, m.token)
    return t


@concepts.command("delete", short_help="Delete a concept whole: its versions, runs and artifacts.")
def delete_cmd(
    name: Annotated[
        str, typer.Argument(metavar="NAME", help="the concept's name (`oneword concepts list`), or a bundle's")
    ],
    yes: Annotated[bool, typer.Option("--yes", help="delete; without it, only say what would go")] = False,
    tracking_uri: Annotated[str, TRACKING] = default(TrackingConfig, "tracking_uri"),
) -> None:
    """Delete a concept whole: every version, every MLflow run of it, and their artifacts (the embedding, and
    the samples drawn from its photos), as a request to erase a person's concept asks; and its trainings'
    checkpoints and kept trainings beside the checkpoint root.

    Without --yes it deletes nothing and says what would go. The photos themselves, in your bucket or folder,
    and a batch's manifest are yours to remove. The bundles that hold a copy of the concept lose those versions;
    a bundle's name deletes the bundle alone.

    \b
    Example:
      oneword concepts delete my-cat          # what would go
      oneword concepts delete my-cat --yes
    """
    from rich.console import Console
    from rich.markup import escape

    from oneword.catalogue import delete_concept

    done = delete_concept(name, existing_store(tracking_uri), dry_run=not yes)
    kinds = (("versions", "version"), ("runs", "MLflow run"), ("logged_models", "logged model"))
    counted = [f"{len(done[k])} {what}{'s' * (len(done[k]) != 1)}" for k, what in kinds]
    what = f"{counted[0]}, {counted[1]} and {counted[2]}, with their artifacts"
    if bundled := done["bundle_versions"]:
        what += f"; and {len(bundled)} bundle version{'s' * (len(bundled) != 1)} holding it ({', '.join(bundled)})"
    if outside := done["checkpoints"]:  # beside the checkpoint root: its trainings' checkpoints, kept trainings
        what += f"; and {len(outside)} checkpoint folder{'s' * (len(outside) != 1)} or kept training" + \
            f"{'s' * (len(outside) != 1)} holding it ({', '.join(outside)})"
    console = Console(highlight=False, soft_wrap=True)
    if not yes:
        console.print(f"would delete {escape(name)}: {escape(what)}. Nothing was deleted: add --yes to delete.")
        return
    console.print(f"[green]deleted[/] {escape(name)}: {escape(what)} (MLflow keeps the deleted runs' records, without "
                  "artifacts, until `mlflow gc`)")  # fmt: skip


@concepts.command("prune")
def prune_cmd(
    names: Annotated[
        list[str] | None, typer.Argument(metavar="NAME", help="concepts or bundles to prune (default: every one)")
    ] = None,
    keep_versions: Annotated[int, option(TrackingConfig, "keep_versions", "--keep", min=1)] = default(
        TrackingConfig, "keep_versions"
    ),
    dry_run: Annotated[bool, typer.Option("--dry-run", help="delete nothing; list what would go")] = False,
    tracking_uri: Annotated[str, TRACKING] = default(TrackingConfig, "tracking_uri"),
) -> None:
    """Delete old versions that no alias points at (their runs stay).

    Keeps each concept's --keep newest versions, every version an alias points at, and any whose register is
    still deciding. Bundles are pruned alike.

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
