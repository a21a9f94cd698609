"""The container images the components run in. Their tag is the package version, so code and image cannot
drift; `ONEWORD_IMAGE_REGISTRY` (at compile time) points them at your registry."""

from __future__ import annotations

import os

from oneword import __version__

REGISTRY = os.environ.get("ONEWORD_IMAGE_REGISTRY", "ghcr.io/oneword-ml")
CPU_IMAGE = f"{REGISTRY}/oneword:{__version__}"  # docker/cpu.Dockerfile: preprocess, register, the CLI
GPU_IMAGE = f"{REGISTRY}/oneword-cuda:{__version__}"  # docker/cuda.Dockerfile: cache_latents, train, evaluate
