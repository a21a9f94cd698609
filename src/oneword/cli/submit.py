"""`oneword submit` and `oneword schedule`: send pipelines to a Kubeflow Pipelines cluster."""

import json
import math
from typing import Annotated

import typer

from oneword.cli.app import app
from oneword.cli.options import names_given
from oneword.errors import OnewordError
from oneword.pipelines.parameters import DEFAULTS, KFP_EXPERIMENT, PIPELINE_ROOT, SERVICE_ACCOUNT

HOST = typer.Option(help="KFP API endpoint, e.g. http://ml-pipeline-ui.kubeflow")
# the default in full is a URL of 200 characters with the MinIO endpoint in its query: its path says enough
PIPELINE_ROOT_HELP = (f"where the run's artifacts go (default: {PIPELINE_ROOT.split('?')[0]}, on oneword's MinIO; "
                      "'': the namespace's KFP default)")  # fmt: skip
PIPELINE_ROOT_OPTION = typer.Option(help=PIPELINE_ROOT_HELP, show_default=False)
IMAGE_REGISTRY = typer.Option(
    help="registry the cluster pulls oneword's images from (required), e.g. ghcr.io/oneword-ml for the released ones",
    envvar="ONEWORD_IMAGE_REGISTRY",
)


# the pipeline inputs `oneword submit` takes as options of their own: given as --param too, one would silently win
SUBMIT_OPTIONS = {"images", "token", "init_word", "concepts_manifest", "only_concepts"}


def _params(param: list[str] | None, pipeline: str, own: set[str] = frozenset()) -> dict:
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
        if k in own:
            raise OnewordError(f"--param {k}: give it as --{k.replace('_', '-')}", hint="it has an option of its own")
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


def _check_cluster_store(tracking_uri: str) -> None:
    """A cluster run's steps log to an MLflow server: a SQLite file (or a path) names a file on each pod, a store
    of its own that nobody reads, not the one on this machine."""
    from oneword.tracking import as_uri, sqlite_path

    if tracking_uri and sqlite_path(as_uri(tracking_uri)) is not None:
        raise OnewordError(
            f"--param tracking_uri={tracking_uri}: a cluster run's steps cannot log to a SQLite file (each pod would "
            "make one of its own)",
            hint="leave tracking_uri out (the cluster's MLflow, from the oneword-config ConfigMap) or give an MLflow "
            "server's URL, e.g. http://mlflow.oneword.svc.cluster.local:5000",
        )


def _preflight_here(params: dict, one_concept: bool = True) -> None:
    """The run's own first task checks again on the cluster; from here, a typo costs seconds, not a queue.
    Without `one_concept` (a manifest's run), the shared resources only, as the batch's own preflight."""
    import os

    from oneword.pipelines.parameters import CHECKPOINT_ROOT, DEFAULT_BASE_MODEL
    from oneword.preflight import preflight

    concept = {k: params[k] for k in ("images", "token", "init_word", "n_vectors", "templates") if params.get(k)}
    try:
        preflight(
            params.get("base_model", DEFAULT_BASE_MODEL),
            [concept] if one_concept else [],
            params.get("clip_model", DEFAULTS["clip_model"]),
            params.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or None,  # else the cluster's alone
            params.get("experiment", DEFAULTS["experiment"]),
            params.get("checkpoint_root", CHECKPOINT_ROOT),
            _here(params.get("prompt_set", DEFAULTS["prompt_set"])),
            _here(params.get("dino_model", DEFAULTS["dino_model"])),
        )
    except OnewordError as e:
        raise OnewordError(e.message, hint="fix these and submit again (or skip these checks with --no-preflight); "
                           "no run was started") from e  # fmt: skip


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


