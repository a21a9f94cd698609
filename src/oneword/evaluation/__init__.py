"""Evaluation: the paper's CLIP metrics, DINO fidelity, checkpoint selection, pictures and the quality gate."""

from oneword.evaluation.evaluate import EvalConfig, evaluate

__all__ = ["EvalConfig", "evaluate"]
