"""Evaluation prompt sets. `{}` marks where the concept's token goes.

- `paper`: the three editability prompts Gal et al. 2022 name in Sec. 5 (background, style, composition).
- `neti15`: the 15 prompts of NeTI (Alaluf et al. 2023, `constants.py` of their code), the closest public
  stand-in for the paper's unpublished list.
- `dreambench-object`, `dreambench-live`: the DreamBooth benchmark's 25 prompts each (shipped with its licence).
- `toyworld`: edits the toy world can draw and its oracle can check.
- a path: a text file with one prompt per line (`#` starts a comment).

The reconstruction prompt is always "A photo of {}" (the paper's). The text target of an editability prompt is
the prompt with the token removed, as in the paper: "A photo of {} on the moon" -> "A photo of on the moon".

The DreamBench sets follow DreamBooth's protocol instead (Ruiz et al. 2023, Sec. 4.1): the token is followed by
the subject's class noun ("a <my-dog> dog in the jungle"), and the text target keeps the class noun ("a dog in
the jungle"), so that CLIP-T, CLIP-I and DINO can sit beside DreamBooth's Table 1.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

from oneword.errors import OnewordError
from oneword.templates import names_a_file, one_placeholder, read_lines
from oneword.toyworld import assets

RECONSTRUCTION = "A photo of {}"

PAPER = ("A photo of {} on the moon", "An oil painting of {}", "Elmo holding a {}")

NETI15 = (
    "A photo of a {}",
    "A photo of {} in the jungle",
    "A photo of {} on a beach",
    "A photo of {} in Times Square",
    "A photo of {} in the moon",
    "A painting of {} in the style of Monet",
    "Oil painting of {}",
    "A Marc Chagall painting of {}",
    "A manga drawing of {}",
    "A watercolor painting of {}",
    "A statue of {}",
    "App icon of {}",
    "A sand sculpture of {}",
    "Colorful graffiti of {}",
    "A photograph of two {} on a table",
)

TOYWORLD = ("{} on a blue background", "{} on a white background", "a small {}", "a large {}")

BUILTIN = {"paper": PAPER, "neti15": NETI15, assets.NAME: TOYWORLD}
PACKAGED = ("dreambench-object", "dreambench-live")


def get_prompt_set(name: str) -> tuple[str, ...]:
    """Return the prompts of a named set or of a prompt file (see the module docstring)."""
    if name in BUILTIN:
        return BUILTIN[name]
    if name in PACKAGED:
        return read_lines((resources.files("oneword") / "data" / "prompts" / f"{name}.txt").read_text())
    p = Path(name)
    if p.is_file():
        prompts = read_lines(p.read_text())
        if not prompts:
            raise OnewordError(f"prompt file {p} is empty", hint="write one prompt per line, like 'A photo of {}'")
        bad = [q for q in prompts if not one_placeholder(q)]
        if bad:
            raise OnewordError(
                f"prompt file {p} needs one '{{}}' per line, where the token goes, and no other braces; bad: {bad[:3]}",
                hint="write lines like 'A photo of {} on the moon'; write a literal brace as {{ or }}",
            )
        return prompts
    raise OnewordError(
        f"prompt file {name!r} not found" if names_a_file(name) else f"unknown prompt set {name!r}",
        hint=f"use one of {', '.join([*BUILTIN, *PACKAGED])} or a file of prompts",
    )


def follows_dreambench(name: str) -> bool:
    """Whether prompt set `name` is scored by DreamBooth's protocol (token plus class noun; see the docstring)."""
    return name in PACKAGED


def with_token(template: str, token: str, class_word: str = "") -> str:
    """Put the concept's token (and, for DreamBench's protocol, its class noun after it) into a prompt template."""
    return template.format(f"{token} {class_word}".strip())


def without_token(template: str, class_word: str = "") -> str:
    """The text target: the prompt with the token removed (the class noun kept, if given), spaces collapsed."""
    return re.sub(r"\s+", " ", template.format(class_word)).strip()
