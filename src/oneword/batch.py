"""Batch personalisation: the concepts manifest, one concept's whole run, and what became of each concept.

The manifest is YAML, at a local path or an `s3://` URI:

    concepts:
      - images: s3://oneword-data/concepts/my-cat/   # folder or prefix of 3-5 photos
        token: "<my-cat>"
        init_word: cat
        name: my-cat          # optional: registered-model name (default: from the token)
        n_vectors: 1          # optional
        templates: object     # optional: object or style
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import yaml
from pydantic import BaseModel as Schema
from pydantic import ConfigDict, Field, ValidationError

from oneword import storage
from oneword.errors import OnewordError


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


def personalise(
    entry: ConceptEntry, settings: BatchSettings, work_dir: Path, tracking_uri: str | None, batch_id: str
) -> dict:
    """Run one concept through preprocess -> cache_latents -> train -> evaluate -> register, never raising.

    A concept that fails (bad images, a NaN loss, ...) is reported with the stage and the error, so the other
    concepts of its shard and batch go on. A concept already registered in this batch (a retried shard) is
    not registered twice.

    Returns:
        `{"token", "name", "status": "registered"|"failed", "stage", "error", "version", "alias"}`.
    """
    import traceback

    from oneword.evaluation import EvalConfig, evaluate
    from oneword.evaluation.gate import GateThresholds
    from oneword.images import preprocess
    from oneword.inversion import ConceptSpec, TrainConfig
    from oneword.latents import cache_latents
    from oneword.registry import concept_name, list_concepts, record_failure, register
    from oneword.train import train

    s = settings
    name = entry.name or concept_name(entry.token)
    status = {
        "token": entry.token,
        "name": name,
        "status": "failed",
        "stage": "",
        "error": "",
        "version": None,
        "alias": None,
    }
    done = [r for r in list_concepts(tracking_uri) if r["name"] == name and r.get("batch_id") == batch_id]
    if batch_id and done:
        return {
            **status,
            "status": "registered",
            "stage": "register",
            "version": done[-1]["version"],
            "alias": ",".join(done[-1]["aliases"]),
        }
    root = Path(work_dir) / name
    try:
        status["stage"] = "preprocess"
        preprocess(entry.images, root / "dataset", resolution=s.resolution, mode=s.mode)  # type: ignore[arg-type]
        status["stage"] = "cache_latents"
        import torch

        cache_latents(
            root / "dataset", s.base_model, root / "latents", device="cuda" if torch.cuda.is_available() else "cpu"
        )
        status["stage"] = "train"
        ckpt = f"{s.checkpoint_root.rstrip('/')}/{batch_id}/{name}" if s.checkpoint_root else None
        train(
            root / "latents",
            root / "model",
            ConceptSpec(
                token=entry.token, init_word=entry.init_word, n_vectors=entry.n_vectors, templates=entry.templates
            ),
            TrainConfig(
                steps=s.steps,
                batch_size=s.batch_size,
                learning_rate=s.learning_rate,
                scale_lr=s.scale_lr,
                progressive_every=s.progressive_every,
                init_l2=s.init_l2,
                seed=s.seed,
                checkpoint_every=s.checkpoint_every,
            ),
            base_model=s.base_model,
            checkpoint_dir=ckpt,
            resume=True,
            progress=False,
        )
        status["stage"] = "evaluate"
        evaluate(
            root / "model",
            root / "dataset",
            root / "evaluation",
            EvalConfig(
                prompt_set=s.prompt_set,
                n_images=s.n_images,
                steps=s.sampling_steps,
                guidance_scale=s.guidance_scale,
                clip_model=s.clip_model,
                dino_model=s.dino_model,
                checkpoint_budget=s.checkpoint_budget,
            ),
        )
        status["stage"] = "register"
        r = register(
            root / "model",
            root / "evaluation",
            tracking_uri,
            name=name,
            experiment=s.experiment,
            thresholds=GateThresholds(s.min_reconstruction, s.min_editability),
            batch_id=batch_id,
        )
        status.update({"status": "registered", "version": r.version, "alias": r.alias})
    except OnewordError as e:
        status["error"] = str(e)
    except Exception as e:  # one concept's crash must not take the batch down; the trace goes to the log
        status["error"] = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    if status["status"] == "failed":
        try:
            record_failure(tracking_uri, name, entry.token, batch_id, status["stage"], status["error"], s.experiment)
        except Exception:  # the tracking server may be what failed; the shard's output still has the status
            traceback.print_exc()
    return status
