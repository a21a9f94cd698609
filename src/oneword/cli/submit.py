"""`oneword submit` and `oneword schedule`: send pipelines to a Kubeflow Pipelines cluster."""

import json
import math
from typing import Annotated

import typer

from oneword.cli.app import app
from oneword.pipelines.parameters import DEFAULTS, KFP_EXPERIMENT, PIPELINE_ROOT, SERVICE_ACCOUNT

HOST = typer.Option(help="KFP API endpoint, e.g. http://ml-pipeline-ui.kubeflow")
PIPELINE_ROOT_HELP = "where the run's artifacts go (default: oneword's MinIO bucket; '': the namespace's KFP default)"
# the default in full is a URL of 200 characters with the MinIO endpoint in its query: its path says enough
PIPELINE_ROOT_OPTION = typer.Option(help=PIPELINE_ROOT_HELP, show_default=PIPELINE_ROOT.split("?")[0] + "?...")
IMAGE_REGISTRY = typer.Option(
    help="registry the cluster pulls oneword's images from (required), e.g. ghcr.io/oneword-ml for the released ones",
    envvar="ONEWORD_IMAGE_REGISTRY",
)


def _params(param: list[str] | None, pipeline: str) -> dict:
    """`--param KEY=VALUE`s as the pipeline's inputs, each checked against its name and type here.

    The KFP client sends any key and value as they are; a typo would reach the cluster and fail there, and a
    number given for a string parameter (`accelerator_limit`) would be read as empty by KFP's driver.
    """
    import difflib

    from oneword.errors import OnewordError
    from oneword.pipelines import definitions

    inputs = getattr(definitions, pipeline).component_spec.inputs
    out = {}
    for p in param or []:
        if "=" not in p:
            raise OnewordError(f"--param {p!r} is not KEY=VALUE", hint="e.g. --param steps=3000")
        k, v = p.split("=", 1)
        if k not in inputs:
            close = difflib.get_close_matches(k, list(inputs), n=3)
            raise OnewordError(
                f"--param {k}: the {pipeline} pipeline has no parameter {k!r}",
                hint=f"did you mean {' or '.join(close)}?" if close else f"its parameters: {', '.join(inputs)}",
            )
        out[k] = _typed(k, v, inputs[k].type)
        _check_setting(k, out[k])
    return out


def _check_setting(key: str, value: object) -> None:
    """A setting's own rules (its config field's: a step count of at least 1, a GPU count of at least one, ...),
    checked here rather than in the step that would meet it on the cluster."""
    from oneword.errors import OnewordError
    from oneword.pipelines.parameters import invalid

    if problems := invalid({key: value}):
        raise OnewordError(f"--param {problems[0]}", hint="fix the value and run again")


def _typed(key: str, value: str, kfp_type: str) -> object:
    """`value` as the pipeline input `key` of KFP type `kfp_type` takes it."""
    from oneword.errors import OnewordError

    try:
        if kfp_type == "String":
            return value
        if kfp_type == "Integer":
            return int(value)
        if kfp_type == "Float":
            number = float(value)
            if not math.isfinite(number):  # not JSON, and no setting takes it
                raise ValueError(value)
            return number
        if kfp_type == "Boolean":
            if value.lower() not in ("true", "false"):
                raise ValueError(value)
            return value.lower() == "true"
        parsed = json.loads(value)
        if not isinstance(parsed, dict if kfp_type == "Dict" else list):
            raise ValueError(value)
        return parsed
    except ValueError:
        words = {"Integer": "a whole number", "Float": "a number", "Boolean": "true or false",
                 "Dict": 'a JSON object, e.g. {"key": "value"}', "List": "a JSON list"}  # fmt: skip
        raise OnewordError(
            f"--param {key}={value!r}: {key} takes {words.get(kfp_type, kfp_type)}", hint="fix the value and run again"
        ) from None


def _preflight_here(params: dict) -> None:
    """The run's own first task checks again on the cluster; from here, a typo costs seconds, not a queue."""
    import os

    from oneword.pipelines.parameters import CHECKPOINT_ROOT, DEFAULT_BASE_MODEL
    from oneword.preflight import preflight

    concept = {k: params[k] for k in ("images", "token", "init_word", "n_vectors", "templates") if params.get(k)}
    preflight(
        params.get("base_model", DEFAULT_BASE_MODEL),
        [concept],
        params.get("clip_model", DEFAULTS["clip_model"]),
        params.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or None,  # else only the cluster knows it
        params.get("experiment", DEFAULTS["experiment"]),
        params.get("checkpoint_root", CHECKPOINT_ROOT),
        _here(params.get("prompt_set", DEFAULTS["prompt_set"])),
        _here(params.get("dino_model", DEFAULTS["dino_model"])),
    )


def _here(ref: str) -> str:
    """`ref` if this machine can check it (a name, an s3:// or hub reference, a file here); else "", left to the
    cluster's own preflight (a path on the cluster's volumes, such as the model cache)."""
    import os

    if ref.startswith(("/", "./", "~")):
        return ref if os.path.exists(os.path.expanduser(ref)) else ""
    return ref


