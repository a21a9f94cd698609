"""The `register` step, and whether a result is registered already, on MLflow 3 (the queries: `oneword.catalogue`;
what a run records besides versions: `oneword.batch_records`).

`register` logs one MLflow run per concept (params, training curve, evaluation metrics, artifacts), verifies
every uploaded artifact against its local sha256, and only then registers a model version under a registered
model named after the concept. When training logged live (`oneword.live`), that run is the concept's run: its id
is in summary.json, `register` completes it and ends it. The evaluation scores are metrics of the logged model
too, so `mlflow.search_logged_models(filter_string="metrics.reconstruction > 0.5")` finds concepts by score
(MLflow 3.17's `search_model_versions` filters by name, version, run id, source and tags only; a version
links to its logged model by `model_id`, which its REST API leaves out: the version's source is
`models:/<model_id>`). A failure before that point leaves no version; a failure after it deletes the
version again. The `champion` alias moves to the new version only if it passes the quality gate and beats the
current champion (scored by the same evaluator), or passes the gate's thresholds where the champion does not
(`_decide_alias`); otherwise the version gets the alias `candidate` and a tag saying why.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

from oneword import __version__, outcome, storage, tracking
from oneword.config import NAME_LENGTH, REGISTERED_NAME, TrackingConfig
from oneword.errors import OnewordError
from oneword.evaluation.gate import (
    SCORE_DECIMALS,
    EvaluatorMismatch,
    GateThresholds,
    check_comparable,
    quality_gate,
)
from oneword.evaluation.protocol import result_key
from oneword.profiles import DEFAULT_FAMILY, PROFILES, ModelProfile
from oneword.tracking import resolve

log = logging.getLogger(__name__)


class _MlflowAdvice(logging.Filter):
    """Drops MLflow's advice to whoever logs a pyfunc model from an object, said at every registration: oneword
    logs its model so on purpose (its code travels in `code_paths`) and gives the signature itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Passing a Python object as `python_model`")


logging.getLogger("mlflow.pyfunc").addFilter(_MlflowAdvice())

EXPERIMENT = TrackingConfig().experiment
CONCEPT_TAG = "oneword.concept"
BUNDLE_TAG = "oneword.bundle"  # a bundle's registered model ("true"), and its versions' runs (its name)
CHAMPION, CANDIDATE = "champion", "candidate"
GATE_ALIAS_TAG = "oneword.gate_alias"  # the alias the gate gave the version when it was registered
# the training photos (16 hex digits of each one's file and pixel sha256): a version that shares none of the
# champion's is another concept, or the same one photographed anew, and the gate does not compare the two
PHOTOS_TAG, PHOTO_ID_LENGTH, MAX_PHOTOS_TAGGED = "oneword.photos", 16, 120
GENERATED_DESCRIPTION = "oneword concept "  # a registered model's description, before its champion's token
PHOTO_NOTE_TAG = "oneword.photo_note"  # too few photos, files skipped: what a batch's report says beside the alias
EMBEDDING_ARTIFACT = "embeddings/diffusers/learned_embeds.safetensors"  # in a concept's run (`_artifact_files`)


def _setup(tracking_uri: str | None):
    return tracking.client(tracking_uri)


# the most a page of registered models may hold (MLflow's threshold; versions and runs allow more): MLflow's page
# tokens are offsets, and a concept created or deleted between two pages shifts the next one (`every_page`)
PAGE_SIZE = 1000


def every_page(search, page_size: int = PAGE_SIZE, **kwargs) -> list:
    """All results of an MLflow `search_*` call (runs, registered models or model versions), page after page, each
    once: another process that creates or deletes one between two pages shifts the next page by one, which repeats
    an item (kept once here; `prune_versions` would have counted a version twice among those it keeps) or skips
    one (the larger the pages, the rarer)."""
    out, seen, token = [], set(), None
    while True:
        page = search(max_results=page_size, page_token=token, **kwargs)
        for item in page:
            key = _identity(item)
            if key not in seen:
                seen.add(key)
                out.append(item)
        token = page.token
        if not token:
            return out


def _identity(item) -> tuple[str, ...]:
    """A run's id, a model version's name and number, a logged model's id, or a registered model's name."""
    if (info := getattr(item, "info", None)) is not None:
        return (info.run_id,)
    if (version := getattr(item, "version", None)) is not None:
        return (item.name, str(version))
    if (model_id := getattr(item, "model_id", None)) is not None:  # every one is named `concept`
        return (model_id,)
    return (item.name,)


NAME_PATTERN = re.compile(REGISTERED_NAME)


def concept_name(token: str, name: str = "") -> str:
    """The registered-model name of a concept: `name` when given (checked), else made from the token
    (`<my-cat>` -> `my-cat`).

    A given name keeps to letters, digits, `_`, `.` and `-` (`config.REGISTERED_NAME` says why).
    """
    if name:
        if not NAME_PATTERN.fullmatch(name) or len(name) > NAME_LENGTH:
            example = _cleaned(name).strip("_") or "my-cat"
            raise OnewordError(
                f"registered-model name {name!r} is not one oneword can look up",
                hint=f"use letters, digits, '_', '.' and '-' only, starting with a letter or digit, e.g. {example!r}",
            )
        return name
    made = _cleaned(token)
    if not made:
        raise OnewordError(f"cannot make a registered-model name from token {token!r}", hint="pass --name")
    return made


