"""Send pipelines to a Kubeflow Pipelines cluster with `kfp.Client`: one run, or a recurring batch run."""

import contextlib
import io
import json
import logging
from collections.abc import Iterator

from oneword.errors import OnewordError
from oneword.logs import log_level
from oneword.pipelines.compile import tmp_package
from oneword.pipelines.container import require_registry
from oneword.pipelines.parameters import KFP_EXPERIMENT, PIPELINE_ROOT, SERVICE_ACCOUNT

log = logging.getLogger(__name__)


def _client(host: str, namespace: str | None, token: str | None):
    import warnings

    import kfp

    try:
        # urllib3 warns "Retrying (...)" in five lines per attempt, which the error says once
        with warnings.catch_warnings(), log_level(logging.ERROR, "urllib3.connectionpool"):
            # "This client only works with Kubeflow Pipeline v2.0.0-beta.2 and later": oneword's pipelines need 2.14
            warnings.filterwarnings("ignore", category=FutureWarning, module="kfp.client")
            return kfp.Client(host=host, namespace=namespace, existing_token=token)
    except Exception as e:  # connection and auth errors come in many types
        why = getattr(e, "reason", None) or e  # urllib3's MaxRetryError: the last attempt's own error
        why = getattr(why, "reason", None) or why
        raise OnewordError(f"cannot reach the Kubeflow Pipelines API at {host}: {why}",
                           hint="check --host (e.g. http://ml-pipeline-ui.kubeflow) and your credentials") from e



def submit(host: str, params: dict, pipeline: str = "textual_inversion", experiment: str = KFP_EXPERIMENT,
           namespace: str | None = None, run_name: str | None = None, token: str | None = None,
           service_account: str = SERVICE_ACCOUNT, image_registry: str | None = None,
           pipeline_root: str = PIPELINE_ROOT) -> dict:
    """Start one run of a pipeline on a cluster (`submit_runs`, for one run).

    Returns:
        `{"run_id", "experiment", "url"}`.
    """
    return next(submit_runs(host, [(run_name, params)], pipeline, experiment, namespace, token, service_account,
                            image_registry, pipeline_root))  # fmt: skip


def submit_runs(host: str, runs: list[tuple[str | None, dict]], pipeline: str = "textual_inversion",
                experiment: str = KFP_EXPERIMENT, namespace: str | None = None, token: str | None = None,
                service_account: str = SERVICE_ACCOUNT, image_registry: str | None = None,
                pipeline_root: str = PIPELINE_ROOT) -> Iterator[dict]:
    """Start runs of a pipeline on a cluster, one after another: `runs` holds each one's name (None: KFP's) and
    parameters. The pipeline is compiled once, for all of them.

    No task uses KFP's cache (`definitions.personalise` says why); what is costly, training and evaluating an
    unchanged concept, oneword finds by its own keys.
    `image_registry` is where the cluster pulls oneword's images from; without it nothing is sent.
    `pipeline_root` is where the runs' artifacts go (KFP's own default root is left to KFP's other pipelines).

    Yields:
        `{"run_id", "experiment", "url"}` for each run once it is started: a run that cannot be started raises,
        and those before it stay started.
    """
    package = tmp_package(pipeline, require_registry(image_registry))  # refused before any call
    client = _client(host, namespace, token)
    for run_name, params in runs:
        # kfp prints its own two links per run (the caller says one), and logs "Creating experiment" each time
        with contextlib.redirect_stdout(io.StringIO()), log_level(logging.WARNING, None):
            run = client.create_run_from_pipeline_package(str(package), arguments=params, run_name=run_name,
                                                          experiment_name=experiment, namespace=namespace,
                                                          service_account=service_account or None,
                                                          enable_caching=False,
                                                          pipeline_root=pipeline_root or None)  # fmt: skip
        yield {"run_id": run.run_id, "experiment": experiment,
               "url": f"{host.rstrip('/')}/#/runs/details/{run.run_id}"}  # fmt: skip


