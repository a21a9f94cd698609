"""`oneword train`: learn the embedding of a new token from cached latents."""

from __future__ import annotations

import contextlib
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from oneword.cli.app import STATE, app
from oneword.cli.options import default, option
from oneword.config import ConceptSpec, TrackingConfig, TrainConfig


@app.command("train", short_help="Learn the concept's new word from its latents.")
def train_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder")],
    latents: Annotated[
        Path | None, typer.Argument(metavar="LATENTS", help="folder written by `oneword cache-latents` (one concept)")
    ] = None,
    token: Annotated[str | None, typer.Option(help="the new pseudo-word, e.g. '<my-cat>'")] = None,
    init_word: Annotated[str | None, typer.Option(help="one-token word to start from, e.g. 'cat'")] = None,
    concepts: Annotated[
        Path | None,
        typer.Option(
            help="YAML list of concepts to train together (name, latents, token, init_word, optional n_vectors, "
            "templates and learning_rate); each is written to OUT/NAME"
        ),
    ] = None,
    base_model: Annotated[str | None, typer.Option(help="default: the model the latents were encoded with")] = None,
    n_vectors: Annotated[int, option(ConceptSpec, "n_vectors")] = default(ConceptSpec, "n_vectors"),
    templates: Annotated[str | None, option(ConceptSpec, "templates")] = default(ConceptSpec, "templates"),
    steps: Annotated[int | None, option(TrainConfig, "steps")] = default(TrainConfig, "steps"),
    batch_size: Annotated[int, option(TrainConfig, "batch_size")] = default(TrainConfig, "batch_size"),
    learning_rate: Annotated[float | None, option(TrainConfig, "learning_rate")] = default(
        TrainConfig, "learning_rate"
    ),
    scale_lr: Annotated[bool, option(TrainConfig, "scale_lr")] = default(TrainConfig, "scale_lr"),
    weight_decay: Annotated[float, option(TrainConfig, "weight_decay")] = default(TrainConfig, "weight_decay"),
    progressive_every: Annotated[int, option(TrainConfig, "progressive_every")] = default(
        TrainConfig, "progressive_every"
    ),
    init_l2: Annotated[float, option(TrainConfig, "init_l2")] = default(TrainConfig, "init_l2"),
    init_l2_schedule: Annotated[str, option(TrainConfig, "init_l2_schedule")] = default(
        TrainConfig, "init_l2_schedule"
    ),
    early_end: Annotated[float, option(TrainConfig, "early_end")] = default(TrainConfig, "early_end"),
    early_end_window: Annotated[int, option(TrainConfig, "early_end_window")] = default(
        TrainConfig, "early_end_window"
    ),
    init_cos: Annotated[float, option(TrainConfig, "init_cos")] = default(TrainConfig, "init_cos"),
    direction_only: Annotated[bool, option(TrainConfig, "direction_only")] = default(TrainConfig, "direction_only"),
    direction_lr: Annotated[float, option(TrainConfig, "direction_lr")] = default(TrainConfig, "direction_lr"),
    vmf_kappa: Annotated[float, option(TrainConfig, "vmf_kappa")] = default(TrainConfig, "vmf_kappa"),
    seed: Annotated[int, option(TrainConfig, "seed")] = default(TrainConfig, "seed"),
    precision: Annotated[str, option(TrainConfig, "precision")] = default(TrainConfig, "precision"),
    compile: Annotated[str, option(TrainConfig, "compile", "--compile")] = default(TrainConfig, "compile"),
    gradient_checkpointing: Annotated[bool, option(TrainConfig, "gradient_checkpointing")] = default(
        TrainConfig, "gradient_checkpointing"
    ),
    gpus: Annotated[int, option(TrainConfig, "gpus")] = default(TrainConfig, "gpus"),
    checkpoint_every: Annotated[int | None, option(TrainConfig, "checkpoint_every")] = default(
        TrainConfig, "checkpoint_every"
    ),
    checkpoint_dir: Annotated[str | None, typer.Option(help="folder or s3:// prefix (default OUT/checkpoints)")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue from the newest checkpoint")] = False,
    log_every: Annotated[int, option(TrainConfig, "log_every")] = default(TrainConfig, "log_every"),
    sample_every: Annotated[int, option(TrainConfig, "sample_every")] = default(TrainConfig, "sample_every"),
    device: Annotated[str, option(TrainConfig, "device")] = default(TrainConfig, "device"),
    tracking_uri: Annotated[
        str,
        typer.Option(
            help="MLflow URI of the live run: loss, norm and sample pictures while it trains (empty: "
            "$MLFLOW_TRACKING_URI; neither: no live run)"
        ),
    ] = default(TrackingConfig, "tracking_uri"),
    experiment: Annotated[str, option(TrackingConfig, "experiment")] = default(TrackingConfig, "experiment"),
) -> None:
    """Learn a new word for the concept in the latents, or for several concepts together (--concepts).

    \b
    Examples:
      oneword train runs/my-cat/latents --token '<my-cat>' --init-word cat \\
        -o runs/my-cat/train
      # K concepts in one batch of K x batch-size; with --gpus 4, each GPU K/4:
      oneword train --concepts shard.yaml -o runs/shard-0 --resume
      # live loss, norm and sample pictures in MLflow (`register` ends the run):
      oneword train runs/my-cat/latents --token '<my-cat>' --init-word cat \\
        -o runs/my-cat/train --tracking-uri http://mlflow:5000
    """
    from oneword.live import LiveTracking

    config = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        scale_lr=scale_lr,
        weight_decay=weight_decay,
        progressive_every=progressive_every,
        init_l2=init_l2,
        init_l2_schedule=init_l2_schedule,  # type: ignore[arg-type]
        early_end=early_end,
        early_end_window=early_end_window,
        init_cos=init_cos,
        direction_only=direction_only,
        direction_lr=direction_lr,
        vmf_kappa=vmf_kappa,
        seed=seed,
        precision=precision,
        compile=compile,  # type: ignore[arg-type]
        gradient_checkpointing=gradient_checkpointing,
        gpus=gpus,
        checkpoint_every=checkpoint_every,
        log_every=log_every,
        sample_every=sample_every,
        device=device,
    )
    tracking = LiveTracking.configured(tracking_uri, experiment)
    # a group's own checkpoint folders lie under --checkpoint-dir; without it, all in out/checkpoints
    with _interrupted(checkpoint_dir or out / "checkpoints", concepts is None or not checkpoint_dir):
        _train(concepts, latents, out, token, init_word, n_vectors, templates, config, base_model, checkpoint_dir,
               resume, tracking)  # fmt: skip


