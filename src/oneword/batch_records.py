"""What a run records in MLflow of each concept besides its model versions, and what its report reads back.

A concept that failed is a FAILED run tagged with its step and error (`record_failure`); one found unchanged, a
FINISHED run tagged with the version it is again (`note_unchanged`), or, where a batch's plan found it, a line of
the plan's `unchanged.json` (`note_unchanged_in_plan`); a batch's plan, a run of its own tagged with the manifest
it was read from (`record_plan`), so that the report reads the concepts the run planned, and the next run of that
manifest tells which concepts left it (`previous_plan`, `held_aliases`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from oneword import tracking
from oneword.catalogue import version_row
from oneword.registry import (
    CONCEPT_TAG,
    EXPERIMENT,
    REJUDGED_TAG,
    UNCHANGED_TAG,
    Registration,
    ensure_experiment,
    every_page,
    live_run_to_complete,
)
from oneword.tracking import resolve

log = logging.getLogger(__name__)


def record_failure(
    tracking_uri: str | None,
    name: str,
    token: str,
    batch_id: str,
    stage: str,
    error: str,
    experiment: str = EXPERIMENT,
    run_tags: dict[str, str] | None = None,
    hint: str = "",
) -> str:
    """Log a FAILED MLflow run for a concept that did not make it, so its batch status says why (and `hint`, the
    fix, where the error has one). Returns its id.

    A step or plan tried again (`outcome.retrying`, a cluster's retry policy) that records the same failure of the
    same batch again finds the run it logged the first time and logs no other."""
    uri = resolve(tracking_uri)
    mlflow, client = tracking.client(uri)
    exp_id = ensure_experiment(mlflow, experiment, uri)
    same = client.search_runs(
        [exp_id],
        f"tags.`oneword.batch_id` = '{batch_id}' and tags.`{CONCEPT_TAG}` = '{name}' and "
        f"tags.`oneword.failed_stage` = '{stage}' and attributes.status = 'FAILED'",
        max_results=10,
    )
    for run in same:
        if run.data.tags.get("oneword.error") == error[:4000]:
            return run.info.run_id
    tags = {
        CONCEPT_TAG: name,
        "oneword.token": token,
        "oneword.batch_id": batch_id,
        "oneword.failed_stage": stage,
        "oneword.error": error[:4000],
        **({"oneword.hint": hint[:1000]} if hint else {}),
        **(run_tags or {}),
    }
    run = client.create_run(exp_id, run_name=f"{name} (failed)", tags=tags)
    client.set_terminated(run.info.run_id, status="FAILED")
    return run.info.run_id


def record_unchanged(
    tracking_uri: str | None,
    train_dir: Path,
    name: str,
    found: dict,
    batch_id: str = "",
    experiment: str = EXPERIMENT,
    run_tags: dict[str, str] | None = None,
) -> Registration:
    """Record that `name` trained and would be evaluated exactly as version `found["version"]` was: no new
    version. The live run training opened (or a new one) ends FINISHED, tagged with that version and the batch,
    where the batch report finds it."""
    summary = json.loads((Path(train_dir) / "summary.json").read_text())
    return note_unchanged(tracking_uri, name, summary["concept"]["token"], found, batch_id, experiment, run_tags,
                          summary.get("mlflow_run_id"))  # fmt: skip


def note_unchanged(
    tracking_uri: str | None,
    name: str,
    token: str,
    found: dict,
    batch_id: str = "",
    experiment: str = EXPERIMENT,
    run_tags: dict[str, str] | None = None,
    live_run_id: str | None = None,
) -> Registration:
    """Record that `name` is version `found["version"]` again (`registered_result` or `rejudged_result` found it):
    a FINISHED run tagged with that version, the batch and what the gate said (`rejudged`, if judged again), where
    the batch report finds it. The live run training left open
    (`live_run_id`) is that run, else a new one."""
    uri = resolve(tracking_uri)
    mlflow, client = tracking.client(uri)
    version = found["version"]
    tags = {CONCEPT_TAG: name, "oneword.token": token, UNCHANGED_TAG: version,
            **({"oneword.batch_id": batch_id} if batch_id else {}),
            **({REJUDGED_TAG: found["rejudged"][:4000]} if found.get("rejudged") else {}),
            **(run_tags or {})}  # fmt: skip
    run_id = live_run_to_complete(client, live_run_id)
    if run_id is None:  # made with its tags: a kill between two calls must not leave an untagged RUNNING run
        run_id = client.create_run(
            ensure_experiment(mlflow, experiment, uri), run_name=f"{name} (unchanged)", tags=tags
        ).info.run_id
    else:
        for k, v in tags.items():
            client.set_tag(run_id, k, v)
    client.set_terminated(run_id)
    alias = ",".join(found.get("aliases", []))
    reason = f"unchanged: the same training and evaluation as version {version}"
    if found.get("rejudged"):
        reason += f" ({found['rejudged']})"
    log.info("%s: %s", name, reason)
    return Registration(name, version, alias, reason, run_id, f"models:/{name}/{version}", uri, unchanged=True)


UNCHANGED_FILE = "unchanged.json"  # in a batch's plan run: the concepts its plan found unchanged


def note_unchanged_in_plan(tracking_uri: str | None, plan_run_id: str, found: dict[str, dict]) -> None:
    """Record in a batch's plan (`record_plan`) the concepts its plan found unchanged, `{name: {"version",
    "token", "rejudged"?}}`, in one file, where the batch report finds them: one write for the whole catalogue,
    not a run per concept (`note_unchanged`) night after night."""
    _, client = tracking.client(resolve(tracking_uri))
    client.log_dict(plan_run_id, found, UNCHANGED_FILE)
    log.info("%d concepts unchanged since their versions (recorded in the plan)", len(found))


def batch_unchanged(tracking_uri: str | None, batch_id: str, experiment: str = EXPERIMENT) -> list[dict]:
    """The concepts a batch found already registered (`note_unchanged`, `note_unchanged_in_plan`), as
    `list_concepts` rows of the versions they kept (a version deleted since is left out), with `rejudged` where
    only the gate had changed."""
    from mlflow.exceptions import MlflowException

    mlflow, client = tracking.client(tracking_uri)
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = every_page(
        client.search_runs,
        experiment_ids=[exp.experiment_id],
        filter_string=f"tags.`oneword.batch_id` = '{batch_id}' and tags.`{UNCHANGED_TAG}` != ''",
    )
    kept = {(r.data.tags[CONCEPT_TAG], r.data.tags[UNCHANGED_TAG]): r.data.tags.get(REJUDGED_TAG) for r in runs}
    plan = _plan_run(client, exp.experiment_id, batch_id)
    if plan is not None and any(f.path == UNCHANGED_FILE for f in client.list_artifacts(plan.info.run_id)):
        told = mlflow.artifacts.load_dict(f"{plan.info.artifact_uri}/{UNCHANGED_FILE}")
        kept |= {(name, str(hit["version"])): hit.get("rejudged") for name, hit in told.items()}
    rows, models = [], {}  # each model read once, as batch_versions
    for (name, version), rejudged in sorted(kept.items()):
        try:
            models[name] = models.get(name) or client.get_registered_model(name)
            rows.append(version_row(client.get_model_version(name, version), models[name]))
            if rejudged:
                rows[-1]["rejudged"] = rejudged
        except MlflowException as e:  # deleted since the batch kept it: the report says the concept failed
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            log.warning("%s version %s, which the batch kept, is no longer in the registry", name, version)
    return sorted(rows, key=lambda r: (r["name"], int(r["version"])))


PLAN_KIND = "batch-plan"


MANIFEST_TAG, MANIFEST_KEY_TAG = "oneword.manifest", "oneword.manifest_key"
BUNDLE_FILE = "bundle.json"  # in a batch's plan run: what became of its bundle
BUNDLE_ASKED_TAG = "oneword.batch_bundle"  # on a batch's plan run: the bundle it makes at its end


def record_plan(
    tracking_uri: str | None, batch_id: str, concepts: list[dict], experiment: str = EXPERIMENT, manifest: str = "",
    bundle: str = "",
) -> str:
    """Record a batch's plan (its concepts, as planned; the bundle it makes at its end, if any) in MLflow, where the
    batch's report reads it back, and the next run of the same manifest (`previous_plan`) too.

    KFP's exit handler, which writes the report, may not read other tasks' outputs; MLflow is where both meet.
    Returns the plan's run id. A plan step tried again (`outcome.retrying`, a cluster's retry policy) plans again in
    the run its first attempt recorded, not in another: what that attempt found unchanged is forgotten there.
    """
    uri = resolve(tracking_uri)
    mlflow, client = tracking.client(uri)
    exp_id = ensure_experiment(mlflow, experiment, uri)
    tags = {"oneword.batch_id": batch_id, "oneword.kind": PLAN_KIND}
    if manifest:  # searched by a hash: a path may hold quotes, which a filter string would have to escape
        tags |= {MANIFEST_TAG: manifest, MANIFEST_KEY_TAG: hashlib.sha256(manifest.encode()).hexdigest()[:16]}
    if bundle:
        tags[BUNDLE_ASKED_TAG] = bundle
    earlier = _plan_run(client, exp_id, batch_id)
    if earlier is None:
        run_id = client.create_run(exp_id, run_name=f"batch {batch_id} (plan)", tags=tags).info.run_id
    else:
        run_id = earlier.info.run_id
        if any(f.path == UNCHANGED_FILE for f in client.list_artifacts(run_id)):
            client.log_dict(run_id, {}, UNCHANGED_FILE)
    client.log_dict(run_id, {"concepts": concepts}, "plan.json")
    client.set_terminated(run_id)
    return run_id


def mark_deferred(tracking_uri: str | None, plan_run_id: str, concepts: list[dict], later: dict[str, int],
                  untold: set[str] = frozenset(), one_off: bool = False) -> None:  # fmt: skip
    """Record in a batch's plan (`record_plan`) which of its concepts it left to the manifest's next runs, how many
    runs in a row have left each (`batch.this_run_takes`), and of which the lookup could not tell whether they
    changed (`untold`): its report says so of them, and the next run takes those that waited longest first. In a
    run limited to some concepts (`one_off`), no next run will: its report says to start them again."""
    from oneword.batch import DEFERRED_KEY, ONE_OFF_KEY, UNTOLD_KEY

    _, client = tracking.client(resolve(tracking_uri))
    marked = [{**c, DEFERRED_KEY: later[c["name"]], **({UNTOLD_KEY: True} if c["name"] in untold else {}),
               **({ONE_OFF_KEY: True} if one_off else {})}
              if c["name"] in later else c for c in concepts]  # fmt: skip
    client.log_dict(plan_run_id, {"concepts": marked}, "plan.json")


def batch_plan(tracking_uri: str | None, batch_id: str, experiment: str = EXPERIMENT) -> list[dict] | None:
    """The concepts a batch planned (`record_plan`), or None if it recorded no plan (its manifest was invalid)."""
    mlflow, _, run = _recorded_plan(tracking_uri, batch_id, experiment)
    return None if run is None else mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/plan.json")["concepts"]


def _recorded_plan(tracking_uri: str | None, batch_id: str, experiment: str):
    """(mlflow, client, the plan run a batch recorded or None)."""
    mlflow, client = tracking.client(resolve(tracking_uri))
    exp = mlflow.get_experiment_by_name(experiment)
    return mlflow, client, None if exp is None else _plan_run(client, exp.experiment_id, batch_id)


def record_bundle(tracking_uri: str | None, batch_id: str, outcome: dict, experiment: str = EXPERIMENT) -> None:
    """Record in a batch's plan what became of its bundle (`Bundled.summary`, or `{"name", "error"}`), where its
    report reads it (`batch_bundle`)."""
    _, client, run = _recorded_plan(tracking_uri, batch_id, experiment)
    if run is None:  # the bundle step runs after the plan's: a plan deleted since
        log.warning("batch %s recorded no plan: what became of its bundle is not recorded", batch_id)
        return
    client.log_dict(run.info.run_id, outcome, BUNDLE_FILE)


def batch_bundle(tracking_uri: str | None, batch_id: str, experiment: str = EXPERIMENT) -> dict | None:
    """What became of a batch's bundle (`record_bundle`; `{"name", "error"}` where its step never ran), or None:
    the batch makes none."""
    mlflow, client, run = _recorded_plan(tracking_uri, batch_id, experiment)
    if run is None or not (asked := run.data.tags.get(BUNDLE_ASKED_TAG)):
        return None
    if not any(f.path == BUNDLE_FILE for f in client.list_artifacts(run.info.run_id)):
        return {"name": asked, "error": "not made: the run ended before its bundle-concepts step (a step before it "
                "failed, or the run was stopped); the bundle is as it was"}  # fmt: skip
    return mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/{BUNDLE_FILE}")


def _plan_run(client, experiment_id: str, batch_id: str):
    """The plan a batch recorded (the newest, should there be several), or None."""
    runs = client.search_runs(
        [experiment_id],
        f"tags.`oneword.batch_id` = '{batch_id}' and tags.`oneword.kind` = '{PLAN_KIND}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def previous_plan(tracking_uri: str | None, batch_id: str, experiment: str = EXPERIMENT) -> list[dict] | None:
    """The plan of the run of the same manifest before this batch (the schedule's last night), or None: no such
    run, or a batch whose plan names no manifest."""
    mlflow, client = tracking.client(tracking_uri)
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        return None
    kind = f"tags.`oneword.kind` = '{PLAN_KIND}'"
    mine = client.search_runs([exp.experiment_id], f"tags.`oneword.batch_id` = '{batch_id}' and {kind}",
                              order_by=["attributes.start_time DESC"], max_results=1)  # fmt: skip
    if not mine or not (key := mine[0].data.tags.get(MANIFEST_KEY_TAG)):
        return None
    # by when each plan-batch started: a plan-batch pod that stayed pending may swap two runs started together
    before = client.search_runs(
        [exp.experiment_id],
        f"tags.`{MANIFEST_KEY_TAG}` = '{key}' and {kind} and tags.`oneword.batch_id` != '{batch_id}' and "
        f"attributes.start_time <= {mine[0].info.start_time}",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return mlflow.artifacts.load_dict(f"{before[0].info.artifact_uri}/plan.json")["concepts"] if before else None


def held_aliases(tracking_uri: str | None, name: str) -> dict[str, str]:
    """The aliases registered model `name` holds, `{alias: version}`; {} where it is not registered."""
    from mlflow.exceptions import MlflowException

    _, client = tracking.client(tracking_uri)
    try:
        return {a: str(v) for a, v in (client.get_registered_model(name).aliases or {}).items()}
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return {}
        raise


def batch_failures(tracking_uri: str | None, batch_id: str, experiment: str = EXPERIMENT) -> dict[str, dict]:
    """The failed concepts of a batch: {name: {"stage", "error", "hint", "run_id"}}.

    A concept may have several FAILED runs: one that failed itself (live training, `register`) carries no stage,
    and the run `record_failure` logs after it does. The newest run that says where it failed wins.
    """
    mlflow, client = tracking.client(tracking_uri)
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        return {}
    runs = [  # FAILED: a step said why; KILLED: the run's exit handler ended a training register never saw
        r
        for status in ("FAILED", "KILLED")
        for r in every_page(
            client.search_runs,
            experiment_ids=[exp.experiment_id],
            filter_string=f"tags.`oneword.batch_id` = '{batch_id}' and attributes.status = '{status}'",
            order_by=["attributes.start_time DESC"],
        )
    ]
    runs.sort(key=lambda r: r.info.start_time or 0, reverse=True)
    out: dict[str, dict] = {}
    for r in runs:  # newest first
        name, stage = r.data.tags.get(CONCEPT_TAG), r.data.tags.get("oneword.failed_stage")
        if name is None or (name in out and (out[name]["stage"] or not stage)):
            continue
        out[name] = {"stage": stage, "error": r.data.tags.get("oneword.error"),
                     "hint": r.data.tags.get("oneword.hint", ""), "run_id": r.info.run_id}  # fmt: skip
    return out
