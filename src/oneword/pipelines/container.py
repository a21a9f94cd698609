"""The container images the components run in, and pointing a compiled spec at the registry a cluster pulls from.

The components are written against the images that `.github/workflows/images.yml` publishes for each release
(tag = the package version, so code and image cannot drift). A cluster that pulls from elsewhere (a mirror, a
registry of your own builds) gets specs retargeted with `with_registry`; `oneword submit`/`schedule` refuse to
send a spec until they are told which registry the cluster pulls from.
"""

from __future__ import annotations

import re
from pathlib import Path

from oneword import __version__
from oneword.errors import OnewordError

PUBLISHED_REGISTRY = "ghcr.io/oneword-ml"  # where the release workflow pushes both images
CPU_IMAGE = f"{PUBLISHED_REGISTRY}/oneword:{__version__}"  # docker/cpu.Dockerfile: preprocess, register, the CLI
GPU_IMAGE = f"{PUBLISHED_REGISTRY}/oneword-cuda:{__version__}"  # docker/cuda.Dockerfile: cache_latents, train, ...
IMAGES = (CPU_IMAGE, GPU_IMAGE)

# host[:port] followed by a lower-case path, as Docker references name a repository prefix (no scheme, no tag).
_REGISTRY = re.compile(r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:[0-9]+)?(/[a-z0-9]+([._-]+[a-z0-9]+)*)*$")


def check_registry(registry: str) -> str:
    """`registry` if it names a registry (and path) that images can be pushed under, else a clear error."""
    if not _REGISTRY.match(registry or ""):
        raise OnewordError(
            f"{registry!r} is not an image registry prefix",
            hint="give host[:port]/path without scheme, tag or trailing slash, e.g. registry.example.com/ml "
            f"(the images are then registry.example.com/ml/oneword:{__version__} and .../oneword-cuda:{__version__})",
        )
    return registry


def image_at(image: str, registry: str) -> str:
    """`image` (one of IMAGES) under `registry`: same name and tag."""
    return f"{check_registry(registry)}/{image.rsplit('/', 1)[1]}"


def with_registry(spec: Path, registry: str) -> Path:
    """Point every oneword image of a compiled spec (component or pipeline YAML) at `registry`, in place."""
    text = spec.read_text()
    for image in IMAGES:
        text = re.sub(rf"(?m)(image: ){re.escape(image)}$", rf"\g<1>{image_at(image, registry)}", text)
    spec.write_text(text)
    return spec


def require_registry(registry: str | None) -> str:
    """The registry a spec sent to a cluster will pull from: it must have been said, not defaulted."""
    if not registry:
        raise OnewordError(
            "no image registry given: the run's pods would pull images that your cluster may not reach "
            "(ImagePullBackOff)",
            hint=f"pass --image-registry (or set ONEWORD_IMAGE_REGISTRY) to where the cluster pulls oneword's "
            f"images: {PUBLISHED_REGISTRY} for the released ones, or your registry after building docker/*.Dockerfile "
            "(docs/deploy.md, step 2)",
        )
    return check_registry(registry)
