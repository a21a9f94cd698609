"""Held-out toy-world concepts: things the base model knows only through ordinary words.

Each colour-shape pair in `world.HELD_OUT` was never rendered for training, though its colour and its shape
were, so the model can draw it by composition ("a purple star") and textual inversion must learn it from five
pictures alone. `red-heart` is the negative control: the model never saw a heart at all.
"""

import random
from dataclasses import dataclass
from pathlib import Path

from oneword.errors import OnewordError
from oneword.toyworld import world


@dataclass(frozen=True)
class ToyConcept:
    """A held-out concept: its name, colour, shape, and whether the model can draw it at all."""

    name: str
    colour: str
    shape: str
    drawable: bool = True  # False for the negative control

    @property
    def words(self) -> str:
        """The concept in ordinary words (the upper bound TI is compared with)."""
        return f"{self.colour} {self.shape}"


CONCEPTS = {f"{c}-{s}": ToyConcept(f"{c}-{s}", c, s) for c, s in world.HELD_OUT}
CONCEPTS["red-heart"] = ToyConcept("red-heart", "red", "heart", drawable=False)


def get_concept(name: str) -> ToyConcept:
    if name not in CONCEPTS:
        raise OnewordError(f"unknown toy-world concept {name!r}", hint=f"use one of {', '.join(CONCEPTS)}")
    return CONCEPTS[name]


def write_concept(name: str, out: Path, n: int = 5, seed: int = 0) -> list[Path]:
    """Render `n` training pictures of a held-out concept into `out` (PNG), in varied sizes, places and
    backgrounds, plain pattern (the concept is its colour and shape).

    Returns:
        The written files.
    """
    c = get_concept(name)
    rng = random.Random(f"{name}:{seed}")
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        scene = world.sample_scene(rng, shape=c.shape, colour=c.colour, pattern="plain", training=False)
        p = out / f"{name}-{i}.png"
        world.render(scene).save(p)
        files.append(p)
    return files