def _check_manifest_size(concepts_manifest: str, most: int) -> None:
    """Say, before a schedule exists, how many runs its manifest needs where every concept is new (a run trains at
    most `most`), and warn of a limit above what one KFP run is known to carry. A manifest this machine cannot read
    is left to each run's plan step, which reads it afresh every night."""
    from rich import print as rprint

    from oneword.batch import over_the_limit, parse_concepts_manifest, read_concepts_manifest, runs_needed
    from oneword.errors import OnewordError

    if warning := over_the_limit(most):
        rprint(f"[bold yellow]warning[/] {warning}")
    try:
        text = read_concepts_manifest(concepts_manifest)
    except Exception as e:  # no S3 settings here, a network apart: only advice is lost
        why = getattr(e, "message", None) or e
        rprint(f"[dim]could not read {concepts_manifest} from here ({why}); each run reads it[/]")
        return
    try:
        n = len(parse_concepts_manifest(text, concepts_manifest))
    except OnewordError as e:
        rprint(f"[bold yellow]warning[/] {e.message}: each run fails at plan-batch until it is fixed"
               + (f"\n  hint: {e.hint}" if e.hint else ""))  # fmt: skip
        return
    if note := runs_needed(n, most):  # the first nights; after them, only what changed
        rprint(f"[bold]note[/] if every concept is new: {note}")


@app.command("submit")
def submit_cmd(
    host: Annotated[str, HOST],
    images: Annotated[str, typer.Option(help="s3:// prefix of the concept's photos")],
    token: Annotated[str, typer.Option(help="the new pseudo-word")],
    init_word: Annotated[str, typer.Option(help="one-token initializer word")],
    param: Annotated[
        list[str] | None, typer.Option("--param", "-p", metavar="KEY=VALUE", help="more pipeline parameters KEY=VALUE")
    ] = None,
    experiment: Annotated[str, typer.Option(help="KFP experiment")] = KFP_EXPERIMENT,
    namespace: Annotated[str | None, typer.Option(help="Kubernetes namespace (multi-user KFP)")] = None,
    run_name: Annotated[str | None, typer.Option(help="run name")] = None,
    existing_token: Annotated[str | None, typer.Option(help="bearer token for the KFP API", envvar="KFP_TOKEN")] = None,
    service_account: Annotated[str, typer.Option(help="service account of the pods")] = SERVICE_ACCOUNT,
    image_registry: Annotated[str | None, IMAGE_REGISTRY] = None,
    pipeline_root: Annotated[str, PIPELINE_ROOT_OPTION] = PIPELINE_ROOT,
    preflight: Annotated[
        bool, typer.Option(help="check from here what can be checked (model, evaluator, buckets, token) first")
    ] = True,
) -> None:
    """Start a textual_inversion run on a cluster.

    \b
    Example:
      oneword submit --host http://kfp --images s3://oneword-data/my-cat \\
        --token '<my-cat>' --init-word cat
    """
    from rich import print as rprint

    from oneword.pipelines.container import require_registry
    from oneword.pipelines.remote import submit

    require_registry(image_registry)  # before the checks: a run that cannot pull its images is not worth them
    params = {"images": images, "token": token, "init_word": init_word, **_params(param, "textual_inversion")}
    if preflight:
        _preflight_here(params)
    rprint(
        submit(
            host,
            params,
            experiment=experiment,
            namespace=namespace,
            run_name=run_name,
            token=existing_token,
            service_account=service_account,
            image_registry=image_registry,
            pipeline_root=pipeline_root,
        )
    )


@app.command("schedule", short_help="Run a batch on a cluster on a schedule.")
def schedule_cmd(
    host: Annotated[str, HOST],
    concepts_manifest: Annotated[str, typer.Option(help="s3:// URI of the concepts manifest")],
    cron: Annotated[str, typer.Option(help="cron with seconds, e.g. '0 0 2 * * *' (daily at 02:00)")],
    name: Annotated[str, typer.Option(help="pipeline and recurring-run name")] = "oneword-batch",
    param: Annotated[
        list[str] | None, typer.Option("--param", "-p", metavar="KEY=VALUE", help="more pipeline parameters KEY=VALUE")
    ] = None,
    max_concurrency: Annotated[int, typer.Option(help="runs of this schedule at once")] = 1,
    catchup: Annotated[
        bool, typer.Option("--catchup/--no-catchup", help="backfill runs missed while the schedule was paused")
    ] = False,
    experiment: Annotated[str, typer.Option(help="KFP experiment")] = KFP_EXPERIMENT,
    namespace: Annotated[str | None, typer.Option(help="Kubernetes namespace (multi-user KFP)")] = None,
    existing_token: Annotated[str | None, typer.Option(help="bearer token for the KFP API", envvar="KFP_TOKEN")] = None,
    service_account: Annotated[str, typer.Option(help="service account of the pods")] = SERVICE_ACCOUNT,
    image_registry: Annotated[str | None, IMAGE_REGISTRY] = None,
    pipeline_root: Annotated[str, PIPELINE_ROOT_OPTION] = PIPELINE_ROOT,
) -> None:
    """Upload batch_personalisation as a new pipeline version and run it on a schedule.

    Scheduling again with the same --name replaces that schedule (new version, new settings) instead of adding one.

    \b
    Example:
      oneword schedule --host http://kfp \\
        --concepts-manifest s3://oneword-data/concepts.yaml --cron '0 0 2 * * *'
    """
    from rich import print as rprint

    from oneword.pipelines.remote import schedule

    params = {"concepts_manifest": concepts_manifest, **_params(param, "batch_personalisation")}
    _check_manifest_size(concepts_manifest, params.get("max_concepts_per_run", DEFAULTS["max_concepts_per_run"]))
    rprint(
        schedule(
            host,
            params,
            cron,
            name=name,
            experiment=experiment,
            max_concurrency=max_concurrency,
            catchup=catchup,
            namespace=namespace,
            token=existing_token,
            service_account=service_account,
            image_registry=image_registry,
            pipeline_root=pipeline_root,
        )
    )
