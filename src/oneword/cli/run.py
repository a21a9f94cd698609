"""`oneword run` and `oneword batch`: the pipelines on this machine (kfp.local), no cluster needed.

Options left at 0 or empty are decided by the base model's profile (`oneword.profiles`), as in the pipelines:
`oneword run --base-model toyworld` trains and evaluates with the toy world's tuned settings.
"""

import json
from pathlib import Path
from typing import Annotated

import typer

from oneword.cli.app import app, on_interrupt
from oneword.cli.options import BASE_MODEL_HELP, names_given, parameter
from oneword.pipelines.parameters import DEFAULTS as D
from oneword.pipelines.parameters import LOCAL_PIPELINE_ROOT, RESOLUTION_FROM_PROFILE
from oneword.profiles import TOYWORLD
from oneword.tracking import shown

BASE_MODEL = TOYWORLD  # on one machine, the model that needs no download
RESOLUTION_HELP = "training image side (0: the base model's native size)"
LOG_FILE = typer.Option(
    help="the steps' full logs (default: a new file under the pipeline root's logs/, named as the run starts; "
    "'-': this terminal); the terminal gets a line per finished step"
)


def _stopped(what: str, log_file: Path | None) -> str:
    """What `on_interrupt` says when a run or batch stopped, and how to go on."""
    where = f"\n  the steps' logs: {log_file}" if log_file else ""
    return (f"the {what} stopped; no step started after {{by}}.{where}\nto go on, run the same command again: "
            "what was registered is found unchanged,\nand a training cut short resumes from its newest "
            "checkpoint.")  # fmt: skip


def _log_file(log_file: Path | None, pipeline_root: Path, pipeline: str) -> Path | None:
    """Where the steps' logs go (None: this terminal)."""
    from oneword.pipelines.local import default_log_file

    if log_file is not None and str(log_file) == "-":
        return None
    return log_file or default_log_file(pipeline_root, pipeline)


