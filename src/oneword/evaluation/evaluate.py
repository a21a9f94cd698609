"""The `evaluate` step: score a trained concept the way the paper does, pick a checkpoint, draw the pictures.

Cost is dominated by sampling: (1 + prompts) x N images x DDIM steps, plus the prompt-only baseline. The step
reuses one loaded pipeline for every checkpoint (swapping the token's rows in place), batches prompts
together, and caches CLIP embeddings of the training images and the text targets.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from oneword import checkpoints, storage
from oneword import embeddings as emb_io
from oneword.errors import OnewordError
from oneword.evaluation import prompts as P
from oneword.evaluation.metrics import (
    DEFAULT_CLIP,
    TOYWORLD_CLIP,
    ClipScorer,
    DinoScorer,
    mean_matched_cosine,
    mean_pairwise_cosine,
)
from oneword.evaluation.report import html_report, scatter
from oneword.evaluation.selection import CurvePoint, criterion_text, select_checkpoint
from oneword.generate import SamplerConfig, build_pipeline, load_embeddings, make_grid, sample
from oneword.images import Manifest
from oneword.inversion import resolve_device
from oneword.latents import DATASET_DIR
from oneword.models import LoadedModel, load_base_model
from oneword.storage import atomic_dir
from oneword.tokens import vector_tokens
from oneword.train import SUMMARY_FILE, write_embedding_files

log = logging.getLogger(__name__)

METRICS_FILE, REPORT_FILE, GRID_FILE, SCATTER_FILE = "metrics.json", "report.html", "grid.png", "scatter.png"


class EvalConfig(BaseModel):
    """Evaluation settings. Sampling defaults follow the paper's code: 50 DDIM steps, eta 0, guidance 5.0."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prompt_set: str = Field(
        "paper", description="paper, neti15, dreambench-object, dreambench-live, toyworld or a file"
    )
    n_images: int = Field(64, ge=1, description="images per prompt (the paper: 64)")
    steps: int = Field(50, ge=1, description="DDIM steps")
    guidance_scale: float = Field(5.0, description="classifier-free guidance")
    eta: float = Field(0.0, description="DDIM eta")
    seed: int = Field(0, description="image j of every prompt uses seed + j")
    clip_model: str = Field(
        "auto", description="CLIP evaluator; auto = toyworld-clip for the toy model, else openai/clip-vit-base-patch32"
    )
    dino_model: str = Field("", description="DINO ViT for subject fidelity, e.g. facebook/dino-vits16; empty = skip")
    checkpoint_budget: int = Field(
        8, ge=0, description="images per prompt when scoring each checkpoint; 0 = score the final step only"
    )
    selection_tolerance: float = Field(0.02, ge=0, description="reconstruction slack of the selection rule")
    baselines: bool = Field(True, description="compute the image-only and prompt-only ceilings")
    grid_seeds: int = Field(8, ge=1, description="columns of the sample grid")
    batch_size: int = Field(32, ge=1, description="images per sampling call")
    device: str = Field("auto", description="auto, cpu, cuda, ...")


def _load_summary(train_dir: Path) -> dict:
    p = Path(train_dir) / SUMMARY_FILE
    if not p.exists():
        raise OnewordError(f"{p} not found", hint="evaluate a folder written by `oneword train`")
    return json.loads(p.read_text())


def _checkpoint_list(train_dir: Path, summary: dict) -> list[tuple[int, str]]:
    local = checkpoints.list_checkpoints(Path(train_dir) / "checkpoints")
    if local:
        return local
    recorded = summary.get("checkpoint_dir")
    if recorded and not storage.is_s3(recorded) and not Path(recorded).is_absolute():
        recorded = Path(train_dir) / recorded  # a group's shared checkpoints, beside the concept's folder
    return checkpoints.list_checkpoints(recorded) if recorded else []


