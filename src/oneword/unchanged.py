"""Which planned concepts a run must train: the others are their newest versions again, and ask for no GPU.

A concept whose newest registered version came from the same photos, spec, model and settings, evaluated and
judged the same way, would be trained (or taken from the kept trainings), evaluated and registered to no new
version: on a cluster, that is a cache_latents, a train and an evaluate pod on the GPU pool, each pulling the
CUDA image and loading the model, to learn that nothing changed. A nightly batch of a catalogue that mostly stays
the same paid that for every concept, every night.

`changed_concepts` computes on CPU, before any GPU step, the key register gave that version (`protocol.result_key`
of the `evaluation_key` of `train.training_key`): the photos preprocessed as `preprocess` will (into a scratch
folder), the model's fingerprint from its tokenizers, text encoders and UNet config only, the settings resolved
by the model's profile as `train` resolves them. In a batch, a concept that one of its steps would fail at every
attempt (photos that do not read, at preprocess; a token the model already has, at train) is recorded as failed at
that step right there. What it cannot compute (a single-file checkpoint, which loads only whole; a registry that
does not answer; photos a retry may yet read) counts as changed: that concept takes the usual path, where `train`
and `evaluate` still find it unchanged, or fail and say why. A wrong "changed" costs pods, never a result.

Where only the quality gate changed, the newest version's recorded scores are judged by the new one on CPU
(`registry.rejudged_result`): a concept whose twin would take no alias is unchanged too.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from oneword import outcome, storage, tracking
from oneword.batch import JUDGED_KEY, spec_of
from oneword.batch_records import note_unchanged, note_unchanged_in_plan, record_failure
from oneword.config import EvalConfig, GateThresholds, TrainConfig
from oneword.errors import OnewordError
from oneword.evaluation.protocol import evaluation_key, result_key
from oneword.images import Manifest, preprocess
from oneword.inversion import check_concept, check_progressive
from oneword.model_files import model_keys
from oneword.models import SINGLE_FILE_SUFFIXES, LoadedModel, load_base_model, recorded_source
from oneword.profiles import image_side, profile_of
from oneword.registry import EXPERIMENT, name_taken, unchanged_result
from oneword.templates import get_templates
from oneword.train import model_identity, training_key

log = logging.getLogger(__name__)

# What the fingerprint and the profile read of a diffusers folder: an s3:// model is fetched without its UNet's
# and VAE's weights
FINGERPRINT_PARTS = (
    "model_index.json",
    "tokenizer/",
    "tokenizer_2/",
    "text_encoder/",
    "text_encoder_2/",
    "unet/config.json",
    "vae/config.json",
    "scheduler/",
)


# JUDGED_KEY (`oneword.batch`) is set on a concept the lookup found changed: a later lookup of the same run (a
# batch's shard, after its plan) takes it as told and asks nothing again, so a shard of such concepts loads no
# model on CPU


@dataclass(frozen=True)
class Settings:
    """What a run is given for every concept: the model (as the steps are given it), preprocess's resolution
    (None: the model's profile) and mode, and the settings train, evaluate and register are given (the profile
    fills them in here, as there)."""

    base_model: str
    train: TrainConfig
    evaluation: EvalConfig
    gate: GateThresholds
    resolution: int | None = None
    mode: str = "crop"


@dataclass
class Lookup:
    """What the lookup told of a run's planned concepts, each by name."""

    keys: dict[str, str] = field(default_factory=dict)  # the result key register would give it now
    evaluations: dict[str, str] = field(default_factory=dict)  # the evaluation key evaluate would give it now
    # the version it is again: {"version", "aliases"}, and "rejudged" where only the gate changed
    found: dict[str, dict] = field(default_factory=dict)
    unknown: dict[str, str] = field(default_factory=dict)  # why it could not be told (it counts as changed)
    # the error every attempt of one of its steps would meet, as that step records it: {"stage", "error"}
    failing: dict[str, dict[str, str]] = field(default_factory=dict)


def _encoders(base_model: str) -> LoadedModel | None:
    """The model's tokenizers and text encoders (fp16: the fingerprint is taken in fp16), or None for a
    single-file checkpoint, which diffusers loads only whole (UNet and VAE too: more than a CPU step has)."""
    if base_model.lower().endswith(SINGLE_FILE_SUFFIXES):
        return None
    if storage.is_s3(base_model):
        base_model = str(storage.download_prefix(base_model, only=FINGERPRINT_PARTS, cache=storage.model_cache_root(),
                                                  pick=model_keys))
    return load_base_model(base_model, parts=(), encoder_dtype=torch.float16)


