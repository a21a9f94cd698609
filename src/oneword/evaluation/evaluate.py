"""The `evaluate` step: score a trained concept the way the paper does, pick a checkpoint, draw the pictures.

Cost is dominated by sampling: (1 + prompts) x N images x DDIM steps, plus the prompt-only baseline. The step
reuses one loaded pipeline for every checkpoint (swapping the token's rows in place), batches prompts
together, and caches CLIP embeddings of the training images and the text targets.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from oneword import checkpoints, distributed, storage
from oneword import embeddings as emb_io
from oneword.config import EvalConfig
from oneword.device import resolve_device
from oneword.errors import OnewordError
from oneword.evaluation import prompts as P
from oneword.evaluation.metrics import (
    ClipScorer,
    DinoScorer,
    matched_cosine_rows,
    mean_matched_cosine,
    mean_pairwise_cosine,
    pairwise_cosine_rows,
    standard_error,
    standard_error_over_seeds,
)
from oneword.evaluation.protocol import SELECTION_SEED_OFFSET, evaluation_key, protocol, protocol_id
from oneword.evaluation.report import html_report, scatter
from oneword.evaluation.selection import CurvePoint, criterion_text, select_checkpoint
from oneword.generate import (
    SamplerConfig,
    added_tokens,
    build_pipeline,
    load_embeddings,
    make_grid,
    sample,
    unload_added,
)
from oneword.images import Manifest, dataset_image
from oneword.latents import DATASET_DIR
from oneword.models import LoadedModel, load_base_model
from oneword.profiles import profile_of
from oneword.storage import atomic_dir, check_replaceable, check_writable
from oneword.tokens import check_untrained, vector_tokens
from oneword.train import SUMMARY_FILE, write_embedding_files

log = logging.getLogger(__name__)

METRICS_FILE, REPORT_FILE, GRID_FILE, SCATTER_FILE = "metrics.json", "report.html", "grid.png", "scatter.png"
EVALUATION = "an evaluation written by `oneword evaluate`"
PROGRESS_EVERY_S = 20.0  # between the evaluation's progress lines in its log
GRID_CELL = 512  # px: SD's own side; SDXL's 1024 px samples are halved in the grid (sample files keep them whole)


def _load_summary(train_dir: Path) -> dict:
    p = Path(train_dir) / SUMMARY_FILE
    if not p.exists():
        raise OnewordError(f"{p} not found", hint="evaluate a folder written by `oneword train`")
    return storage.read_json(p, hint=f"train again into {train_dir}, or evaluate another training's folder")


def _checkpoint_list(train_dir: Path, summary: dict) -> list[tuple[int, str]]:
    local = checkpoints.list_checkpoints(Path(train_dir) / "checkpoints")
    if local:
        return local
    recorded = summary.get("checkpoint_dir")
    if recorded and not storage.is_s3(recorded) and not Path(recorded).is_absolute():
        recorded = Path(train_dir) / recorded  # a group's shared checkpoints, beside the concept's folder
    return checkpoints.list_checkpoints(recorded) if recorded else []


def complete_checkpoints(found: list[tuple[int, str]], summary: dict) -> list[tuple[int, str]]:
    """The checkpoints in which every vector of the token has trained.

    Under the progressive schedule, vector k joins the prompts at step k x `progressive_every`: an earlier
    checkpoint holds rows that never trained (only weight decay moved them), which evaluation's prompts, holding
    all the token's vectors, would still use, and which could be selected and registered.
    """
    every = summary.get("config", {}).get("progressive_every", 0) or 0
    n = summary.get("concept", {}).get("n_vectors", 1) or 1
    # past the training's last step: a later training into its folder that never finished (killed: the summary
    # is still this one's), or another's in the checkpoint folder it names
    last = summary.get("steps") or float("inf")
    return [(step, path) for step, path in found if (n - 1) * every < step <= last]


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
        self.templates = P.get_prompt_set(cfg.prompt_set)  # a prompt file's mistake, said before any model loads
        resolved = resolve_device(cfg.device)
        # several processes: each draws a share of every set of images
        self.world = distributed.current(cpu=resolved.type == "cpu")
        device = str(distributed.device_for(resolved, self.world))
        self.pipe = build_pipeline(model, device)
        # the evaluators first: once the embedding is in, the pipeline is given back as it was after scoring
        self.clip = ClipScorer(cfg.clip_model, device)
        self.dino = DinoScorer(cfg.dino_model, device) if cfg.dino_model else None
        self.train_images = train_images
        self.train_clip = self.clip.images(train_images)
        self.train_dino = self.dino.images(train_images) if self.dino is not None else None
        self.before = added_tokens(self.pipe)  # the caller may have loaded the model once, for several steps
        try:
            load_embeddings(self.pipe, model, [emb], force=force)
        except BaseException:  # one text encoder's half of an SDXL pair may be in
            unload_added(self.pipe, self.before)
            raise
        names = vector_tokens(emb.token, emb.n_vectors)
        # (text encoder, the token's rows) for each encoder: one, or SDXL's two
        self.tables = [(self.pipe.text_encoder, self.pipe.tokenizer.convert_tokens_to_ids(names))]
        if getattr(self.pipe, "text_encoder_2", None) is not None:
            self.tables.append((self.pipe.text_encoder_2, self.pipe.tokenizer_2.convert_tokens_to_ids(names)))
        # DreamBench's protocol names the subject's class after the token; the initializer word is that class
        self.class_word = emb.meta.get("initializer", "") if P.follows_dreambench(cfg.prompt_set) else ""
        self.sampler = SamplerConfig(steps=cfg.steps, guidance_scale=cfg.guidance_scale, eta=cfg.eta)
        self.images_generated = 0
        self.sampling_seconds = 0.0
        self.planned = 0  # the images the whole evaluation draws (`plan`), which its progress lines count toward
        self._drawn, self._said = 0, time.monotonic()

    def plan(self, checkpoints: int) -> None:
        """Count the images ahead: `checkpoints` scored on the selection budget, the chosen one's, and the
        prompt-only reference's."""
        prompts = 1 + len(self.templates)  # the reconstruction prompt, then each edit prompt
        self.planned = checkpoints * prompts * self.cfg.checkpoint_budget + prompts * self.cfg.n_images + (
            len(self.templates) * self.cfg.n_images if self.cfg.baselines else 0
        )

    def _drew(self, count: float) -> None:
        """A progress line now and then (`oneword run` tells the terminal): the evaluation of a concept draws
        hundreds of images, minutes on a CPU. `count`: of all the processes' images (`sample`'s `on_batch`)."""
        self._drawn += count
        now = time.monotonic()
        if now - self._said >= PROGRESS_EVERY_S:
            self._said = now
            drawn = min(round(self._drawn), self.planned)
            log.info("evaluate %s: drew %d of %d images", self.token, drawn, self.planned)

    def set_vectors(self, vectors: list[torch.Tensor]) -> None:
        """Put the token's vectors (one tensor per text encoder) into the pipeline's embedding tables."""
        with torch.no_grad():
            for (encoder, rows), v in zip(self.tables, vectors, strict=True):
                table = encoder.get_input_embeddings().weight
                table[rows] = v.to(table.device, table.dtype)

    def draw(self, prompts: list[str], n: int, seed: int | None = None) -> list[list[Image.Image]]:
        t = time.perf_counter()
        seed = self.cfg.seed if seed is None else seed
        out = sample(self.pipe, prompts, n, seed, self.sampler, batch_size=self.cfg.batch_size, world=self.world,
                     on_batch=self._drew)  # fmt: skip
        self.sampling_seconds += time.perf_counter() - t
        self.images_generated += len(prompts) * n
        return out

    def score(self, vectors: list[torch.Tensor], n: int, seed: int | None = None) -> dict:
        """Generate n images for the reconstruction prompt and each edit prompt (image j from seed `seed + j`,
        by default the configured seed); return scores and images."""
        self.set_vectors(vectors)
        prompts = [P.with_token(P.RECONSTRUCTION, self.token)] + [
            P.with_token(t, self.token, self.class_word) for t in self.templates
        ]
        images = self.draw(prompts, n, seed)
        rec_rows = pairwise_cosine_rows(self.clip.images(images[0]), self.train_clip)
        per_prompt, edit_rows = [], []
        for tpl, ims in zip(self.templates, images[1:]):
            target = P.without_token(tpl, self.class_word)
            rows = matched_cosine_rows(self.clip.images(ims), self.clip.texts([target] * len(ims)))
            edit_rows.append(rows)
            per_prompt.append(
                {
                    "prompt": P.with_token(tpl, self.token, self.class_word),
                    "template": tpl,
                    "text_target": target,
                    "editability": float(rows.mean()),
                }
            )
        editability = sum(p["editability"] for p in per_prompt) / len(per_prompt)
        # image j of every prompt shares seed j: the gate's score (the sum) is measured once per seed, and two
        # versions scored the same way are paired seed by seed
        per_seed = rec_rows.float() + torch.stack([r.float() for r in edit_rows]).mean(0)
        out = {
            "reconstruction": float(rec_rows.mean()),
            "editability": editability,
            # how far another set of seeds may move the score (the prompts are held fixed)
            "reconstruction_se": standard_error(rec_rows),
            "editability_se": standard_error_over_seeds(edit_rows),
            "score_se": standard_error(per_seed),
            "score_per_seed": [round(float(x), 6) for x in per_seed],
            "per_prompt": per_prompt,
            "images": images,
            "prompts": prompts,
        }
        if self.dino is not None:  # subject fidelity: in "a photo of S*", and kept through the edits
            fid = pairwise_cosine_rows(self.dino.images(images[0]), self.train_dino)
            kept = pairwise_cosine_rows(self.dino.images([im for row in images[1:] for im in row]), self.train_dino)
            out |= {
                "fidelity": float(fid.mean()),
                "fidelity_se": standard_error(fid),
                "kept": float(kept.mean()),
                "kept_se": standard_error_over_seeds(list(kept.view(len(images) - 1, -1))),
            }
        return out


