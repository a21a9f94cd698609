"""The `train` step: cached latents + hyperparameters in, embedding files + checkpoints + curves out.

Output folder layout (one concept):

    learned_embeds.safetensors   diffusers format (loads with load_textual_inversion); SDXL's holds both
                                 encoders' vectors in one file, clip_l and clip_g (`embeddings.save_whole`)
    a1111/<token>.pt             A1111 format
    kohya/<token>.safetensors    kohya format
    checkpoints/step-*.pt        every `checkpoint_every` steps (resume from the newest)
    curve.json                   loss and embedding norm every `log_every` steps
    summary.json                 config, concept, model fingerprint, timing (and the live MLflow run's id)
    dataset/                     the training images (when the latents carry them), for evaluation

Several concepts trained together (`train_group`: a batch job's shard, in one batch of K x batch_size) write
one such folder per concept, `<out>/<name>/`, beside their shared `checkpoints/` and `concepts.json` (each
concept's status: trained, or failed with the stage and the error).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from oneword import __version__, checkpoints, distributed, outcome, storage, trainings
from oneword import embeddings as emb_io
from oneword.errors import OnewordError
from oneword.inversion import (
    ConceptSpec,
    InversionTrainer,
    MetricsCallback,
    TrainConfig,
    TrainResult,
    check_concept,
    check_progressive,
)
from oneword.latents import DATASET_DIR, LatentSet
from oneword.live import CHECKPOINTS_TAG, LiveRuns, LiveTracking
from oneword.models import LoadedModel, load_base_model
from oneword.profiles import profile_of, vae_config
from oneword.templates import SETS as TEMPLATE_SETS
from oneword.templates import get_templates
from oneword.tokens import check_untrained, clashing_entries, vector_tokens

log = logging.getLogger(__name__)

CURVE_FILE, SUMMARY_FILE, GROUP_FILE = "curve.json", "summary.json", "concepts.json"


def write_embedding_files(emb: emb_io.Embedding, out_dir: Path) -> dict[str, Path]:
    """Write one embedding in every format that can hold it into `out_dir`; returns {format: path}.

    An SDXL pair has no A1111 `.pt` (its kohya file is what A1111 and ComfyUI load).
    """
    stem = emb_io.default_filename(emb.token, "kohya").removesuffix(".safetensors")
    paths = {
        "diffusers": out_dir / "learned_embeds.safetensors",
        "a1111": out_dir / "a1111" / f"{stem}.pt",
        "kohya": out_dir / "kohya" / f"{stem}.safetensors",
    }
    paths = {fmt: p for fmt, p in paths.items() if fmt in emb_io.formats_for(emb)}
    for fmt, p in paths.items():
        if fmt == "diffusers":
            emb_io.save_whole(emb, p)
        else:
            emb_io.save(emb, p, fmt)  # type: ignore[arg-type]
    return paths


def _check_encoded_for(latents: LatentSet, model: LoadedModel, where: Path) -> None:
    """Refuse latents that another family's VAE encoded (a scaling factor that differs from the model's VAE: SD
    1.x's latents for SDXL, whose VAE scales by 0.13025, not 0.18215); warn of latents another model encoded."""
    recorded = latents.meta.get("model_fingerprint")
    if not recorded or recorded == model.fingerprint:
        return
    vae = vae_config(str(model.path or model.source))
    theirs = None if vae is None else vae.get("scaling_factor")
    if theirs is not None and abs(float(theirs) - latents.scaling_factor) > 1e-6:
        raise OnewordError(
            f"latents {where} were encoded by {latents.meta.get('model_source', 'another model')}'s VAE (scaling "
            f"factor {latents.scaling_factor}), not by {model.source}'s ({theirs}): trained on them, the concept would "
            "learn from latents the model cannot read",
            hint=f"encode the photos with this model: oneword cache-latents ... --base-model {model.source}",
        )
    log.warning(
        "latents %s were encoded for model %s… but training uses %s…; fine only if they share a VAE",
        where,
        recorded[:19],
        model.fingerprint[:19],
    )