def _cleaned(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.").lower()[:NAME_LENGTH]


def ensure_experiment(mlflow, name: str, tracking_uri: str) -> str:
    """The id of experiment `name`, made if it is new (safely when another process makes it too)."""
    from mlflow.exceptions import MlflowException

    exp = mlflow.get_experiment_by_name(name)
    if exp is not None and exp.lifecycle_stage == "deleted":  # runs in it would fail to start
        raise OnewordError(
            f"MLflow experiment {name!r} is deleted",
            hint=f"restore it (mlflow experiments restore --experiment-id {exp.experiment_id}) or pass another "
            "--experiment",
        )
    if exp is not None:
        return exp.experiment_id
    try:
        return mlflow.create_experiment(name, artifact_location=tracking.local_artifact_root(tracking_uri))
    except MlflowException:  # another process made it between our look and our create
        exp = mlflow.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _flat_params(summary: dict, metrics: dict | None) -> dict[str, str]:
    p: dict[str, str] = {}
    for k, v in summary["concept"].items():
        p[k] = str(v)
    for k, v in summary["config"].items():
        p[f"train.{k}"] = str(v)
    p["train.learning_rate_used"] = str(summary.get("learning_rate_used"))
    p["base_model"] = str(summary["model_source"])
    p["base_model_fingerprint"] = summary["model_fingerprint"]
    hashes = ",".join(summary.get("image_sha256", []))
    # MLflow cuts a param at 6000 characters (92 photos' hashes): past that, one hash of them all
    p["image_sha256"] = (
        hashes if len(hashes) <= 6000 else "sha256 of the list: " + hashlib.sha256(hashes.encode()).hexdigest()
    )
    p["n_images"] = str(len(summary.get("image_sha256", [])))
    p["oneword_version"] = __version__
    if metrics:
        p["eval.prompt_set"] = metrics["prompt_set"]
        p["eval.n_images"] = str(metrics["n_images"])
        p["eval.evaluator"] = metrics["evaluator"]["name"]
        p["eval.evaluator_fingerprint"] = metrics["evaluator"]["fingerprint"]
        for k, v in metrics["sampler"].items():
            p[f"eval.sampler.{k}"] = str(v)
        if metrics.get("evaluation_key"):
            # every evaluation setting: two registers of one training evaluated otherwise log to runs of their
            # own (`live_run_to_complete`), or they would overwrite each other's embedding and pictures in one run
            p["eval.evaluation_key"] = metrics["evaluation_key"]
    return p


def _eval_metrics(metrics: dict) -> dict[str, float]:
    m = {
        "reconstruction": metrics["reconstruction"],
        "editability": metrics["editability"],
        "chosen_step": float(metrics["step"]),
    }
    if metrics.get("dino") is not None:
        m["dino"] = metrics["dino"]
    base = metrics.get("baselines") or {}
    for k in ("image_only", "prompt_only"):
        if base.get(k) is not None:
            m[f"baseline_{k}"] = base[k]
        for coord, v in base.get("points", {}).get(k, {}).items():
            m[f"reference_{k}_{coord}"] = v
    for k in ("reconstruction_se", "editability_se"):
        if metrics.get(k) is not None:
            m[k] = metrics[k]
    for k, v in (metrics.get("dreambench") or {}).items():
        if isinstance(v, float):
            m[f"dreambench_{k}"] = v
    for i, p in enumerate(metrics.get("per_prompt", [])):
        m[f"editability_prompt_{i}"] = p["editability"]
    return m


@dataclass
class Registration:
    """The outcome of `register`."""

    name: str
    version: str
    alias: str
    reason: str
    run_id: str
    model_uri: str
    tracking_uri: str
    unchanged: bool = False  # no new version: `version` was registered from the same training and evaluation

    def as_dict(self) -> dict:
        """As it is kept (registration.json, the KFP artifact's metadata): the store without its credentials."""
        return {**asdict(self), "tracking_uri": tracking.shown(self.tracking_uri)}


def _upload_and_verify(mlflow, client, run_id: str, files: dict[str, Path]) -> None:
    """Log each local file at its artifact path, then download it back and compare sha256."""
    for rel, local in files.items():
        folder = str(Path(rel).parent) if str(Path(rel).parent) != "." else None
        mlflow.log_artifact(str(local), artifact_path=folder)
    with tempfile.TemporaryDirectory() as d:
        for rel, local in files.items():
            back = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=rel, dst_path=d)
            if sha256_file(Path(back)) != sha256_file(local):
                raise OnewordError(
                    f"artifact {rel} of run {run_id} does not match its local file after upload",
                    hint="check the artifact store, then rerun `register`",
                )


@dataclass
class _Concept:
    """What `register` records: the name, the token, the training summary, the evaluation metrics (None: none)."""

    name: str
    token: str
    summary: dict
    metrics: dict | None
    batch_id: str
    photos: str = ""  # PHOTOS_TAG's value
    photo_note: str = ""  # PHOTO_NOTE_TAG's value


def register(
    train_dir: Path,
    eval_dir: Path | None,
    tracking_uri: str | None = None,
    name: str | None = None,
    experiment: str = EXPERIMENT,
    thresholds: GateThresholds = GateThresholds(),
    batch_id: str = "",
    run_tags: dict[str, str] | None = None,
) -> Registration:
    """Log a trained (and evaluated) concept to MLflow and register it as a model version.

    Args:
        train_dir: folder written by `oneword train`.
        eval_dir: folder written by `oneword evaluate` (None: register unevaluated, always as `candidate`).
        tracking_uri: MLflow tracking URI (default: `default_tracking_uri()`).
        name: registered-model name (default: from the token).
        experiment: MLflow experiment.
        thresholds: the quality gate's minimum scores.
        batch_id: set by batch personalisation, so a batch's versions can be found together.
        run_tags: more run tags (which KFP run, `oneword.live.kfp_tags`).

    Returns:
        The `Registration`; `unchanged` where another run registered this very training and evaluation while
        this one evaluated (its version is then the other's, and none is added).
    """
    train_dir = Path(train_dir)
    concept = _read_concept(train_dir, eval_dir, name, batch_id)
    tracking.refuse_active_run("register")
    uri = resolve(tracking_uri)
    mlflow, client = _setup(uri)
    existed = model_kind(client, concept.name) == "concept"  # deleted before its version is made: erased (below)
    if existed and (found := _registered_before(client, concept, thresholds)) is not None:
        # `register` run again on what it registered: the same version, and no second run, copy of every
        # artifact and logged model naming a version that never came to be (it would be deleted as a twin)
        from oneword.batch_records import note_unchanged

        return note_unchanged(uri, concept.name, concept.token, found, batch_id, experiment, run_tags,
                              concept.summary.get("mlflow_run_id"))  # fmt: skip
    files = _artifact_files(train_dir, eval_dir, concept.name)
    exp_id = ensure_experiment(mlflow, experiment, uri)
    tags = {**_run_tags(concept), **(run_tags or {})}
    params = _flat_params(concept.summary, concept.metrics)
    if _deleted_run(client, trained := concept.summary.get("mlflow_run_id")):  # erased while it was trained
        _erase_training_copies(concept.summary)
        raise _erased_meanwhile(client, concept.name, trained, created=False, when="it was trained")
    live = live_run_to_complete(client, trained, params)
    opened = (
        mlflow.start_run(run_id=live, tags=tags)
        if live
        else mlflow.start_run(experiment_id=exp_id, run_name=concept.name, tags=tags)
    )
    run_id = opened.info.run_id
    try:
        with opened:  # ends FINISHED, or FAILED on an error
            _log_params_and_metrics(mlflow, client, run_id, concept, train_dir / "curve.json", live is not None)
            _upload_and_verify(mlflow, client, run_id, files)
            info = _log_model(mlflow, concept, files[EMBEDDING_ARTIFACT])
            if concept.metrics:  # on the logged model too, where search_logged_models filters by them
                mlflow.log_metrics(_eval_metrics(concept.metrics), model_id=info.model_id)
    except Exception as e:  # MLflow refuses to log to a run deleted meanwhile: say why, and erase what came after
        if _deleted_run(client, run_id):
            _erase_training_copies(concept.summary)
            raise _erased_meanwhile(client, concept.name, run_id, created=False) from e
        raise
    # Everything is uploaded and verified: only now does a version exist.
    try:
        version, alias, reason, unchanged = _register_version(client, concept, run_id, info, thresholds, existed)
    except ErasedMeanwhile:
        raise
    except BaseException as e:  # the run ended FINISHED with the upload; it must not pass for a registered one
        _mark_failed(client, run_id, f"{type(e).__name__}: {e}")
        raise
    return Registration(
        concept.name, version, alias, reason, run_id, f"models:/{concept.name}/{version}", uri, unchanged
    )