@app.command("run", short_help="Run the whole pipeline here (kfp.local).")
def run_cmd(
    images: Annotated[str, typer.Option(help="folder or s3:// prefix of 3-5 photos of the concept")],
    token: Annotated[str, typer.Option(help="the new pseudo-word, e.g. '<my-cat>'")],
    init_word: Annotated[str, typer.Option(help="one-token word to start from, e.g. cat")],
    base_model: Annotated[str, typer.Option(help=BASE_MODEL_HELP)] = BASE_MODEL,
    name: Annotated[str, typer.Option(help="registered-model name (default: from the token)")] = "",
    steps: Annotated[int, parameter("steps")] = D["steps"],
    batch_size: Annotated[int, parameter("batch_size")] = D["batch_size"],
    learning_rate: Annotated[float, parameter("learning_rate")] = D["learning_rate"],
    scale_lr: Annotated[bool, parameter("scale_lr")] = D["scale_lr"],
    progressive_every: Annotated[int, parameter("progressive_every")] = D["progressive_every"],
    n_vectors: Annotated[int, parameter("n_vectors")] = D["n_vectors"],
    init_l2: Annotated[float, parameter("init_l2")] = D["init_l2"],
    init_l2_schedule: Annotated[str, parameter("init_l2_schedule")] = D["init_l2_schedule"],
    early_end: Annotated[float, parameter("early_end")] = D["early_end"],
    early_end_window: Annotated[int, parameter("early_end_window")] = D["early_end_window"],
    init_cos: Annotated[float, parameter("init_cos")] = D["init_cos"],
    direction_only: Annotated[bool, parameter("direction_only")] = D["direction_only"],
    direction_lr: Annotated[float, parameter("direction_lr")] = D["direction_lr"],
    vmf_kappa: Annotated[float, parameter("vmf_kappa")] = D["vmf_kappa"],
    resolution: Annotated[int, typer.Option(help=RESOLUTION_HELP)] = RESOLUTION_FROM_PROFILE,
    mode: Annotated[str, parameter("mode")] = D["mode"],
    templates: Annotated[str, parameter("templates")] = D["templates"],
    checkpoint_every: Annotated[int, parameter("checkpoint_every")] = D["checkpoint_every"],
    log_every: Annotated[int, parameter("log_every")] = D["log_every"],
    sample_every: Annotated[int, parameter("sample_every")] = D["sample_every"],
    compile: Annotated[str, parameter("compile")] = D["compile"],
    prompt_set: Annotated[str, parameter("prompt_set")] = D["prompt_set"],
    n_images: Annotated[int, parameter("n_images")] = D["n_images"],
    sampling_steps: Annotated[int, parameter("sampling_steps")] = D["sampling_steps"],
    guidance_scale: Annotated[float, parameter("guidance_scale")] = D["guidance_scale"],
    clip_model: Annotated[str, parameter("clip_model")] = D["clip_model"],
    dino_model: Annotated[str, parameter("dino_model")] = D["dino_model"],
    checkpoint_budget: Annotated[int, parameter("checkpoint_budget")] = D["checkpoint_budget"],
    min_reconstruction: Annotated[float, parameter("min_reconstruction")] = D["min_reconstruction"],
    min_editability: Annotated[float, parameter("min_editability")] = D["min_editability"],
    margin_se: Annotated[float, parameter("margin_se")] = D["margin_se"],
    tracking_uri: Annotated[str, parameter("tracking_uri")] = D["tracking_uri"],
    experiment: Annotated[str, parameter("experiment")] = D["experiment"],
    pipeline_root: Annotated[Path, typer.Option(help="where KFP writes artifacts")] = Path(LOCAL_PIPELINE_ROOT),
    seed: Annotated[int, parameter("seed")] = D["seed"],
    log_file: Annotated[Path | None, LOG_FILE] = None,
) -> None:
    """Run the whole textual_inversion pipeline on this machine with kfp.local, then print where it all is.

    \b
    Example:
      oneword run --images photos/my-cat --token '<my-cat>' --init-word cat \\
        --base-model ./sd15
    """
    params = {k: v for k, v in locals().items() if k not in ("pipeline_root", "tracking_uri", "log_file")}
    from rich import print as rprint

    from oneword.pipelines.local import run_textual_inversion

    log_file = _log_file(log_file, pipeline_root, "textual-inversion")
    with on_interrupt(_stopped("run", log_file)):
        out = run_textual_inversion(pipeline_root, tracking_uri or None, log_file, **params)
    registered = str(out["registered"])
    if out.get("unchanged"):  # this very training was registered (before, or by another run meanwhile)
        ref = registered.split("@")[0]
        rprint(f"[bold cyan]unchanged[/] {ref}: registered before from the same photos and settings "
               f"({out['seconds']:.0f} s)\n  its scores:    oneword concepts show {ref}\n"
               f"  its embedding: oneword concepts pull {ref} -o FILE")  # fmt: skip
    else:
        rprint(f"[bold green]registered[/] {registered}  ({out['seconds']:.0f} s)")
        if out.get("gate"):
            from rich.markup import escape

            rprint(f"  {escape(out['gate'])}")
    if out.get("metrics"):
        m = json.loads(Path(out["metrics"]).read_text())
        rprint(f"  reconstruction {m['reconstruction']:.4f}, editability {m['editability']:.4f} (step {m['step']})"
               + _baselines(m.get("baselines")))  # fmt: skip
    if out.get("photos"):
        from rich.markup import escape

        for line in photo_lines(json.loads(Path(out["photos"]).read_text())):
            rprint(escape(line))
    if log_file is not None:
        rprint(f"  {'logs':13s} {log_file}")
    for k in ("report", "grid", "embedding", "run_dir", "tracking_uri"):
        if out.get(k):  # found unchanged by evaluate, a concept drew nothing new: its files are the version's
            rprint(f"  {k:13s} {shown(str(out.get(k)))}")
    if "/" in registered:  # what to do with it next, to copy
        import shlex

        from rich.markup import escape

        from oneword.tracking import default_tracking_uri

        uri = out.get("tracking_uri")  # its password, if it holds one, is the user's to add
        store = "" if uri in (None, default_tracking_uri()) else f" --tracking-uri {shlex.quote(shown(uri))}"
        prompt = shlex.quote(f"a watercolor of {params['token']}")
        rprint(escape(f"  draw it:\n    oneword generate --concept {registered.split('@')[0]} {prompt}{store}"))


