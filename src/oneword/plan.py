"""A batch run's plan: which concepts of its manifest it trains tonight, in which shards.

`plan_batch` is the library part of the pipelines' `plan_batch` step. It reads the manifest and records the plan
in MLflow, where the run's report reads it. It makes the lookup of unchanged concepts once for the whole manifest
(`oneword.unchanged`): the unchanged ones and those a step would fail at every attempt are recorded there and add
no task to the run. It keeps the run within what Argo can hold of it: at most `max_concepts_per_run` concepts
(`batch.this_run_takes`), the others recorded as deferred for the manifest's next runs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from oneword.batch import (
    DEFERRED_KEY,
    JUDGED_KEY,
    concept_names,
    load_concepts_manifest,
    manifest_id,
    plan_concepts,
    runs_needed,
    shard,
    this_run_takes,
)
from oneword.batch_records import mark_deferred, previous_plan, record_plan
from oneword.bundles import check_bundle_name
from oneword.registry import EXPERIMENT

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """What a batch run trains: `shards` of planned concepts; how many the lookup `told` (unchanged, or recorded as
    failing), how many it trains, and how many it `deferred`."""

    shards: list[list[dict]]
    told: int
    to_train: int
    deferred: int


def plan_batch(
    concepts_manifest: str,
    batch_id: str,
    settings_of: dict,
    concepts_per_shard: int = 1,
    max_concepts_per_run: int = 0,
    only_concepts: Sequence[str] = (),
    tracking_uri: str | None = None,
    experiment: str = EXPERIMENT,
    run_tags: dict[str, str] | None = None,
    bundle: str = "",
) -> Plan:
    """Plan a batch run of a manifest (see the module's docstring).

    Args:
        concepts_manifest: YAML at an `s3://` URI or a path.
        batch_id: the run's id (its report reads the plan back by it).
        settings_of: the run's pipeline parameters by name, as the steps are given them (`lookup_settings`).
        concepts_per_shard: concepts trained together in one GPU job.
        max_concepts_per_run: concepts the run trains at most (0 or less: all that changed).
        only_concepts: names of the manifest's concepts the run is limited to (empty: all). Such a run is no night
            of the manifest's: the next run of the manifest neither reads its plan (who waited, who left) nor is
            read by it.
        tracking_uri: the registry's MLflow tracking URI.
        experiment: MLflow experiment.
        run_tags: more tags for the records of unchanged and failing concepts (the KFP run's).
        bundle: the bundle the run refreshes after its concepts (`bundles.check_bundle_name`; empty: none).

    Raises:
        OnewordError: the manifest is invalid; `bundle` is a concept's name, or another tool's model's.
    """
    from oneword.pipelines.parameters import lookup_settings
    from oneword.unchanged import changed_concepts

    entries = load_concepts_manifest(concepts_manifest)
    if bundle:  # before the plan is recorded: a run that stops here trains nothing
        check_bundle_name(bundle, concept_names(entries), tracking_uri, concepts_manifest)
    concepts = plan_concepts(entries, only_concepts, concepts_manifest)
    manifest = "" if only_concepts else manifest_id(concepts_manifest)
    plan_run = record_plan(tracking_uri, batch_id, concepts, experiment, manifest, bundle)
    try:
        given = lookup_settings(settings_of)
    except ValueError as e:  # a setting no step takes: train records it as each concept's failure
        log.warning("cannot tell which concepts changed: %s", e)
        todo = concepts
    else:
        todo = changed_concepts(concepts, given, tracking_uri, batch_id, experiment, run_tags, "record",
                                plan_run_id=plan_run)  # fmt: skip
    waited = {}
    if 0 < max_concepts_per_run < len(todo):
        try:
            waited = {c["name"]: c[DEFERRED_KEY] for c in previous_plan(tracking_uri, batch_id, experiment) or []
                      if c.get(DEFERRED_KEY)}  # fmt: skip
        except Exception as e:  # who waited longest is lost for one night; the night is not
            log.warning("could not read the manifest's previous plan (%s): the manifest's order decides", e)
    now, later = this_run_takes(todo, max_concepts_per_run, waited)
    if later:
        mark_deferred(tracking_uri, plan_run, concepts, later, {c["name"] for c in todo if not c.get(JUDGED_KEY)},
                      one_off=bool(only_concepts))  # fmt: skip
        if only_concepts:
            log.warning("%d of only_concepts left out: start them in a run of their own", len(later))
        else:
            log.warning(runs_needed(len(todo), max_concepts_per_run))
    return Plan(shard(now, concepts_per_shard), len(concepts) - len(todo), len(now), len(later))