def _registered_before(client, concept: _Concept, thresholds: GateThresholds) -> dict | None:
    """The concept's newest version, where it was registered from this very training and evaluation under these
    thresholds (`newest_result`); None where it was not, or the concept was not evaluated."""
    if not (key := (concept.metrics or {}).get("evaluation_key")):
        return None
    return _newest_decided_on(client, concept.name, result_key(key, thresholds))


def _read_concept(train_dir: Path, eval_dir: Path | None, name: str | None, batch_id: str) -> _Concept:
    """Read the training summary and evaluation metrics, and name the concept."""
    for f, step in ((train_dir / "summary.json", "train"), (Path(eval_dir or "") / "metrics.json", "evaluate")):
        if (eval_dir or step == "train") and not f.parent.is_dir():
            raise OnewordError(f"folder {f.parent} not found", hint=f"pass the folder `oneword {step}` wrote (its -o)")
        if (eval_dir or step == "train") and not f.is_file():
            failed = outcome.read_failure(f.parent)
            why = f"the concept failed at {failed['stage']}: {failed['error']}" if failed else f"{step} did not finish"
            raise OnewordError(
                f"{f} is missing: {why}", hint=(failed or {}).get("hint") or f"run {step} for this concept first"
            )
    summary = storage.read_json(train_dir / "summary.json", hint=f"train again into {train_dir}")
    metrics = (
        storage.read_json(Path(eval_dir) / "metrics.json", hint=f"evaluate {train_dir} again (-o {eval_dir})")
        if eval_dir
        else None
    )
    token = summary["concept"]["token"]
    if metrics is not None:
        _check_evaluated(train_dir, Path(eval_dir), summary, metrics)
    return _Concept(concept_name(token, name), token, summary, metrics, batch_id, _photo_ids(train_dir, summary),
                    photo_note(train_dir))  # fmt: skip


def photo_note(train_dir: Path) -> str:
    """What a person should know of the photos a training learned from, in a line (`PHOTO_NOTE_TAG`), from
    preprocess's manifest, which the training folder carries: too few or too many used, files skipped; "" when
    there is nothing to say."""
    from oneword.images import FEW_PHOTOS, MANIFEST, MANY_PHOTOS
    from oneword.latents import DATASET_DIR

    try:
        m = json.loads((Path(train_dir) / DATASET_DIR / MANIFEST).read_text())
        used, skipped = len(m["images"]), len(m.get("skipped") or [])
    except (OSError, ValueError, KeyError, TypeError):  # no manifest (another tool's training): nothing known
        return ""
    said = []
    if used < FEW_PHOTOS:
        said.append(f"{used} photo{'s' * (used != 1)} only (fewer than {FEW_PHOTOS}: it may learn their pose and "
                    "background too)")  # fmt: skip
    elif used > MANY_PHOTOS:
        said.append(f"{used} photos (more than {MANY_PHOTOS}: check that they all show the one concept)")
    if skipped:  # which, and why in a few words: the reasons are otherwise in a log of thousands of lines
        named = [f"{_printable(PurePosixPath(str(s.get('source'))).name)} ({_gist(str(s.get('reason')))})"
                 for s in m["skipped"][:NAMED_SKIPPED]]  # fmt: skip
        more = f" and {skipped - NAMED_SKIPPED} more (preprocess's log says why)" if skipped > NAMED_SKIPPED else ""
        said.append(f"{skipped} file{'s' * (skipped != 1)} skipped: {', '.join(named)}{more}")
    return "; ".join(said)


NAMED_SKIPPED = 3  # skipped files a photo note names


def _gist(reason: str) -> str:
    """A skipped file's reason in a few words: up to its first details in brackets or its first `;`."""
    first = reason.split(" (")[0].split("; ")[0]
    return _printable(first if len(first) <= 60 else first[:59] + "…")


