"""The `train` step: cached latents + hyperparameters in, embedding files + checkpoints + curves out.

Output folder layout (one concept):

    learned_embeds.safetensors   diffusers format (loads with load_textual_inversion)
    a1111/<token>.pt             A1111 format
    kohya/<token>.safetensors    kohya format
    checkpoints/step-*.pt        every `checkpoint_every` steps (resume from the newest)
    curve.json                   loss and embedding norm every `log_every` steps
    summary.json                 config, concept, model fingerprint, timing
"""

from __future__ import annotations

import json
import logging
import platform
from collections.abc import Sequence
from pathlib import Path

import torch

from oneword import __version__
from oneword import embeddings as emb_io
from oneword.errors import OnewordError
from oneword.inversion import ConceptSpec, InversionTrainer, MetricsCallback, TrainConfig, TrainResult
from oneword.latents import LatentSet
from oneword.models import BaseModel, load_base_model

log = logging.getLogger(__name__)

CURVE_FILE, SUMMARY_FILE = "curve.json", "summary.json"


def write_embedding_files(emb: emb_io.Embedding, out_dir: Path) -> dict[str, Path]:
    """Write one embedding in every format into `out_dir`; returns {format: path}."""
    stem = emb_io.default_filename(emb.token, "kohya").removesuffix(".safetensors")
    paths = {
        "diffusers": out_dir / "learned_embeds.safetensors",
        "a1111": out_dir / "a1111" / f"{stem}.pt",
        "kohya": out_dir / "kohya" / f"{stem}.safetensors",
    }
    for fmt, p in paths.items():
        emb_io.save(emb, p, fmt)  # type: ignore[arg-type]
    return paths


def train(
    latents_dir: Path,
    out_dir: Path,
    concept: ConceptSpec,
    config: TrainConfig = TrainConfig(),
    base_model: str | BaseModel | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    callbacks: Sequence[MetricsCallback] = (),
    progress: bool = True,
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

    Returns:
        The `TrainResult`.
    """
    latents = LatentSet.load(Path(latents_dir))
    source = base_model if base_model is not None else latents.meta.get("model_source")
    if source is None:
        raise OnewordError(f"{latents_dir} does not record its base model", hint="pass --base-model")
    model = source if isinstance(source, BaseModel) else load_base_model(source, parts=("unet",))
    recorded = latents.meta.get("model_fingerprint")
    if recorded and recorded != model.fingerprint:
        log.warning(
            "latents were encoded for model %s… but training uses %s…; fine only if they share a VAE",
            recorded[:19],
            model.fingerprint[:19],
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint_dir if checkpoint_dir is not None else out_dir / "checkpoints"
    trainer = InversionTrainer(model, [(concept, latents)], config)
    log.info(
        "training %s (init %r, %d vector(s)) for %d steps at lr %g on %s",
        concept.token,
        concept.init_word,
        concept.n_vectors,
        config.steps,
        config.lr,
        trainer.device,
    )
    result = trainer.run(ckpt, resume=resume, callbacks=callbacks, progress=progress)
    files = write_embedding_files(result.embeddings[0], out_dir)
    (out_dir / CURVE_FILE).write_text(json.dumps(result.curve))
    summary = {
        "concept": concept.model_dump(),
        "config": config.model_dump(),
        "learning_rate_used": config.lr,
        "model_source": model.source,
        "model_fingerprint": model.fingerprint,
        "image_sha256": latents.image_sha256,
        "steps": result.steps,
        "seconds": result.seconds,
        "steps_per_second": result.steps_per_second,
        "final_loss": result.curve[-1]["loss"] if result.curve else None,
        "embedding_norm": result.curve[-1]["embedding_norm"] if result.curve else None,
        "last_checkpoint": result.last_checkpoint,
        "checkpoint_dir": str(ckpt),
        "files": {k: str(v.relative_to(out_dir)) for k, v in files.items()},
        "device": str(trainer.device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "oneword_version": __version__,
    }
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    return result