@app.command("batch", short_help="Run a batch of concepts here (kfp.local).")
def batch_cmd(
    concepts_manifest: Annotated[
        str, typer.Argument(metavar="MANIFEST", help="YAML listing images, token and init_word per concept")
    ],
    base_model: Annotated[str, typer.Option(help=BASE_MODEL_HELP)] = BASE_MODEL,
    steps: Annotated[int, parameter("steps")] = D["steps"],
    batch_size: Annotated[int, parameter("batch_size")] = D["batch_size"],
    learning_rate: Annotated[float, parameter("learning_rate")] = D["learning_rate"],
    scale_lr: Annotated[bool, parameter("scale_lr")] = D["scale_lr"],
    progressive_every: Annotated[int, parameter("progressive_every")] = D["progressive_every"],
    init_l2: Annotated[float, parameter("init_l2")] = D["init_l2"],
    init_l2_schedule: Annotated[str, parameter("init_l2_schedule")] = D["init_l2_schedule"],
    early_end: Annotated[float, parameter("early_end")] = D["early_end"],
    early_end_window: Annotated[int, parameter("early_end_window")] = D["early_end_window"],
    init_cos: Annotated[float, parameter("init_cos")] = D["init_cos"],
    direction_only: Annotated[bool, parameter("direction_only")] = D["direction_only"],
    direction_lr: Annotated[float, parameter("direction_lr")] = D["direction_lr"],
    vmf_kappa: Annotated[float, parameter("vmf_kappa")] = D["vmf_kappa"],
    checkpoint_every: Annotated[int, parameter("checkpoint_every")] = D["checkpoint_every"],
    log_every: Annotated[int, parameter("log_every")] = D["log_every"],
    sample_every: Annotated[int, parameter("sample_every")] = D["sample_every"],
    compile: Annotated[str, parameter("compile")] = D["compile"],
    resolution: Annotated[int, typer.Option(help=RESOLUTION_HELP)] = RESOLUTION_FROM_PROFILE,
    mode: Annotated[str, parameter("mode")] = D["mode"],
    prompt_set: Annotated[str, parameter("prompt_set")] = D["prompt_set"],
    n_images: Annotated[int, parameter("n_images")] = D["n_images"],
    sampling_steps: Annotated[int, parameter("sampling_steps")] = D["sampling_steps"],
    guidance_scale: Annotated[float, parameter("guidance_scale")] = D["guidance_scale"],
    clip_model: Annotated[str, parameter("clip_model")] = D["clip_model"],
    dino_model: Annotated[str, parameter("dino_model")] = D["dino_model"],
    checkpoint_budget: Annotated[int, parameter("checkpoint_budget")] = D["checkpoint_budget"],
    min_reconstruction: Annotated[float, parameter("min_reconstruction")] = D["min_reconstruction"],
    min_editability: Annotated[float, parameter("min_editability")] = D["min_editability"],
    margin_se: Annotated[float, parameter("margin_se")] = D["margin_se"],
    tracking_uri: Annotated[str, parameter("tracking_uri")] = D["tracking_uri"],
    experiment: Annotated[str, parameter("experiment")] = D["experiment"],
    pipeline_root: Annotated[Path, typer.Option(help="where KFP writes artifacts")] = Path(LOCAL_PIPELINE_ROOT),
    concepts_per_shard: Annotated[int, parameter("concepts_per_shard")] = D["concepts_per_shard"],
    only_concepts: Annotated[list[str], parameter("only_concepts", metavar="NAME")] = D["only_concepts"],
    bundle: Annotated[str, parameter("bundle", metavar="NAME")] = D["bundle"],
    seed: Annotated[int, parameter("seed")] = D["seed"],
    log_file: Annotated[Path | None, LOG_FILE] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="run nothing: say which concepts would train, which are "
                                               "unchanged since their version and which would fail (on CPU: "
                                               "preprocesses the photos, loads the text encoders); exits 1 if any "
                                               "would fail or could not be told, 2 if the manifest is refused "
                                               "whole")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="with --dry-run: print the plan as JSON")] = False,
) -> None:
    """Run batch_personalisation on this machine: every concept of a manifest, each registered on its own.

    The manifest lists each concept's photos (a local folder, relative to the manifest, or an s3:// prefix),
    token and init_word: see k8s/examples/concepts.yaml. Toy-world photos to try it with:
    oneword toyworld concept purple-star -o photos/purple-star

    Exits 1 if a concept failed (the others are registered all the same) or the bundle could not be made, 2 if
    the batch wrote no report.

    \b
    Example:
      oneword batch concepts.yaml --base-model toyworld --steps 300
      oneword batch concepts.yaml --base-model ./sd15 --dry-run
      oneword batch concepts.yaml --only-concepts my-cat --only-concepts my-dog
      oneword batch concepts.yaml --bundle studio
    """
    params = {
        k: v for k, v in locals().items()
        if k not in ("concepts_manifest", "pipeline_root", "tracking_uri", "log_file", "dry_run", "as_json")
    }  # fmt: skip
    params["only_concepts"] = names_given(only_concepts)
    if as_json and not dry_run:
        from oneword.errors import OnewordError

        raise OnewordError("--json prints a dry run's plan", hint="add --dry-run, or leave --json out")
    if dry_run:
        from rich.console import Console

        from oneword.pipelines.local import batch_plan

        plan = batch_plan(concepts_manifest, tracking_uri or None, **params)
        if as_json:
            print(json.dumps(plan, indent=2))
        else:
            print_batch_plan(plan, Console(soft_wrap=False))
        if any(r["status"].startswith("fails at") or r["status"] == "unknown" for r in plan["concepts"]):
            raise typer.Exit(1)  # a concept would fail, or could not be told (a model that did not load, say)
        return

    from oneword.pipelines.local import run_batch

    log_file = _log_file(log_file, pipeline_root, "batch-personalisation")
    with on_interrupt(_stopped("batch", log_file)):
        report = run_batch(concepts_manifest, pipeline_root, tracking_uri or None, log_file, **params)
    report["logs"] = str(log_file or "")
    from rich.console import Console

    code = print_batch_report(report, Console(soft_wrap=False))
    if code:
        raise typer.Exit(code)