@dataclass
class _Trained:
    """What `train` left behind, loaded: its folder and summary, the embedding, the base model, the images."""

    train_dir: Path
    summary: dict
    emb: emb_io.Embedding
    model: LoadedModel
    images: list[Image.Image]
    reference: dict  # which images reconstruction is measured against (`_reference_images`)


@dataclass
class _Choice:
    """The vectors to evaluate: the step they come from and the checkpoint curve that chose it (empty: none)."""

    step: int
    vectors: list[torch.Tensor]  # one tensor per text encoder
    curve: list[CurvePoint]


def evaluate(
    train_dir: Path,
    dataset_dir: Path | None,
    out_dir: Path,
    config: EvalConfig = EvalConfig(),
    base_model: str | LoadedModel | None = None,
    on_images: Callable[[list[str], list[list[Image.Image]]], None] | None = None,
    on_checkpoint: Callable[[int, list[str], list[list[Image.Image]]], None] | None = None,
) -> dict:
    """Evaluate a trained concept.

    Args:
        train_dir: folder written by `oneword train` (embedding, checkpoints, summary.json).
        dataset_dir: the preprocessed training images (folder written by `oneword preprocess`); None: the copy
            that `train` keeps in `train_dir/dataset`.
        out_dir: where metrics.json, grid.png, scatter.png, report.html and the selected embedding go.
        config: evaluation settings; those left unset are the base model's profile's.
        base_model: default: the model the concept was trained on.
        on_images: called with the final evaluation's prompts and images (reconstruction prompt first), for
            callers that score them further (the toy world's oracle).
        on_checkpoint: called with each checkpoint's step, prompts and images during checkpoint selection.

    Returns:
        The metrics dict written to `metrics.json`.
    """
    check_replaceable(Path(out_dir), METRICS_FILE, EVALUATION)  # before the sampling, not after
    check_writable(Path(out_dir))
    local = "a loaded model or callbacks" if isinstance(base_model, LoadedModel) or on_images or on_checkpoint else ""
    if (n := distributed.processes(config.gpus, config.device, local)) > 1:
        return distributed.launch(
            "oneword.evaluation.evaluate:evaluate", n, train_dir=train_dir, dataset_dir=dataset_dir,
            out_dir=out_dir, config=config, base_model=base_model,
        )  # fmt: skip
    t0 = time.perf_counter()
    trained = _load_trained(train_dir, dataset_dir, base_model)
    key = trained.summary.get("training_key")
    # of the settings as given, as the pipeline asks; another model or other photos than the training's are
    # not what the key says, and a result marked with it would pass for the pipeline's own
    overridden = base_model is not None or dataset_dir is not None
    evaluated = evaluation_key(key, config) if key and not overridden else None
    config = config.resolved(profile_of(trained.model))
    s = _Session(trained.model, trained.emb, trained.images, config, force=base_model is not None)
    try:
        choice = _choose_checkpoint(s, trained, config, on_checkpoint)
        full = s.score(choice.vectors, config.n_images)
    finally:  # every image is drawn: a model the caller loaded once evaluates the next training as well
        unload_added(s.pipe, s.before)
    if on_images is not None:
        on_images(full["prompts"], full["images"])
    metrics = _final_metrics(s, trained, choice, full)
    if config.baselines:
        _add_baselines(s, metrics)
    metrics["images_generated"] = s.images_generated
    metrics["sampling_images_per_second"] = s.images_generated / max(s.sampling_seconds, 1e-9)
    metrics["seconds"] = time.perf_counter() - t0
    metrics["processes"] = s.world.size
    if evaluated:
        metrics["evaluation_key"] = evaluated
    if s.world.main:  # the other processes hold the same images and scores
        selected = _selected_embedding(trained.emb, choice, metrics)
        _write_outputs(Path(out_dir), metrics, full, selected, config, trained.images)
        _log_result(metrics)
    return metrics


