"""Preprocessing: turn a user's photos into clean, square, deduplicated training images plus a manifest.

Each image gets its EXIF orientation applied, is converted to RGB from whatever Pillow mode it was read in
(alpha composited onto white, high-bit-depth greys scaled to 8 bits), centre-cropped or padded to a square and
resized to the training resolution. Exact duplicates and pictures too small to train from are dropped. Every
file that is skipped is listed with the reason.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import warnings
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from oneword import __version__, storage
from oneword.errors import OnewordError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".avif", ".bmp", ".gif", ".tif", ".tiff"}
# iPhones save HEIC by default; Pillow cannot read it without a plugin, so such files get their own advice
UNREADABLE_SUFFIXES = {
    ".heic": "export it as JPEG (on an iPhone: Settings > Camera > Formats > Most Compatible)",
    ".heif": "export it as JPEG",
}
MANIFEST = "manifest.json"
FRAMES = "oneword.frames"  # load_image's note, in an image's info, of the frames its file holds
REDUCED = "oneword.reduced"  # and of the factor by which a very large JPEG was reduced as it was decoded
ORIGINAL_SIZE = "oneword.original_size"  # and of its size before that, upright
SRGB = ImageCms.createProfile("sRGB")
# Above a 108 MP phone sensor (about 360 MB decoded as RGB, within a CPU step's memory limit). A bigger JPEG (a
# 200 MP phone photo) is decoded at 1/2, 1/4 or 1/8 of its size, which its format does as cheaply, and still
# holds far more pixels than any training resolution; another format that big is refused (it may be a
# decompression bomb), as is a file too big even at 1/8.
MAX_PIXELS = 120_000_000
JPEG_REDUCTIONS = (2, 4, 8)
# MAX_PIXELS decides below Pillow's error, so its warning (past 89 MP) says nothing more. A filter set once, not a
# catch_warnings() around each decode: that swaps the process's filters, which is not safe while threads decode
# (the plan's lookup decodes two concepts' photos at once).
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
DOWNSCALE_HINT = "downscale it (e.g. to 4000 pixels on its long side) and add it again"
# A photo whose short side is under a quarter of the training resolution would be upscaled more than 4x: the
# model would learn interpolation blur rather than the concept, so it is refused. Under half it is kept, with a
# warning that it will look blurry.
MIN_SIDE_FRACTION = 1 / 4
WARN_SIDE_FRACTION = 1 / 2
# The paper learns a concept from 3-5 photos (a style from a few more). Fewer, and the token learns one picture's
# pose and background along with the concept; far more is often a folder of several things, not one concept.
FEW_PHOTOS, MANY_PHOTOS = 3, 30


@dataclass(frozen=True)
class ImageRecord:
    """One processed image: where it came from and what it became."""

    file: str  # path relative to the dataset folder
    source: str
    source_sha256: str
    original_size: tuple[int, int]
    processed_sha256: str


@dataclass
class Manifest:
    """What `preprocess` wrote: the images, the files it skipped and why, and the settings."""

    resolution: int
    mode: str
    images: list[ImageRecord]
    skipped: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    oneword_version: str = __version__
    photos: str = ""  # the folder or s3:// prefix they were read from, as given (a later step's failure names it)

    def save(self, folder: Path) -> Path:
        """Write `manifest.json` into `folder` and return its path."""
        p = folder / MANIFEST
        p.write_text(json.dumps(asdict(self), indent=2))
        return p

    @staticmethod
    def photos_of(folder: str | Path) -> str:
        """The photos' folder of the dataset in `folder`, or '' where it has none (an earlier step failed)."""
        p = Path(folder) / MANIFEST
        if not p.is_file():
            return ""
        return str(storage.read_json(p, f"run `oneword preprocess` again for {folder}").get("photos", ""))

    @classmethod
    def load(cls, folder: Path) -> Manifest:
        """Read `manifest.json` from a dataset folder written by `preprocess`."""
        p = Path(folder) / MANIFEST
        if not p.exists():
            raise OnewordError(f"{p} not found", hint="run `oneword preprocess` on the images first")
        again = f"run `oneword preprocess` again for {Path(folder)}"
        d = storage.read_json(p, hint=again)
        try:
            d["images"] = [ImageRecord(**{**r, "original_size": tuple(r["original_size"])}) for r in d["images"]]
            return cls(**d)
        except (KeyError, TypeError) as e:  # a field missing, or one of another kind
            raise OnewordError(f"{p} is not a manifest oneword wrote ({type(e).__name__}: {e})", hint=again) from e


