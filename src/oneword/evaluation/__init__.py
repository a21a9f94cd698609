"""Evaluation: the paper's CLIP metrics, DINO fidelity, checkpoint selection, pictures and the quality gate.

The package itself imports nothing: the registry's queries read the gate without loading torch and CLIP
(`oneword concepts list` answers in about two seconds); `evaluate` lives in `oneword.evaluation.evaluate`.
"""