def _load_trained(train_dir: Path, dataset_dir: Path | None, base_model: str | LoadedModel | None) -> _Trained:
    """Load the training summary, the learned embedding, the base model and the training images."""
    summary = _load_summary(train_dir)
    emb = emb_io.load(Path(train_dir) / "learned_embeds.safetensors")
    source = base_model if base_model is not None else summary["model_source"]
    if isinstance(source, LoadedModel):
        check_untrained(source, "evaluate")
    model = source if isinstance(source, LoadedModel) else load_base_model(source)
    dataset_dir = Path(dataset_dir) if dataset_dir is not None else Path(train_dir) / DATASET_DIR
    manifest = Manifest.load(dataset_dir)
    # scored against as the manifest says they are: an image edited since would change what "reconstruction" means
    images = [dataset_image(Path(dataset_dir) / r.file, r.processed_sha256) for r in manifest.images]
    reference = _reference_images(summary, [r.processed_sha256 for r in manifest.images], dataset_dir)
    return _Trained(Path(train_dir), summary, emb, model, images, reference)


def _reference_images(summary: dict, given: list[str], dataset_dir: Path) -> dict:
    """Say whether the images to score against are the ones the concept was trained on.

    Other images are a choice (held-out photos of the subject), but scores against them are not comparable with
    the concept's others: the metrics and the report say so, and a warning names the folder.
    """
    trained = summary.get("image_sha256") or []
    same = not trained or sorted(trained) == sorted(given)
    if not same:
        shared = len(set(trained) & set(given))
        log.warning(
            "%s holds %d images, %d of them among the %d the concept was trained on: its scores measure the "
            "concept against these images, and compare only with evaluations against the same ones (leave out "
            "--data to score against the training images)",
            dataset_dir, len(given), shared, len(trained),
        )  # fmt: skip
    return {"training_images": same, "n": len(given), "folder": str(dataset_dir)}