@app.command("submit", short_help="Start a run on a cluster: one concept, or a manifest's.")
def submit_cmd(
    host: Annotated[str, HOST],
    images: Annotated[str | None, typer.Option(help="s3:// prefix of the concept's photos")] = None,
    token: Annotated[str | None, typer.Option(help="the new pseudo-word")] = None,
    init_word: Annotated[str | None, typer.Option(help="one-token initializer word")] = None,
    concepts_manifest: Annotated[
        str | None,
        typer.Option(help="instead of one concept: s3:// URI of a concepts manifest, in runs of max_concepts_per_run"),
    ] = None,
    only_concepts: Annotated[
        list[str] | None,
        typer.Option(metavar="NAME", help="with --concepts-manifest: only these of its concepts (repeat, or commas)"),
    ] = None,
    param: Annotated[
        list[str] | None, typer.Option("--param", "-p", metavar="KEY=VALUE", help="more pipeline parameters KEY=VALUE")
    ] = None,
    experiment: Annotated[str, typer.Option(help="KFP experiment")] = KFP_EXPERIMENT,
    namespace: Annotated[str | None, typer.Option(help="Kubernetes namespace (multi-user KFP)")] = None,
    run_name: Annotated[str | None, typer.Option(help="run name (a manifest's runs: NAME 1/N, ...)")] = None,
    first_run: Annotated[
        int, typer.Option(metavar="K", help="with --concepts-manifest: start at its run K (the ones before started)")
    ] = 1,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="say which runs would start, and start none")] = False,
    existing_token: Annotated[str | None, typer.Option(help="bearer token for the KFP API", envvar="KFP_TOKEN")] = None,
    service_account: Annotated[str, typer.Option(help="service account of the pods")] = SERVICE_ACCOUNT,
    image_registry: Annotated[str | None, IMAGE_REGISTRY] = None,
    pipeline_root: Annotated[str, PIPELINE_ROOT_OPTION] = PIPELINE_ROOT,
    preflight: Annotated[
        bool, typer.Option(help="check from here what can be checked (model, evaluator, buckets, token) first")
    ] = True,
) -> None:
    """Start a run on a cluster: textual_inversion of one concept, or batch_personalisation of a manifest's.

    A manifest with more concepts than one run trains (max_concepts_per_run, 8) is started as several runs, each
    limited to its share of the concepts (only_concepts): a first fill of a catalogue at once, where a schedule
    would take a night per 8. Each run still trains only its concepts that changed.

    \b
    Example:
      oneword submit --host http://kfp --image-registry ghcr.io/oneword-ml \\
        --images s3://oneword-data/my-cat --token '<my-cat>' --init-word cat
      oneword submit --host http://kfp --image-registry ghcr.io/oneword-ml \\
        --concepts-manifest s3://oneword-data/concepts.yaml
    """
    from rich import print as rprint

    from oneword.pipelines.container import require_registry
    from oneword.pipelines.remote import submit_runs

    pipeline, runs = _runs(images, token, init_word, concepts_manifest, names_given(only_concepts), param, run_name)
    _check_cluster_store(runs[0][1].get("tracking_uri", ""))
    if not 1 <= first_run <= len(runs):
        raise OnewordError(f"--first-run {first_run}: there are runs 1 to {len(runs)}", hint="see them with --dry-run")
    if dry_run:
        try:
            require_registry(image_registry)
        except OnewordError as e:  # said, as the real submit would refuse it; the runs are listed all the same
            rprint(f"[bold yellow]warning[/] {e.message}; a submit without --dry-run refuses it"
                   + (f"\n  hint: {e.hint}" if e.hint else ""))  # fmt: skip
        for i, (name, params) in enumerate(runs[first_run - 1 :], first_run):
            if pipeline == "textual_inversion" or "only_concepts" not in params:
                rprint({"pipeline": pipeline, **({"run_name": name} if name else {}), "params": params})
            else:
                names = params["only_concepts"]
                rprint(f"run {name or i}: {len(names)} concept{'s' * (len(names) != 1)}: {', '.join(names)}")
        rprint(f"[bold]dry run[/]: {len(runs) - first_run + 1} run{'s' * (len(runs) > first_run)} would start; "
               "none was")  # fmt: skip
        return
    require_registry(image_registry)  # before the checks: a run that cannot pull its images is not worth them
    if preflight:  # a manifest's concepts are checked by each run's plan: one's bad photos must not stop the others
        _preflight_here(runs[0][1], one_concept=pipeline == "textual_inversion")
    started = first_run - 1
    try:
        for answer in submit_runs(host, runs[started:], pipeline, experiment, namespace, existing_token,
                                  service_account, image_registry, pipeline_root):  # fmt: skip
            started += 1
            if len(runs) == 1:
                rprint(answer)
            else:  # a line a run: a catalogue's first fill starts a hundred
                rprint(f"started run {started}/{len(runs)}: {answer['url']}")
    except OnewordError:
        raise
    except Exception as e:
        if len(runs) == 1:
            raise
        done = {0: "", 1: f"run {started} was started (above); "}.get(
            started - first_run + 1, f"runs {first_run} to {started} were started (above); "
        )
        raise OnewordError(
            f"run {started + 1}/{len(runs)} could not be started: {_api_said(e)}",
            hint=f"{done}to start the rest, run the same command with --first-run {started + 1} before the manifest "
            "changes (the runs are cut from it as it is then)",
        ) from e