class _Session:
    """One loaded pipeline + evaluator, scoring any vectors for the concept's token."""

    def __init__(
        self,
        model: LoadedModel,
        emb: emb_io.Embedding,
        train_images: list[Image.Image],
        cfg: EvalConfig,
        force: bool = False,
    ):
        self.cfg, self.token = cfg, emb.token
        device = str(resolve_device(cfg.device))
        self.pipe = build_pipeline(model, device)
        load_embeddings(self.pipe, model, [emb], force=force)
        self.rows = self.pipe.tokenizer.convert_tokens_to_ids(vector_tokens(emb.token, emb.n_vectors))
        clip_name = cfg.clip_model
        if clip_name == "auto":
            clip_name = TOYWORLD_CLIP if model.source == "toyworld" else DEFAULT_CLIP
        self.clip = ClipScorer(clip_name, device)
        self.dino = DinoScorer(cfg.dino_model, device) if cfg.dino_model else None
        self.train_images = train_images
        self.train_clip = self.clip.images(train_images)
        self.templates = P.get_prompt_set(cfg.prompt_set)
        self.sampler = SamplerConfig(steps=cfg.steps, guidance_scale=cfg.guidance_scale, eta=cfg.eta)
        self.images_generated = 0
        self.sampling_seconds = 0.0

    def set_vectors(self, vectors: torch.Tensor) -> None:
        table = self.pipe.text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            table[self.rows] = vectors.to(table.device, table.dtype)

    def draw(self, prompts: list[str], n: int) -> list[list[Image.Image]]:
        t = time.perf_counter()
        out = sample(self.pipe, prompts, n, self.cfg.seed, self.sampler, batch_size=self.cfg.batch_size)
        self.sampling_seconds += time.perf_counter() - t
        self.images_generated += len(prompts) * n
        return out

    def score(self, vectors: torch.Tensor, n: int) -> dict:
        """Generate n images for the reconstruction prompt and each edit prompt; return scores and images."""
        self.set_vectors(vectors)
        prompts = [P.with_token(P.RECONSTRUCTION, self.token)] + [P.with_token(t, self.token) for t in self.templates]
        images = self.draw(prompts, n)
        rec = mean_pairwise_cosine(self.clip.images(images[0]), self.train_clip)
        per_prompt = []
        for tpl, ims in zip(self.templates, images[1:]):
            target = P.without_token(tpl)
            edit = mean_matched_cosine(self.clip.images(ims), self.clip.texts([target] * len(ims)))
            per_prompt.append({"prompt": P.with_token(tpl, self.token), "text_target": target, "editability": edit})
        editability = sum(p["editability"] for p in per_prompt) / len(per_prompt)
        return {
            "reconstruction": rec,
            "editability": editability,
            "per_prompt": per_prompt,
            "images": images,
            "prompts": prompts,
        }