def visible_files(folder: Path) -> list[Path]:
    """The files under `folder`, in subfolders too, hidden ones (and those in hidden folders) apart; sorted.
    Symbolic links that lead to no file (broken, or to a folder, which is not followed) are among them, so that
    whoever reads them says why they were skipped."""
    found: list[Path] = []
    unreadable: list[Path] = []  # a subfolder that cannot be listed is one of them: said, its photos not lost unsaid

    def refused(e: OSError) -> None:
        if e.filename and Path(e.filename) != folder:
            unreadable.append(Path(e.filename))

    for here, dirs, files in os.walk(folder, onerror=refused):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(here) / f for f in files if not f.startswith(".")]
        found += [Path(here) / d for d in dirs if (Path(here) / d).is_symlink()]  # a link to a folder: told why
    return sorted(found + unreadable)


def _photo_folder(source: str | Path, download_dir: Path | None = None) -> Path:
    """The local folder of a concept's photos: a folder as given, or an `s3://` prefix downloaded."""
    return storage.download_prefix(str(source), download_dir) if storage.is_s3(source) else Path(source).expanduser()


def discover_images(source: str | Path, download_dir: Path | None = None) -> list[Path]:
    """List the candidate files in a local folder or `s3://` prefix (downloaded first: into `download_dir`, else
    into oneword's cache).

    Hidden files are ignored. Every other file is returned, image or not, so that `preprocess` can report
    the ones it cannot read.

    Returns:
        Sorted local paths.
    """
    folder = _photo_folder(source, download_dir)
    if folder.is_file():
        raise OnewordError(f"{folder} is a file: pass the folder of the concept's photos", hint="e.g. photos/my-cat/")
    if not folder.is_dir():
        raise OnewordError(f"image folder {folder} does not exist", hint="pass a folder of photos of the concept")
    files = visible_files(folder)
    if not files:
        raise OnewordError(f"image folder {source} is empty", hint="put 3-5 photos of the concept in it")
    return files


