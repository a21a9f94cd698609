"""Checkpoint selection: pick the step that best trades reconstruction for editability.

Each checkpoint is scored on a small budget of pictures, so its scores carry noise: two checkpoints count as equal
in a score when they differ by less than `tolerance` or by less than `Z` standard errors of their difference,
whichever is larger (`within`). Rules:

- `balanced`: the highest editability among checkpoints whose reconstruction equals the best one's.
- `latest-editable`: of those same checkpoints, the latest whose editability equals the highest among them. A
  vector keeps learning the concept after its score stops rising, and an evaluator that misses part of it (the toy
  CLIP weighs colour over shape; CLIP is weak on fine shape and counting) rates early, half-learned checkpoints as
  high as later ones; later wins unless editability really falls.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from oneword.errors import OnewordError
from oneword.evaluation.gate import known_se

SelectionRule = Literal["balanced", "latest-editable"]
SELECTION_RULES: tuple[str, ...] = ("balanced", "latest-editable")
Z = 2.0  # standard errors of a difference within which two checkpoints' scores count as equal


@dataclass(frozen=True)
class CurvePoint:
    """Scores of one checkpoint (on the small selection budget)."""

    step: int
    reconstruction: float
    editability: float
    reconstruction_se: float = 0.0  # standard errors over the budget's images (0: not measured)
    editability_se: float = 0.0
    # with a DINO evaluator: subject fidelity in the reconstruction pictures, and kept through the edit pictures
    fidelity: float | None = None
    fidelity_se: float = 0.0
    kept: float | None = None
    kept_se: float = 0.0


def within(a: CurvePoint, b: CurvePoint, key: str, tolerance: float) -> bool:
    """Whether `b`'s score `key` is as good as `a`'s: lower by at most `tolerance` or `Z` standard errors."""
    se = math.hypot(known_se(getattr(a, key + "_se")), known_se(getattr(b, key + "_se")))
    return getattr(b, key) >= getattr(a, key) - max(tolerance, Z * se)


def select_checkpoint(
    curve: Sequence[CurvePoint], tolerance: float = 0.02, rule: SelectionRule = "latest-editable"
) -> CurvePoint:
    """Pick a checkpoint by `rule` (module docstring). Ties go to the earlier step under `balanced`."""
    if not curve:
        raise ValueError("no checkpoints to select from")
    if rule not in SELECTION_RULES:
        raise ValueError(f"unknown selection rule {rule!r}: use one of {', '.join(SELECTION_RULES)}")
    # a NaN score (a checkpoint whose pictures came out NaN) compares false both ways: max() would keep one that
    # came first and then find nothing within it
    scored = [p for p in curve if math.isfinite(p.reconstruction) and math.isfinite(p.editability)]
    if not scored:
        steps = ", ".join(str(p.step) for p in curve)
        raise OnewordError(
            f"every checkpoint (steps {steps}) scored NaN: there is nothing to select",
            hint="the pictures drawn with them were not finite: see the evaluation's grid, and train again "
            "(a lower --learning-rate, or --precision fp32)",
        )
    curve = scored
    best = max(curve, key=lambda p: p.reconstruction)
    eligible = [p for p in curve if within(best, p, "reconstruction", tolerance)]
    editable = max(eligible, key=lambda p: (p.editability, -p.step))
    if rule == "balanced":
        return editable
    return max((p for p in eligible if within(editable, p, "editability", tolerance)), key=lambda p: p.step)


def criterion_text(tolerance: float, rule: SelectionRule = "latest-editable") -> str:
    """The selection rule in words, recorded beside the choice."""
    equal = f"within {tolerance:g} or {Z:g} standard errors"
    if rule == "balanced":
        return f"highest editability among checkpoints whose reconstruction is {equal} of the best"
    return (
        f"latest checkpoint whose reconstruction is {equal} of the best and whose editability is {equal} "
        "of the highest among those"
    )