def _train(concepts, latents, out, token, init_word, n_vectors, templates, config, base_model, checkpoint_dir,
           resume, tracking) -> None:  # fmt: skip
    """Train the group of `--concepts`, or the one concept of LATENTS, and say where it went."""
    from rich import print as rprint

    from oneword.errors import OnewordError
    from oneword.train import train, train_group

    if concepts is not None:
        if latents is not None or token or init_word:
            raise OnewordError("pass either --concepts or LATENTS with --token and --init-word, not both")
        rows = train_group(
            _read_group(concepts),
            out,
            config,
            base_model=base_model,
            checkpoint_root=checkpoint_dir,
            resume=resume,
            tracking=tracking,
        )
        for row in rows:
            where = f"{out}/{row['name']}" if row["status"] == "trained" else f"{row['stage']}: {row['error']}"
            rprint(f"[{'green' if row['status'] == 'trained' else 'red'}]{row['token']}[/] {row['status']}: {where}")
        if any(row["status"] != "trained" for row in rows):
            raise typer.Exit(2)
        return
    if latents is None or not token or not init_word:
        raise OnewordError("train needs LATENTS, --token and --init-word (or --concepts FILE)")
    concept = ConceptSpec(token=token, init_word=init_word, n_vectors=n_vectors, templates=templates)
    r = train(
        latents,
        out,
        concept,
        config,
        base_model=base_model,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        tracking=tracking,
    )
    if r.steps_run:
        said = f"trained for {r.steps} steps ({r.steps_per_second:.1f} steps/s)"
        if r.steps_run < r.steps:
            said = f"trained steps {r.steps - r.steps_run + 1}-{r.steps} ({r.steps_per_second:.1f} steps/s)"
    else:  # --resume of a training whose checkpoints were at the end already
        said = f"was trained for {r.steps} steps already (its checkpoints reached the end; nothing to train)"
    rprint(f"[green]{token}[/] {said} -> {out}/learned_embeds.safetensors")