def _api_said(e: Exception) -> str:
    """What the KFP API said, in a line: its client's errors hold the response's headers too."""
    if isinstance(status := getattr(e, "status", None), int):
        return f"HTTP {status} {getattr(e, 'reason', '') or ''}: {(getattr(e, 'body', '') or '').strip()}"
    return f"{type(e).__name__}: {e}"


def _runs(images: str | None, token: str | None, init_word: str | None, concepts_manifest: str | None,
          only: list[str], param: list[str] | None, run_name: str | None) -> tuple[str, list[tuple[str | None, dict]]]:
    """The pipeline `oneword submit` starts, and its runs: (run name, parameters) each."""
    from oneword.batch import chosen, concept_names, over_the_limit, split_runs
    from oneword.storage import is_s3

    one = {"--images": images, "--token": token, "--init-word": init_word}
    if concepts_manifest is None:
        if missing := [k for k, v in one.items() if v is None]:
            raise OnewordError(f"missing {', '.join(missing)}",
                               hint="give --images, --token and --init-word (one concept), or --concepts-manifest")
        if only:
            raise OnewordError("--only-concepts chooses among a manifest's concepts",
                               hint="give --concepts-manifest too, or leave --only-concepts out")  # fmt: skip
        if not is_s3(images):
            raise OnewordError(
                f"--images {images} is not an s3:// prefix: the cluster's pods cannot read a folder here",
                hint="upload the photos (e.g. mc cp --recursive photos/my-cat/ oneword/oneword-data/concepts/my-cat/)"
                " and pass their prefix (s3://oneword-data/concepts/my-cat/)",
            )
        return "textual_inversion", [(run_name, {"images": images, "token": token, "init_word": init_word,
                                                 **_params(param, "textual_inversion", SUBMIT_OPTIONS)})]  # fmt: skip
    if given := [k for k, v in one.items() if v is not None]:
        raise OnewordError(f"give either --concepts-manifest or {', '.join(given)}, not both",
                           hint="--images, --token and --init-word start one concept; a manifest's concepts take "
                           "theirs from it")  # fmt: skip
    _on_the_cluster(concepts_manifest)
    params = {"concepts_manifest": concepts_manifest, **_params(param, "batch_personalisation", SUBMIT_OPTIONS)}
    most = params.get("max_concepts_per_run", DEFAULTS["max_concepts_per_run"])
    if warning := over_the_limit(most):
        from rich import print as rprint

        rprint(f"[bold yellow]warning[/] {warning}")
    names = chosen(concept_names(_manifest_here(concepts_manifest)), only, concepts_manifest)
    shares = split_runs(names, most)
    if len(shares) == 1 and not only:  # the whole manifest in one run: a night of it, as a schedule's would be
        return "batch_personalisation", [(run_name, params)]
    base = run_name or _stem(concepts_manifest)
    return "batch_personalisation", [
        (f"{base} {i}/{len(shares)}" if len(shares) > 1 else run_name, {**params, "only_concepts": share})
        for i, share in enumerate(shares, 1)
    ]


