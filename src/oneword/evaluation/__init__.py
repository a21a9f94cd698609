"""Evaluation: the paper's CLIP metrics, DINO fidelity, checkpoint selection, pictures and the quality gate.

The package itself imports nothing: the registry's queries read the gate without loading torch and CLIP
(`oneword concepts list` took half its 8 s importing them); `evaluate` is `oneword.evaluation.evaluate`'s.
"""