def _printable(name: str) -> str:
    """A file name as a tag can hold it: one in another encoding than UTF-8 (an old camera's, a Windows zip's)
    reaches Python with surrogates, which no UTF-8 store takes."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _photo_ids(train_dir: Path, summary: dict) -> str:
    """The training photos, as `PHOTOS_TAG` holds them: each one's file sha256 (from the dataset manifest the
    training folder carries) and pixel sha256, cut to `PHOTO_ID_LENGTH` digits ("" past `MAX_PHOTOS_TAGGED`)."""
    hashes = list(summary.get("image_sha256") or [])
    from oneword.images import MANIFEST
    from oneword.latents import DATASET_DIR

    manifest = train_dir / DATASET_DIR / MANIFEST
    if manifest.is_file():
        with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):  # another tool's: pixels tell
            hashes += [i["source_sha256"] for i in json.loads(manifest.read_text()).get("images", [])]
    if len(hashes) > 2 * MAX_PHOTOS_TAGGED:
        return ""
    return ",".join(sorted({str(h)[:PHOTO_ID_LENGTH] for h in hashes}))


def _other_photos(photos: str, holder) -> str:
    """Why `holder` (a model version) was trained on none of `photos`, or "" when they share one or either
    does not say."""
    theirs = holder.tags.get(PHOTOS_TAG, "")
    if not photos or not theirs or set(photos.split(",")) & set(theirs.split(",")):
        return ""
    return (
        f"trained on other photos than the champion, version {holder.version} (none of them the same): another "
        "concept, or this one photographed anew"
    )


def _check_evaluated(train_dir: Path, eval_dir: Path, summary: dict, metrics: dict) -> None:
    """Refuse an evaluation of another training: its scores and embedding would be registered with this training's
    token, steps and settings (a champion whose card describes one concept and whose file is another's)."""
    theirs = {"token": metrics.get("token"), "steps": metrics.get("final_step"),
              "base model": metrics.get("model_fingerprint"),
              "photos": _photos(metrics.get("image_sha256"))}  # fmt: skip
    mine = {"token": summary["concept"]["token"], "steps": summary.get("steps"),
            "base model": summary.get("model_fingerprint"), "photos": _photos(summary.get("image_sha256"))}  # fmt: skip
    differ = [k for k in mine if theirs[k] is not None and mine[k] is not None and theirs[k] != mine[k]]
    if (metrics.get("step") or 0) > (summary.get("steps") or float("inf")):  # scored a checkpoint past its end
        differ.append(f"chosen step ({metrics['step']}, past this training's last, {summary['steps']})")
    if not differ and metrics.get("step") == metrics.get("final_step"):  # it picked the last: the very vectors
        import torch

        from oneword import embeddings as emb_io

        files = [eval_dir / "embedding" / "learned_embeds.safetensors", train_dir / "learned_embeds.safetensors"]
        if all(f.is_file() for f in files):
            a, b = (emb_io.load(f) for f in files)
            if not torch.equal(a.vectors, b.vectors):
                differ = ["last vectors"]
    reference = metrics.get("reference_images") or {}
    if not differ and not reference.get("training_images", True):
        # a registry's scores rank versions against each other and the champion: all against the training images
        raise OnewordError(
            f"{eval_dir} scored the concept against {reference.get('n')} images that are not the ones it was "
            f"trained on ({reference.get('folder')}); the registry compares scores against the training images",
            hint=f"evaluate again without --data (oneword evaluate {train_dir} -o ...), then register that",
        )
    if differ:
        said = "; ".join(f"{k}: {theirs[k]!r} there, {mine[k]!r} here" for k in differ if k in theirs)
        raise OnewordError(
            f"{eval_dir} is the evaluation of another training than {train_dir} (its {', '.join(differ)} differ"
            + (f": {said})" if said else ")"),
            hint=f"evaluate this training (oneword evaluate {train_dir} -o ...), or register the training that "
            f"{eval_dir} evaluated",
        )


def _photos(image_sha256: list[str] | None) -> str | None:
    """A training's photos as a check says them: how many, and a digest of the set."""
    if not image_sha256:
        return None
    return f"{len(image_sha256)} photos {hashlib.sha256(''.join(sorted(image_sha256)).encode()).hexdigest()[:12]}"


TRAINING_SUMMARY = "training/summary.json"  # a run's training, as it ran (`catalogue` reads where it left copies)


def _artifact_files(train_dir: Path, eval_dir: Path | None, name: str) -> dict[str, Path]:
    """The run's artifacts, {artifact path: local file}; every one must exist."""
    files: dict[str, Path] = {
        TRAINING_SUMMARY: train_dir / "summary.json",
        "training/curve.json": train_dir / "curve.json",
    }
    emb_root = Path(eval_dir) / "embedding" if eval_dir else train_dir
    for fmt, rel in (("diffusers", "learned_embeds.safetensors"), ("a1111", None), ("kohya", None)):
        found = [emb_root / rel] if rel else sorted((emb_root / fmt).glob("*"))
        for f in found:
            files[f"embeddings/{fmt}/{f.name}"] = f
    if eval_dir:
        for f in ("metrics.json", "report.html", "grid.png", "scatter.png"):
            files[f"evaluation/{f}"] = Path(eval_dir) / f
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing:
        raise OnewordError(f"cannot register {name}: missing {missing}", hint="run train and evaluate first")
    return files


def _run_tags(concept: _Concept) -> dict[str, str]:
    """The run's tags: which concept, token and base model (and batch)."""
    tags = {
        CONCEPT_TAG: concept.name,
        "oneword.token": concept.token,
        "oneword.base_model_fingerprint": concept.summary["model_fingerprint"],
    }
    if concept.batch_id:
        tags["oneword.batch_id"] = concept.batch_id
    return tags


def live_run_to_complete(client, run_id: str | None, params: dict[str, str] | None = None) -> str | None:
    """The live run training left RUNNING for this concept, if this store has it and holds no other value of
    `params` (MLflow refuses to change a param: another evaluation's register, killed after logging its own, or
    running beside this one, logged them); else None (a new run)."""
    from mlflow.exceptions import MlflowException

    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        log.warning("training's MLflow run %s is not in this store (%s); registering in a new run", run_id, e)
        return None
    if run.info.status != "RUNNING":  # registered before (or a register failed half-way): a new run
        log.info("training's MLflow run %s is %s; registering in a new run", run_id, run.info.status)
        return None
    logged = run.data.params
    if other := sorted(k for k, v in (params or {}).items() if k in logged and logged[k] != str(v)):
        log.info("training's MLflow run %s holds other values of %s; registering in a new run", run_id, other[:3])
        return None
    return run_id


def _log_params_and_metrics(
    mlflow, client, run_id: str, concept: _Concept, curve_file: Path, live: bool = False
) -> None:
    """Log the params, the training curve (the points a live run lacks), and the checkpoint curve."""
    from mlflow.entities import Metric

    mlflow.log_params(_flat_params(concept.summary, concept.metrics))
    curve = json.loads(curve_file.read_text())
    have = {m.step for m in client.get_metric_history(run_id, "loss")} if live else set()
    new = [p for p in curve if int(p["step"]) not in have]
    now = int(time.time() * 1000)  # the time they are logged: 0 would put them in 1970 on a wall-time axis
    batch = [Metric(k, float(p[k]), now, int(p["step"])) for p in new for k in ("loss", "embedding_norm")]
    for i in range(0, len(batch), 900):
        client.log_batch(run_id, metrics=batch[i : i + 900])
    if concept.metrics:
        for p in concept.metrics["selection"]["curve"]:
            mlflow.log_metrics(
                {"ckpt_reconstruction": p["reconstruction"], "ckpt_editability": p["editability"]},
                step=int(p["step"]),
            )


def _profile(summary: dict) -> ModelProfile:
    """The profile the concept was trained under (summaries before profiles: the default family's)."""
    return ModelProfile(**summary["profile"]) if "profile" in summary else PROFILES[DEFAULT_FAMILY]


def _log_model(mlflow, concept: _Concept, embedding: Path):
    """Log the servable pyfunc model around the embedding, then check that its copy of the embedding is intact."""
    from oneword.serving import check_copy, log_model

    info = log_model(
        {"embedding": embedding},
        {
            "base_model": concept.summary["model_source"],
            "model_fingerprint": concept.summary["model_fingerprint"],
            "token": concept.token,
        },
        _profile(concept.summary),
        concept.token,
    )
    check_copy(mlflow, info, "embedding", embedding)
    return info


def _mark_failed(client, run_id: str, error: str) -> None:
    """Mark an ended run FAILED at register, with why (a store that does not answer leaves it as it was)."""
    from oneword.live import end_failed

    try:
        end_failed(client, run_id, "register", error)
    except Exception as e:  # the registration's own error is the one to raise
        log.warning("could not mark run %s as failed (%s)", run_id, e)


ALIAS_WAIT_SECONDS = 300.0  # how long a version waits for older versions' alias decisions (a killed register)
# A register that waits says it is alive now and then, on its version: one silent for twice the wait died (its
# pod was killed), and `oneword concepts` promote, delete and prune go on without it (`silent_for`).
HEARTBEAT_TAG, HEARTBEAT_S = "oneword.alive_at", 30.0


def silent_for(mv, now: float | None = None) -> float:
    """Seconds since undecided version `mv`'s register last said it was alive (made it, or beat `HEARTBEAT_TAG`)."""
    said = [mv.creation_timestamp / 1000]
    with contextlib.suppress(TypeError, ValueError):
        said.append(float((mv.tags or {}).get(HEARTBEAT_TAG)))
    return (time.time() if now is None else now) - max(said)
ABANDONED = "abandoned: its register never decided its alias"  # the gate tag of such a version, once waited for


def newest_version(client, name: str):
    """Registered model `name`'s newest `ModelVersion` (the highest number: `models:/NAME/latest`), or None."""
    return newest_of(every_page(client.search_model_versions, filter_string=f"name = '{name}'"))


def newest_of(versions: list):
    """The newest of `versions` (MLflow `ModelVersion`s: by number, not by string), or None."""
    return max(versions, key=lambda mv: int(mv.version), default=None)


def created_at(mv) -> str:
    """When a `ModelVersion` was registered: ISO 8601, UTC, to the second."""
    import datetime

    return datetime.datetime.fromtimestamp(mv.creation_timestamp / 1000, datetime.UTC).isoformat(timespec="seconds")


def model_kind(client, name: str) -> str | None:
    """What the registry holds as `name`: "concept", "bundle" (`oneword.bundles`), "other" (another tool's model),
    or None (nothing)."""
    from mlflow.exceptions import MlflowException

    try:
        tags = client.get_registered_model(name).tags or {}
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return "concept" if tags.get(CONCEPT_TAG) == "true" else "bundle" if tags.get(BUNDLE_TAG) == "true" else "other"


def name_taken(client, name: str) -> OnewordError | None:
    """Why a concept named `name` cannot be registered, where the registry holds that name as no concept (a
    bundle, another tool's model); None where it is free or a concept's."""
    kind = model_kind(client, name)
    if kind in (None, "concept"):
        return None
    what = "a bundle of concepts" if kind == "bundle" else "another tool's model"
    return OnewordError(f"the registry holds {name!r} as {what}, not a concept: the concept cannot be a version of it",
                        hint="give the concept another name (--name, or name: in the manifest)")  # fmt: skip


class ErasedMeanwhile(OnewordError):
    """The concept was deleted (`oneword concepts delete`) while it was trained or this registration uploaded:
    what it made is erased too, nothing is registered, and no run records the failure (`recorded`)."""

    recorded = False


def _create_version(client, name: str, info, run_id: str, token: str, tags: dict[str, str], existed: bool):
    """Create the registered model if it is new (another process may be creating it too), then a version with its
    tags (a version of oneword's is never untagged: see `_wait_for_older_decisions`).

    A concept that `existed` when the registration began and is gone now, or whose deletion erased this
    registration's run, was deleted meanwhile: a request to erase it must not be undone by a registration that
    was uploading then (the deletion refuses while a version is being decided, not before one exists)."""
    from mlflow.exceptions import MlflowException

    if _deleted_run(client, run_id):
        raise _erased_meanwhile(client, name, run_id, created=False)
    try:
        client.create_registered_model(
            name, tags={CONCEPT_TAG: "true", "oneword.token": token}, description=f"{GENERATED_DESCRIPTION}{token}"
        )
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        if (taken := name_taken(client, name)) is not None:
            raise taken from e
    else:
        if existed:
            raise _erased_meanwhile(client, name, run_id, created=True)
    try:
        return client.create_model_version(name, info.model_uri, run_id=run_id, model_id=info.model_id, tags=tags)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST" and model_kind(client, name) is None:  # deleted just now
            raise _erased_meanwhile(client, name, run_id, created=False) from e
        raise


def _erased_meanwhile(client, name: str, run_id: str, created: bool, when: str = "this registration uploaded"
                      ) -> ErasedMeanwhile:  # fmt: skip
    """Erase what a registration of a concept deleted meanwhile made (its run, artifacts and logged model; the
    registered model it made anew, where it holds no version another registration made since), and say so."""
    from oneword.catalogue import erase_runs

    if created and not every_page(client.search_model_versions, filter_string=f"name = '{name}'"):
        client.delete_registered_model(name)
    erase_runs(client, [client.get_run(run_id)])
    return ErasedMeanwhile(f"concept {name} was deleted while {when}: it is erased too, and nothing was registered",
                           hint="register it again where the concept is to exist")  # fmt: skip


def _erase_training_copies(summary: dict) -> None:
    """Delete what the training of a concept deleted meanwhile left beside the checkpoint root: a deletion while
    it trained found its checkpoints and kept training before they were all written."""
    from oneword import trainings

    group, kept = trainings.copies_of(summary)
    # a shard's checkpoints are its other concepts' too, which may be evaluating from them now: those wait for
    # a delete after the batch (the deleted runs' tags still name them); a concept trained alone goes whole
    alone = summary.get("concepts_trained_together", 1) == 1
    try:
        trainings.remove(trainings.copies({group} if group and alone else set(), {kept} if kept else set()))
    except Exception as e:  # a store that does not answer
        log.warning("could not delete the checkpoints %s left (%s): `oneword concepts delete` again deletes them",
                    group, e)  # fmt: skip
        return
    if group and not alone:
        log.warning("the checkpoints of %s's shard (%s) hold it too: `oneword concepts delete` of it again, after "
                    "the batch, deletes them", (summary.get("concept") or {}).get("token"), group)  # fmt: skip


def _deleted_run(client, run_id: str | None) -> bool:
    """Whether run `run_id` is one this store holds as deleted (a concept's deletion deletes its runs)."""
    from mlflow.exceptions import MlflowException

    if not run_id:
        return False
    try:
        return client.get_run(run_id).info.lifecycle_stage == "deleted"
    except MlflowException:  # another store's, or gone: not this concept's erasure
        return False


def _wait_for_older_decisions(
    client,
    name: str,
    version: int,
    run_id: str,
    tags: dict[str, str],
    source: str,
    timeout: float = ALIAS_WAIT_SECONDS,
) -> None:
    """Wait until every older version of `name` has its alias decided (its `gate` tag set).

    Version numbers are handed out atomically by MLflow, so deciding aliases in version order makes concurrent
    registrations of one concept behave as if they ran one after another: each compares itself with the
    champion that the versions before it left, and the champion alias ends on the best of them.

    An older version of this very run and logged model (`source`) with the very tags this one was created with
    is this registration's own twin: MLflow's client retries a create whose answer was lost (a 503 or a gateway
    timeout after the server had committed it), and only the retry's answer came back. Another registration's
    version may share the run (two registers of one training take its live run) and even the tags (the same
    evaluation draws the same scores), but not the model, which each register logs. A twin is deleted at once
    instead of waited for.
    """
    deadline, waiting, beat = time.monotonic() + timeout, None, time.monotonic()
    while True:
        if time.monotonic() - beat > HEARTBEAT_S:  # a register waiting long is alive: `concepts` commands wait too
            client.set_model_version_tag(name, str(version), HEARTBEAT_TAG, f"{time.time():.0f}")
            beat = time.monotonic()
        older = [
            mv
            for mv in every_page(client.search_model_versions, filter_string=f"name = '{name}'")
            if int(mv.version) < version and "gate" not in mv.tags
        ]
        twins = [mv for mv in older if mv.run_id == run_id and mv.tags == tags and mv.source == source]
        for twin in twins:
            log.warning("%s version %s is an undecided twin of version %s (same run): deleting it", name,
                        twin.version, version)  # fmt: skip
            delete_version(client, name, twin.version)
        older = sorted((mv for mv in older if mv not in twins), key=lambda mv: int(mv.version))
        if not older:
            return
        undecided = {mv.version for mv in older}
        if waiting is not None and undecided < waiting:  # an older version decided: the queue moves, wait on
            deadline = time.monotonic() + timeout
        if waiting is None or undecided < waiting:
            log.info("%s: waiting for version %s's register to decide its alias before version %s's (it said it was "
                     "alive %.0f s ago; one silent for %.0f s is taken as killed)", name, older[0].version, version,
                     max(0.0, silent_for(older[0])), timeout)  # fmt: skip
        waiting = undecided
        # a register silent for twice the wait (`catalogue._deciding`'s measure; a live one beats while it waits)
        # died long before this one began: not waited for
        if time.monotonic() > deadline or silent_for(older[0]) > 2 * max(timeout, HEARTBEAT_S):
            # Only the oldest: the versions after it may be alive and waiting for it as this one is, and decide
            # as soon as it is marked; marking them too would let two registrations set the alias at once.
            oldest = older[0]
            log.warning(
                "version %s of %s never decided its alias (its register was killed?); deciding without it",
                oldest.version,
                name,
            )
            mark_abandoned(client, name, oldest.version)  # not waited for again
            deadline = time.monotonic() + timeout
            continue
        time.sleep(0.2)  # another process is between create_model_version and its alias; it takes a moment


def mark_abandoned(client, name: str, version: str) -> None:
    """Tag a version `ABANDONED`, unless it decided or went meanwhile. Two registers that waited for it as long
    mark it at one moment, and PostgreSQL refuses the second insert of its tag ("duplicate key ... model_version_tag
    _pk", an HTTP 400 the client does not retry): the loser finds it marked and waits on, not fails."""
    from mlflow.exceptions import MlflowException

    try:
        client.set_model_version_tag(name, version, "gate", ABANDONED)
    except MlflowException:
        try:
            decided = client.get_model_version(name, version).tags.get("gate") is not None
        except MlflowException as gone:
            decided = gone.error_code == "RESOURCE_DOES_NOT_EXIST"  # deleted: nothing to wait for
        if not decided:
            raise


def _register_version(
    client, concept: _Concept, run_id: str, info, thresholds: GateThresholds, existed: bool
) -> tuple[str, str, str, bool]:
    """Create the model version, tag it and decide its alias; returns (version, alias, reason, unchanged).

    A version whose training, evaluation and gate (`RESULT_KEY_TAG`) are those of the version just before it
    is a twin that another run registered while this one evaluated (two batches, or two runs of one concept, at
    once): it is deleted, and the registration is the older version's, unchanged, as if `evaluate` had found it.
    """
    tags = _version_tags(concept, run_id, thresholds)
    try:
        mv = _create_version(client, concept.name, info, run_id, concept.token, tags, existed)
    except ErasedMeanwhile:
        _erase_training_copies(concept.summary)
        raise
    try:
        _wait_for_older_decisions(client, concept.name, int(mv.version), run_id, tags, mv.source)
        if (same := _same_result_before(client, concept.name, int(mv.version), tags)) is not None:
            delete_version(client, concept.name, mv.version)
            client.set_tag(run_id, UNCHANGED_TAG, same.version)  # where the batch report finds it
            held = sorted(a for a, v in (client.get_registered_model(concept.name).aliases or {}).items()
                          if str(v) == str(same.version))  # fmt: skip
            reason = f"unchanged: the same training and evaluation as version {same.version}, registered meanwhile"
            log.info("%s: %s", concept.name, reason)
            return str(same.version), ",".join(held), reason, True
        alias, reason = _apply_gate(client, concept, mv.version, tags, thresholds)
    except BaseException:
        delete_version(client, concept.name, mv.version)  # no half-registered version
        raise
    log.info("registered %s version %s as %s (%s)", concept.name, mv.version, alias, reason)
    return str(mv.version), alias, reason, False


def _same_result_before(client, name: str, version: int, tags: dict[str, str]):
    """The version just before `version`, if its gate decided on the same training, evaluation and gate; else
    None (as `registered_result`: only the newest older version counts)."""
    key = tags.get(RESULT_KEY_TAG)
    if not key:
        return None
    older = [mv for mv in every_page(client.search_model_versions, filter_string=f"name = '{name}'")
             if int(mv.version) < version]  # fmt: skip
    newest = newest_of(older)
    return newest if newest is not None and _decided_on(newest, key) else None


def _decided_on(mv, key: str) -> bool:
    """Whether version `mv` is the result `key` (`protocol.result_key`) and its gate decided (not a register that
    died before, and not other inputs)."""
    return mv.tags.get(RESULT_KEY_TAG) == key and mv.tags.get("gate") not in (None, ABANDONED)


def delete_version(client, name: str, version) -> None:
    """Delete a model version; one already gone (a retried delete whose answer was lost) is no error."""
    from mlflow.exceptions import MlflowException

    try:
        client.delete_model_version(name, version)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise


def _version_tags(concept: _Concept, run_id: str, thresholds: GateThresholds) -> dict[str, str]:
    """The version's tags: provenance, and the scores the next registration's gate compares against."""
    vtags = {
        "oneword.token": concept.token,
        "oneword.base_model": str(concept.summary["model_source"]),
        "oneword.base_model_fingerprint": concept.summary["model_fingerprint"],
        "oneword.model_family": _profile(concept.summary).family,  # which pipeline and file layout it needs
        "oneword.steps": str(concept.summary["steps"]),
        "oneword.run_id": run_id,
    }
    if concept.batch_id:
        vtags["oneword.batch_id"] = concept.batch_id
    if concept.photos:
        vtags[PHOTOS_TAG] = concept.photos
    if concept.photo_note:
        vtags[PHOTO_NOTE_TAG] = concept.photo_note
    if key := (concept.metrics or {}).get("evaluation_key"):
        # a later run with the same training, evaluation and gate finds this version (`registered_result`), and
        # one with another gate only judges its scores again (`rejudged_result`)
        vtags[RESULT_KEY_TAG] = result_key(key, thresholds)
        vtags[EVALUATION_KEY_TAG] = key
    if m := concept.metrics:
        vtags.update(
            {
                "reconstruction": f"{m['reconstruction']:.{SCORE_DECIMALS}f}",
                "editability": f"{m['editability']:.{SCORE_DECIMALS}f}",
                "evaluator": m["evaluator"]["name"],
                "evaluator_fingerprint": m["evaluator"]["fingerprint"],
                "chosen_step": str(m["step"]),
            }
        )
        if "protocol" in m:  # how the scores were measured, and their noise: what the next gate compares with
            vtags.update(
                {
                    "reconstruction_se": f"{m['reconstruction_se']:.{SCORE_DECIMALS}f}",
                    "editability_se": f"{m['editability_se']:.{SCORE_DECIMALS}f}",
                    "eval_protocol": json.dumps(m["protocol"], sort_keys=True),
                    "eval_protocol_id": m["protocol_id"],
                }
            )
            if "score_per_seed" in m:  # the gate pairs two versions' scores seed by seed
                vtags |= {"score_se": f"{m['score_se']:.{SCORE_DECIMALS}f}",
                          "score_per_seed": json.dumps(m["score_per_seed"])}  # fmt: skip
    return vtags


def _apply_gate(
    client, concept: _Concept, version, tags: dict[str, str], thresholds: GateThresholds
) -> tuple[str, str]:
    """Decide the version's alias (every older version's is decided), set it, and mark the decision made.

    A promote by hand refuses while a version is being decided, but one that came between the decision's read of
    the champion and the alias set would be overruled by a decision against the champion before it: the decision
    is made again against the one that holds now."""
    for _ in range(JUDGING_ROUNDS):
        judged = _version_of(_alias_holder(client, concept.name, CHAMPION))
        alias, reason = _decide_alias(
            client, concept.name, concept.metrics, thresholds, concept.token, concept.photos, str(version)
        )
        before = _alias_holder(client, concept.name, alias)
        holds = before if alias == CHAMPION else _alias_holder(client, concept.name, CHAMPION)
        if _version_of(holds) == judged:
            break
        log.info("%s: @%s moved to version %s while version %s was judged: judging it again", concept.name,
                 CHAMPION, _version_of(holds), version)  # fmt: skip
    else:
        log.warning("%s: @%s kept moving while version %s was judged; it is judged as of the last read",
                    concept.name, CHAMPION, version)  # fmt: skip
    client.set_registered_model_alias(concept.name, alias, version)
    try:
        client.set_model_version_tag(concept.name, version, GATE_ALIAS_TAG, alias)  # aliases move later; this not
        client.set_model_version_tag(concept.name, version, "gate", reason)  # last: it marks the decision as made
    except BaseException:
        # the caller deletes this version, and MLflow drops its aliases with it: give the alias back first, or
        # the concept is left with no champion
        if before is not None:
            client.set_registered_model_alias(concept.name, alias, before.version)
        raise
    if alias == CHAMPION:
        champion_named(client, concept.name, concept.token)
    return alias, reason


JUDGING_ROUNDS = 3  # judgings of one version, each after @champion moved by hand while the one before it ran


def _version_of(mv) -> str | None:
    return None if mv is None else str(mv.version)


def champion_named(client, name: str, token: str | None) -> None:
    """Say the champion's token on the registered model itself (its `oneword.token` tag, and the description
    oneword wrote), where a server that builds its prompts from the model, and MLflow's UI, read it: a champion
    with a new token made the first version's word wrong there. A bundle or a version without a token changes
    nothing; a description a person wrote stays. Only said: a registry that refuses it fails nothing."""
    if not token:
        return
    try:
        model = client.get_registered_model(name)
        if (model.tags or {}).get(CONCEPT_TAG) != "true":
            return
        client.set_registered_model_tag(name, "oneword.token", token)
        if not model.description or model.description.startswith(GENERATED_DESCRIPTION):
            client.update_registered_model(name, description=f"{GENERATED_DESCRIPTION}{token}")
    except Exception as e:  # the version and its alias stand: this only describes them
        log.warning("could not name %s's champion token %s on the registered model (%s)", name, token, e)


def _alias_holder(client, name: str, alias: str):
    """The model version `alias` points at, or None when it points nowhere (any other registry error is raised)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        if e.error_code in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST") and "not found" in str(e):
            return None
        raise


def _version_metrics(mv) -> dict | None:
    t = mv.tags
    if "reconstruction" not in t:
        return None
    metrics = {
        "reconstruction": float(t["reconstruction"]),
        "editability": float(t["editability"]),
        "evaluator": {"name": t.get("evaluator"), "fingerprint": t.get("evaluator_fingerprint")},
    }
    if "eval_protocol" in t:
        metrics["protocol"] = json.loads(t["eval_protocol"])
        metrics["reconstruction_se"] = float(t["reconstruction_se"])
        metrics["editability_se"] = float(t["editability_se"])
        if "score_per_seed" in t:
            metrics["score_se"] = float(t["score_se"])
            metrics["score_per_seed"] = json.loads(t["score_per_seed"])
    return metrics


def _decide_alias(
    client,
    name: str,
    metrics: dict | None,
    thresholds: GateThresholds,
    token: str = "",
    photos: str = "",
    version: str = "VERSION",
) -> tuple[str, str]:
    if metrics is None:
        return CANDIDATE, "not evaluated"
    # no champion yet, or one: a registry that fails to answer is not "no champion" (the new version would take
    # the alias from a better one)
    holder = _alias_holder(client, name, CHAMPION)
    if holder is not None and (other := _other_photos(photos, holder)):
        # scores against other photos rank nothing, and `@champion` must not move to another concept unasked
        return CANDIDATE, (
            f"not compared: {other}; if it is this concept, promote it by hand (`oneword concepts promote "
            f"{name}/{version}`), if another, register it under a name of its own"
        )
    champion = None if holder is None else _version_metrics(holder)
    if holder is not None and token and holder.tags.get("oneword.token", token) != token:
        # the concept's word changed (a manifest's `token:`): prompts written for the new one must find it
        # under `@champion`, so it replaces the old word's version if it passes the thresholds alone
        why = f"replaces the champion's token {holder.tags['oneword.token']!r} with {token!r}"
        return _passes_alone(metrics, thresholds, why)
    try:
        if champion is not None and not (bar := quality_gate(champion, None, thresholds)).passed:
            # a bar raised past the champion's scores: it holds the alias by no measure it passes now, or a
            # version that passes the bar and scores less would stay a candidate behind it
            check_comparable(metrics, champion)
            why = f"the champion, version {holder.version}, does not pass these thresholds ({bar.reason})"
            return _passes_alone(metrics, thresholds, why)
        result = quality_gate(metrics, champion, thresholds)
    except EvaluatorMismatch as e:
        return CANDIDATE, f"not compared: {e.message}"
    return (CHAMPION if result.passed else CANDIDATE), result.reason


def _passes_alone(metrics: dict, thresholds: GateThresholds, why: str) -> tuple[str, str]:
    """The alias of a version judged by the thresholds alone, for `why` (a champion is there, so not "the first
    champion"), and the reason."""
    result = quality_gate(metrics, None, thresholds)
    return (CHAMPION, f"passes the thresholds; {why}") if result.passed else (CANDIDATE, result.reason)


RESULT_KEY_TAG, UNCHANGED_TAG = "oneword.result_key", "oneword.unchanged_version"
EVALUATION_KEY_TAG, REJUDGED_TAG = "oneword.evaluation_key", "oneword.rejudged"


def registered_result(tracking_uri: str | None, name: str, key: str) -> dict | None:
    """The concept's newest version, if it was registered from the same training, evaluation and gate
    (`protocol.result_key`) and its gate decided: `{"version", "aliases"}`; else None.

    Only the newest version counts: photos changed and changed back are evaluated again, so that the newest
    version is always the one of the current inputs. A registry that cannot be asked counts as none: the concept
    is then evaluated and registered as usual, which costs time, never a result.
    """
    try:
        return newest_result(tracking_uri, name, key)
    except Exception as e:  # a store that is down or refuses: evaluate after all
        log.warning("could not look up %s's earlier results (%s); evaluating it", name, e)
        return None


def newest_result(tracking_uri: str | None, name: str, key: str) -> dict | None:
    """`registered_result`, raising what the registry raised."""
    _, client = _setup(tracking_uri)
    return _newest_decided_on(client, name, key)


def _newest_decided_on(client, name: str, key: str) -> dict | None:
    """`newest_result` with a client."""
    newest = newest_version(client, name)
    return _held(client, name, newest) if newest is not None and _decided_on(newest, key) else None


def unchanged_result(
    tracking_uri: str | None, name: str, key: str, evaluation: str, thresholds: GateThresholds, token: str = ""
) -> dict | None:
    """`newest_result`, else `rejudged_result` (`key` is `evaluation`'s result under `thresholds`), reading the
    concept's versions once. Raises what the registry raised."""
    _, client = _setup(tracking_uri)
    newest = newest_version(client, name)
    if newest is None:
        return None
    if _decided_on(newest, key):
        return _held(client, name, newest)
    return _rejudged(client, name, newest, evaluation, thresholds, token)


def why_changed(tracking_uri: str | None, name: str, evaluation: str) -> str:
    """Why a concept that `unchanged_result` did not find is trained again (a dry run's `why`), in a few words:
    no version yet; its newest version trained or evaluated otherwise than `evaluation` now would be; that
    version's registration never finished; or only the gate changed, and by it a twin would take @champion."""
    _, client = _setup(tracking_uri)
    newest = newest_version(client, name)
    if newest is None:
        return "not registered yet"
    v = f"v{newest.version}"
    if newest.tags.get(EVALUATION_KEY_TAG) != evaluation:
        return f"{v} was trained or evaluated otherwise (photos, settings, model, or how oneword scores)"
    if newest.tags.get("gate") in (None, ABANDONED):
        return f"{v}'s registration did not finish"
    return f"only the gate changed, and by it {v}'s scores do not settle the aliases: evaluated again"


def _held(client, name: str, mv, **more) -> dict:
    """Version `mv` as the lookups find it: `{"version", "aliases"}` (the aliases it holds now), and `more`."""
    aliases = client.get_registered_model(name).aliases or {}
    held = sorted(a for a, v in aliases.items() if str(v) == str(mv.version))
    return {"version": str(mv.version), "aliases": held, **more}


def rejudged_result(
    tracking_uri: str | None, name: str, evaluation: str, thresholds: GateThresholds, token: str = ""
) -> dict | None:
    """The concept's newest version, if only the gate changed since it was registered and the new gate would
    move no alias: `{"version", "aliases", "rejudged"}` (`rejudged`: its scores judged by `thresholds`); else
    None. Raises what the registry raised.

    A run would evaluate that training again the same way (`evaluation`, `protocol.evaluation_key`), on a GPU,
    to the same scores, and register a twin of the version that its gate compares with the champion: a twin of
    the champion cannot beat itself, and a candidate's twin that does not beat the champion either leaves every
    alias where it is. Only a twin that would take `@champion` is worth its run (None). The champion keeps its
    alias under thresholds it no longer passes, as a registration that fails them would leave it: `rejudged`
    says so, and the first version that passes them takes it (`_decide_alias`). Versions registered before
    they carried their evaluation key (`EVALUATION_KEY_TAG`) were keyed by the oneword release: never found.
    """
    _, client = _setup(tracking_uri)
    newest = newest_version(client, name)
    return None if newest is None else _rejudged(client, name, newest, evaluation, thresholds, token)


def _rejudged(client, name: str, newest, evaluation: str, thresholds: GateThresholds, token: str) -> dict | None:
    """`rejudged_result` of the concept's newest version `newest`."""
    if newest.tags.get(EVALUATION_KEY_TAG) != evaluation or newest.tags.get("gate") in (None, ABANDONED):
        return None
    holder = _alias_holder(client, name, CHAMPION)
    try:
        metrics = _version_metrics(newest)
        if metrics is None:
            return None
        photos = newest.tags.get(PHOTOS_TAG, "")
        alias, reason = _decide_alias(client, name, metrics, thresholds, token, photos, str(newest.version))
        champion = None if holder is None else _version_metrics(holder)
        bar = None if champion is None else quality_gate(champion, None, thresholds)
    except (ValueError, KeyError, TypeError) as e:  # tags another tool wrote: this concept is evaluated again
        log.warning("could not judge %s version %s's recorded scores again (%s)", name, newest.version, e)
        return None
    if alias == CHAMPION:
        return None
    if holder is not None and str(holder.version) == str(newest.version):
        said = "passes the new thresholds" if bar.passed else bar.reason
    else:  # why its twin would stay a candidate
        said = reason
        if bar is not None and not bar.passed:
            said += f"; the champion, version {holder.version}, does not pass them either ({bar.reason})"
    if bar is not None and not bar.passed:
        said += f": it keeps @{CHAMPION} until a version that passes them takes it"
    return _held(client, name, newest, rejudged=f"the gate changed: {said}")


def earlier_result(tracking_uri: str | None, train_dir: Path, name: str, config, thresholds) -> dict | None:
    """The version an earlier run registered from this very training, evaluated with `config` and judged by
    `thresholds` (`registered_result`), or None. None too where that cannot be known: a concept trained alone
    (`oneword train`) has no training key, and settings that are not valid (a prompt file that cannot be read)
    are left to `evaluate` to report."""
    from oneword.evaluation.protocol import evaluation_key

    summary = Path(train_dir) / "summary.json"
    try:
        key = json.loads(summary.read_text()).get("training_key") if summary.is_file() else None
        wanted = result_key(evaluation_key(key, config), thresholds) if key else None
    except Exception as e:  # evaluate meets the same error and records it as the concept's
        log.warning("cannot tell whether %s changed (%s)", name, e)
        return None
    return registered_result(tracking_uri, name, wanted) if wanted else None
