"""Preflight: check, in seconds and before any GPU work, everything the later steps will need.

The base model resolves and has its parts; the CLIP evaluator exists (at its path, its s3:// prefix, on the hub);
the tracking server answers and the experiment takes writes; the buckets answer with the credentials given;
each token is new to the tokenizer and each initializer one token. Metadata only (config files, a tokenizer),
never a model load. Every problem is listed at once, each with what to do.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from unittest.mock import patch  # the stdlib's scoped os.environ change

from oneword import hub, storage
from oneword.errors import OnewordError, TransientError
from oneword.images import IMAGE_SUFFIXES, UNREADABLE_SUFFIXES, opens, visible_files
from oneword.outcome import transient
from oneword.profiles import TOYWORLD_CLIP, ModelProfile, profile
from oneword.toyworld import assets

log = logging.getLogger(__name__)

TRACKING_TIMEOUT_S = "5"  # seconds a tracking server has to answer


class Problems:
    """What preflight found, each problem with its fix."""

    def __init__(self) -> None:
        self.found: list[tuple[str, str]] = []
        self.passed: list[str] = []
        self.weather: list[bool] = []  # per problem found: a server that did not answer (a later try may pass)

    def check(self, name: str, problem: str | None, hint: str = "", weather: bool = False) -> None:
        if problem:
            self.found.append((problem, hint))
            self.weather.append(weather)
        else:
            self.passed.append(name)

    def attempt(self, name: str, fn, *args):
        """`fn(*args)`, or None when it raises, which is then a problem of `name`: one check that fails to run
        (a denied bucket, an unreadable tokenizer) is listed beside the others instead of ending the preflight."""
        try:
            return fn(*args)
        except Exception as e:  # storage, hub and parsing errors come in many types
            message = e.message if isinstance(e, OnewordError) else f"{type(e).__name__}: {e}"
            hint = e.hint if isinstance(e, OnewordError) else "see the other problems listed; they may be its cause"
            self.check(name, f"{name} could not be checked: {message}", hint, transient(e))
            return None

    def run(self, name: str, find, *args) -> bool:
        """`check` what `find(*args)` returns, (problem, hint); True when it passed."""
        problem = self.attempt(name, find, *args)
        if problem is not None:
            self.check(name, *problem)
        return problem is not None and not problem[0]

    def raise_if_any(self) -> None:
        """Raise the problems found as one error: a `TransientError` where each was a server that did not answer
        (a store or hub restarting), which a step tries again (`outcome.retrying`) rather than lose the night."""
        if self.found:
            lines = "\n".join(f"  - {p}" + (f" (fix: {h})" if h else "") for p, h in self.found)
            kind = TransientError if all(self.weather) else OnewordError
            raise kind(
                f"preflight found {len(self.found)} problem(s), before any training:\n{lines}",
                hint="fix these and run again; nothing was trained or registered",
            )


def preflight(
    base_model: str,
    concepts: Sequence[dict] = (),
    clip_model: str = "auto",
    tracking_uri: str | None = "",
    experiment: str = "oneword",
    checkpoint_root: str = "",
    prompt_set: str = "",
    dino_model: str = "",
    writes: bool = True,
) -> list[str]:
    """Check what the pipeline's steps will need. Returns the checks that passed.

    Args:
        base_model: the model reference (`toyworld`, a folder, a single file, `s3://`, a hub id).
        concepts: planned concepts (images, token, init_word, optional n_vectors); empty: shared checks only.
        clip_model: the evaluator (`auto`: the base model's profile's).
        tracking_uri: MLflow tracking URI (empty: `$MLFLOW_TRACKING_URI`, else ./mlflow.db; None: not checked,
            as when submitting to a cluster whose server only the cluster reaches).
        experiment: the MLflow experiment the concepts go to.
        checkpoint_root: folder or `s3://` prefix for checkpoints (empty: none to check).
        prompt_set: the evaluation's prompt set, a name or a file (empty: the profile's, always there).
        dino_model: the DINO evaluator (empty: none).
        writes: check that the tracking server takes writes (it makes the experiment, or tags it); False: that it
            answers, writing nothing (a dry run).

    Raises:
        OnewordError: listing every problem found, each with its fix; a `TransientError` where every one was a
            server that did not answer.
    """
    t0 = time.perf_counter()
    p = Problems()
    prof: ModelProfile | None = None
    if p.run("base model", _base_model_problem, base_model):
        prof = p.attempt("the base model's profile", profile, base_model)  # read once: on s3, four downloads
    clip = prof.clip_model if clip_model in ("auto", "") and prof is not None else clip_model
    if clip not in ("auto", ""):
        p.run("evaluator", _evaluator_problem, clip)
    if dino_model:
        p.run("DINO evaluator", _evaluator_problem, dino_model, "DINO")
    if prompt_set:
        p.run("prompt set", _prompt_set_problem, prompt_set)
    names = sorted({c["name"] for c in concepts if c.get("name")})
    if tracking_uri is not None and p.run("tracking", _tracking_problem, tracking_uri, experiment, writes) and names:
        p.run("registered names", _names_problem, tracking_uri, names)
    for bucket in sorted(_buckets(base_model, clip, dino_model, checkpoint_root, *(c["images"] for c in concepts))):
        p.run(f"bucket {bucket}", _bucket_problem, bucket)
    for c in concepts:
        label = c["token"] or repr(c["token"])  # an empty token is named as such, not as ": image folder ..."
        p.run(f"images of {label}", images_problem, c["images"], label)
    if concepts and prof is not None:
        for name, problem in p.attempt("the tokens", _concept_problems, base_model, prof, concepts) or []:
            p.check(name, problem)
    p.raise_if_any()
    log.info("preflight passed in %.1f s: %s", time.perf_counter() - t0, ", ".join(p.passed))
    return p.passed


def _base_model_problem(base_model: str) -> tuple[str | None, str]:
    if storage.is_s3(base_model):
        if not storage.object_exists(f"{base_model.rstrip('/')}/model_index.json"):
            return f"base model {base_model}: no model_index.json under that prefix", "upload a diffusers folder there"
        return None, ""
    if hub.is_repo_id(base_model):
        if hub.small_file(base_model, "model_index.json") is None:
            return (
                f"base model {base_model!r} is neither a local folder nor reachable on the hub",
                "pass a local diffusers folder, an s3:// folder, or run where the hub (or its cache) is reachable",
            )
        return None, ""
    from oneword.models import folder_problems, resolve

    try:
        where = Path(resolve(base_model))
    except OnewordError as e:
        return e.message, e.hint or ""
    if problems := folder_problems(where):
        fix = "pass a complete diffusers folder; one whose download was cut short: download it again"
        return f"base model {where}: {'; '.join(problems)}", fix
    return None, ""


def _evaluator_problem(ref: str, kind: str = "CLIP") -> tuple[str | None, str]:
    option, shipped = ("--clip-model", TOYWORLD_CLIP) if kind == "CLIP" else ("--dino-model", assets.DINO_NAME)
    hint = f"pass {option} with a local {kind} folder, an s3:// folder, a hub id you can reach, or {shipped}"
    if kind == "DINO":
        hint += "; or leave it empty to skip DINO"
    if ref == TOYWORLD_CLIP:
        ok = (assets.clip_path() / "config.json").is_file()
    elif ref == assets.DINO_NAME:
        ok = (assets.dino_path() / "config.json").is_file()
    elif storage.is_s3(ref):
        ok = storage.object_exists(f"{ref.rstrip('/')}/config.json")
    elif Path(ref).expanduser().exists():
        ok = (Path(ref).expanduser() / "config.json").is_file()
    else:
        ok = hub.small_file(ref, "config.json") is not None
    return (None, "") if ok else (f"the {kind} evaluator {ref!r} cannot be found or reached", hint)


def _prompt_set_problem(prompt_set: str) -> tuple[str | None, str]:
    from oneword.evaluation.prompts import get_prompt_set

    try:
        get_prompt_set(prompt_set)
    except OnewordError as e:
        return f"prompt set {prompt_set!r}: {e.message}", e.hint or ""
    return None, ""


def _tracking_problem(tracking_uri: str, experiment: str, writes: bool = True) -> tuple:
    from mlflow import MlflowClient

    from oneword import tracking

    uri = tracking.ensure_store(tracking_uri or None) if writes else tracking.existing_store(tracking_uri or None)
    try:
        # MLflow's own default retries a server that is down for minutes
        quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": TRACKING_TIMEOUT_S}
        with patch.dict(os.environ, quick):
            client = MlflowClient(uri)
            exp = client.get_experiment_by_name(experiment)
            if exp is not None and exp.lifecycle_stage == "deleted":
                return f"MLflow experiment {experiment!r} is deleted", "restore it or pass another --experiment"
            if not writes:
                return None, ""
            if exp is None:  # made as the registry makes it (a local store's artifacts beside its database)
                client.create_experiment(experiment, artifact_location=tracking.local_artifact_root(uri))
            else:
                client.set_experiment_tag(exp.experiment_id, "oneword.preflight", str(int(time.time())))
    except Exception as e:  # unreachable, refused, unauthorised: the message says which
        why = tracking.said(e, 200)
        return (
            f"the MLflow tracking server {why}" if why.startswith(("http://", "https://"))
            else f"the MLflow tracking server {uri} does not take writes to {experiment!r}: {why}",
            "check --tracking-uri (or MLFLOW_TRACKING_URI) and MLFLOW_TRACKING_USERNAME/PASSWORD",
            transient(e),
        )
    return None, ""


def _names_problem(tracking_uri: str, names: Sequence[str]) -> tuple[str | None, str]:
    """Whether the registry holds a concept's name as no concept (a bundle, another tool's model): its register
    would fail after the GPU work."""
    from mlflow import MlflowClient

    from oneword import tracking
    from oneword.registry import name_taken

    client = MlflowClient(tracking.resolve(tracking_uri or None))
    with patch.dict(os.environ, {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                                 "MLFLOW_HTTP_REQUEST_TIMEOUT": TRACKING_TIMEOUT_S}):  # fmt: skip
        taken = [e for e in (name_taken(client, n) for n in names) if e is not None]
    return (taken[0].message, taken[0].hint) if taken else (None, "")


def _buckets(*uris: str) -> set[str]:
    return {storage.split_s3(u)[0] for u in uris if u and storage.is_s3(u)}


CHECK_TIMEOUT_S = 10.0  # a check's answer is small: an endpoint silent this long does not answer


def _bucket_problem(bucket: str) -> tuple:
    try:
        if storage.client(read_timeout=CHECK_TIMEOUT_S).bucket_exists(bucket):
            return None, ""
        return f"bucket {bucket!r} does not exist", "create it (docs/deploy.md) or fix the s3:// URI"
    except Exception as e:
        return (
            f"bucket {bucket!r} does not answer: {str(e).splitlines()[0][:200]}",
            "check S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
            transient(e),
        )


def images_problem(images: str, token: str) -> tuple[str | None, str]:
    """What is wrong with a concept's photo folder or s3:// prefix, and its fix; (None, "") if nothing."""
    if storage.is_s3(images):
        try:
            names = [Path(k) for k, _, _ in storage.list_objects(images)]
            names = [k for k in names if not any(part.startswith(".") for part in k.parts)]  # as preprocess
        except Exception as e:
            if not _bucket_problem(storage.split_s3(images)[0])[0]:  # the bucket answers, yet its listing fails
                return f"{token}: cannot list {images}: {str(e).splitlines()[0][:200]}", (
                    "give the pipelines' S3 user s3:ListBucket on that bucket"
                )
            return None, ""  # the bucket's own check says why
    else:
        folder = Path(images).expanduser()
        if folder.is_file():
            return f"{token}: {images} is a file", "pass the folder of the concept's photos"
        if not folder.is_dir():
            return f"{token}: image folder {images} does not exist", "pass the folder or s3:// prefix of its photos"
        names = [n for n in visible_files(folder) if n.exists()]  # as preprocess finds them, less broken links
    pictures = [n for n in names if n.suffix.lower() in IMAGE_SUFFIXES]
    if pictures and (storage.is_s3(images) or any(opens(n) for n in pictures[:PICTURES_TRIED])):
        return None, ""
    if pictures:  # (a local folder's) named as pictures, and none is one: preprocess would read none, a minute on
        return f"{token}: no file in {images} is a picture Pillow can read ({pictures[0].name}, ...)", (
            "put 3-5 photos of the concept there (JPEG, PNG, WebP, ...)"
        )
    if unreadable := sorted({n.suffix.lower() for n in names} & set(UNREADABLE_SUFFIXES)):
        return f"{token}: the photos in {images} are {unreadable[0]} files, which cannot be read", (
            UNREADABLE_SUFFIXES[unreadable[0]]
        )
    return f"{token}: no images in {images}", "put 3-5 photos of the concept there"


