"""The paper's CLIP-space metrics (Gal et al. 2022, Sec. 5) and DreamBench's DINO fidelity.

- Reconstruction: mean cosine over all (generated image, training image) pairs of CLIP image embeddings.
- Editability: mean cosine between each generated image and the CLIP text embedding of its prompt with the
  token removed.
- DINO: mean cosine over all (generated, training) pairs of DINO ViT-S/16 CLS embeddings (Ruiz et al. 2023).

Every score carries its evaluator's identity (name and weight fingerprint): scores from different evaluators
must never be compared.
"""

from __future__ import annotations

import hashlib

import torch
from PIL import Image

from oneword import storage
from oneword.errors import OnewordError
from oneword.evaluation.protocol import config_fingerprint
from oneword.models import module_fingerprint
from oneword.profiles import DEFAULT_CLIP, TOYWORLD_CLIP
from oneword.toyworld import assets

DEFAULT_DINO = "facebook/dino-vits16"  # DreamBench's subject-fidelity model


def resolve_evaluator(name: str) -> str:
    """Turn an evaluator reference into a local folder or hub id (`toyworld-clip` and `toyworld-dino` are shipped
    with oneword)."""
    shipped = {TOYWORLD_CLIP: ("CLIP", assets.clip_path()), assets.DINO_NAME: ("DINO", assets.dino_path())}
    if name in shipped:
        kind, p = shipped[name]
        if not (p / "config.json").exists():
            raise OnewordError(
                f"the toy-world {kind} evaluator is missing from the package ({p})",
                hint="reinstall oneword, or train it with `oneword toyworld train`",
            )
        return str(p)
    if storage.is_s3(name):
        return str(storage.download_prefix(name, cache=storage.model_cache_root()))
    return name


def mean_pairwise_cosine(a: torch.Tensor, b: torch.Tensor, exclude_diagonal: bool = False) -> float:
    """Mean cosine similarity over all pairs (rows of `a` x rows of `b`); rows need not be normalised.

    With `exclude_diagonal` (a is b), self-pairs are left out.
    """
    a = torch.nn.functional.normalize(a.float(), dim=-1)
    b = torch.nn.functional.normalize(b.float(), dim=-1)
    sim = a @ b.T  # (Na, Nb)
    if exclude_diagonal:
        n = sim.shape[0]
        if n < 2:
            return float("nan")
        return float((sim.sum() - sim.diagonal().sum()) / (n * n - n))
    return float(sim.mean())


def pairwise_cosine_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Each row of `a`'s mean cosine similarity to the rows of `b` (Na,): one score per generated image."""
    a = torch.nn.functional.normalize(a.float(), dim=-1)
    b = torch.nn.functional.normalize(b.float(), dim=-1)
    return (a @ b.T).mean(dim=1)


