"""Batch personalisation: the concepts manifest, one concept's whole run, and what became of each concept.

The manifest is YAML, at a local path or an `s3://` URI:

    concepts:
      - images: s3://oneword-data/concepts/my-cat/   # folder or prefix of 3-5 photos
        token: "<my-cat>"
        init_word: cat
        name: my-cat          # optional: registered-model name (default: from the token)
        n_vectors: 1          # optional
        templates: object     # optional: object, style, toyworld or a file of templates
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import yaml
from pydantic import BaseModel as Schema
from pydantic import ConfigDict, Field, ValidationError

from oneword import storage
from oneword.errors import OnewordError

log = logging.getLogger(__name__)


class ConceptEntry(Schema):
    """One concept of a batch."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    images: str = Field(description="folder or s3:// prefix of the concept's photos")
    token: str = Field(description="the new pseudo-word")
    init_word: str = Field(description="one-token initializer word")
    name: str = Field("", description="registered-model name (default: from the token)")
    n_vectors: int = Field(1, ge=1)
    templates: str = Field("object")


def shard(entries: list[ConceptEntry], concepts_per_shard: int = 1) -> list[list[dict]]:
    """Group the concepts into shards (one GPU job each) of at most `concepts_per_shard`."""
    k = max(1, concepts_per_shard)
    items = [e.model_dump() for e in entries]
    return [items[i : i + k] for i in range(0, len(items), k)]


def load_concepts_manifest(source: str) -> list[ConceptEntry]:
    """Read and validate a concepts manifest (path or `s3://` URI).

    Returns:
        The entries, in file order.

    Raises:
        OnewordError: naming the entry and field at fault, or a duplicated token or name.
    """
    if storage.is_s3(source):
        with tempfile.TemporaryDirectory() as d:
            text = storage.download_file(source, Path(d) / "manifest.yaml").read_text()
    else:
        p = Path(source)
        if not p.is_file():
            raise OnewordError(f"concepts manifest {source} not found", hint="pass a YAML file or s3:// URI")
        text = p.read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise OnewordError(f"concepts manifest {source} is not valid YAML: {e}") from e
    items = data.get("concepts") if isinstance(data, dict) else None
    if not items:
        raise OnewordError(f"concepts manifest {source} lists no concepts", hint="see `k8s/examples/concepts.yaml`")
    entries = []
    for i, item in enumerate(items):
        try:
            entries.append(ConceptEntry(**item))
        except (ValidationError, TypeError) as e:
            raise OnewordError(f"concept #{i + 1} of {source} is invalid: {e}") from e
    tokens = [e.token for e in entries]
    dupes = sorted({t for t in tokens if tokens.count(t) > 1})
    if dupes:
        raise OnewordError(f"concepts manifest {source} uses tokens {dupes} more than once")
    return entries


def batch_report(tracking_uri: str | None, batch_id: str, entries: list[ConceptEntry]) -> dict:
    """What became of each concept of a batch: registered (name, version, alias) or missing.

    Returns:
        `{"batch_id", "registered": n, "failed": n, "concepts": [{token, name, status, version, alias}]}`.
    """
    from oneword.registry import batch_failures, concept_name, list_concepts

    rows = [r for r in list_concepts(tracking_uri) if r.get("batch_id") == batch_id]
    failures = batch_failures(tracking_uri, batch_id)
    out = []
    for e in entries:
        name = e.name or concept_name(e.token)
        mine = [r for r in rows if r["name"] == name]
        if mine:
            r = mine[-1]
            out.append(
                {
                    "token": e.token,
                    "name": name,
                    "status": "registered",
                    "version": r["version"],
                    "alias": ",".join(r["aliases"]),
                }
            )
        else:
            why = failures.get(name, {})
            out.append(
                {
                    "token": e.token,
                    "name": name,
                    "status": "failed",
                    "version": None,
                    "alias": None,
                    "stage": why.get("stage"),
                    "error": why.get("error"),
                }
            )
    ok = sum(c["status"] == "registered" for c in out)
    return {"batch_id": batch_id, "registered": ok, "failed": len(out) - ok, "concepts": out}