def load_image(path: Path) -> Image.Image:
    """Open and fully decode an image, with its EXIF orientation applied.

    A JPEG over `MAX_PIXELS` is decoded reduced (`JPEG_REDUCTIONS`). The image's info says how many frames the
    file holds (`FRAMES`), by what factor it was reduced (`REDUCED`) and its size before (`ORIGINAL_SIZE`).

    Raises:
        ValueError: with the reason, if the file is not an image, is corrupt or truncated, or has more pixels
            than oneword decodes.
    """
    try:
        with _open(path) as im:
            pixels, size = im.width * im.height, im.size
            reduced = next((k for k in (1, *JPEG_REDUCTIONS) if pixels / (k * k) <= MAX_PIXELS), None)
            if reduced is None or (reduced > 1 and im.format not in ("JPEG", "MPO")):
                raise ValueError(
                    f"refused: {im.width}x{im.height} pixels ({pixels / 1e6:.0f} MP) is more than oneword decodes "
                    f"from a {im.format or 'file'} ({_limit(im.format)}); {DOWNSCALE_HINT}"
                )
            if reduced > 1:
                im.draft(im.mode, (im.width // reduced, im.height // reduced))
            im.load()
            out = ImageOps.exif_transpose(im)
            # an animation's: the copy has its first frame (a camera's MPO holds a preview image, no animation)
            out.info[FRAMES] = 1 if im.format == "MPO" else getattr(im, "n_frames", 1)
            out.info[REDUCED] = reduced
            out.info[ORIGINAL_SIZE] = size if out.size == im.size else size[::-1]  # turned upright: w and h swap
            return out
    except UnidentifiedImageError as e:
        raise ValueError("not an image file Pillow can read") from e
    except OSError as e:
        raise ValueError(f"corrupt or truncated image ({e}): copy the photo again") from e
    except (ValueError, MemoryError):
        raise
    except Exception as e:  # a damaged file fails Pillow's decoders in many ways (SyntaxError, TypeError, struct.error)
        raise ValueError(f"damaged image: it could not be decoded ({type(e).__name__}: {e}); copy the photo "
                         "again") from e  # fmt: skip


def _open(path: Path) -> Image.Image:
    """`Image.open`, but a JPEG past Pillow's own guard is opened all the same: `load_image` decodes it reduced."""
    try:
        return Image.open(path)
    except Image.DecompressionBombError as e:
        with open(path, "rb") as f:
            jpeg = f.read(3) == b"\xff\xd8\xff"
        if not jpeg:
            raise ValueError(f"refused: {e}; {DOWNSCALE_HINT}") from e
        from PIL import JpegImagePlugin

        try:
            return JpegImagePlugin.JpegImageFile(path)  # the plugin itself: its header read, no pixel decoded yet
        except SyntaxError as bad:  # Pillow's word for a header it cannot parse
            raise ValueError(f"refused: {e}; {DOWNSCALE_HINT}") from bad


def opens(path: Path) -> bool:
    """Whether `path`'s header reads as a picture preprocess opens (`_open`: a JPEG past Pillow's guard too),
    without decoding it."""
    if not Path(path).is_file():  # a pipe would be read forever, a folder or a broken link not at all
        return False
    try:
        with _open(path):
            return True
    except Exception:  # Pillow's refusals come in many types
        return False


def _suffix_for(path: Path) -> str | None:
    """The suffix preprocess reads `path` by, where its header is that of a picture of such a kind."""
    if not opens(path):
        return None
    with _open(path) as im:
        kind = im.format
    usual = (".jpg", ".png", ".webp", ".tif", ".gif", ".bmp", ".avif")  # before .jfif, .jpe
    known = sorted(Image.registered_extensions().items(), key=lambda e: (e[0] not in usual, e[0]))
    return next((ext for ext, fmt in known if fmt == kind and ext in IMAGE_SUFFIXES), None)


def _limit(image_format: str | None) -> str:
    if image_format in ("JPEG", "MPO"):
        return f"{MAX_PIXELS * JPEG_REDUCTIONS[-1] ** 2 / 1e9:.1f} GP, read at 1/{JPEG_REDUCTIONS[-1]} of its size"
    return f"{MAX_PIXELS / 1e6:.0f} MP; a JPEG can be up to {JPEG_REDUCTIONS[-1] ** 2}x that"


def to_rgb(im: Image.Image, notes: list[str] | None = None) -> Image.Image:
    """Convert an image in any Pillow mode to RGB, keeping what it shows.

    - 'I;16*', 'I' and 'F' greys are scaled from their bit depth to 8 bits (see `high_bit_depth_to_l`), not
      clipped at 255 as Pillow's own conversion does;
    - 'LAB' goes through ImageCms (CIE Lab D50 to sRGB);
    - anything with alpha ('LA', 'La', 'PA', 'RGBA', 'RGBa', or a 'transparency' colour such as a GIF's) is
      composited onto white, the colour `square` pads with;
    - everything else ('1', 'L', 'P', 'RGB', 'RGBX', 'CMYK', 'YCbCr', 'HSV') uses Pillow's conversion.

    An embedded colour profile that cannot be applied is said in `notes` where given (else logged).
    """
    if icc := im.info.get("icc_profile"):  # a phone's Display P3, Adobe RGB, a print CMYK: its numbers are not sRGB's
        if im.mode in ("P", "PA") or (im.mode in ("RGB", "L") and "transparency" in im.info):
            im = im.convert("RGBA")  # a palette, or a transparent colour, which the conversion would not keep
        im = _to_srgb(im, icc, notes)
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        im = high_bit_depth_to_l(im)
    if im.mode == "LAB":
        return ImageCms.profileToProfile(
            im, ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), outputMode="RGB"
        )
    if im.mode in ("La", "RGBa"):  # premultiplied alpha: Pillow composites only straight alpha
        im = im.convert({"La": "LA", "RGBa": "RGBA"}[im.mode])
    if "A" in im.getbands() or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def _to_srgb(im: Image.Image, icc: bytes, notes: list[str] | None = None) -> Image.Image:
    """`im`'s colours in sRGB, through its embedded ICC profile (what the VAE, trained on sRGB pictures, reads);
    `im` as it was where LittleCMS cannot convert its mode or profile."""
    alpha = "A" in im.getbands()
    if im.mode not in ("RGB", "RGBA", "CMYK", "L"):
        return im
    try:
        out = ImageCms.profileToProfile(
            im,
            ImageCms.ImageCmsProfile(io.BytesIO(icc)),
            SRGB,
            renderingIntent=ImageCms.Intent.PERCEPTUAL,
            outputMode="RGBA" if alpha else "RGB",
        )
    except (ImageCms.PyCMSError, OSError, ValueError) as e:
        said = f"its colour profile could not be applied ({e}): its numbers are read as sRGB"
        if notes is None:
            log.warning(said)
        else:
            notes.append(said)
        return im
    out.info.pop("icc_profile", None)
    return out


def high_bit_depth_to_l(im: Image.Image) -> Image.Image:
    """Scale an 'I;16*', 'I' or 'F' grey image to 8-bit 'L', mapping its white level to 255.

    The white level is 65535 for 'I;16*'. For 'I' and 'F' it is guessed from the brightest pixel: 1.0 for
    floats that are all within 0..1, else 255 if the values fit 8 bits, else 65535 if they fit 16 bits, else
    the brightest pixel itself. Negative values become black, and so do a float image's NaN and infinities.
    """
    a = np.nan_to_num(np.asarray(im, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    peak = float(a.max(initial=0.0))
    if im.mode.startswith("I;16"):
        white = 65535.0
    elif im.mode == "F" and peak <= 1.0:
        white = 1.0
    else:
        white = next((w for w in (255.0, 65535.0) if peak <= w), peak)
    return Image.fromarray(np.clip(np.rint(a * (255.0 / white)), 0, 255).astype(np.uint8))


def square(im: Image.Image, resolution: int, mode: Literal["crop", "pad"]) -> Image.Image:
    """Centre-crop (or pad with white) to a square, then resize to `resolution` pixels a side."""
    if mode == "crop":
        return ImageOps.fit(im, (resolution, resolution), Image.Resampling.LANCZOS)
    # resized before it is padded: a canvas as wide as a panorama's long side, squared, would not fit in memory
    return ImageOps.pad(im, (resolution, resolution), Image.Resampling.LANCZOS, color=(255, 255, 255))


def min_side(resolution: int) -> int:
    """The shortest side, in pixels, that a picture needs to be trained from at `resolution`."""
    return math.ceil(resolution * MIN_SIDE_FRACTION)


def scaled_side(size: tuple[int, int], mode: str = "crop") -> int:
    """The side of a picture of `size` that is scaled to the training resolution: the short one when cropping
    to a square, the long one when padding to it."""
    return max(size) if mode == "pad" else min(size)


def size_problem(size: tuple[int, int], resolution: int, mode: str = "crop") -> str | None:
    """Why a picture of `size` (width, height) is too small to train from at `resolution`, or None if it is not."""
    if scaled_side(size, mode) >= min_side(resolution):
        return None
    side = "long" if mode == "pad" else "short"
    return (
        f"too small to train from: {size[0]}x{size[1]} pixels, and the {side} side must be at least "
        f"{min_side(resolution)} pixels at resolution {resolution}; use a larger original of this photo or a "
        "lower --resolution"
    )


def dataset_image(path: Path, sha256: str, said_too: str = "") -> Image.Image:
    """A preprocessed image, as its manifest says it is (`sha256`, of its pixels): one edited or replaced since
    `oneword preprocess` wrote it is refused, naming it (`said_too`: what the refusal spared, for the hint)."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except OSError as e:  # missing, truncated, not an image
        raise OnewordError(
            f"{path} cannot be read ({e})", hint="preprocess the photos again: oneword preprocess PHOTOS -o DATASET"
        ) from e
    if pixel_sha256(im) != sha256:
        raise OnewordError(
            f"{path} is not the image its manifest names (changed since `oneword preprocess` wrote it)",
            hint="preprocess the photos again rather than editing a dataset" + (f"; {said_too}" if said_too else ""),
        )
    return im


def pixel_sha256(im: Image.Image) -> str:
    """sha256 of an image's size, mode and raw pixels (independent of how the file was encoded)."""
    h = hashlib.sha256(f"{im.mode}:{im.width}x{im.height}:".encode())
    h.update(im.tobytes())
    return h.hexdigest()


def preprocess(
    source: str | Path,
    out_dir: Path,
    resolution: int = 512,
    mode: Literal["crop", "pad"] = "crop",
    download_dir: Path | None = None,
    decoding: AbstractContextManager | None = None,
) -> Manifest:
    """Preprocess the images of one concept.

    Args:
        source: local folder or `s3://` prefix of photos.
        out_dir: dataset folder to write (`images/*.png` and `manifest.json`); replaced only on success.
        resolution: side of the square training images, in pixels.
        mode: `crop` (centre-crop to a square) or `pad` (pad with white to a square).
        download_dir: where photos under an `s3://` prefix are downloaded (default: oneword's cache, where the
            next run finds them).
        decoding: held while the photos are decoded, after their download (e.g. a semaphore that bounds how
            many concepts' photos threads decode at once, and so the memory they take).

    Returns:
        The `Manifest` written to `out_dir/manifest.json`.

    Raises:
        OnewordError: if no valid image is left; the message lists every skipped file and why.
    """
    if mode not in ("crop", "pad"):
        raise OnewordError(f"unknown mode {mode!r}", hint="use 'crop' or 'pad'")
    root = _photo_folder(source, download_dir)  # an s3:// prefix is listed (and fetched) once, not twice
    files = discover_images(root)
    if not storage.is_s3(source) and Path(out_dir).resolve().is_relative_to(root.resolve()):
        raise OnewordError(
            f"the output folder {out_dir} is inside the photo folder {source}: its pictures would be read as "
            "photos of the concept the next time",
            hint="write the dataset to a folder outside the photos' folder",
        )
    records: list[ImageRecord] = []
    skipped: list[dict] = []
    notes: list[str] = []
    seen: dict[str, str] = {}
    nested: list[str] = []  # the photos used from subfolders
    written_by = "a dataset written by `oneword preprocess`"
    with decoding or nullcontext(), storage.atomic_dir(Path(out_dir), MANIFEST, written_by) as tmp:
        (tmp / "images").mkdir()
        for path in files:
            rel = path.relative_to(root).as_posix()
            shown = f"{str(source).rstrip('/')}/{rel}"
            suffix = path.suffix.lower()
            if suffix in UNREADABLE_SUFFIXES:
                skipped.append({"source": shown, "reason": f"{suffix} photos cannot be read: "
                                f"{UNREADABLE_SUFFIXES[suffix]}"})  # fmt: skip
                continue
            if path.is_dir():
                why = ("a link to a folder, which is not followed: link the photos, or pass the folder itself"
                       if path.is_symlink() else "a folder that cannot be read: check its permissions")  # fmt: skip
                skipped.append({"source": shown, "reason": why})
                continue
            if not path.is_file():  # a pipe, a socket or a device would be read forever, or not at all
                why = "a link that leads to no file" if path.is_symlink() else "not a regular file (a pipe or device)"
                skipped.append({"source": shown, "reason": why})
                continue
            if suffix not in IMAGE_SUFFIXES:
                why = f"not an image file (suffix {path.suffix!r})"
                if named := _suffix_for(path):  # a picture of a kind preprocess reads, named otherwise
                    why = f"a picture without an image suffix ({path.suffix!r}): rename it {path.stem}{named}"
                skipped.append({"source": shown, "reason": why})
                continue
            colour: list[str] = []
            try:  # one photo that cannot be read (permissions, a mode Pillow cannot convert) loses no other
                data = path.read_bytes()
                if not data:
                    skipped.append({"source": shown, "reason": "empty file (0 bytes): copy the photo again"})
                    continue
                source_sha = hashlib.sha256(data).hexdigest()
                if source_sha in seen:
                    skipped.append({"source": shown, "reason": f"exact duplicate of {seen[source_sha]}"})
                    continue
                im = load_image(path)
                too_small = size_problem(im.size, resolution, mode)
                if too_small:
                    skipped.append({"source": shown, "reason": too_small})
                    continue
                out = square(to_rgb(im, colour), resolution, mode)
            except (ValueError, OSError) as e:
                skipped.append({"source": shown, "reason": str(e)})
                continue
            except MemoryError:
                raise
            except Exception as e:  # a file that decodes into what no conversion takes: it alone is skipped
                skipped.append({"source": shown, "reason": f"could not be converted ({type(e).__name__}: {e})"})
                continue
            seen[source_sha] = shown
            notes += [f"{shown}: {c}" for c in colour]
            if mode == "pad" and min(im.size) / max(im.size) < MIN_SIDE_FRACTION:
                notes.append(
                    f"{shown} is {im.width}x{im.height}: padded to a square, it fills under a quarter of it, and "
                    "the model learns mostly white; crop it closer to the concept"
                )
            if im.info.get(FRAMES, 1) > 1:
                notes.append(f"{shown} is animated: only its first frame is used")
            if (k := im.info.get(REDUCED, 1)) > 1:
                log.info("%s: decoded at 1/%d of its size (%dx%d), as very large JPEGs are", shown, k, *im.size)
            if scaled_side(im.size, mode) < resolution * WARN_SIDE_FRACTION:
                notes.append(
                    f"{shown} is {im.width}x{im.height}, smaller than half the training resolution "
                    f"({resolution}); it will look blurry to the model"
                )
            processed_sha = pixel_sha256(out)
            if processed_sha in seen:
                skipped.append({"source": shown, "reason": f"same pixels as {seen[processed_sha]}"})
                continue
            seen[processed_sha] = shown
            name = f"images/{processed_sha[:16]}.png"
            out.info.pop("icc_profile", None)  # its numbers are sRGB's now, whatever the photo's profile said
            out.save(tmp / name)
            records.append(ImageRecord(name, shown, source_sha, im.info.get(ORIGINAL_SIZE, im.size), processed_sha))
            nested += [rel] if "/" in rel else []
        if not records:  # the error lists every skipped file: not also a warning each before it
            listing = "\n".join(f"  - {s['source']}: {s['reason']}" for s in skipped)
            raise OnewordError(
                f"no valid image left in {source}; skipped:\n{listing}",
                hint="add JPEG or PNG photos of the concept (3-5 is typical), each at least "
                f"{min_side(resolution)} pixels on its {'long' if mode == 'pad' else 'short'} side",
            )
        if nested:  # a `rejected/` folder, or a parent of several concepts' folders, would be trained unsaid
            folders = ", ".join(sorted({rel.split("/")[0] + "/" for rel in nested}))
            notes.append(f"{len(nested)} of the photos used come from subfolders of {source} ({folders}): they are "
                         "trained as photos of this concept; move away any that are not")  # fmt: skip
        if len(records) < FEW_PHOTOS:
            notes.append(
                f"{source} gives {len(records)} photo{'s' * (len(records) > 1)}: with fewer than {FEW_PHOTOS}, the "
                "token learns their pose and background along with the concept; add photos of it in other places "
                "(3-5 is typical)"
            )
        elif len(records) > MANY_PHOTOS:
            notes.append(
                f"{source} gives {len(records)} photos: a concept is learned from 3-5 (a style from a few more); "
                "check that they all show the one concept"
            )
        for s in skipped:
            log.warning("skipped %s: %s", s["source"], s["reason"])
        for n in notes:
            log.warning(n)
        manifest = Manifest(resolution, mode, records, skipped, notes, photos=str(source))
        manifest.save(tmp)
    log.info("preprocessed %d image(s) into %s (%d skipped)", len(records), out_dir, len(skipped))
    return manifest
