"""The registry's quality gate: does a new concept version pass the thresholds and beat the champion?

Scores are only comparable when measured the same way (`oneword.evaluation.protocol`): the gate refuses to
compare scores whose evaluators or protocols differ, instead of silently comparing them. A candidate must beat the
champion by more than the noise of the two measurements (`GateThresholds.margin_se` standard errors). Two
versions scored under one protocol drew image j of every prompt from the same seed: where both recorded their
per-seed scores, the noise is that of the paired differences, which the seeds they share do not inflate.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from oneword.config import GateThresholds
from oneword.errors import OnewordError
from oneword.evaluation.protocol import differences

SCORE_DECIMALS = 6  # the registry keeps scores to this many places: a champion's read back is rounded to them


def known_se(se: float | None) -> float:
    """A standard error to compare with: an unmeasured one (nan: one image; None: not recorded) counts as 0, so
    that the fixed tolerance alone decides, never a nan that makes every comparison false."""
    return 0.0 if se is None or math.isnan(se) else se


class EvaluatorMismatch(OnewordError):
    """Two sets of scores come from different evaluators."""


@dataclass(frozen=True)
class GateResult:
    passed: bool
    reason: str


def check_comparable(a: dict, b: dict) -> None:
    """Raise `EvaluatorMismatch` unless metrics dicts `a` and `b` were measured the same way: the same evaluator,
    and the same protocol where either records one (both written before protocols were recorded: the evaluator)."""
    check_same_evaluator(a, b)
    pa, pb = a.get("protocol"), b.get("protocol")
    if pa is None and pb is None:
        return
    if pa is None or pb is None:
        raise EvaluatorMismatch(
            "one of the scores was measured before oneword recorded its evaluation protocol (prompts, images, "
            "sampler, seeds, base model), so the two cannot be shown to be comparable",
            hint="re-evaluate the older version with this oneword, then compare",
        )
    diff = differences(pa, pb)
    if diff:
        raise EvaluatorMismatch(
            f"scores were measured under different evaluation protocols ({'; '.join(diff)}) and cannot be compared",
            hint="evaluate both with the same settings (the option that sets each is named beside it)",
        )


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
    if not (math.isfinite(rec) and math.isfinite(edit)):  # NaN fails no comparison: it would pass every check
        return GateResult(False, f"scores are not finite (reconstruction {rec}, editability {edit})")
    if rec < thresholds.min_reconstruction:
        return GateResult(False, f"reconstruction {rec:.4f} < threshold {thresholds.min_reconstruction:.4f}")
    if edit < thresholds.min_editability:
        return GateResult(False, f"editability {edit:.4f} < threshold {thresholds.min_editability:.4f}")
    if champion is None:
        off = thresholds.min_reconstruction <= -1 and thresholds.min_editability <= -1
        # without thresholds any first version becomes champion: said, so that no one reads a bar into it
        return GateResult(True, "the first champion: none before it" + (
            "; no thresholds set (--min-reconstruction, --min-editability)" if off else "; passes the thresholds"))
    check_comparable(candidate, champion)
    # at the registry's precision: the same evaluation registered twice beat its own rounded copy
    score = round(rec, SCORE_DECIMALS) + round(edit, SCORE_DECIMALS)
    best = champion["reconstruction"] + champion["editability"]
    if not math.isfinite(best):  # a champion whose scores were NaN holds its alias by no measure
        return GateResult(True, f"reconstruction + editability {score:.4f}; the champion's scores are not finite")
    paired = _paired_se(candidate, champion)
    se = paired if paired is not None else (_se_of_sum(candidate) ** 2 + _se_of_sum(champion) ** 2) ** 0.5
    margin = thresholds.margin_se * se
    need = f"{best:.4f}" + (
        f" by more than {margin:.4f} ({thresholds.margin_se:g} x the {'paired ' if paired is not None else ''}"
        "difference's standard error)"
        if margin
        else ""
    )
    if score <= best + margin:
        return GateResult(False, f"reconstruction + editability {score:.4f} does not beat the champion's {need}")
    return GateResult(True, f"reconstruction + editability {score:.4f} beats the champion's {need}")


def _se_of_sum(metrics: dict) -> float:
    """The standard error of reconstruction + editability (0 where the scores carry none): measured seed by seed
    where recorded (the two scores of one seed are not independent), else as if they were.

    One image a prompt leaves a score's spread unmeasured (nan): it counts as none, as in checkpoint selection; a
    nan margin would let every candidate "beat" the champion, however bad.
    """
    if "score_se" in metrics:
        return known_se(metrics["score_se"])
    return math.hypot(known_se(metrics.get("reconstruction_se")), known_se(metrics.get("editability_se")))


def _paired_se(candidate: dict, champion: dict) -> float | None:
    """The standard error of the mean per-seed difference of the two versions' scores, or None where either did
    not record them seed by seed (or for another number of seeds). Called once the protocols are the same."""
    a, b = candidate.get("score_per_seed"), champion.get("score_per_seed")
    if not a or not b or len(a) != len(b) or len(a) < 2 or not all(math.isfinite(x) for x in (*a, *b)):
        return None  # (statistics.stdev raises on nan rather than answer it)
    return known_se(statistics.stdev(x - y for x, y in zip(a, b, strict=True)) / math.sqrt(len(a)))