class BatchSettings(Schema):
    """The settings every concept of a batch shares (the batch pipeline's parameters)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    base_model: str = "toyworld"
    resolution: int = 512
    mode: str = "crop"
    steps: int = 5000
    batch_size: int = 4
    learning_rate: float = 0.005
    scale_lr: bool = True
    progressive_every: int = 0
    init_l2: float = 0.0
    seed: int = 0
    checkpoint_every: int = 500
    checkpoint_root: str = ""
    prompt_set: str = "paper"
    n_images: int = 64
    sampling_steps: int = 50
    guidance_scale: float = 5.0
    clip_model: str = "auto"
    dino_model: str = ""
    checkpoint_budget: int = 8
    experiment: str = "oneword"
    min_reconstruction: float = -1.0
    min_editability: float = -1.0


def personalise_shard(
    entries: list[ConceptEntry],
    settings: BatchSettings,
    work_dir: Path,
    tracking_uri: str | None,
    batch_id: str,
) -> list[dict]:
    """Run a shard's concepts through preprocess -> cache_latents -> train (together) -> evaluate -> register.

    The shard's concepts are trained in one batch of K x batch_size (one model load, one GPU kept busy), each
    with its own parameter and early end. A concept that fails at any step (bad photos, a clashing token, a
    non-finite loss) is recorded with the stage and the error, and the others go on. A concept already
    registered in this batch (a rerun shard) is not registered twice; training resumes from the group's
    checkpoints under `checkpoint_root`, which are keyed by what is trained, not by the run.

    Returns:
        Per concept, in order: `{"token", "name", "status": "registered"|"failed", "stage", "error", "version",
        "alias"}`.
    """
    import torch

    from oneword.evaluation import EvalConfig, evaluate
    from oneword.evaluation.gate import GateThresholds
    from oneword.images import preprocess
    from oneword.inversion import ConceptSpec, TrainConfig
    from oneword.latents import cache_latents
    from oneword.outcome import read_failure, run_step
    from oneword.registry import concept_name, list_concepts, record_failure, register
    from oneword.train import train_group

    s, work = settings, Path(work_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    names = [e.name or concept_name(e.token) for e in entries]
    status = {
        n: {"token": e.token, "name": n, "status": "failed", "stage": "", "error": "", "version": None, "alias": None}
        for n, e in zip(names, entries)
    }
    done = {r["name"]: r for r in list_concepts(tracking_uri) if batch_id and r.get("batch_id") == batch_id}
    todo = []
    for n, e in zip(names, entries):
        if n in done:
            status[n].update(
                status="registered", stage="register", version=done[n]["version"], alias=",".join(done[n]["aliases"])
            )
            continue
        root = work / n
        run_step(
            "preprocess",
            root / "dataset",
            "record",
            lambda e=e, root=root: preprocess(e.images, root / "dataset", resolution=s.resolution, mode=s.mode),
        )
        run_step(
            "cache_latents",
            root / "latents",
            "record",
            lambda root=root: cache_latents(root / "dataset", s.base_model, root / "latents", device=device),
            upstream=[root / "dataset"],
        )
        spec = ConceptSpec(token=e.token, init_word=e.init_word, n_vectors=e.n_vectors, templates=e.templates)
        todo.append((n, spec, root / "latents"))
    if todo:
        config = TrainConfig(
            steps=s.steps,
            batch_size=s.batch_size,
            learning_rate=s.learning_rate,
            scale_lr=s.scale_lr,
            progressive_every=s.progressive_every,
            init_l2=s.init_l2,
            seed=s.seed,
            checkpoint_every=s.checkpoint_every,
        )
        train_group(
            todo,
            work / "model",
            config,
            base_model=s.base_model,
            checkpoint_root=s.checkpoint_root or None,
            resume=True,
            progress=False,
        )
    eval_config = EvalConfig(
        prompt_set=s.prompt_set,
        n_images=s.n_images,
        steps=s.sampling_steps,
        guidance_scale=s.guidance_scale,
        clip_model=s.clip_model,
        dino_model=s.dino_model,
        checkpoint_budget=s.checkpoint_budget,
    )
    for n, spec, _ in todo:
        model_dir, eval_dir = work / "model" / n, work / n / "evaluation"
        run_step(
            "evaluate",
            eval_dir,
            "record",
            lambda m=model_dir, d=eval_dir: evaluate(m, None, d, eval_config),
            upstream=[model_dir],
        )
        r = run_step(
            "register",
            work / n / "registration",
            "record",
            lambda m=model_dir, d=eval_dir, n=n: register(
                m,
                d,
                tracking_uri,
                name=n,
                experiment=s.experiment,
                thresholds=GateThresholds(s.min_reconstruction, s.min_editability),
                batch_id=batch_id,
            ),
            upstream=[eval_dir],
        )
        if r is not None:
            status[n].update(status="registered", stage="register", version=r.version, alias=r.alias)
            continue
        failure = read_failure(work / n / "registration") or {"stage": "register", "error": "unknown"}
        status[n].update(stage=failure["stage"], error=failure["error"])
        try:
            record_failure(tracking_uri, n, spec.token, batch_id, failure["stage"], failure["error"], s.experiment)
        except Exception:  # the tracking server may be what failed; the shard's output still has the status
            log.exception("could not record the failure of %s in MLflow", n)
    return [status[n] for n in names]
