"""Generation: draw prompts that use learned concepts, with the stock diffusers pipeline.

Embeddings are loaded with diffusers' own `load_textual_inversion`, so what oneword draws is what any
diffusers user gets from the same file. Several concepts may appear in one prompt.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo

from oneword import __version__, storage
from oneword import embeddings as emb_io
from oneword.config import GenerateConfig
from oneword.device import resolve_device
from oneword.distributed import World, gather
from oneword.errors import OnewordError
from oneword.models import LoadedModel, load_base_model
from oneword.profiles import ModelProfile, profile_of
from oneword.tokens import check_untrained, clashing_entries, vector_tokens

log = logging.getLogger(__name__)

GRID = "grid.png"  # generate's picture of them all, which marks its output folder


@dataclass(frozen=True)
class SamplerConfig:
    """Sampling settings; steps and guidance unset (None) are the model's profile's (`oneword.profiles`)."""

    steps: int | None = None
    guidance_scale: float | None = None
    eta: float = 0.0
    height: int | None = None  # default: the model's native size
    width: int | None = None

    def resolved(self, profile: ModelProfile) -> SamplerConfig:
        """These settings with unset steps and guidance from `profile`."""
        return replace(
            self,
            steps=self.steps or profile.sampling_steps,
            guidance_scale=self.guidance_scale if self.guidance_scale is not None else profile.guidance_scale,
        )


def build_pipeline(model: LoadedModel, device: str = "auto"):
    """Wrap a loaded `LoadedModel` (with UNet and VAE) in its family's diffusers pipeline, with a DDIM scheduler.

    SD 1.x/2.x get a `StableDiffusionPipeline`, SDXL a `StableDiffusionXLPipeline` (both text encoders).

    Returns:
        The pipeline, on `device`.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    if model.unet is None or model.vae is None:
        raise OnewordError("generation needs the base model's UNet and VAE")
    dev = resolve_device(device)
    parts = dict(
        vae=model.vae,
        text_encoder=model.text_encoder,
        tokenizer=model.tokenizer,
        unet=model.unet,
        scheduler=DDIMScheduler.from_config(model.scheduler_config),
    )
    if model.text_encoder_2 is not None:
        pipe = StableDiffusionXLPipeline(**parts, text_encoder_2=model.text_encoder_2, tokenizer_2=model.tokenizer_2)
    else:
        pipe = StableDiffusionPipeline(
            **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    pipe = pipe.to(dev)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _same_vectors(a: emb_io.Embedding, b: emb_io.Embedding) -> bool:
    import torch

    pairs = [(a.vectors, b.vectors), (a.vectors_2, b.vectors_2)]
    return all((x is None and y is None) or (x is not None and y is not None and x.shape == y.shape
                                             and torch.equal(x, y)) for x, y in pairs)  # fmt: skip


def _text_encoders(pipe) -> list[tuple]:
    return [(pipe.tokenizer, pipe.text_encoder)] + (
        [(pipe.tokenizer_2, pipe.text_encoder_2)] if getattr(pipe, "tokenizer_2", None) is not None else []
    )


def _own_stream(module: torch.nn.Module):
    """A random stream of its own for what draws on `module`'s device: resizing a token table draws its new rows at
    random before they are set, and the caller's stream (a notebook's next torch.rand) is left as it was."""
    device = next(module.parameters()).device
    return torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else [])


def added_tokens(pipe) -> list[set[str]]:
    """The tokens added to each of the pipeline's tokenizers so far (`unload_added` takes out those added since)."""
    return [set(tokenizer.get_added_vocab()) for tokenizer, _ in _text_encoders(pipe)]


def unload_added(pipe, before: list[set[str]]) -> None:
    """Take out of the pipeline's tokenizers and text encoders the embeddings loaded since `added_tokens` gave
    `before`: a model the caller loaded once (`LoadedModel`) serves the next step as it was."""
    for (tokenizer, encoder), had in zip(_text_encoders(pipe), before):
        if added := [t for t in tokenizer.get_added_vocab() if t not in had]:
            with _own_stream(encoder):
                pipe.unload_textual_inversion(added, tokenizer=tokenizer, text_encoder=encoder)
            encoder.get_input_embeddings().requires_grad_(False)  # diffusers makes the table anew, trainable
            encoder.config.vocab_size = encoder.get_input_embeddings().num_embeddings  # as resizing leaves it