# Concepts whose photos the lookup downloads and preprocesses ahead, in threads, while it keys the one before (the
# tokenizer's checks stay on one thread: a fast tokenizer is not safe to share across threads). Downloads wait on
# the object store and Pillow decodes outside the GIL: a catalogue's plan took one concept's round trips and
# decoding after the other's. Two decode at once: the plan pod's two CPUs (cpu_step_cpu_limit), and twice the
# memory of one concept's photos (a 100-megapixel photo decodes to 300 MB, and its rotated copy as much) beside the
# text encoders, within cpu_step_memory_limit.
LOOKUP_AHEAD, LOOKUP_DECODING = 4, 2


def _ahead(fn: Callable[[int], Any], items: range, window: int) -> Iterator[Future]:
    """`fn(item)` for each of `items` in `window` threads, at most `window` items ahead of the one the caller holds:
    the futures, in the items' order."""
    with ThreadPoolExecutor(window, thread_name_prefix="oneword-lookup") as pool:
        pending = deque(pool.submit(fn, item) for item in items[:window])
        for item in items[window:]:
            yield pending.popleft()
            pending.append(pool.submit(fn, item))
        yield from pending


def result_keys(
    concepts: list[dict],
    settings: Settings,
) -> Lookup:
    """Each planned concept's result key (`protocol.result_key`), as register would give its version if the run
    trained, evaluated and judged it now.

    Args:
        concepts: planned concepts (`batch.plan_concepts`).
        settings: what the run is given for every concept.

    Returns:
        `keys`, `unknown` and `failing` told.
    """
    base_model = settings.base_model
    try:
        model = _encoders(base_model)
        if model is None:
            why = "a single-file checkpoint loads only whole: the GPU steps tell"
        else:
            profile = profile_of(model)
            config = settings.train.resolved(profile)
            side = image_side(base_model, settings.resolution)
            model_id = model_identity(model.fingerprint, recorded_source(base_model))  # as train records it
    except Exception as e:  # train meets it and says so
        why = f"{base_model} did not load ({type(e).__name__}: {e})"
        model = None
    if model is None:
        log.warning("cannot tell which concepts changed: %s", why)
        return Lookup(unknown={c["name"]: why for c in concepts})
    told = Lookup()
    scratch_log = logging.getLogger(preprocess.__module__)
    level = scratch_log.level
    scratch_log.setLevel(max(level, logging.WARNING))  # "preprocessed into /tmp/...": a folder deleted at once
    try:
        with tempfile.TemporaryDirectory(prefix="oneword-unchanged-") as scratch:
            decoding = threading.BoundedSemaphore(LOOKUP_DECODING)

            def photos_of(i: int) -> Manifest:
                # a concept's photos go beside its scratch dataset, deleted once keyed: a batch's plan looks at a
                # whole catalogue's on the ephemeral disk of one pod, and holds LOOKUP_AHEAD concepts' at most
                here = Path(scratch) / str(i)
                return preprocess(concepts[i]["images"], here / "dataset", resolution=side, mode=settings.mode,
                                  download_dir=here / "photos", decoding=decoding)  # fmt: skip

            for i, preprocessed in enumerate(_ahead(photos_of, range(len(concepts)), LOOKUP_AHEAD)):
                concept = concepts[i]
                name, at = concept["name"], "preprocess"
                here = Path(scratch) / str(i)
                try:
                    photos = preprocessed.result()
                    at = "settings"  # a templates file this machine cannot read the GPU pod may: not told
                    spec = spec_of(concept).resolved(profile)
                    get_templates(spec.templates)
                    at = "train"  # what train checks of each concept against the model before any work
                    check_concept(model.tokenizer, spec)
                    check_progressive(spec, config)
                    at = "key"
                    trained = training_key(spec, [r.processed_sha256 for r in photos.images], config, model_id)
                    told.evaluations[name] = evaluation_key(trained, settings.evaluation)
                    told.keys[name] = result_key(told.evaluations[name], settings.gate)
                except Exception as e:  # its own step meets it and records it as the concept's
                    why = getattr(e, "message", None) or f"{type(e).__name__}: {e}"
                    if at in ("preprocess", "train") and isinstance(e, OnewordError) and not outcome.transient(e):
                        # no photo reads, say, or a token clashes
                        told.failing[name] = {"stage": at, "error": why, "hint": e.hint or ""}
                        log.warning("%s will fail at %s (%s)", name, at, why)
                    else:
                        told.unknown[name] = why
                        log.warning("cannot tell whether %s changed (%s)", name, why)
                finally:
                    shutil.rmtree(here, ignore_errors=True)
    finally:
        scratch_log.setLevel(level)
    return told