def evaluate(
    train_dir: Path,
    dataset_dir: Path | None,
    out_dir: Path,
    config: EvalConfig = EvalConfig(),
    base_model: str | LoadedModel | None = None,
    on_images: Callable[[list[str], list[list[Image.Image]]], None] | None = None,
) -> dict:
    """Evaluate a trained concept.

    Args:
        train_dir: folder written by `oneword train` (embedding, checkpoints, summary.json).
        dataset_dir: the preprocessed training images (folder written by `oneword preprocess`); None: the copy
            that `train` keeps in `train_dir/dataset`.
        out_dir: where metrics.json, grid.png, scatter.png, report.html and the selected embedding go.
        config: evaluation settings.
        base_model: default: the model the concept was trained on.
        on_images: called with the final evaluation's prompts and images (reconstruction prompt first), for
            callers that score them further (the toy world's oracle).

    Returns:
        The metrics dict written to `metrics.json`.
    """
    t0 = time.perf_counter()
    summary = _load_summary(train_dir)
    emb = emb_io.load(Path(train_dir) / "learned_embeds.safetensors")
    source = base_model if base_model is not None else summary["model_source"]
    model = source if isinstance(source, LoadedModel) else load_base_model(source)
    dataset_dir = Path(dataset_dir) if dataset_dir is not None else Path(train_dir) / DATASET_DIR
    manifest = Manifest.load(dataset_dir)
    train_images = [Image.open(Path(dataset_dir) / r.file).convert("RGB") for r in manifest.images]
    s = _Session(model, emb, train_images, config, force=base_model is not None)

    curve: list[CurvePoint] = []
    found = _checkpoint_list(train_dir, summary)
    vectors_at = {step: path for step, path in found}
    if config.checkpoint_budget > 0 and len(found) >= 2:
        for step, path in found:
            v = checkpoints.load_checkpoint(path)["vectors"][emb.token]
            r = s.score(v, config.checkpoint_budget)
            curve.append(CurvePoint(step, r["reconstruction"], r["editability"]))
            log.info(
                "checkpoint %d: reconstruction %.4f, editability %.4f", step, r["reconstruction"], r["editability"]
            )
        chosen = select_checkpoint(curve, config.selection_tolerance).step
        vectors = checkpoints.load_checkpoint(vectors_at[chosen])["vectors"][emb.token]
    else:
        chosen, vectors = emb.steps or summary.get("steps", 0), emb.vectors

    full = s.score(vectors, config.n_images)
    if on_images is not None:
        on_images(full["prompts"], full["images"])
    metrics: dict = {
        "token": emb.token,
        "step": chosen,
        "final_step": summary.get("steps"),
        "reconstruction": full["reconstruction"],
        "editability": full["editability"],
        "per_prompt": full["per_prompt"],
        "prompt_set": config.prompt_set,
        "n_images": config.n_images,
        "sampler": {
            "steps": config.steps,
            "guidance_scale": config.guidance_scale,
            "eta": config.eta,
            "scheduler": "DDIM",
        },
        "evaluator": s.clip.identity,
        "model_fingerprint": model.fingerprint,
        "selection": {
            "criterion": criterion_text(config.selection_tolerance) if curve else "final step (no selection)",
            "chosen_step": chosen,
            "budget": config.checkpoint_budget,
            "curve": [p.__dict__ for p in curve],
        },
    }
    if s.dino is not None:
        metrics["dino"] = mean_pairwise_cosine(s.dino.images(full["images"][0]), s.dino.images(train_images))
        metrics["dino_evaluator"] = s.dino.identity
    if config.baselines:
        targets = [P.without_token(t) for t in s.templates]
        base_images = s.draw(targets, config.n_images)
        per = [
            mean_matched_cosine(s.clip.images(ims), s.clip.texts([t] * len(ims)))
            for t, ims in zip(targets, base_images)
        ]
        for p, v in zip(metrics["per_prompt"], per):
            p["prompt_only"] = v
        metrics["baselines"] = {
            "image_only": mean_pairwise_cosine(s.train_clip, s.train_clip, exclude_diagonal=True),
            "prompt_only": sum(per) / len(per),
        }
    metrics["images_generated"] = s.images_generated
    metrics["sampling_images_per_second"] = s.images_generated / max(s.sampling_seconds, 1e-9)
    metrics["seconds"] = time.perf_counter() - t0

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        cols = min(config.grid_seeds, config.n_images)
        grid = make_grid([row[:cols] for row in full["images"]], full["prompts"], label_width=200)
        grid.save(tmp / GRID_FILE)
        selected = emb_io.Embedding(
            emb.token,
            vectors.float().cpu(),
            {**emb.meta, "steps": str(chosen), "selected_by": metrics["selection"]["criterion"]},
        )
        files = write_embedding_files(selected, tmp / "embedding")
        metrics["files"] = {k: str(v.relative_to(tmp)) for k, v in files.items()}
        scatter(
            [
                {
                    "label": emb.token,
                    "curve": metrics["selection"]["curve"],
                    "chosen": chosen,
                    "final": {"reconstruction": metrics["reconstruction"], "editability": metrics["editability"]},
                    "baselines": metrics.get("baselines"),
                }
            ],
            tmp / SCATTER_FILE,
            title=f"{emb.token}",
        )
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
        html_report(metrics, tmp / GRID_FILE, tmp / SCATTER_FILE, tmp / REPORT_FILE)
    log.info(
        "%s at step %s: reconstruction %.4f, editability %.4f (%d images, %.0f s)",
        emb.token,
        chosen,
        metrics["reconstruction"],
        metrics["editability"],
        s.images_generated,
        metrics["seconds"],
    )
    return metrics