def load_embeddings(
    pipe, model: LoadedModel, files: Sequence[Path | emb_io.Embedding], force: bool = False
) -> list[str]:
    """Load embedding files (any format) into a pipeline, after checking they fit the model.

    An SDXL pair goes in as diffusers documents it: one `load_textual_inversion` call per text encoder.

    Returns:
        The tokens now usable in prompts.
    """
    tokens, loaded = [], {}
    for f in files:
        emb = f if isinstance(f, emb_io.Embedding) else emb_io.load(Path(f))
        source = "" if isinstance(f, emb_io.Embedding) else str(f)
        emb_io.check_compatible(emb, model.width, model.fingerprint, force=force, source=source, width_2=model.width_2)
        if (same := loaded.get(emb.token)) is not None and _same_vectors(same, emb):
            continue  # one concept named twice (alone, and in a bundle that holds a copy of it): loaded once
        earlier = {t for e in loaded.values() for t in vector_tokens(e.token, e.n_vectors)}  # this call's files'
        loaded[emb.token] = emb
        if clash := clashing_entries(vector_tokens(emb.token, emb.n_vectors), pipe.tokenizer.get_added_vocab()):
            if not any(c in earlier for c in clash):  # a model saved after a load_textual_inversion holds it
                raise OnewordError(
                    f"embedding {emb.token!r}{f' ({source})' if source else ''} uses {clash[0]!r}, which the base "
                    "model's tokenizer holds already (an embedding loaded into it before it was saved)",
                    hint="rename its token: oneword export FILE --token '<new-name>' -o NEW_FILE",
                )
            raise OnewordError(
                f"two embeddings use the token {emb.token!r}"
                if clash[0] == emb.token
                else f"embedding {emb.token!r} cannot be told from the loaded {clash[0]!r} in a prompt (the same "
                "but for case, or NAME and NAME_1, which diffusers reads as one concept's two vectors)",
                hint="rename one: oneword export FILE --token '<new-name>' -o NEW_FILE",
            )
        for tokenizer in filter(None, (pipe.tokenizer, getattr(pipe, "tokenizer_2", None))):
            taken = [t for t in vector_tokens(emb.token, emb.n_vectors) if t in tokenizer.get_vocab()]
            if taken:  # diffusers would refuse it with a bare ValueError; training it would change that word
                raise OnewordError(
                    f"embedding {emb.token!r}{f' ({source})' if source else ''} uses {taken[0]!r}, which is "
                    "already an entry of the model's vocabulary",
                    hint="rename its token: oneword export FILE --token '<new-name>' -o NEW_FILE",
                )
        with _own_stream(pipe.text_encoder):
            pipe.load_textual_inversion(
                emb.vectors.to(pipe.text_encoder.dtype),
                token=emb.token,
                text_encoder=pipe.text_encoder,
                tokenizer=pipe.tokenizer,
            )
            if emb.vectors_2 is not None:
                pipe.load_textual_inversion(
                    emb.vectors_2.to(pipe.text_encoder_2.dtype),
                    token=emb.token,
                    text_encoder=pipe.text_encoder_2,
                    tokenizer=pipe.tokenizer_2,
                )
        tokens.append(emb.token)
    return tokens


@torch.no_grad()
def sample(
    pipe,
    prompts: Sequence[str],
    n: int,
    seed: int,
    sampler: SamplerConfig = SamplerConfig(),
    batch_size: int = 16,
    world: World = World(),
    on_batch: Callable[[float], None] | None = None,
) -> list[list[Image.Image]]:
    """Draw `n` images per prompt; image j of every prompt uses seed `seed + j`.

    Prompts are batched together (up to `batch_size` images per UNet call). In a launch of several processes
    (`oneword.distributed`), each draws a contiguous share of the prompt x seed pairs and every process gets all
    the images back, in order. `on_batch` is called after each batch this process draws with how many of all the
    processes' images that stands for (its count scaled by all the images over this process's share).

    Returns:
        `images[i][j]`: prompt i, seed j.
    """
    if sampler.steps is None or sampler.guidance_scale is None:
        raise ValueError("sampler steps and guidance are unset: resolve the SamplerConfig with the model's profile")
    jobs = [(i, j) for i in range(len(prompts)) for j in range(n)]
    lo, hi = world.share(len(jobs))
    mine = jobs[lo:hi]
    out: list[list[Image.Image | None]] = [[None] * n for _ in prompts]
    device = pipe.device
    gen_device = "cpu" if device.type == "mps" else device
    drawn = []
    for k in range(0, len(mine), batch_size):
        chunk = mine[k : k + batch_size]
        images = pipe(
            prompt=[prompts[i] for i, _ in chunk],
            num_inference_steps=sampler.steps,
            guidance_scale=sampler.guidance_scale,
            eta=sampler.eta,
            height=sampler.height,
            width=sampler.width,
            generator=[torch.Generator(gen_device).manual_seed(seed + j) for _, j in chunk],
        ).images
        drawn.extend(zip(chunk, images))
        if on_batch is not None:
            on_batch(len(chunk) * len(jobs) / len(mine))
    for (i, j), im in gather(drawn, world):
        out[i][j] = im
    return out  # type: ignore[return-value]


