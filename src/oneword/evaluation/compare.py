"""Compare several evaluated runs on one distortion-editability scatter."""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

from oneword.errors import OnewordError, TransientError
from oneword.evaluation.gate import check_comparable
from oneword.evaluation.report import scatter

log = logging.getLogger(__name__)


def load_metrics(run: str, tracking_uri: str | None = None) -> tuple[str, dict]:
    """Read `metrics.json` from an evaluation folder, from an MLflow run's artifacts, or from the run that
    registered a concept version (`NAME`, `NAME/3`, `NAME@alias`).

    Returns:
        (default label, metrics).
    """
    p = Path(run)
    if p.is_dir():
        f = p / "metrics.json"
        if not f.exists():
            raise OnewordError(f"{f} not found", hint="pass folders written by `oneword evaluate`")
        return p.name if p.name not in ("eval", "evaluation") else p.parent.name, json.loads(f.read_text())
    import mlflow

    from oneword.tracking import resolve

    tracking_uri = resolve(tracking_uri)
    label = run[:8]
    if not re.fullmatch(r"[0-9a-f]{32}", run):  # not an MLflow run id: a registered concept, or a folder not there
        if run.startswith((".", "/", "~")) or ("/" in run and not run.rsplit("/", 1)[1].isdigit()):
            raise OnewordError(f"evaluation folder {run} not found", hint="pass folders written by `oneword evaluate`")
        run, label = _registered_run(run, tracking_uri)

    with tempfile.TemporaryDirectory() as d:
        try:
            local = mlflow.artifacts.download_artifacts(
                run_id=run, artifact_path="evaluation/metrics.json", tracking_uri=tracking_uri, dst_path=d
            )
        except Exception as e:  # mlflow raises several types for a missing run or artifact
            from oneword.tracking import said

            raise OnewordError(f"could not read evaluation metrics of MLflow run {run!r}: {said(e)}") from e
        return label, json.loads(Path(local).read_text())


def _registered_run(ref: str, tracking_uri: str) -> tuple[str, str]:
    """The run id and label (`NAME/VERSION`) of concept reference `ref`; refused, naming both readings of it,
    where it is neither a concept there nor an evaluation folder here."""
    from oneword.catalogue import get_version
    from oneword.tracking import sqlite_path

    store = sqlite_path(tracking_uri)
    try:
        if store is not None and not store.exists():  # asking would make an empty store
            raise OnewordError(f"no MLflow store at {store}")
        mv = get_version(ref, tracking_uri)
    except TransientError:  # a registry that did not answer: said as such, not as "no such concept"
        raise
    except OnewordError as e:
        raise OnewordError(
            f"{ref} is no evaluation folder here, nor a registered concept: {e.message}",
            hint="pass folders written by `oneword evaluate`, MLflow run ids, or concepts as NAME, NAME/3 or "
            "NAME@alias with --tracking-uri",
        ) from e
    if not mv.run_id:  # registered by another tool from no run: no evaluation to read
        raise OnewordError(f"{ref} ({mv.name}/{mv.version}) was registered from no MLflow run",
                           hint="compare versions that oneword registered")  # fmt: skip
    return mv.run_id, f"{mv.name}/{mv.version}"


def _distinct(defaults: list[str], runs: Sequence[str], metrics: list[dict]) -> list[str]:
    """The runs' labels, told apart where their folders' names are not (kfp.local names every evaluation's folder
    `evaluate`): by token where the tokens differ, else by the first folder of their paths that differs."""
    if len(set(defaults)) == len(defaults):
        return defaults
    # two references to one registered version (`my-cat/3 my-cat@champion`): each as typed beside it
    typed = [d if d == r or Path(r).is_dir() else f"{d} ({r})" for d, r in zip(defaults, runs, strict=True)]
    if len(set(typed)) == len(typed):
        return typed
    tokens = [m.get("token") for m in metrics]
    if all(tokens) and len(set(tokens)) == len(tokens):
        return [str(t) for t in tokens]
    try:
        paths = [Path(r).resolve() for r in runs]
        common = Path(os.path.commonpath(paths))
        firsts = [p.relative_to(common).parts[0] for p in paths]
    except (ValueError, IndexError):  # an MLflow run among folders, or one folder given twice
        firsts = []
    if firsts and len(set(firsts)) == len(firsts):
        return firsts
    return [f"{d} #{i + 1}" for i, d in enumerate(defaults)]


def compare(
    runs: Sequence[str], out: Path, labels: Sequence[str] | None = None, tracking_uri: str | None = None
) -> Path:
    """Plot each run's checkpoint curve, chosen step and baselines on one chart; write a JSON table beside it.

    Raises:
        EvaluatorMismatch: if the runs were scored by different evaluators.
    """
    if labels and len(labels) != len(runs):
        raise OnewordError(f"{len(labels)} labels for {len(runs)} runs", hint="give one --label per run, or none")
    if out.suffix.lower() != ".png":  # matplotlib would add .png to the name, and the path printed would be wrong
        out = out.with_name(out.name + ".png")
    loaded = [load_metrics(r, tracking_uri) for r in runs]
    for _, m in loaded[1:]:
        check_comparable(loaded[0][1], m)
    names = list(labels) if labels else _distinct([d for d, _ in loaded], runs, [m for _, m in loaded])
    # scores against other images than the training's (`evaluate --data`) rank with no other run's reconstruction
    other = [not (m.get("reference_images") or {}).get("training_images", True) for _, m in loaded]
    if any(other) and not all(other):
        log.warning("%s scored the concept against other images than its training's: their reconstruction does "
                    "not compare with the others'", ", ".join(n for n, o in zip(names, other) if o))  # fmt: skip
    names = [f"{n} (other images)" if o else n for n, o in zip(names, other)]
    series, table = [], []
    for name, (_, m) in zip(names, loaded, strict=True):
        sel = m.get("selection", {})
        series.append(
            {
                "label": name,
                "curve": sel.get("curve"),
                "chosen": sel.get("chosen_step"),
                "final": {"reconstruction": m["reconstruction"], "editability": m["editability"]},
                "baselines": m.get("baselines"),
            }
        )
        table.append(
            {"run": name, "step": m.get("step"), "reconstruction": m["reconstruction"], "editability": m["editability"]}
        )
    scatter(series, out, title="oneword compare")
    out.with_suffix(".json").write_text(json.dumps(table, indent=2))
    return out
