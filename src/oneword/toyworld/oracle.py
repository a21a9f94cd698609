"""The oracle: what a toy-world picture shows, for checking generated images against what was asked.

Exact where the world allows it: the background is the colour of the picture's border, and the object's colour is
the palette colour most of its pixels are nearest to. A small CNN reads what pixel rules cannot: shape, pattern,
size and position. It is trained on pictures passed through the model's own VAE (encode, decode), so it reads the
soft edges of generated images as well as crisp renders.
"""

import logging
import random
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from oneword.toyworld import world
from oneword.toyworld.architecture import vae_roundtrip

log = logging.getLogger(__name__)

SHAPE_CLASSES = world.SHAPES + world.UNSEEN_SHAPES
HEADS = {"shape": SHAPE_CLASSES, "pattern": world.PATTERNS, "size": world.SIZES, "position": world.POSITIONS}
PALETTE = np.array(list(world.COLOURS.values()), dtype=np.float32)  # (8, 3)
SHADES = np.array([world.shade(c) for c in world.COLOURS.values()], dtype=np.float32)
COLOUR_NAMES = list(world.COLOURS)


class OracleNet(nn.Module):
    """A small CNN with one classification head per attribute."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.GELU(),
            nn.MaxPool2d(2),  # 16x16
            nn.Conv2d(32, 64, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.GELU(),
            nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(64, 128, 3, padding=1),
            nn.GELU(),
            nn.Flatten(),
            nn.Linear(128 * 8 * 8, 256),
            nn.GELU(),
        )
        self.heads = nn.ModuleDict({k: nn.Linear(256, len(v)) for k, v in HEADS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # x: (B, 3, 32, 32) in [-1, 1]
        h = self.body(x)
        return {k: head(h) for k, head in self.heads.items()}


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    a = np.stack([np.asarray(im.convert("RGB").resize((world.SIZE, world.SIZE)), np.float32) for im in images])
    return torch.from_numpy(a / 127.5 - 1).permute(0, 3, 1, 2)


def _nearest(rgb: np.ndarray, table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = ((rgb[..., None, :] - table) ** 2).sum(-1)
    return d.argmin(-1), np.sqrt(d.min(-1))


def background_colour(im: Image.Image) -> str:
    """The palette colour of the picture's border (median of the outer 2-pixel ring)."""
    a = np.asarray(im.convert("RGB"), np.float32)
    ring = np.concatenate(
        [a[:2].reshape(-1, 3), a[-2:].reshape(-1, 3), a[:, :2].reshape(-1, 3), a[:, -2:].reshape(-1, 3)]
    )
    idx, _ = _nearest(np.median(ring, 0), PALETTE)
    return COLOUR_NAMES[int(idx)]


def object_colour(im: Image.Image, background: str | None = None) -> str | None:
    """The palette colour most object pixels are nearest to (pattern shades count for their colour).

    Returns None when no pixel stands out from the background.
    """
    a = np.asarray(im.convert("RGB"), np.float32).reshape(-1, 3)
    bg = np.array(world.COLOURS[background or background_colour(im)], np.float32)
    fg = a[np.sqrt(((a - bg) ** 2).sum(-1)) > 60]
    if len(fg) < 4:
        return None
    table = np.concatenate([PALETTE, SHADES])
    idx, dist = _nearest(fg, table)
    votes = Counter(int(i) % len(PALETTE) for i, d in zip(idx, dist) if d < 70)
    if not votes:
        return None
    return COLOUR_NAMES[votes.most_common(1)[0][0]]


class Oracle:
    """Reads the attributes of toy-world pictures."""

    def __init__(self, net: OracleNet):
        self.net = net.eval()

    @classmethod
    def load(cls, path: Path | None = None) -> "Oracle":
        """Load the shipped oracle (or one at `path`)."""
        from oneword.toyworld.assets import oracle_path

        net = OracleNet()
        net.load_state_dict({k: v.float() for k, v in load_file(str(path or oracle_path())).items()})
        return cls(net)

    @torch.no_grad()
    def predict(self, images: list[Image.Image]) -> list[dict[str, str | None]]:
        """Attributes of each picture: shape, colour, pattern, size, position, background."""
        out = []
        for i in range(0, len(images), 256):
            chunk = images[i : i + 256]
            logits = self.net(to_tensor(chunk))
            for j, im in enumerate(chunk):
                bg = background_colour(im)
                d = {k: HEADS[k][int(logits[k][j].argmax())] for k in HEADS}
                d.update(background=bg, colour=object_colour(im, bg))
                out.append(d)
        return out

    def accuracy(self, images: list[Image.Image], requested: dict[str, str]) -> dict[str, float]:
        """Share of pictures showing each requested attribute, plus `all` (every requested attribute at once)."""
        preds = self.predict(images)
        acc = {k: float(np.mean([p[k] == v for p in preds])) for k, v in requested.items()}
        acc["all"] = float(np.mean([all(p[k] == v for k, v in requested.items()) for p in preds]))
        return acc


def train_oracle(vae, out: Path, steps: int = 2500, batch: int = 128, seed: int = 0) -> dict[str, float]:
    """Train the oracle's CNN on freshly rendered scenes (half passed through `vae`), every shape incl. `heart`.

    Returns:
        Accuracy per head on 2,048 held-out VAE round-tripped pictures.
    """
    torch.manual_seed(seed)
    rng = random.Random(seed)
    net = OracleNet()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps, pct_start=max(0.1, 3 / steps))

    def draw(n: int, r: random.Random):
        scenes = [world.sample_scene(r, shape=r.choice(SHAPE_CLASSES), training=False) for _ in range(n)]
        x = to_tensor([world.render(s) for s in scenes])
        y = {k: torch.tensor([v.index(getattr(s, k)) for s in scenes]) for k, v in HEADS.items()}
        return x, y

    for step in range(steps):
        x, y = draw(batch, rng)
        half = batch // 2
        x[:half] = vae_roundtrip(vae, x[:half])
        x = x + 0.03 * torch.randn_like(x)
        logits = net(x)
        loss = sum(nn.functional.cross_entropy(logits[k], y[k]) for k in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0:
            log.info("oracle step %d: loss %.4f", step, loss.item())
    net.eval()
    x, y = draw(2048, random.Random(seed + 99))
    x = vae_roundtrip(vae, x)
    with torch.no_grad():
        logits = net(x)
    acc = {k: float((logits[k].argmax(-1) == y[k]).float().mean()) for k in HEADS}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half().contiguous() for k, v in net.state_dict().items()}, str(out))
    return acc