def matched_cosine_rows(images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """Cosine between row i of `images` and row i of `texts` (N,): one score per generated image."""
    a = torch.nn.functional.normalize(images.float(), dim=-1)
    b = torch.nn.functional.normalize(texts.float(), dim=-1)
    return (a * b).sum(-1)


def standard_error(per_image: torch.Tensor) -> float:
    """The standard error of a mean of per-image scores (sample std / sqrt(n); nan for fewer than two)."""
    n = per_image.numel()
    return float(per_image.float().std(unbiased=True) / n**0.5) if n >= 2 else float("nan")


def standard_error_over_seeds(per_prompt: list[torch.Tensor]) -> float:
    """The standard error of a mean over fixed prompts whose image j all share seed j: the spread of each seed's
    mean over the prompts (the prompts' own differences are not noise; images of one seed are not independent)."""
    return standard_error(torch.stack([row.float() for row in per_prompt]).mean(0))


def mean_matched_cosine(images: torch.Tensor, texts: torch.Tensor) -> float:
    """Mean cosine between row i of `images` and row i of `texts`."""
    a = torch.nn.functional.normalize(images.float(), dim=-1)
    b = torch.nn.functional.normalize(texts.float(), dim=-1)
    return float((a * b).sum(-1).mean())


def _image_key(im: Image.Image) -> str:
    return hashlib.sha256(im.tobytes() + f"{im.size}{im.mode}".encode()).hexdigest()


class ClipScorer:
    """CLIP image and text embeddings through transformers' CLIP classes, cached by content."""

    def __init__(self, model: str = DEFAULT_CLIP, device: str = "cpu"):
        from transformers import CLIPModel, CLIPProcessor

        path = resolve_evaluator(model)
        try:
            self.model = CLIPModel.from_pretrained(path, dtype=torch.float32).eval().to(device)
            self.processor = CLIPProcessor.from_pretrained(path)
        except OSError as e:
            raise OnewordError(
                f"could not load the CLIP evaluator {model!r}: {e}",
                hint="pass --clip-model with a local CLIP folder, an s3:// folder, a hub id "
                "you can reach, or toyworld-clip",
            ) from e
        self.device = device
        self.identity = {
            "name": model,
            "fingerprint": module_fingerprint(self.model),
            "preprocessing": config_fingerprint(self.processor.image_processor.to_dict()),
        }
        self._images: dict[str, torch.Tensor] = {}
        self._texts: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def images(self, images: list[Image.Image], batch_size: int = 64) -> torch.Tensor:
        """Normalised image embeddings (N, D)."""
        keys = [_image_key(im) for im in images]
        todo = [(k, im) for k, im in zip(keys, images) if k not in self._images]
        for i in range(0, len(todo), batch_size):
            chunk = todo[i : i + batch_size]
            px = self.processor(images=[im.convert("RGB") for _, im in chunk], return_tensors="pt")["pixel_values"]
            emb = self.model.get_image_features(pixel_values=px.to(self.device))
            emb = getattr(emb, "pooler_output", emb)
            for (k, _), e in zip(chunk, torch.nn.functional.normalize(emb.float(), dim=-1).cpu()):
                self._images[k] = e
        return torch.stack([self._images[k] for k in keys])

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        """Normalised text embeddings (N, D)."""
        todo = sorted({t for t in texts if t not in self._texts})
        if todo:
            tok = self.processor.tokenizer(todo, padding=True, truncation=True, return_tensors="pt")
            emb = self.model.get_text_features(**{k: v.to(self.device) for k, v in tok.items()})
            emb = getattr(emb, "pooler_output", emb)
            for t, e in zip(todo, torch.nn.functional.normalize(emb.float(), dim=-1).cpu()):
                self._texts[t] = e
        return torch.stack([self._texts[t] for t in texts])


class DinoScorer:
    """DINO ViT CLS embeddings through transformers' ViT classes (DreamBench's DINO score)."""

    def __init__(self, model: str = DEFAULT_DINO, device: str = "cpu"):
        from transformers import AutoImageProcessor, ViTModel

        path = resolve_evaluator(model)
        try:
            self.model = ViTModel.from_pretrained(path, add_pooling_layer=False, dtype=torch.float32).eval().to(device)
            self.processor = AutoImageProcessor.from_pretrained(path)
        except OSError as e:
            raise OnewordError(
                f"could not load the DINO model {model!r}: {e}",
                hint="pass --dino-model with a local ViT folder or a reachable hub id, or leave it empty to skip DINO",
            ) from e
        self.device = device
        self.identity = {
            "name": model,
            "fingerprint": module_fingerprint(self.model),
            "preprocessing": config_fingerprint(self.processor.to_dict()),
        }
        self._cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def images(self, images: list[Image.Image], batch_size: int = 64) -> torch.Tensor:
        """Normalised CLS embeddings (N, D)."""
        keys = [_image_key(im) for im in images]
        todo = [(k, im) for k, im in zip(keys, images) if k not in self._cache]
        for i in range(0, len(todo), batch_size):
            chunk = todo[i : i + batch_size]
            px = self.processor(images=[im.convert("RGB") for _, im in chunk], return_tensors="pt")["pixel_values"]
            cls = self.model(pixel_values=px.to(self.device)).last_hidden_state[:, 0]  # (B, D)
            for (k, _), e in zip(chunk, torch.nn.functional.normalize(cls.float(), dim=-1).cpu()):
                self._cache[k] = e
        return torch.stack([self._cache[k] for k in keys])
