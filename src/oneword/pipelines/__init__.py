"""Kubeflow Pipelines: components, the `textual_inversion` and `batch_personalisation` pipelines, compiling,
local runs (kfp.local) and cluster submission. The only part of oneword that imports kfp."""