def schedule(host: str, params: dict, cron: str, name: str = "oneword-batch", experiment: str = KFP_EXPERIMENT,
             pipeline: str = "batch_personalisation", version: str | None = None, max_concurrency: int = 1,
             catchup: bool = False, namespace: str | None = None, token: str | None = None,
             service_account: str = SERVICE_ACCOUNT, image_registry: str | None = None,
             pipeline_root: str = PIPELINE_ROOT) -> dict:
    """Upload a pipeline version and run it on a schedule, replacing the schedule of the same name if there is one.

    KFP's API cannot change a recurring run in place, so the new one is created first and the old ones of that
    name (in the experiment) are deleted after it: at no moment is there no schedule, and afterwards only one.

    Args:
        host: KFP API endpoint.
        params: pipeline parameters (for batch personalisation: at least concepts_manifest).
        cron: cron expression with seconds, as KFP expects (e.g. "0 0 2 * * *": daily at 02:00).
        name: the pipeline's and the recurring run's name.
        experiment: KFP experiment.
        pipeline: which pipeline to schedule.
        version: pipeline version name (default: oneword's version plus a timestamp).
        max_concurrency: runs of this schedule allowed at once.
        catchup: backfill the runs missed while the schedule was paused (off: start from now).
        namespace: the Kubernetes namespace of a multi-user KFP (every call is made in it).
        service_account: the Kubernetes service account runs use (k8s/base/pipeline-namespace/rbac.yaml makes it).
        image_registry: where the cluster pulls oneword's images from (required: see container.require_registry).
        pipeline_root: where the runs' artifacts go (default: oneword's MinIO; "": the namespace's KFP default).

    Returns:
        `{"pipeline_id", "version_id", "recurring_run_id", "replaced": [ids of the schedules it replaced]}`.
    """
    import time

    from oneword import __version__

    package = str(tmp_package(pipeline, require_registry(image_registry)))
    client = _client(host, namespace, token)
    version = version or f"{__version__}-{time.strftime('%Y%m%d-%H%M%S')}"
    pipeline_id = _pipeline_id(client, name, namespace)
    if pipeline_id is None:
        p = client.upload_pipeline(package, pipeline_name=name, namespace=namespace)
        pipeline_id = p.pipeline_id
    v = client.upload_pipeline_version(package, pipeline_version_name=version, pipeline_id=pipeline_id)
    exp = client.create_experiment(experiment, namespace=namespace)
    old = [r.recurring_run_id for r in _schedules_named(client, name, exp.experiment_id, namespace)]
    job = client.create_recurring_run(
        experiment_id=exp.experiment_id, job_name=name, cron_expression=cron, max_concurrency=max_concurrency,
        no_catchup=not catchup, params=params, pipeline_id=pipeline_id, version_id=v.pipeline_version_id,
        enabled=True, service_account=service_account or None, pipeline_root=pipeline_root or None,
    )
    replaced = [r for r in old if r != job.recurring_run_id]
    # another `schedule` of the name at the same moment listed before this one created (and this one before it):
    # each would keep its own. Both keep the newest (the last created holds, as the one run after the other would)
    fresh = [r for r in _schedules_named(client, name, exp.experiment_id, namespace) if r.recurring_run_id not in old]
    if job.recurring_run_id not in {r.recurring_run_id for r in fresh}:
        fresh.append(job)
    newest = max(fresh, key=lambda r: (r.created_at.timestamp() if r.created_at else 0.0, r.recurring_run_id))
    held_id = newest.recurring_run_id
    replaced += [r.recurring_run_id for r in fresh if r.recurring_run_id != held_id]
    for r in replaced:
        _delete_schedule(client, r)
    out = {"pipeline_id": pipeline_id, "version_id": v.pipeline_version_id, "recurring_run_id": held_id,
           "replaced": [r for r in replaced if r != job.recurring_run_id]}  # fmt: skip
    if held_id != job.recurring_run_id:
        log.warning("another `oneword schedule` of %r made its schedule at the same moment, after this one's: "
                    "its schedule (%s) holds, and this one's was deleted", name, held_id)  # fmt: skip
        out["overtaken_by"] = held_id
    return out


def _schedules_named(client, name: str, experiment_id: str, namespace: str | None) -> list:
    """The recurring runs named `name` in the experiment, every page."""
    only = json.dumps({"predicates": [{"key": "display_name", "operation": "EQUALS", "string_value": name}]})
    found, page = [], ""
    while True:
        listed = client.list_recurring_runs(page_token=page, page_size=100, experiment_id=experiment_id,
                                            namespace=namespace, filter=only)  # fmt: skip
        found += [r for r in (listed.recurring_runs or []) if r.display_name == name]
        page = listed.next_page_token
        if not page:
            return found


def _delete_schedule(client, recurring_run_id: str) -> None:
    """Delete a recurring run, leaving the runs it started to finish; one deleted already (by another `schedule`
    at the same moment) is no error."""
    from kfp_server_api.exceptions import ApiException

    try:
        # the runs an old schedule started are its Workflows' dependents: deleted by default, that night's run would
        # be stopped mid-training with no exit handler to report it. ORPHAN leaves them to finish (KFP 2.16+;
        # an older server ignores the parameter).
        try:
            client._recurring_run_api.recurring_run_service_delete_recurring_run(
                recurring_run_id=recurring_run_id, propagation_policy="ORPHAN"
            )
        except TypeError:  # a kfp client before 2.16 takes no policy: its runs go with it, as they always did
            log.warning("this kfp client cannot keep the replaced schedule's running runs; deleting it as it is")
            client.delete_recurring_run(recurring_run_id)
    except ApiException as e:
        if e.status != 404:
            raise


def _pipeline_id(client, name: str, namespace: str | None) -> str | None:
    """The id of the pipeline `name` where `schedule` uploads it: in `namespace` on a multi-user KFP (the KFP
    client's `get_pipeline_id` looks among shared pipelines only, so a second schedule uploaded it again and
    was refused: the name already exists)."""
    only = json.dumps({"predicates": [{"key": "display_name", "operation": "EQUALS", "string_value": name}]})
    found = client.list_pipelines(filter=only, page_size=2, namespace=namespace).pipelines or []
    found = [p for p in found if p.display_name == name]
    return found[0].pipeline_id if found else None