def _load_model(
    latents: LatentSet, base_model: str | LoadedModel | None, where: Path, samples: bool = False
) -> LoadedModel:
    source = base_model if base_model is not None else latents.meta.get("model_source")
    if isinstance(source, LoadedModel):
        check_untrained(source, "train")
    if source is None:
        raise OnewordError(f"{where} does not record its base model", hint="pass --base-model")
    parts = ("unet", "vae") if samples else ("unet",)  # the VAE only to draw live sample pictures
    return source if isinstance(source, LoadedModel) else load_base_model(source, parts=parts)


def _where(checkpoint_dir: str | Path) -> str:
    """A checkpoint folder as the summary records it: an `s3://` prefix as it is, a local folder absolute (a
    relative one would be read against the concept's folder by `evaluate`, not against where training ran)."""
    return str(checkpoint_dir) if storage.is_s3(checkpoint_dir) else str(Path(checkpoint_dir).resolve())


def _run_summary(
    config: TrainConfig, model: LoadedModel, result: TrainResult, trainer: InversionTrainer, checkpoint_dir: str
) -> dict:
    """What every concept of one training run shares in its summary.json."""
    return {
        "config": config.model_dump(),
        "model_source": model.source,
        "model_fingerprint": model.fingerprint,
        "profile": trainer.profile.model_dump(),  # what the unset settings were taken from
        "steps": result.steps,
        "steps_run": result.steps_run,  # 0 when a rerun found its checkpoints at the end already
        "ended_early_at": result.ended_early_at,  # every embedding had settled (TrainConfig.early_end)
        "seconds": result.seconds,
        "steps_per_second": result.steps_per_second,
        "last_checkpoint": result.last_checkpoint,
        "checkpoint_dir": checkpoint_dir,
        "concepts_trained_together": len(trainer.concepts),
        "device": str(trainer.device),
        "processes": trainer.world.size,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "oneword_version": __version__,
    }


def _write_concept(
    out_dir: Path,
    concept: ConceptSpec,
    latents: LatentSet,
    latents_dir: Path,
    result: TrainResult,
    run: dict,
    mlflow_run_id: str | None = None,
) -> None:
    """Write one concept's folder: its embedding in every format, curve, summary and training images."""
    out_dir.mkdir(parents=True, exist_ok=True)
    emb = next(e for e in result.embeddings if e.token == concept.token)
    curve = result.curves[concept.token]
    files = write_embedding_files(emb, out_dir)
    (out_dir / CURVE_FILE).write_text(json.dumps(curve))
    if (Path(latents_dir) / DATASET_DIR).is_dir():
        shutil.rmtree(out_dir / DATASET_DIR, ignore_errors=True)  # an earlier training's photos: never mixed in
        shutil.copytree(Path(latents_dir) / DATASET_DIR, out_dir / DATASET_DIR)
    summary = {
        "concept": concept.model_dump(),
        "learning_rate_used": TrainConfig(**run["config"]).lr_for(concept),
        "image_sha256": latents.image_sha256,
        "final_loss": curve[-1]["loss"] if curve else None,
        "embedding_norm": curve[-1]["embedding_norm"] if curve else None,
        "files": {k: str(v.relative_to(out_dir)) for k, v in files.items()},
        **run,
    }
    if mlflow_run_id:
        summary["mlflow_run_id"] = mlflow_run_id  # the live run, left RUNNING: `register` completes and ends it
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))


