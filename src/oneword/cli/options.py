"""CLI options made from the config models, so that an option's default and help text are stated once.

`option(TrainConfig, "steps")` is a typer option whose help is the field's description; `default(TrainConfig,
"steps")` its default. A model-dependent field's default is None, which the library fills from the model's
profile (`oneword.profiles`). `tests/test_parameters.py` checks every command against the config models.
"""

from __future__ import annotations

from typing import Any

import typer
from pydantic import BaseModel

BASE_MODEL_HELP = "toyworld, a diffusers folder, a .safetensors/.ckpt file, s3://..., or a hub id"


def default(model: type[BaseModel], field: str) -> Any:
    """The default of `model.field`."""
    return model.model_fields[field].get_default(call_default_factory=True)


def describe(model: type[BaseModel], field: str) -> str:
    """The help text of `model.field`."""
    return model.model_fields[field].description or ""


def cli_help(description: str) -> str:
    """A field's description as an option's help: a None default, which nobody can type, is the option left out."""
    return description.replace("(None: ", "(if not given: ")


def option(model: type[BaseModel], field: str, *names: str, **kwargs: Any) -> Any:
    """A typer option for `model.field`: its description is the help text."""
    return typer.Option(*names, help=cli_help(describe(model, field)), **kwargs)


def parameter(name: str, *names: str, **kwargs: Any) -> Any:
    """A typer option for pipeline parameter `name` (`oneword run`, `oneword batch`): help from its config field.

    Its default is `DEFAULTS[name]` of `oneword.pipelines.parameters`, where 0 or "" leaves the setting to the
    model's profile, as in the pipelines.
    """
    from oneword.pipelines.parameters import DEFAULTS, PIPELINE_HELP, SOURCES

    if name in PIPELINE_HELP:
        return typer.Option(*names, help=PIPELINE_HELP[name], **kwargs)
    unset = "empty" if isinstance(DEFAULTS[name], str) else "0"
    text = describe(*SOURCES[name]).replace("(None: the model's profile)", f"({unset}: the model's profile)")
    if isinstance(DEFAULTS[name], list):  # `names_given` reads each option given, or commas in one
        text = text[:-1] + "; repeat, or commas)" if text.endswith(")") else text + " (repeat, or commas)"
    return typer.Option(*names, help=text, **kwargs)


def names_given(values: list[str] | None) -> list[str]:
    """Concept names as an option takes them, repeated or comma-separated (a registered-model name holds no comma:
    `registry.concept_name`), each once, in the order given."""
    return list(dict.fromkeys(n.strip() for v in values or [] for n in v.split(",") if n.strip()))
