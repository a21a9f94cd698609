"""The VAE latent cache: encode each training image and its mirror once, not at every step.

We store the posterior's mean and std, not one sample, so a training step draws `mean + std * eps` exactly as
encoding the image at every step would (Rombach et al. 2022, the LDM's `DiagonalGaussianDistribution`).
Entries are keyed by (VAE fingerprint, image hash, resolution, flip) in a shared cache, so reruns and other
concepts reuse them. Each image also keeps its SDXL size and crop conditioning (`oneword.conditioning.time_ids`),
which SDXL's UNet reads beside the text.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, safe_open

from oneword import __version__, storage
from oneword.conditioning import default_time_ids, time_ids
from oneword.errors import OnewordError
from oneword.images import Manifest, dataset_image
from oneword.models import LoadedModel, load_base_model, module_fingerprint
from oneword.profiles import profile_of

log = logging.getLogger(__name__)

LATENTS_FILE = "latents.safetensors"
LATENT_CACHE = "a latent cache written by `oneword cache-latents`"
DATASET_DIR = "dataset"  # a copy of the preprocessed images the latents were encoded from


# an image edited since preprocess would poison the cache for every run that shares it
LATENT_CACHE_UNTOUCHED = "nothing was written to the shared latent cache"


@dataclass
class LatentSet:
    """The cached latents of one concept's images.

    `mean` and `std` have shape (N, 2, C, h, w): N images, unflipped and mirrored; `time_ids` (N, 2, 6) their
    original size, crop top-left and target size (None in caches written by older versions: square, uncropped).
    """

    mean: torch.Tensor
    std: torch.Tensor
    image_sha256: list[str]
    scaling_factor: float
    shift_factor: float
    meta: dict
    time_ids: torch.Tensor | None = None

    def time_ids_or_default(self) -> torch.Tensor:
        """`time_ids`, or those of square, uncropped pictures at the cached resolution."""
        if self.time_ids is not None:
            return self.time_ids
        res = int(self.meta.get("resolution") or self.mean.shape[-1] * 8)
        return torch.tensor(default_time_ids(res), dtype=torch.float32).expand(len(self), 2, 6).clone()

    def __len__(self) -> int:
        return self.mean.shape[0]

    def save(self, folder: Path) -> Path:
        """Write `latents.safetensors` (tensors plus metadata in the header) into `folder`."""
        folder.mkdir(parents=True, exist_ok=True)
        p = folder / LATENTS_FILE
        meta = {
            **self.meta,
            "image_sha256": self.image_sha256,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
        }
        tensors = {"mean": self.mean.contiguous(), "std": self.std.contiguous()}
        if self.time_ids is not None:
            tensors["time_ids"] = self.time_ids.contiguous()
        return storage.save_tensors(tensors, p, metadata={"oneword": json.dumps(meta)})

    @classmethod
    def load(cls, folder: Path) -> LatentSet:
        """Read a latent set written by `cache_latents` (the folder or the file itself)."""
        p = Path(folder)
        p = p / LATENTS_FILE if p.is_dir() else p
        if not p.exists():
            raise OnewordError(f"{p} not found", hint="run `oneword cache-latents` first")
        try:
            with safe_open(str(p), "pt") as f:
                meta = json.loads((f.metadata() or {})["oneword"])
            t = load_file(str(p))
            missing = [k for k in ("mean", "std") if k not in t] + [
                k for k in ("image_sha256", "scaling_factor", "shift_factor") if k not in meta
            ]
        except Exception as e:  # not safetensors, or safetensors of something else: a bad header comes in many types
            raise OnewordError(
                f"{p} is not a latent set oneword wrote ({type(e).__name__}: {e})",
                hint="pass the folder `oneword cache-latents -o` wrote (it holds latents.safetensors)",
            ) from e
        if missing:
            raise OnewordError(
                f"{p} is not a latent set oneword wrote (it has no {', '.join(missing)})",
                hint="pass the folder `oneword cache-latents -o` wrote (it holds latents.safetensors)",
            )
        for key in ("mean", "std"):
            if not torch.isfinite(t[key]).all():  # a damaged file would only show as a NaN loss, steps later
                raise OnewordError(
                    f"{p} holds non-finite values (NaN or inf) in its {key!r} latents",
                    hint="the file is damaged: run `oneword cache-latents` again for this concept",
                )
        return cls(
            t["mean"],
            t["std"],
            meta.pop("image_sha256"),
            meta.pop("scaling_factor"),
            meta.pop("shift_factor"),
            meta,
            t.get("time_ids"),
        )


def _cached(f: Path) -> dict[str, torch.Tensor] | None:
    """A shared-cache entry, or None when it is missing or unusable (cut short, or non-finite): then it is
    encoded again and replaced."""
    if not f.exists():
        return None
    try:
        entry = load_file(str(f))
    except Exception:  # safetensors' errors for a truncated file come in several types
        log.warning("latent cache entry %s is unreadable; encoding it again", f)
        return None
    if not all(torch.isfinite(t).all() for t in entry.values()):
        log.warning("latent cache entry %s holds non-finite values; encoding it again", f)
        return None
    return entry


def entry_key(vae_fingerprint: str, image_sha256: str, resolution: int, flip: bool) -> str:
    """The shared-cache key of one encoded image."""
    return hashlib.sha256(f"{vae_fingerprint}|{image_sha256}|{resolution}|{int(flip)}".encode()).hexdigest()


def _to_tensor(im: Image.Image) -> torch.Tensor:
    a = np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1.0  # [-1, 1], as the VAE was trained
    return torch.from_numpy(a).permute(2, 0, 1)  # (3, H, W)


@torch.no_grad()
def cache_latents(
    dataset_dir: Path,
    base_model: LoadedModel | str,
    out_dir: Path,
    *,
    cache_dir: Path | None = None,
    batch_size: int = 8,
    device: str = "cpu",
) -> LatentSet:
    """Encode a preprocessed dataset with the base model's VAE, reusing the shared cache.

    Args:
        dataset_dir: folder written by `oneword.images.preprocess`.
        base_model: a loaded `LoadedModel` (with its VAE) or a model reference to load.
        out_dir: where to write `latents.safetensors`.
        cache_dir: shared cache folder (default `cache_root()/latents`).
        batch_size: images per VAE forward pass.
        device: torch device for the VAE.

    Returns:
        The `LatentSet` written to `out_dir`.
    """
    manifest = Manifest.load(dataset_dir)
    storage.check_replaceable(Path(out_dir), LATENTS_FILE, LATENT_CACHE)  # before the VAE works, not after
    model = (
        base_model
        if isinstance(base_model, LoadedModel)
        else load_base_model(base_model, parts=("vae",), device=device)
    )
    if model.vae is None:
        raise OnewordError("cache_latents needs the base model's VAE, which was not loaded")
    native = profile_of(model).resolution
    if manifest.resolution != native:  # `oneword preprocess` alone never sees the model: 512 unless told
        log.warning(
            "the images of %s are %d px, but %s draws at %d px: training at another size than the model's "
            "weakens it (preprocess with --resolution %d unless that is meant)",
            dataset_dir,
            manifest.resolution,
            model.source,
            native,
            native,
        )
    vae = model.vae
    vae_fp = module_fingerprint(vae)
    cache = Path(cache_dir) if cache_dir else storage.cache_root() / "latents"
    res = manifest.resolution
    entries: dict[str, dict[str, torch.Tensor]] = {}
    todo: list[tuple[str, Path, bool]] = []
    for rec in manifest.images:
        for flip in (False, True):
            key = entry_key(vae_fp, rec.processed_sha256, res, flip)
            f = cache / key[:2] / f"{key}.safetensors"
            if (hit := _cached(f)) is not None:
                entries[key] = hit
            else:
                todo.append((key, Path(dataset_dir) / rec.file, flip, rec.processed_sha256))
    log.info("latent cache: %d hit(s), %d to encode", len(entries), len(todo))
    # every one checked before any is encoded and cached, and read once (an image and its mirror share it)
    checked = {path: dataset_image(path, sha, LATENT_CACHE_UNTOUCHED) for _, path, _, sha in todo}
    dtype = next(vae.parameters()).dtype
    if dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        # SDXL's VAE overflows in fp16 (its config says so with force_upcast, as diffusers' pipelines read it)
        vae, dtype = vae.float(), torch.float32
    for i in range(0, len(todo), batch_size):
        chunk = todo[i : i + batch_size]
        ims = [checked[p] for _, p, _, _ in chunk]
        x = torch.stack(
            [
                _to_tensor(im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else im)
                for im, (_, _, flip, _) in zip(ims, chunk)
            ]
        ).to(device, dtype)
        dist = vae.encode(x).latent_dist
        for j, (key, path, _, _) in enumerate(chunk):
            e = {"mean": dist.mean[j].float().cpu().contiguous(), "std": dist.std[j].float().cpu().contiguous()}
            if not all(torch.isfinite(t).all() for t in e.values()):  # never into the cache other runs share
                raise OnewordError(
                    f"the VAE made non-finite latents of {path}",
                    hint="check the base model's VAE (its weights, or a half precision it overflows in) and the "
                    "picture; nothing was written to the shared latent cache",
                )
            entries[key] = e
            f = cache / key[:2] / f"{key}.safetensors"
            f.parent.mkdir(parents=True, exist_ok=True)
            tmp = storage.part_path(f)  # parallel steps, in other pods too, may encode the same image at once
            storage.save_tensors(e, tmp)
            tmp.replace(f)
    means, stds = [], []
    for rec in manifest.images:
        pair = [entries[entry_key(vae_fp, rec.processed_sha256, res, flip)] for flip in (False, True)]
        means.append(torch.stack([p["mean"] for p in pair]))
        stds.append(torch.stack([p["std"] for p in pair]))
    sizes = [[time_ids(rec, manifest.mode, res, flip) for flip in (False, True)] for rec in manifest.images]
    latents = LatentSet(
        time_ids=torch.tensor(sizes, dtype=torch.float32),
        mean=torch.stack(means),
        std=torch.stack(stds),
        image_sha256=[r.processed_sha256 for r in manifest.images],
        scaling_factor=float(vae.config.scaling_factor),
        shift_factor=float(getattr(vae.config, "shift_factor", None) or 0.0),
        meta={
            "vae_fingerprint": vae_fp,
            "model_fingerprint": model.fingerprint,
            "model_source": model.source,
            "resolution": res,
            "oneword_version": __version__,
        },
    )
    with storage.atomic_dir(Path(out_dir), LATENTS_FILE, LATENT_CACHE) as tmp:
        latents.save(tmp)
        # the images travel with their latents, so a later step (evaluation of a batch) finds them there: the
        # ones the manifest read at the start names, checked again (a preprocess rerun may have replaced them)
        (tmp / DATASET_DIR / "images").mkdir(parents=True)
        for rec in manifest.images:
            dataset_image(Path(dataset_dir) / rec.file, rec.processed_sha256, LATENT_CACHE_UNTOUCHED)
            shutil.copyfile(Path(dataset_dir) / rec.file, tmp / DATASET_DIR / rec.file)
        manifest.save(tmp / DATASET_DIR)
    return latents