def print_batch_plan(plan: dict, console) -> None:
    """Print what a batch would do with each concept (`local.batch_plan`), one row per concept."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    from oneword.batch import RUN_LIMIT, runs_needed

    rows = plan["concepts"]
    t = Table(title="dry run: nothing was trained or recorded", box=box.SIMPLE_HEAD, pad_edge=False)
    # in 80 columns: a name folds past 20 characters, the status stays whole, the why takes what is left
    t.add_column("concept", overflow="fold", min_width=min(max((len(r["name"]) for r in rows), default=7), 20))
    t.add_column("next run", no_wrap=True)
    t.add_column("ver", justify="right", no_wrap=True)
    t.add_column("alias / why", overflow="fold", ratio=1, min_width=16)
    colours = {"unchanged": "cyan", "to train": "yellow", "fails": "red", "unknown": "magenta"}
    for r in rows:
        said = "; ".join(x for x in (r["alias"], escape(r.get("why", ""))) if x)
        colour = colours[r["status"].split(" at ")[0]]
        t.add_row(escape(r["name"]), f"[{colour}]{r['status']}[/]", r["version"], said)
    console.print(t)
    count = {k: sum(r["status"].split(" at ")[0] == k for r in rows) for k in colours}
    said = f"{count['to train']} to train, {count['unchanged']} unchanged"
    if count["fails"]:
        said += f", {count['fails']} would fail (a run records why)"
    if count["unknown"]:
        said += f", {count['unknown']} unknown (a run trains them)"
    console.print(said, highlight=False)
    where = "" if plan["registry"] else " (none there yet: every concept is new)"
    console.print(f"  registry {shown(plan['tracking_uri'])}{where}", highlight=False, soft_wrap=True)
    if advice := runs_needed(count["to train"] + count["unknown"], RUN_LIMIT):  # here, kfp.local keeps no Argo workflow
        console.print(f"[bold yellow]on a cluster[/], at the default limit: {escape(advice)}")


WHY_MIN_WIDTH = 20  # the batch report's last column: an error, a fix, why the gate chose an alias


def print_batch_report(report: dict, console) -> int:
    """Print a batch's report as a table, one row per concept; return the command's exit status.

    1 if any concept failed (the others are registered all the same) or the bundle could not be made, 2 if the
    batch wrote no report (its manifest could not be read, or the run ended before its report); 0 else, a batch
    of unchanged concepts too.
    """
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    from oneword.batch import alias_reason, bundle_said
    from oneword.cli.concepts import score_cell

    if report.get("error") or "concepts" not in report:
        console.print(f"[bold red]error:[/] {escape(report.get('error', 'the batch wrote no report'))}")
        if made := report.get("bundle"):
            console.print(escape(bundle_said(made)), highlight=False)
        for k in ("logs", "run_dir"):
            if report.get(k):
                console.print(f"  {k:13s} {report.get(k)}", highlight=False, soft_wrap=True)
        return 2
    t = Table(title=f"batch {report['batch_id']}", box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    longest = max((len(c["name"]) for c in report["concepts"]), default=7)
    # a name breaks only past what the other columns leave (22 characters at 80 columns): past that, rich crops
    # lines instead of folding them (the status, version and scores never wrap; 3 characters between columns)
    rows = report["concepts"]
    fixed = sum(max([len(head)] + [len(cell(c)) for c in rows]) for head, cell in (
        ("registered", lambda c: c["status"]), ("ver", lambda c: str(c.get("version") or "")),
        ("recon", lambda c: score_cell(c.get("reconstruction"))), ("edit", lambda c: score_cell(c.get("editability"))),
    ))  # fmt: skip
    fits = console.width - 3 * 5 - fixed - WHY_MIN_WIDTH - 1
    t.add_column("concept", overflow="fold", min_width=max(8, min(longest, fits)))
    t.add_column("status")
    t.add_column("ver", justify="right", no_wrap=True)
    t.add_column("recon", justify="right", no_wrap=True)  # as `concepts list` shows them
    t.add_column("edit", justify="right", no_wrap=True)
    t.add_column("alias / why", overflow="fold", ratio=1, min_width=WHY_MIN_WIDTH)  # what the names leave
    for c in report["concepts"]:
        if c["status"] in ("registered", "unchanged"):
            colour = "green" if c["status"] == "registered" else "cyan"
            said = "; ".join(x for x in (c["alias"], escape(alias_reason(c))) if x)
            scores = (score_cell(c.get("reconstruction")), score_cell(c.get("editability")))
            t.add_row(escape(c["name"]), f"[{colour}]{c['status']}[/]", c["version"], *scores, said)
        elif c["status"] == "deferred":  # a cluster run's: kfp.local takes no limit
            t.add_row(escape(c["name"]), "[yellow]deferred[/]", "", "", "", escape(c.get("error") or ""))
        else:
            why = f"{c.get('stage')}: {c.get('error')}" + (f" (fix: {c['hint']})" if c.get("hint") else "")
            t.add_row(escape(c["name"]), "[red]failed[/]", "", "", "", escape(why))
    console.print(t)
    console.print(
        f"{report['registered']} registered, {report.get('unchanged', 0)} unchanged, {report['failed']} failed"
        + (f", {report['deferred']} deferred" if report.get("deferred") else "")
        + f" in {report.get('seconds', 0):.0f} s",
        highlight=False,
    )
    if report.get("left"):  # removed or renamed in the manifest: the registry still serves them
        aliases = [", ".join(f"{a} v{v}" for a, v in sorted(c["aliases"].items())) for c in report["left"]]
        held = ", ".join(f"{escape(c['name'])} ({said or 'its aliases could not be read'})"
                         for c, said in zip(report["left"], aliases))  # fmt: skip
        console.print(f"[yellow]left the manifest[/] since its last run, still holding an alias: {held}",
                      highlight=False, soft_wrap=False)  # fmt: skip
    if report.get("left_error"):  # not "none left": it could not be told
        console.print(f"[yellow]could not tell which concepts left the manifest[/]: {escape(report['left_error'])}",
                      highlight=False)  # fmt: skip
    if made := report.get("bundle"):
        colour = "red" if made.get("error") else "yellow" if made.get("unknown") else "green"
        console.print(f"[{colour}]{escape(bundle_said(made))}[/]", highlight=False)  # folded at the width
    for k in ("overview", "logs", "run_dir", "tracking_uri"):
        if report.get(k):
            console.print(f"  {k:13s} {shown(str(report.get(k)))}", highlight=False, soft_wrap=True)
    if report["registered"]:  # the batch's id is its versions' tag: what it registered, asked again later
        console.print(f"  {'versions':13s} oneword concepts list --batch {escape(report['batch_id'])}", highlight=False,
                      soft_wrap=True)  # fmt: skip
    return 1 if report["failed"] or (report.get("bundle") or {}).get("error") else 0


def photo_lines(manifest: dict) -> list[str]:
    """What preprocess made of the photos (its manifest.json), for the terminal: how many were used, and each
    one skipped or warned about, with why (the steps' log holds them too, among everything else)."""
    import textwrap

    skipped = manifest.get("skipped", [])
    lines = [f"  {'photos':13s} {len(manifest['images'])} used" + (f", {len(skipped)} skipped" if skipped else "")]
    said = [f"skipped {s['source']}: {s['reason']}" for s in skipped] + manifest.get("warnings", [])
    # in an 80-column terminal, each one indented under its first line; a path is never cut
    return lines + [textwrap.fill(line, 80, initial_indent="    ", subsequent_indent="      ", break_long_words=False,
                                  break_on_hyphens=False) for line in said]  # fmt: skip


def _baselines(baselines: dict | None) -> str:
    """The image-only and prompt-only reference points (not ceilings: a concept can score above either), as the
    scores beside them are printed."""
    shown = [f"{k.replace('_', '-')} {v:.4f}" for k, v in (baselines or {}).items() if isinstance(v, float | int)]
    return f"\n  references: {', '.join(shown)}" if shown else ""