def train(
    latents_dir: Path,
    out_dir: Path,
    concept: ConceptSpec,
    config: TrainConfig = TrainConfig(),
    base_model: str | LoadedModel | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    callbacks: Sequence[MetricsCallback] = (),
    progress: bool = True,
    tracking: LiveTracking | None = None,
    name: str | None = None,
) -> TrainResult:
    """Learn one concept from its cached latents and write its files.

    Args:
        latents_dir: folder written by `cache_latents`.
        out_dir: output folder (layout in the module docstring).
        concept: token, initializer word, vector count and templates.
        config: optimisation settings.
        base_model: the model to train in; default: the one the latents were encoded with.
        checkpoint_dir: folder or `s3://` prefix for checkpoints; default `out_dir/checkpoints`.
        resume: continue from the newest checkpoint there.
        callbacks: metrics callbacks, `cb(step, {"loss": ..., "embedding_norm": ...})`.
        progress: show a progress bar.
        tracking: log live to MLflow (`oneword.live`); None: no MLflow.
        name: the concept's registered-model name, which names its live run (default: from the token).

    Returns:
        The `TrainResult`.
    """
    from oneword.registry import concept_name  # (registry imports evaluation, which imports this module)

    name = concept_name(concept.token, name or "")  # a name the registry cannot hold fails before any work
    with _one_writer(out_dir):
        check_output_folder(out_dir, concept.token)  # held: no training of another concept finishes there meanwhile
        ckpt = checkpoint_dir if checkpoint_dir is not None else Path(out_dir) / "checkpoints"
        _refuse_earlier_checkpoints(ckpt, resume)
        if (n := _processes(config, base_model, callbacks)) > 1:
            return distributed.launch(
                "oneword.train:train", n, latents_dir=latents_dir, out_dir=out_dir, concept=concept, config=config,
                base_model=base_model, checkpoint_dir=checkpoint_dir, resume=resume, progress=progress,
                tracking=tracking, name=name,
            )  # fmt: skip
        latents = LatentSet.load(Path(latents_dir))
        model = _load_model(latents, base_model, Path(latents_dir), samples=_samples(tracking, config))
        _check_encoded_for(latents, model, Path(latents_dir))
        profile = profile_of(model)
        concept, config = concept.resolved(profile), config.resolved(profile)
        out_dir = Path(out_dir)
        trainer = InversionTrainer(model, [(concept, latents)], config)  # a token it refuses leaves no folder behind
        out_dir.mkdir(parents=True, exist_ok=True)
        log.info(
            "training %s (init %r, %d vector(s)) for %d steps at lr %g on %s",
            concept.token,
            concept.init_word,
            concept.n_vectors,
            config.steps,
            config.lr,
            trainer.device,
        )
        main = trainer.world.main  # the other processes of a launch hold the same state and write nothing
        live = None
        if tracking and main:
            live = LiveRuns(tracking, [(name, concept)], model.fingerprint, {name: {CHECKPOINTS_TAG: _where(ckpt)}},
                            resume=resume)  # fmt: skip
        result = _run(trainer, live, ckpt, resume, callbacks, progress, keep_going=False)
        if main:
            run = _run_summary(config, model, result, trainer, _where(ckpt))
            run_id = live.run_ids.get(name) if live else None
            _write_concept(out_dir, concept, latents, Path(latents_dir), result, run, run_id)
        return result


def _one_writer(out_dir: str | Path):
    """Hold the output folder for this training (`storage.one_writer`); a launched process's parent holds it."""
    return contextlib.nullcontext() if distributed.launched() else storage.one_writer(Path(out_dir), "training")


def _processes(config: TrainConfig, base_model, callbacks: Sequence[MetricsCallback]) -> int:
    """How many processes to train over (`distributed.processes`)."""
    local = [
        what
        for what, given in (("a loaded model", isinstance(base_model, LoadedModel)), ("callbacks", callbacks))
        if given
    ]
    return distributed.processes(config.gpus, config.device, " and ".join(local))


def _samples(tracking: LiveTracking | None, config: TrainConfig) -> bool:
    """Whether this process draws live sample pictures (and so loads the VAE): only the process that writes."""
    return tracking is not None and config.sample_every > 0 and distributed.current().main