def _choose_checkpoint(s: _Session, trained: _Trained, config: EvalConfig, on_checkpoint=None) -> _Choice:
    """Score every checkpoint on a small budget and pick one by the selection rule; without two, the final step."""
    found = complete_checkpoints(_checkpoint_list(trained.train_dir, trained.summary), trained.summary)
    own = []
    if config.checkpoint_budget > 0 and len(found) >= 2:
        own = _own_checkpoints(found, s.token, trained.summary.get("image_sha256"))
    selecting = len(own) >= 2
    s.plan(len(own) if selecting else 0)
    if selecting:
        curve = _score_checkpoints(s, own, config.checkpoint_budget, on_checkpoint)
        chosen = select_checkpoint(curve, config.selection_tolerance, config.selection_rule).step
        # each process scored on its own GPU: a near tie must not pick two steps, so the main process decides
        chosen = distributed.from_main(chosen, s.world)
        return _Choice(chosen, dict(own)[chosen], curve)
    emb = trained.emb
    final = [emb.vectors] + ([emb.vectors_2] if emb.vectors_2 is not None else [])
    return _Choice(emb.steps or trained.summary.get("steps", 0), final, [])


def _own_checkpoints(found: list[tuple[int, str]], token: str,
                     photos: Sequence[str] | None) -> list[tuple[int, list[torch.Tensor]]]:  # fmt: skip
    """The step and `token`'s vectors of those of `found` that learned it from the training's `photos` (or do not
    say): the others are a later or another training's, written into the checkpoint folder the training names,
    and are passed over, said. Each checkpoint is read once (on S3, one download)."""
    own, others = [], []
    for step, path in found:
        state = checkpoints.load_checkpoint(path)
        theirs = checkpoints.photos_of(state, token)
        if photos and theirs is not None and set(theirs) != set(photos):
            others.append(step)
        else:
            own.append((step, checkpoints.vectors_of(state, token)))
    if others:
        log.warning("%d checkpoint(s) in the training's checkpoint folder learned %s from other photos (another "
                    "training's, written there since): not scored (steps %s)", len(others), token,
                    ", ".join(map(str, others)))  # fmt: skip
    return own


