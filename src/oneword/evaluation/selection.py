"""Checkpoint selection: pick the step that best trades reconstruction for editability.

The default criterion: the highest editability among checkpoints whose reconstruction is within `tolerance`
(0.02) of the best reconstruction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class CurvePoint:
    """Scores of one checkpoint (on the small selection budget)."""

    step: int
    reconstruction: float
    editability: float
    reconstruction_se: float = 0.0  # standard errors over the budget's images (0: not measured)
    editability_se: float = 0.0


def select_checkpoint(curve: Sequence[CurvePoint], tolerance: float = 0.02) -> CurvePoint:
    """Return the point with the highest editability among those within `tolerance` of the best reconstruction.

    Ties go to the earlier step (fewer steps over-fit less).
    """
    if not curve:
        raise ValueError("no checkpoints to select from")
    best = max(p.reconstruction for p in curve)
    eligible = [p for p in curve if p.reconstruction >= best - tolerance]
    return max(eligible, key=lambda p: (p.editability, -p.step))


def criterion_text(tolerance: float) -> str:
    """The selection rule in words, recorded beside the choice."""
    return f"highest editability among checkpoints whose reconstruction is within {tolerance:g} of the best"