def check_output_folder(out_dir: str | Path, token: str) -> None:
    """Refuse an output folder where training `token` would replace files it did not write for that concept.

    A training writes into its folder as it goes (checkpoints among its files), so it cannot replace the folder
    whole as the other steps do: an earlier training of the same concept there is replaced, as every step replaces
    its own earlier output, but another concept's training, or files of the names it writes that no training
    wrote, are refused before any work. Files of other names are left alone.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OnewordError(f"{out} is a file, not a folder: a training writes a folder", hint="choose another -o")
    if not out.is_dir():
        return
    taken = [n for n in ("learned_embeds.safetensors", SUMMARY_FILE, CURVE_FILE, "a1111", "kohya", DATASET_DIR)
             if (out / n).exists()]  # fmt: skip
    if not taken:
        return
    try:
        earlier = json.loads((out / SUMMARY_FILE).read_text())["concept"]["token"]
    except (OSError, ValueError, KeyError, TypeError):  # no summary, or not one a training wrote
        try:  # a training stopped while it wrote its files (the embedding first, the summary last): its own
            earlier = emb_io.load(out / "learned_embeds.safetensors").token
        except Exception:  # not there, or no embedding: files no training wrote
            earlier = None
    if earlier == token:
        return
    whose = f"the training of {earlier}" if earlier else "files no training of oneword wrote"
    raise OnewordError(
        f"{out} holds {', '.join(taken)}: {whose}, which training {token} there would replace",
        hint="choose a new or empty folder for -o (each concept trains into a folder of its own)",
    )


def _refuse_earlier_checkpoints(ckpt: str | Path, resume: bool) -> None:
    """A fresh training (not `resume`) refuses a folder that holds an earlier training's checkpoints: it would
    write among them, and evaluation would choose from both trainings'."""
    if not resume and (earlier := checkpoints.list_checkpoints(ckpt)):
        raise OnewordError(
            f"{ckpt} holds checkpoints of an earlier training (steps {earlier[0][0]}-{earlier[-1][0]})",
            hint="pass --resume to continue that training, or remove them (or choose another -o) to start afresh",
        )


def _run(
    trainer: InversionTrainer,
    live: LiveRuns | None,
    ckpt: str | Path,
    resume: bool,
    callbacks: Sequence[MetricsCallback],
    progress: bool,
    keep_going: bool,
) -> TrainResult:
    """Run the trainer, feeding the live runs; they end FAILED if training fails (with the concepts that stop)."""
    if live is not None:
        callbacks = [*callbacks, live.callback(trainer, trainer.config.sample_every)]
    try:
        result = trainer.run(ckpt, resume=resume, callbacks=callbacks, progress=progress, keep_going=keep_going)
    except BaseException as e:
        if live is not None:
            from oneword.processes import Stopped

            live.fail_all(f"stopped by {e.signal}" if isinstance(e, Stopped) else f"{type(e).__name__}: {e}")
        raise
    if live is not None:
        live.end({live.names[token]: why for token, why in result.failed.items() if token in live.names})
    return result


def _check_fits_group(
    name: str, spec: ConceptSpec, latents: LatentSet, ready: Sequence[tuple[str, ConceptSpec, LatentSet, Path]]
) -> None:
    """Refuse a concept that cannot train beside those already in the group: one whose tokenizer entries clash
    with theirs, or whose latents have another size (one batch holds them all)."""
    mine = vector_tokens(spec.token, spec.n_vectors)
    for other, other_spec, other_latents, _ in ready:
        if clash := clashing_entries(mine, vector_tokens(other_spec.token, other_spec.n_vectors)):
            raise OnewordError(
                f"{name}: its token {spec.token!r} cannot be told from {other}'s {clash[0]!r} in a prompt (the "
                "same but for case, or NAME and NAME_1, which diffusers reads as one concept's two vectors)",
                hint="give each concept a token of its own",
            )
        if latents.mean.shape[2:] != other_latents.mean.shape[2:]:
            raise OnewordError(
                f"{name}: its latents are {tuple(latents.mean.shape[2:])}, {other}'s "
                f"{tuple(other_latents.mean.shape[2:])}: one batch cannot hold both",
                hint="preprocess every concept of a group at one resolution",
            )