def make_grid(
    images: list[list[Image.Image]],
    labels: Sequence[str] | None = None,
    label_width: int = 0,
    max_cell: int | None = None,
) -> Image.Image:
    """Lay out `images[row][col]` as one picture, with an optional text label left of each row.

    `max_cell` shrinks larger pictures to at most that side (26 DreamBench prompts x 8 seeds of SDXL's 1024 px
    would be a 223-megapixel picture, past what Pillow and browsers open).
    """
    rows, cols = len(images), max(len(r) for r in images)
    if max_cell and max(images[0][0].size) > max_cell:
        f = max_cell / max(images[0][0].size)
        images = [[im.resize((round(im.width * f), round(im.height * f)), Image.Resampling.LANCZOS) for im in row]
                  for row in images]  # fmt: skip
    w, h = images[0][0].size
    lw = label_width if labels else 0
    grid = Image.new("RGB", (lw + cols * w, rows * h), "white")
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(images):
        if labels:
            draw.multiline_text((4, r * h + 4), _wrap(labels[r], max(8, lw // 7)), fill="black")
        for c, im in enumerate(row):
            grid.paste(im, (lw + c * w, r * h))
    return grid


def _wrap(text: str, width: int) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join([*lines, line])


def _shown_source(source: str) -> str:
    """A model's reference as a picture may carry it to an image site: a hub id as it is, a local path or an
    object-store URI by its last name only (the fingerprint beside it tells the model)."""
    local = source.startswith(("s3://", "/", "./", "../", "~")) or Path(source).exists()
    return (Path(source.rstrip("/")).name or source) if local else source


def png_parameters(
    prompt: str, seed: int, sampler: SamplerConfig, size: tuple[int, int], model: LoadedModel, tokens: Sequence[str]
) -> PngInfo:
    """What drew a picture, in its PNG: a `parameters` text as A1111 writes it (its PNG Info tab, ComfyUI and
    image sites read it), and the same as JSON under `oneword`, with the learned tokens that were loaded."""
    text = (f"{prompt}\nSteps: {sampler.steps}, Sampler: DDIM, CFG scale: {sampler.guidance_scale}, Seed: {seed}, "
            f"Size: {size[0]}x{size[1]}, Model: {Path(model.source).name or model.source}, Version: oneword "
            f"{__version__}")  # fmt: skip
    info = PngInfo()
    info.add_text("parameters", text)
    info.add_text("oneword", json.dumps({
        "prompt": prompt, "seed": seed, "steps": sampler.steps, "guidance_scale": sampler.guidance_scale,
        "eta": sampler.eta, "scheduler": "DDIM", "base_model": _shown_source(model.source),
        "model_fingerprint": model.fingerprint,
        "tokens": list(tokens), "oneword_version": __version__,
    }))  # fmt: skip
    return info


def generate(
    base_model: str | LoadedModel,
    embedding_files: Sequence[Path],
    prompts: Sequence[str],
    out_dir: Path,
    config: GenerateConfig = GenerateConfig(),
    force: bool = False,
) -> Path:
    """Generate `config.n` images for each prompt and a grid of them all.

    Args:
        base_model: model reference or loaded `LoadedModel`.
        embedding_files: learned embeddings (any format) whose tokens the prompts use.
        prompts: prompts, e.g. "an oil painting of <my-cat> on the moon".
        out_dir: where `p{i}_s{seed}.png` and `grid.png` go (replaced whole: a folder of something else is refused).
        config: images per prompt, first seed, sampler settings (unset: the model's profile) and device.
        force: load embeddings trained on another model of the same width.

    Returns:
        The path of `grid.png`.
    """
    out_dir = Path(out_dir).resolve()  # `-o .` has no name to put a temporary folder beside
    storage.check_replaceable(out_dir, GRID, "pictures drawn by `oneword generate`")  # before drawing
    if (out_dir / GRID).exists():
        log.warning("%s holds an earlier call's pictures: these will replace them (give another -o to keep them)",
                    out_dir)  # fmt: skip
    if isinstance(base_model, LoadedModel):
        check_untrained(base_model, "generate")
    model = base_model if isinstance(base_model, LoadedModel) else load_base_model(base_model)
    pipe = build_pipeline(model, config.device)
    before = added_tokens(pipe)
    try:
        tokens = load_embeddings(pipe, model, embedding_files, force=force)
        unknown = [p for p in prompts if tokens and not any(t in p for t in tokens)]
        for p in unknown:
            log.warning("prompt %r uses none of the loaded tokens %s", p, tokens)
        sampler = SamplerConfig(steps=config.steps, guidance_scale=config.guidance_scale).resolved(profile_of(model))
        images = sample(pipe, list(prompts), config.n, config.seed, sampler)
    finally:  # a model the caller loaded once draws the next call's embeddings as well
        unload_added(pipe, before)
    # replaced whole: an earlier call's pictures of other prompts or seeds are not left among these
    with storage.atomic_dir(Path(out_dir), GRID, "pictures drawn by `oneword generate`") as tmp:
        for i, row in enumerate(images):
            for j, im in enumerate(row):
                said = png_parameters(prompts[i], config.seed + j, sampler, im.size, model, tokens)
                im.save(tmp / f"p{i:02d}_s{config.seed + j}.png", pnginfo=said)
        make_grid(images, list(prompts), label_width=160).save(tmp / GRID)
    return Path(out_dir) / GRID