def _score_checkpoints(s: _Session, own: list[tuple[int, list[torch.Tensor]]], budget: int,
                       on_checkpoint=None) -> list[CurvePoint]:  # fmt: skip
    """The reconstruction/editability curve over the checkpoints' vectors, `budget` images per prompt each."""
    curve = []
    for step, vectors in own:
        # seeds of their own: the images that choose a checkpoint are never the ones that report its scores
        r = s.score(vectors, budget, s.cfg.seed + SELECTION_SEED_OFFSET)
        curve.append(
            CurvePoint(
                step,
                r["reconstruction"],
                r["editability"],
                r["reconstruction_se"],
                r["editability_se"],
                **{k: r[k] for k in ("fidelity", "fidelity_se", "kept", "kept_se") if k in r},
            )
        )
        if on_checkpoint is not None:
            on_checkpoint(step, r["prompts"], r["images"])
        log.info("checkpoint %d: reconstruction %.4f, editability %.4f", step, r["reconstruction"], r["editability"])
    return curve


def _final_metrics(s: _Session, trained: _Trained, choice: _Choice, full: dict) -> dict:
    """The metrics of the final scoring of the chosen vectors, with how they were chosen."""
    cfg = s.cfg
    metrics: dict = {
        "token": trained.emb.token,
        "step": choice.step,
        "final_step": trained.summary.get("steps"),
        "image_sha256": trained.summary.get("image_sha256"),  # the photos learned from: register matches them
        "reconstruction": full["reconstruction"],
        "editability": full["editability"],
        "reconstruction_se": full["reconstruction_se"],
        "editability_se": full["editability_se"],
        "score_se": full["score_se"],
        "score_per_seed": full["score_per_seed"],
        "per_prompt": full["per_prompt"],
        "prompt_set": cfg.prompt_set,
        "n_images": cfg.n_images,
        "sampler": {"steps": cfg.steps, "guidance_scale": cfg.guidance_scale, "eta": cfg.eta, "scheduler": "DDIM"},
        "evaluator": s.clip.identity,
        "model_fingerprint": trained.model.fingerprint,
        "reference_images": trained.reference,
        "selection": {
            "criterion": criterion_text(cfg.selection_tolerance, cfg.selection_rule)
            if choice.curve
            else "the final step: no selection",
            "rule": cfg.selection_rule,
            "tolerance": cfg.selection_tolerance,
            "chosen_step": choice.step,
            "budget": cfg.checkpoint_budget,
            "curve": [p.__dict__ for p in choice.curve],
        },
    }
    if s.dino is not None:  # "a photo of S*" against the training images, as `score` measured it
        metrics["dino"], metrics["dino_se"] = full["fidelity"], full["fidelity_se"]
        metrics["dino_evaluator"] = s.dino.identity
    if s.class_word:
        metrics["class_word"] = s.class_word
        metrics["dreambench"] = _dreambench_scores(s, trained, full)
    metrics["protocol"] = protocol(metrics, cfg.seed, metrics.get("dino_evaluator"))
    metrics["protocol_id"] = protocol_id(metrics["protocol"])
    return metrics


def _dreambench_scores(s: _Session, trained: _Trained, full: dict) -> dict:
    """DreamBooth's three numbers (Ruiz et al. 2023, Table 1): DINO and CLIP-I over the images of every prompt
    against the real images, and CLIP-T (our editability, whose targets keep the class noun)."""
    generated = [im for row in full["images"][1:] for im in row]  # the benchmark's prompts, not "A photo of S*"
    scores = {
        "clip_i": mean_pairwise_cosine(s.clip.images(generated), s.train_clip),
        "clip_t": full["editability"],
        "dino": None,
        "comparable_to": "DreamBooth (Ruiz et al. 2023) Table 1, where the evaluators are its (DINO ViT-S/16, "
        "CLIP ViT-B/32); with other evaluators, only to runs scored the same way",
    }
    if s.dino is not None:
        scores["dino"] = mean_pairwise_cosine(s.dino.images(generated), s.train_dino)
    return scores