def group_key(members: Sequence[tuple[str, ConceptSpec, Sequence[str]]], config: TrainConfig, fingerprint: str) -> str:
    """A name for a group's checkpoints made from what determines its training, not from the run that started it.

    Members are `(name, concept, its images' sha256)` (`LatentSet.image_sha256`). The same concepts, images,
    model and settings give the same key, so a resubmitted run (after a preempted
    pod, or a failure in a later step) resumes the group's checkpoints instead of training from the start. The
    registered names are not in it: they name what is written, not what is trained (a checkpoint holds each
    concept's vectors by token), so a concept registered under another name reuses its training.
    """
    # how often the run reports is how often early end looks: with it on, it changes where the run ends
    runtime = {"sample_every", "device", "compile", "gpus"} | ({"log_every"} if not config.early_end else set())
    what = {
        "concepts": [(_trains_on(spec), list(images)) for _, spec, images in members],
        "config": config.model_dump(exclude=runtime),
        "model": fingerprint,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[: trainings.KEY_HEX]


def _trains_on(spec: ConceptSpec) -> dict:
    """A concept as its training sees it: a file of templates by what it says, not by where it is."""
    what = spec.model_dump()
    if spec.templates and spec.templates not in TEMPLATE_SETS:
        what["templates"] = list(get_templates(spec.templates))
    return what


def training_key(spec: ConceptSpec, image_sha256: Sequence[str], config: TrainConfig, model_id: str) -> str:
    """What decides one concept's training, whichever concepts share its shard: its own spec, photos, the model
    and the settings. Trained with other shard-mates (one changed, failed, or moved in the manifest), a concept
    keeps its key, is taken from the kept trainings (`oneword.trainings`) or trains again, and its evaluation
    and registration see it unchanged."""
    alone = group_key([("", spec, image_sha256)], config, model_id)
    return hashlib.sha256(f"{alone}:{spec.token}".encode()).hexdigest()[: trainings.KEY_HEX]


def model_identity(fingerprint: str, source: str, stated_prediction: str | None = None) -> str:
    """The base model as the training keys see it. The fingerprint covers the tokenizer, the token embeddings
    and the UNet's config, not its weights: a fine-tune that kept the text encoder shares it, so the model's
    source is part of the key too; and so is the prediction type that an LDM config beside a single file states
    (`LoadedModel.stated_prediction`), which sets the training's target: the file alone does not tell it."""
    return f"{fingerprint} {source}" + (f" {stated_prediction}" if stated_prediction else "")


def _under(root: str | Path, key: str) -> str:
    """A group's checkpoint folder under a checkpoint root (folder or `s3://` prefix)."""
    return f"{str(root).rstrip('/')}/{key}"


def _take_trained(
    ready: Sequence[tuple[str, ConceptSpec, LatentSet, Path]],
    keys: dict[str, str],
    out_dir: Path,
    checkpoint_root: str | Path,
) -> list[str]:
    """Write the concepts trained before (`trainings.take`) into their folders, with their photos from these
    latents; returns their names."""
    taken = []
    for name, _, _, where in ready:
        if (summary := trainings.take(checkpoint_root, keys[name], out_dir / name)) is None:
            continue
        if (Path(where) / DATASET_DIR).is_dir():
            shutil.copytree(Path(where) / DATASET_DIR, out_dir / name / DATASET_DIR, dirs_exist_ok=True)
        log.info("%s was trained before with the same photos, spec, model and settings (%s): not trained again",
                 name, summary["trained_before"])  # fmt: skip
        taken.append(name)
    return taken


def match_latents(concepts: Sequence[dict], folders: Sequence[str | Path]) -> list[Path]:
    """Each planned concept's latents folder, matched by the photos they were encoded from, not by position.

    A shard's latents reach `train` gathered from a loop (`dsl.Collected`), in an order KFP does not promise;
    zipped by position, a concept could learn another's photos. A folder belongs to the concept whose `images`
    its copied manifest's sources lie under, or that its failure record names (a concept that failed earlier);
    folders that say nothing keep their order among the concepts left.
    """
    from oneword.images import MANIFEST
    from oneword.latents import DATASET_DIR

    def sources(folder: Path) -> list[str]:
        manifest = folder / DATASET_DIR / MANIFEST
        if manifest.is_file():
            return [r["source"] for r in json.loads(manifest.read_text())["images"]]
        failed = outcome.read_failure(folder) or {}
        return [failed["images"].rstrip("/") + "/"] if failed.get("images") else []

    folders = [Path(f) for f in folders]
    found = [sources(f) for f in folders]
    chosen: dict[int, int] = {}  # concept -> folder
    # the most specific folders first: photos under s3://b/cats/kitten/ also lie under s3://b/cats/
    by_depth = sorted(range(len(concepts)), key=lambda i: -len(str(concepts[i].get("images", "")).rstrip("/")))
    for i in by_depth:
        if not concepts[i].get("images"):  # a concept planned without its photos' place: by position
            continue
        prefix = str(concepts[i]["images"]).rstrip("/") + "/"
        j = next((j for j, s in enumerate(found) if j not in chosen.values() and s and all(
            x.startswith(prefix) for x in s)), None)  # fmt: skip
        if j is not None:
            chosen[i] = j
    left = iter(j for j in range(len(folders)) if j not in chosen.values())
    return [folders[chosen[i]] if i in chosen else folders[next(left)] for i in range(len(concepts))]


def train_shard(
    members: Sequence[tuple[str, ConceptSpec, Path]],
    out_dir: Path,
    make_config: Callable[[], TrainConfig],
    on_error: outcome.OnError = "fail",
    **kwargs,
) -> list[dict]:
    """`train_group` as a pipeline's shard runs it: an error of the whole group is every member's, recorded.

    With `on_error="record"`, settings that are not valid, a base model that does not load or a step that fails
    for every concept at once is written as each member's failure (`failure.json`, `concepts.json`), so the
    batch report names the step and the error for each instead of "unknown". An error a retry may cure
    (`outcome.transient`) is tried again first (`outcome.retrying`: with `resume`, from the last checkpoint),
    then raised all the same, where the task's retries are for it: not under kfp.local
    (`outcome.LOCAL_RUN_ENV`), which retries nothing.

    Args:
        members: as for `train_group`.
        out_dir: as for `train_group`.
        make_config: builds the `TrainConfig` (its validation errors are the group's).
        on_error: fail (raise) or record.
        kwargs: the other arguments of `train_group`.

    Returns:
        One status per member, as `train_group` returns.
    """
    try:
        return outcome.retrying(lambda: train_group(members, out_dir, make_config(), **kwargs), "train")
    except Exception as e:
        if on_error == "fail" or (outcome.transient(e) and not os.environ.get(outcome.LOCAL_RUN_ENV)):
            raise
        error = e.message if isinstance(e, OnewordError) else f"{type(e).__name__}: {e}"
        hint = (e.hint or "") if isinstance(e, OnewordError) else ""
        log.exception("the group failed as a whole")
        rows = []
        for name, spec, where in members:
            # a member that had failed before (its photos) keeps that failure: it is the one to fix
            earlier = outcome.read_failure(where) or {"stage": "train", "error": error, "hint": hint}
            outcome.write_failure(Path(out_dir) / name, earlier["stage"], earlier["error"], earlier.get("hint", ""))
            rows.append({"name": name, "token": spec.token, "status": "failed", "stage": earlier["stage"],
                         "error": earlier["error"]})  # fmt: skip
        (Path(out_dir) / GROUP_FILE).write_text(json.dumps(rows, indent=2))
        return rows


def train_group(
    members: Sequence[tuple[str, ConceptSpec, Path]],
    out_dir: Path,
    config: TrainConfig = TrainConfig(),
    base_model: str | LoadedModel | None = None,
    checkpoint_root: str | Path | None = None,
    resume: bool = True,
    callbacks: Sequence[MetricsCallback] = (),
    progress: bool = True,
    tracking: LiveTracking | None = None,
) -> list[dict]:
    """Learn several concepts together (one batch of K x batch_size), each written to `out_dir/<name>/`.

    A concept trained before under `checkpoint_root` with the same `training_key` is written from there, not
    trained again (its summary says `trained_before`). A concept that cannot train (its latents carry an earlier
    step's failure, its token clashes, its loss turns non-finite) is recorded as failed in
    `out_dir/<name>/failure.json` and `concepts.json`; the others go on.

    Args:
        members: `(name, concept, latents folder)` per concept; names are the output subfolders.
        out_dir: output folder.
        config: optimisation settings (shared; each concept has its own parameter and optimiser state).
        base_model: the model to train in; default: the one the latents were encoded with.
        checkpoint_root: folder or `s3://` prefix; the group's checkpoints go to `<root>/<group_key>` so that
            a rerun resumes them, and each concept's finished training to `<root>/trainings/` (`oneword.trainings`),
            so that a group that holds it again, with other concepts, takes it. Default: `out_dir/checkpoints`,
            which keeps no finished trainings.
        resume: continue from the newest readable checkpoint there, and take the concepts trained before.
        callbacks: metrics callbacks (means over the concepts still training).
        progress: show a progress bar.
        tracking: log live to MLflow (`oneword.live`), one run per concept named by its name; None: no MLflow.

    Returns:
        One status per member, in order: `{"name", "token", "status": "trained"|"failed", "stage", "error"}`.
    """
    with _one_writer(out_dir):
        return _train_group(
            members, out_dir, config, base_model, checkpoint_root, resume, callbacks, progress, tracking
        )


def _train_group(
    members: Sequence[tuple[str, ConceptSpec, Path]],
    out_dir: Path,
    config: TrainConfig,
    base_model: str | LoadedModel | None,
    checkpoint_root: str | Path | None,
    resume: bool,
    callbacks: Sequence[MetricsCallback],
    progress: bool,
    tracking: LiveTracking | None,
) -> list[dict]:
    """`train_group` while it holds its output folder."""
    if (n := _processes(config, base_model, callbacks)) > 1:
        return distributed.launch(
            "oneword.train:train_group", n, members=members, out_dir=out_dir, config=config, base_model=base_model,
            checkpoint_root=checkpoint_root, resume=resume, progress=progress, tracking=tracking,
        )  # fmt: skip
    world = distributed.current()
    main = world.main  # the other processes of a launch hold the same state and write nothing
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    status = {
        name: {"name": name, "token": spec.token, "status": "failed", "stage": "", "error": ""}
        for name, spec, _ in members
    }
    if len(status) != len(members):
        raise OnewordError(f"concept names must differ within a group: {[m[0] for m in members]}")

    def fail(name: str, stage: str, error: str, hint: str = "") -> None:
        status[name].update(stage=stage, error=error)
        if main:
            outcome.write_failure(out_dir / name, stage, error, hint)
            log.error("%s failed at %s: %s", name, stage, error)

    loaded: list[tuple[str, ConceptSpec, LatentSet, Path]] = []
    for name, spec, where in members:
        if (earlier := outcome.read_failure(where)) is not None:
            fail(name, earlier["stage"], earlier["error"], earlier.get("hint", ""))
            continue
        try:
            check_output_folder(out_dir / name, spec.token)
            loaded.append((name, spec, LatentSet.load(Path(where)), Path(where)))
        except OnewordError as e:
            fail(name, "train", e.message, e.hint or "")
        except Exception as e:  # a damaged file's header, say: this concept fails, the others train
            fail(name, "train", f"{where}: its latents could not be read ({type(e).__name__}: {e})")
    model = _load_model(loaded[0][2], base_model, loaded[0][3], _samples(tracking, config)) if loaded else None
    profile = profile_of(model) if model is not None else None
    config = config.resolved(profile) if profile is not None else config
    ready: list[tuple[str, ConceptSpec, LatentSet, Path]] = []
    for name, spec, lat, where in loaded:
        try:
            spec = spec.resolved(profile)
            _check_encoded_for(lat, model, where)  # a member's latents of another family: it fails, the others train
            check_concept(model.tokenizer, spec)
            check_progressive(spec, config)
            _check_fits_group(name, spec, lat, ready)
            ready.append((name, spec, lat, where))
        except OnewordError as e:
            fail(name, "train", e.message, e.hint or "")
    model_id = model_identity(model.fingerprint, model.source, model.stated_prediction) if model is not None else ""
    keys = {name: training_key(spec, lat.image_sha256, config, model_id) for name, spec, lat, _ in ready}
    whole = group_key([(n, s, lat.image_sha256) for n, s, lat, _ in ready], config, model_id)
    if ready and checkpoint_root and resume and not checkpoints.list_checkpoints(_under(checkpoint_root, whole)):
        # this very shard has no checkpoints of its own (those it resumes, whatever was kept): take its concepts
        # trained before, in another shard or run (`oneword.trainings`), and train the others
        taken = distributed.from_main(_take_trained(ready, keys, out_dir, checkpoint_root) if main else [], world)
        for name in taken:
            status[name].update(status="trained", stage="train")
        if taken:
            ready = [m for m in ready if m[0] not in taken]
            whole = group_key([(n, s, lat.image_sha256) for n, s, lat, _ in ready], config, model_id)
    if ready:
        key = whole
        ckpt = _under(checkpoint_root, key) if checkpoint_root else str(out_dir / "checkpoints")
        _refuse_earlier_checkpoints(ckpt, resume)
        trainer = InversionTrainer(model, [(spec, lat) for _, spec, lat, _ in ready], config)
        log.info(
            "training %d concepts together (%s) for %d steps, batch %d x %d, on %s; checkpoints in %s",
            len(ready),
            ", ".join(spec.token for _, spec, _, _ in ready),
            config.steps,
            len(ready),
            config.batch_size,
            trainer.device,
            ckpt,
        )
        # where the training leaves copies of each concept outside MLflow, for an erasure (`catalogue.delete_concept`)
        copies = {n: trainings.copy_tags(_where(ckpt), _where(checkpoint_root), keys[n])
                  for n, _, _, _ in ready} if checkpoint_root else None  # fmt: skip
        named = [(n, s) for n, s, _, _ in ready]
        # and which checkpoints it writes: a resume after a kill goes on in the runs the killed training opened
        tags = {n: {**(copies or {}).get(n, {}), CHECKPOINTS_TAG: _where(ckpt)} for n, _ in named}
        live = LiveRuns(tracking, named, model.fingerprint, tags, resume=resume) if tracking and main else None
        result = _run(trainer, live, ckpt, resume, callbacks, progress, keep_going=True)
        run = _run_summary(config, model, result, trainer, _where(ckpt) if checkpoint_root else "../checkpoints")
        for name, spec, lat, where in ready:
            if spec.token in result.failed:
                fail(name, "train", result.failed[spec.token])
                continue
            if main:
                run_id = live.run_ids.get(name) if live else None
                mine = {**run, "training_key": keys[name]}
                _write_concept(out_dir / name, spec, lat, where, result, mine, run_id)
                # kept once: a resume that found its checkpoints at the end would keep its own "0 steps, 0 s"
                if checkpoint_root and (result.steps_run or not trainings.kept(checkpoint_root, keys[name])):
                    trainings.keep(out_dir / name, checkpoint_root, keys[name])
            status[name].update(status="trained", stage="train")
    rows = [status[name] for name, _, _ in members]
    if main:
        (out_dir / GROUP_FILE).write_text(json.dumps(rows, indent=2))
    return rows