PICTURES_TRIED = 50  # a folder's files opened (their headers only) before its photos are judged unreadable


def _concept_problems(base_model: str, prof: ModelProfile, concepts: Sequence[dict]) -> list[tuple[str, str | None]]:
    """Each token new to the model's tokenizer, each initializer one token (the tokenizer only, no model)."""
    from pydantic import ValidationError

    from oneword.config import ConceptSpec
    from oneword.inversion import concept_problems

    tokenizer = _tokenizer(base_model)
    out = []
    for c in concepts:
        try:
            spec = ConceptSpec(
                token=c["token"],
                init_word=c["init_word"],
                n_vectors=c.get("n_vectors", 1),
                templates=c.get("templates"),
            ).resolved(prof)
        except ValidationError as e:  # a vector count of 0, an empty token: this concept's, the others still checked
            from oneword.batch import field_problems

            out.append((f"token {c.get('token')!r}", f"{c.get('token')!r}: {'; '.join(field_problems(e))}"))
            continue
        except OnewordError as e:  # an unknown template set
            out.append((f"token {c.get('token')!r}", f"{c.get('token')!r}: {e.message}"))
            continue
        problems = concept_problems(tokenizer, spec)
        out += [(f"token {spec.token}", e.message + (f" (fix: {e.hint})" if e.hint else "")) for e in problems]
        if not problems:
            out.append((f"token {spec.token}", None))
    return out


def _tokenizer(base_model: str):
    import tempfile

    from transformers import CLIPTokenizer

    from oneword.models import resolve

    if storage.is_s3(base_model):
        with tempfile.TemporaryDirectory() as tmp:
            return CLIPTokenizer.from_pretrained(
                storage.download_prefix(f"{base_model.rstrip('/')}/tokenizer", Path(tmp))
            )
    where = resolve(base_model)
    if Path(where).is_file():  # a single-file checkpoint holds no tokenizer: SD 1.x, 2.x and SDXL all use CLIP's
        from oneword.tokenizer import load_clip_tokenizer

        return load_clip_tokenizer()
    return CLIPTokenizer.from_pretrained(where, subfolder="tokenizer")
