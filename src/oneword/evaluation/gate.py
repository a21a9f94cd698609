"""The registry's quality gate: does a new concept version pass the thresholds and beat the champion?

Scores are only comparable under one evaluator: the gate refuses to compare scores whose evaluator
fingerprints differ, instead of silently comparing them.
"""

from __future__ import annotations

from dataclasses import dataclass

from oneword.config import GateThresholds
from oneword.errors import OnewordError


class EvaluatorMismatch(OnewordError):
    """Two sets of scores come from different evaluators."""


@dataclass(frozen=True)
class GateResult:
    passed: bool
    reason: str


def check_same_evaluator(a: dict, b: dict) -> None:
    """Raise `EvaluatorMismatch` unless metrics dicts `a` and `b` record the same evaluator fingerprint."""
    fa, fb = a.get("evaluator", {}).get("fingerprint"), b.get("evaluator", {}).get("fingerprint")
    if not fa or not fb or fa != fb:
        raise EvaluatorMismatch(
            f"scores come from different evaluators ({a.get('evaluator', {}).get('name')} {str(fa)[:19]}… vs "
            f"{b.get('evaluator', {}).get('name')} {str(fb)[:19]}…) and cannot be compared",
            hint="re-evaluate both with the same --clip-model",
        )


def quality_gate(candidate: dict, champion: dict | None, thresholds: GateThresholds = GateThresholds()) -> GateResult:
    """Decide whether `candidate` may replace `champion`.

    Args:
        candidate: the new version's metrics (`reconstruction`, `editability`, `evaluator`).
        champion: the current champion's metrics, or None if there is none.
        thresholds: minimum scores.

    Returns:
        A `GateResult`; `reason` says why it failed or why it passed.

    Raises:
        EvaluatorMismatch: if the champion was scored by another evaluator.
    """
    rec, edit = candidate.get("reconstruction"), candidate.get("editability")
    if rec is None or edit is None:
        return GateResult(False, "no evaluation metrics")
    if rec < thresholds.min_reconstruction:
        return GateResult(False, f"reconstruction {rec:.4f} < threshold {thresholds.min_reconstruction:.4f}")
    if edit < thresholds.min_editability:
        return GateResult(False, f"editability {edit:.4f} < threshold {thresholds.min_editability:.4f}")
    if champion is None:
        return GateResult(True, "passes the thresholds; no champion yet")
    check_same_evaluator(candidate, champion)
    score, best = rec + edit, champion["reconstruction"] + champion["editability"]
    if score <= best:
        return GateResult(False, f"reconstruction + editability {score:.4f} does not beat the champion's {best:.4f}")
    return GateResult(True, f"reconstruction + editability {score:.4f} beats the champion's {best:.4f}")