def _add_baselines(s: _Session, metrics: dict) -> None:
    """Add the paper's two reference points, each with both coordinates (Gal et al. 2022, Fig. 9):

    - image-only: the training images themselves (reconstruction: each against the others, self-pairs left out;
      editability: against the prompts' text targets);
    - prompt-only: pictures drawn from the text targets alone (reconstruction: against the training images;
      editability: against their own prompts).

    They are references, not ceilings: a concept can score above either. `image_only` and `prompt_only` keep the
    one coordinate each that earlier versions recorded.
    """
    targets = [P.without_token(t, s.class_word) for t in s.templates]
    base_images = s.draw(targets, s.cfg.n_images)
    per = [
        mean_matched_cosine(s.clip.images(ims), s.clip.texts([t] * len(ims))) for t, ims in zip(targets, base_images)
    ]
    for p, v in zip(metrics["per_prompt"], per):
        p["prompt_only"] = v
    # one training image has no other to be compared with: no image-only point, rather than NaN
    alone = len(s.train_images) < 2
    image_only_rec = None if alone else mean_pairwise_cosine(s.train_clip, s.train_clip, exclude_diagonal=True)
    prompt_only_edit = sum(per) / len(per)
    image_only = {
        "reconstruction": image_only_rec,
        "editability": mean_pairwise_cosine(s.train_clip, s.clip.texts(targets)),
    }
    metrics["baselines"] = {
        "image_only": image_only_rec,
        "prompt_only": prompt_only_edit,
        "points": {
            **({} if alone else {"image_only": image_only}),
            "prompt_only": {
                "reconstruction": mean_pairwise_cosine(
                    s.clip.images([im for row in base_images for im in row]), s.train_clip
                ),
                "editability": prompt_only_edit,
            },
        },
    }


def _selected_embedding(emb: emb_io.Embedding, choice: _Choice, metrics: dict) -> emb_io.Embedding:
    """The chosen vectors as an embedding, its metadata saying which step and by what rule."""
    meta = {**emb.meta, "steps": str(choice.step), "selected_by": metrics["selection"]["criterion"]}
    second = choice.vectors[1].float().cpu() if len(choice.vectors) > 1 else None
    return emb_io.Embedding(emb.token, choice.vectors[0].float().cpu(), meta, second)


def _write_outputs(
    out_dir: Path, metrics: dict, full: dict, selected: emb_io.Embedding, config: EvalConfig, photos: list[Image.Image]
) -> None:
    """Write the grid, the selected embedding, the scatter plot, metrics.json and the report, all at once."""
    with atomic_dir(out_dir, METRICS_FILE, EVALUATION) as tmp:
        cols = min(config.grid_seeds, config.n_images)
        rows, labels = [row[:cols] for row in full["images"]], list(full["prompts"])
        grid = make_grid([_photo_row(photos, rows[0][0].size, config.grid_seeds), *rows],
                         [_photo_label(photos, metrics, config.grid_seeds), *labels],
                         label_width=200, max_cell=GRID_CELL)  # fmt: skip
        grid.save(tmp / GRID_FILE)
        files = write_embedding_files(selected, tmp / "embedding")
        metrics["files"] = {k: str(v.relative_to(tmp)) for k, v in files.items()}
        scatter([_scatter_series(metrics)], tmp / SCATTER_FILE, title=f"{metrics['token']}")
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
        html_report(metrics, tmp / GRID_FILE, tmp / SCATTER_FILE, tmp / REPORT_FILE)


def _photo_row(photos: list[Image.Image], size: tuple[int, int], most: int) -> list[Image.Image]:
    """The grid's first row: the photos the samples are measured against, at the samples' size, so a person sees
    at a glance whether the concept draws what it was shown."""
    return [im.resize(size, Image.Resampling.LANCZOS) if im.size != size else im for im in photos[:most]]


def _photo_label(photos: list[Image.Image], metrics: dict, most: int) -> str:
    which = "training" if (metrics.get("reference_images") or {}).get("training_images", True) else "reference"
    return f"{which} photos" + (f" ({most} of {len(photos)})" if len(photos) > most else "")


def _scatter_series(metrics: dict) -> dict:
    """The concept's points on the reconstruction/editability scatter plot."""
    return {
        "label": metrics["token"],
        "curve": metrics["selection"]["curve"],
        "chosen": metrics["step"],
        "final": {"reconstruction": metrics["reconstruction"], "editability": metrics["editability"]},
        "baselines": metrics.get("baselines"),
    }


def _log_result(metrics: dict) -> None:
    """Log the headline scores."""
    log.info(
        "%s at step %s: reconstruction %.4f, editability %.4f (%d images, %.0f s)",
        metrics["token"],
        metrics["step"],
        metrics["reconstruction"],
        metrics["editability"],
        metrics["images_generated"],
        metrics["seconds"],
    )