@contextlib.contextmanager
def _interrupted(checkpoints_at: str | Path, listed: bool) -> Iterator[None]:
    """On Ctrl-C, say what was kept and how to go on (exit status 130, a shell's for SIGINT), not a blank line;
    on SIGTERM or SIGHUP the same, with its status.

    `checkpoints_at`: where the checkpoints are; `listed`: whether they lie there themselves (not in a folder
    of each group's, under it).
    """
    from oneword.processes import Stopped, stops_raise

    try:
        with stops_raise():  # `timeout`, `kill`, a scheduler's stop: said as Ctrl-C is, with its status
            yield
    except (KeyboardInterrupt, Stopped) as e:
        from oneword import checkpoints

        args = [a for a in STATE["argv"] if a != "--resume"]
        kept, any_kept = f"its checkpoints are kept in {checkpoints_at}", True
        if listed:
            try:
                found = checkpoints.list_checkpoints(checkpoints_at)
                kept = f"its newest checkpoint is step {found[-1][0]}" if found else "no checkpoint was written yet"
                any_kept = bool(found)
            except Exception:  # a store that cannot be read now: where they are is said all the same
                pass
        if any_kept:
            again = "to continue: " + shlex.join(["oneword", *args, "--resume"])
        else:  # nothing to resume from: the same command starts it again
            again = "to start again: " + shlex.join(["oneword", *args])
        by = f"stopped by {e.signal}" if isinstance(e, Stopped) else "interrupted"
        print(f"\n{by}: the training stopped; {kept}.\n{again}", file=sys.stderr)
        raise typer.Exit(e.code if isinstance(e, Stopped) else 130) from None


def _read_group(path: Path):
    """Read a --concepts YAML file into `(name, ConceptSpec, latents folder)` triples."""
    from pydantic import ValidationError

    from oneword.batch import field_problems, manifest_items, parse_yaml, read_text
    from oneword.errors import OnewordError
    from oneword.registry import concept_name

    if not path.is_file():
        raise OnewordError(f"concepts file {path} not found")
    items = manifest_items(parse_yaml(read_text(path, what="concepts file"), str(path), "concepts file"), str(path),
                           "concepts file") or []  # fmt: skip
    own = ("name", "latents")  # the file's own fields; the rest are the concept's (ConceptSpec)
    hint = ("each needs name (letters, digits, '_', '.', '-'), latents, token and init_word (n_vectors, templates "
            "and learning_rate are optional)")  # fmt: skip
    out = []
    for i, item in enumerate(items if isinstance(items, list) else []):
        label = f"concept #{i + 1} of {path}"
        if not isinstance(item, dict):
            raise OnewordError(f"{label} is {item!r}, not a mapping of fields", hint=hint)
        problems = [f"missing field {k!r}" for k in own if k not in item]
        try:
            # (a key YAML reads as a number or a boolean is a field error too, not a TypeError)
            spec = ConceptSpec.model_validate({k: v for k, v in item.items() if k not in own})
        except ValidationError as e:
            problems += field_problems(e, (*own, *ConceptSpec.model_fields))
        if problems:
            raise OnewordError(f"{label}: {'; '.join(problems)}", hint=hint)
        name, where = str(item["name"]), Path(str(item["latents"]))
        try:
            if not name:
                raise OnewordError("its name is empty")
            concept_name(spec.token, name)  # a folder of the output: `../x` must not write outside it
        except OnewordError as e:
            raise OnewordError(f"{label}: {e.message}", hint=hint) from e
        out.append((name, spec, where if where.is_absolute() else path.parent / where))
    if not out:
        raise OnewordError(f"concepts file {path} lists no concepts")
    names = [name for name, _, _ in out]
    if twice := sorted({n for n in names if names.count(n) > 1}):
        raise OnewordError(f"concepts file {path} names {', '.join(map(repr, twice))} more than once",
                           hint="each concept trains into its own folder, named by its `name:`")  # fmt: skip
    return out
