"""The toy world: 32x32 pictures of one shape, with a caption and the exact attributes of each.

Attributes: shape, colour, pattern (plain/striped/dotted), size (small/large), position and background colour.
Every caption word is a single CLIP token, so the real CLIP tokenizer reads captions word for word.

A few colour-shape pairs (`HELD_OUT`) are never rendered for training: the base model knows "purple" and
"star" but has never drawn a purple star, so textual inversion must learn it from five pictures. `heart` is
never rendered at all: the negative control.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32  # image side in pixels
SS = 4  # supersampling factor for anti-aliased edges

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 140, 20),
    "yellow": (245, 215, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "purple": (140, 50, 190),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "moon")
UNSEEN_SHAPES = ("heart",)  # never rendered in training: the negative control
PATTERNS = ("plain", "striped", "dotted")
SIZES = ("small", "large")
POSITIONS = ("middle", "left", "right", "top", "bottom")
HELD_OUT: tuple[tuple[str, str], ...] = (
    ("purple", "star"),
    ("orange", "ring"),
    ("green", "triangle"),
    ("blue", "cross"),
)
RADIUS = {"small": (6.0, 8.0), "large": (10.5, 13.0)}  # circumradius range, pixels
POSITION_PHRASES = {
    "middle": "in the middle",
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}
PREFIXES = ("", "a photo of ", "a picture of ", "an image of ")


@dataclass(frozen=True)
class Scene:
    """The exact content of one picture."""

    shape: str
    colour: str
    pattern: str
    size: str
    position: str
    background: str
    cx: float
    cy: float
    radius: float

    def as_dict(self) -> dict:
        return asdict(self)


def shade(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """The darker tone used for stripes and dots (grey on black shapes)."""
    if max(rgb) < 60:
        return (110, 110, 110)
    return tuple(int(c * 0.5) for c in rgb)  # type: ignore[return-value]


def allowed(colour: str, shape: str) -> bool:
    """True if (colour, shape) may appear in training pictures."""
    return (colour, shape) not in HELD_OUT and shape not in UNSEEN_SHAPES


def sample_scene(
    rng: random.Random,
    shape: str | None = None,
    colour: str | None = None,
    pattern: str | None = None,
    size: str | None = None,
    position: str | None = None,
    background: str | None = None,
    training: bool = True,
) -> Scene:
    """Draw a random scene; any attribute may be fixed. With `training`, held-out pairs are never drawn."""
    while True:
        s = shape or rng.choice(SHAPES)
        c = colour or rng.choice(list(COLOURS))
        if not training or allowed(c, s):
            break
        if shape and colour:
            raise ValueError(f"{colour} {shape} is held out of training")
    p = pattern or rng.choices(PATTERNS, weights=(0.6, 0.2, 0.2))[0]
    z = size or rng.choice(SIZES)
    bg = background or rng.choice([k for k in COLOURS if k != c])
    r = rng.uniform(*RADIUS[z])
    pos = position or ("middle" if z == "large" else rng.choice(POSITIONS))
    lo, mid = r + 1, SIZE / 2
    jitter = 1.5 if z == "large" else 2.5
    if pos == "middle":
        cx, cy = mid + rng.uniform(-jitter, jitter), mid + rng.uniform(-jitter, jitter)
    else:
        far = rng.uniform(lo, lo + 2.0)
        across = mid + rng.uniform(-jitter, jitter)
        cx, cy = {
            "left": (far, across),
            "right": (SIZE - far, across),
            "top": (across, far),
            "bottom": (across, SIZE - far),
        }[pos]
    return Scene(s, c, p, z, pos, bg, cx, cy, r)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    def ring_pts(n, radius, start_deg, cx=cx, cy=cy):
        a = np.deg2rad(start_deg + 360.0 * np.arange(n) / n)
        return list(zip(cx + radius * np.cos(a), cy + radius * np.sin(a)))

    if shape == "square":
        h = 0.78 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return ring_pts(3, r, -90, cy=cy + 0.15 * r)
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.72 * r, cy), (cx, cy + r), (cx - 0.72 * r, cy)]
    if shape == "star":
        outer, inner = ring_pts(5, r, -90), ring_pts(5, 0.42 * r, -54)
        return [p for pair in zip(outer, inner) for p in pair]
    if shape == "cross":
        a, w = r, 0.32 * r
        return [
            (cx - w, cy - a),
            (cx + w, cy - a),
            (cx + w, cy - w),
            (cx + a, cy - w),
            (cx + a, cy + w),
            (cx + w, cy + w),
            (cx + w, cy + a),
            (cx - w, cy + a),
            (cx - w, cy + w),
            (cx - a, cy + w),
            (cx - a, cy - w),
            (cx - w, cy - w),
        ]
    return None


def shape_mask(shape: str, cx: float, cy: float, r: float, scale: int = SS) -> Image.Image:
    """An 'L' mask of the shape at `scale` times the picture size (255 inside)."""
    n = SIZE * scale
    m = Image.new("L", (n, n), 0)
    d = ImageDraw.Draw(m)
    cx, cy, r = cx * scale, cy * scale, r * scale
    box = lambda rad, x=cx, y=cy: (x - rad, y - rad, x + rad, y + rad)  # noqa: E731
    if shape == "circle":
        d.ellipse(box(0.9 * r), fill=255)
    elif shape == "ring":
        d.ellipse(box(r), fill=255)
        d.ellipse(box(0.55 * r), fill=0)
    elif shape == "moon":
        d.ellipse(box(r), fill=255)
        d.ellipse(box(0.85 * r, cx + 0.5 * r, cy - 0.2 * r), fill=0)
    elif shape == "heart":
        lobe = 0.5 * r
        d.ellipse(box(lobe, cx - 0.45 * r, cy - 0.3 * r), fill=255)
        d.ellipse(box(lobe, cx + 0.45 * r, cy - 0.3 * r), fill=255)
        d.polygon([(cx - 0.93 * r, cy - 0.15 * r), (cx + 0.93 * r, cy - 0.15 * r), (cx, cy + 0.95 * r)], fill=255)
    else:
        pts = _polygon(shape, cx, cy, r)
        if pts is None:
            raise ValueError(f"unknown shape {shape!r}")
        d.polygon(pts, fill=255)
    return m


def _pattern_mask(pattern: str, n: int, scale: int) -> np.ndarray:
    yy, xx = np.mgrid[0:n, 0:n] / scale  # picture-pixel coordinates
    # Coarse enough for the VAE's 4x downsampling to keep (a 4-pixel stripe period came back as a blur).
    if pattern == "striped":
        return (yy % 6.0) < 2.5
    if pattern == "dotted":
        return ((xx % 6.0 - 3.0) ** 2 + (yy % 6.0 - 3.0) ** 2) < 1.5**2
    return np.zeros((n, n), bool)


def render(scene: Scene) -> Image.Image:
    """Draw a scene as a 32x32 RGB picture (anti-aliased by supersampling)."""
    n = SIZE * SS
    mask = np.asarray(shape_mask(scene.shape, scene.cx, scene.cy, scene.radius), dtype=np.float32)[..., None] / 255
    fg = np.empty((n, n, 3), np.float32)
    fg[:] = COLOURS[scene.colour]
    fg[_pattern_mask(scene.pattern, n, SS)] = shade(COLOURS[scene.colour])
    bg = np.asarray(COLOURS[scene.background], np.float32)
    img = (mask * fg + (1 - mask) * bg).astype(np.uint8)
    return Image.fromarray(img).resize((SIZE, SIZE), Image.Resampling.BOX)


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene, rng: random.Random, drop: bool = True) -> str:
    """Describe a scene in the caption grammar; with `drop`, attributes are left out at random.

    10% of captions (with `drop`) are empty, for classifier-free guidance. A left-out shape name becomes the
    generic noun "shape", so "shape" means "some shape" to the model (the initializer textual inversion uses).
    """
    if drop and rng.random() < 0.10:
        return ""
    keep = (lambda p: rng.random() < p) if drop else (lambda p: True)
    words = []
    if keep(0.5):
        words.append(scene.size)
    if scene.pattern != "plain" and keep(0.7):
        words.append(scene.pattern)
    if keep(0.8):
        words.append(scene.colour)
    words.append(scene.shape if keep(0.8) else "shape")
    phrases = []
    if keep(0.7):
        phrases.append(f"on {article(scene.background)} {scene.background} background")
    if keep(0.4) and scene.size == "small":
        phrases.append(POSITION_PHRASES[scene.position])
    if drop:
        rng.shuffle(phrases)
    prefix = rng.choice(PREFIXES) if drop else ""
    return " ".join([prefix + article(words[0]), *words, *phrases])


def full_caption(scene: Scene) -> str:
    """The caption with every attribute named (no prefix)."""
    return caption(scene, random.Random(0), drop=False)


def sample(seed: int, **fixed) -> tuple[Image.Image, str, Scene]:
    """The deterministic world sample of `seed`: (picture, caption, scene)."""
    rng = random.Random(seed)
    scene = sample_scene(rng, **fixed)
    return render(scene), caption(scene, rng), scene