def unchanged_versions(
    concepts: list[dict],
    settings: Settings,
    tracking_uri: str | None = None,
) -> Lookup:
    """The planned concepts a run would find unchanged: the version each would be again (`{"version",
    "aliases"}`, `registry.unchanged_result` of its `result_keys`), in `found`; where only the gate changed, the
    version whose scores, judged again, would move no alias (`registry.rejudged_result`). Nothing is recorded.

    A registry that does not answer is asked once, with one retry, not with MLflow's minutes of backoff per
    concept: the concepts not yet asked count as changed.

    Args:
        tracking_uri: the registry's MLflow tracking URI.
        Others: as for `result_keys`.
    """
    told = result_keys(concepts, settings)
    with tracking.briefly():
        for i, concept in enumerate(concepts):
            name = concept["name"]
            if name not in told.keys:
                continue
            try:
                if (taken := name_taken(tracking.client(tracking_uri)[1], name)) is not None:
                    told.failing[name] = {"stage": "register", "error": taken.message, "hint": taken.hint}
                    continue
                hit = unchanged_result(tracking_uri, name, told.keys[name], told.evaluations[name], settings.gate,
                                       concept["token"])  # fmt: skip
            except Exception as e:  # the steps meet the store as it is, and evaluate asks again
                why = f"the registry did not answer ({type(e).__name__}: {e})"
                log.warning("%s: %d concepts count as changed", why, len(concepts) - i)
                told.unknown.update({c["name"]: why for c in concepts[i:] if c["name"] in told.keys})
                break
            if hit is not None:
                told.found[name] = hit
    return told


def changed_concepts(
    concepts: list[dict],
    settings: Settings,
    tracking_uri: str | None = None,
    batch_id: str = "",
    experiment: str = EXPERIMENT,
    run_tags: dict[str, str] | None = None,
    on_error: outcome.OnError = "fail",
    plan_run_id: str | None = None,
) -> list[dict]:
    """The planned concepts that must be trained, evaluated and registered, in order (those found changed marked
    `JUDGED_KEY`, which a later call takes as told: a batch's shards after its plan). Each of the others
    (`unchanged_versions`) is recorded as that version again (`batch_records.note_unchanged`), where the run's report
    finds it. With `on_error="record"` (a batch), a concept that one of its steps would fail at every attempt
    (`Lookup.failing`: none of its photos reads, its token is already a word of the model) is recorded as failed
    at that step, with that error, as the step would record it: no GPU pod starts to pass the failure on.

    Args:
        concepts: planned concepts (`batch.plan_concepts`).
        tracking_uri: the registry's MLflow tracking URI.
        batch_id: the run's id, recorded with each unchanged concept.
        experiment: MLflow experiment.
        run_tags: more tags for those records (the KFP run's).
        on_error: fail (the steps meet every error and fail the run) or record.
        plan_run_id: a batch's plan (`batch_records.record_plan`): the unchanged concepts are recorded there, all
            in one (`batch_records.note_unchanged_in_plan`), not as a run each: a catalogue of a thousand
            concepts checked every night would add a thousand runs a night to the experiment.
        Others: as for `result_keys`.
    """
    asked = [c for c in concepts if not c.get(JUDGED_KEY)]
    told = unchanged_versions(asked, settings, tracking_uri) if asked else Lookup()
    todo, kept = [], {}
    with tracking.briefly():
        for concept in concepts:
            name = concept["name"]
            if concept.get(JUDGED_KEY):  # told by this run's plan
                todo.append(concept)
                continue
            try:
                if name in told.found and plan_run_id:
                    kept[name] = concept
                    continue
                if name in told.found:
                    note_unchanged(tracking_uri, name, concept["token"], told.found[name], batch_id, experiment,
                                   run_tags)  # fmt: skip
                    continue
                if name in told.failing and on_error == "record":
                    why = told.failing[name]
                    record_failure(tracking_uri, name, concept["token"], batch_id, why["stage"], why["error"],
                                   experiment, run_tags, why.get("hint", ""))  # fmt: skip
                    continue
            except Exception as e:  # the steps meet it again, and record it
                log.warning("could not record what became of %s (%s)", name, e)
            # not merely "could not be told", nor unchanged but not recorded as such
            changed = name in told.keys and name not in told.unknown and name not in told.found
            todo.append({**concept, JUDGED_KEY: True} if changed else concept)
        if kept:  # a store that does not take it fails the plan, which is retried: sent to the GPU steps, the
            # unchanged concepts would count against the run's limit and hold the changed ones back
            note_unchanged_in_plan(tracking_uri, plan_run_id, {n: {**told.found[n], "token": c["token"]}
                                                               for n, c in kept.items()})  # fmt: skip
    log.info("%d of %d concepts to train (the others are unchanged, or would fail)", len(todo),
             len(concepts))
    return todo
