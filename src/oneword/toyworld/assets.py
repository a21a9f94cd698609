"""Where the shipped toy-world assets live (package data): the model, its CLIP and DINO evaluators, the oracle."""

from importlib import resources
from pathlib import Path

NAME = "toyworld"  # `--base-model toyworld`: the toy model shipped with oneword
CLIP_NAME = "toyworld-clip"  # `--clip-model toyworld-clip`: its CLIP evaluator
DINO_NAME = "toyworld-dino"  # `--dino-model toyworld-dino`: its subject-fidelity evaluator


def assets_dir() -> Path:
    return Path(str(resources.files("oneword") / "data" / "toyworld"))


def model_path() -> Path:
    """The diffusers folder of the toy-world text-to-image model (`--base-model toyworld`)."""
    return assets_dir() / "model"


def clip_path() -> Path:
    """The toy-world CLIP evaluator (`--clip-model toyworld-clip`)."""
    return assets_dir() / "clip"


def dino_path() -> Path:
    """The toy-world subject-fidelity evaluator (`--dino-model toyworld-dino`, `oneword.toyworld.dino`)."""
    return assets_dir() / "dino"


def oracle_path() -> Path:
    """The oracle CNN's weights."""
    return assets_dir() / "oracle.safetensors"