def _check_cron(cron: str) -> None:
    """Refuse a cron KFP would read otherwise than meant. KFP parses it with robfig/cron's `Parse` (seconds first,
    day of week optional: `backend/src/apiserver/server/api_converter.go`, KFP 2.17), so a crontab line of five
    fields is taken, not refused, with its fields shifted: `0 2 * * *` runs at minute 2 of every hour."""
    fields = cron.split()
    if cron.strip().startswith("@") or len(fields) == 6:
        return
    if len(fields) == 5:
        raise OnewordError(
            f"--cron {cron!r} has five fields, which KFP reads as second, minute, hour, day and month: not as a "
            "crontab line (minute, hour, day, month, weekday)",
            hint=f"give six: for the crontab line, --cron '0 {cron.strip()}'; for KFP's reading, --cron "
            f"'{cron.strip()} *' (or a descriptor: '@daily', '@every 6h')",
        )
    raise OnewordError(f"--cron {cron!r}: KFP takes six fields (second minute hour day month weekday)",
                       hint="e.g. '0 0 2 * * *' (daily at 02:00), or a descriptor: '@daily', '@every 6h'")  # fmt: skip


def _on_the_cluster(concepts_manifest: str) -> None:
    """Refuse a manifest the cluster's pods cannot read: a file on this machine (its photos too, relative to it)."""
    from oneword.storage import is_s3

    if not is_s3(concepts_manifest):
        raise OnewordError(
            f"concepts manifest {concepts_manifest} is not an s3:// URI: the cluster's pods cannot read a file here",
            hint="upload it and its photos (e.g. mc cp concepts.yaml oneword/oneword-data/) and pass its s3:// URI",
        )


def _manifest_here(concepts_manifest: str) -> list:
    """The manifest's concepts, read from this machine: a manifest is split into runs by its concepts' names."""
    from oneword.batch import parse_concepts_manifest, read_concepts_manifest

    try:
        text = read_concepts_manifest(concepts_manifest)
    except OnewordError:
        raise
    except Exception as e:  # no S3 settings here, a network apart
        raise OnewordError(
            f"cannot read {concepts_manifest} from here ({getattr(e, 'message', None) or e}), to split it into runs",
            hint="give this machine the bucket's settings (S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), "
            "or start batch_personalisation from the KFP dashboard (one run: max_concepts_per_run concepts)",
        ) from e
    return parse_concepts_manifest(text, concepts_manifest)


def _stem(concepts_manifest: str) -> str:
    """A manifest's runs' name: its file's name without .yaml (`s3://b/team/concepts.yaml` -> `concepts`)."""
    name = concepts_manifest.rstrip("/").rsplit("/", 1)[-1]
    return name.removesuffix(".yaml").removesuffix(".yml") or "oneword-batch"


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
      oneword schedule --host http://kfp --image-registry ghcr.io/oneword-ml \\
        --concepts-manifest s3://oneword-data/concepts.yaml --cron '0 0 2 * * *'
    """
    from rich import print as rprint

    from oneword.pipelines.container import require_registry
    from oneword.pipelines.remote import schedule

    _check_cron(cron)
    _on_the_cluster(concepts_manifest)
    params = {"concepts_manifest": concepts_manifest, **_params(param, "batch_personalisation", {"concepts_manifest"})}
    require_registry(image_registry)  # a refusal first, before advice on a manifest that will not run
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
