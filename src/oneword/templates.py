"""Training prompt templates: the paper's CLIP ImageNet templates (Gal et al. 2022, Sec. 4 and its code as first
released, rinongal/textual_inversion 4020ea7: `ldm/data/personalized.py` and `personalized_style.py`, the lists
diffusers' script uses too; later commits added variants), one of which is drawn per training sample."""

from __future__ import annotations

import string
from pathlib import Path

from oneword.errors import OnewordError
from oneword.toyworld import assets

OBJECT = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
)

STYLE = (
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a cropped painting in the style of {}",
    "a good painting in the style of {}",
    "a close-up painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
)

# Words the toy world's captions use (oneword.toyworld); its text encoder has never seen "rendition" & co.
TOYWORLD = (
    "a photo of a {}",
    "a picture of a {}",
    "an image of a {}",
    "a {}",
    "a photo of the {}",
)

SETS = {"object": OBJECT, "style": STYLE, assets.NAME: TOYWORLD}


def one_placeholder(line: str) -> bool:
    """True if `line` formats with one positional value: exactly one bare `{}` (`{{` and `}}` are literal braces).

    `"a photo of {} in {style}"` or a stray `{` would pass a count of "{}" and then fail in `str.format`, after
    the models have loaded.
    """
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(line) if name is not None]
    except ValueError:  # an unmatched brace
        return False
    return fields == [("", "", None)]


def read_lines(text: str) -> tuple[str, ...]:
    """The non-empty lines of a template or prompt file, stripped, without `#` comments (indented ones too)."""
    return tuple(line for line in (raw.strip() for raw in text.splitlines()) if line and not line.startswith("#"))


def names_a_file(name: str) -> bool:
    """Whether a template set's or prompt set's name is meant as a file (a suffix or a folder in it): one not
    there is said to be missing, not an unknown set."""
    return bool(Path(name).suffix) or "/" in name or "\\" in name


def get_templates(name: str) -> tuple[str, ...]:
    """Return a template set by name (`object`, `style`, `toyworld`) or read one template per line from a file.

    Every template must contain `{}` exactly once, where the placeholder token goes.
    """
    if name in SETS:
        return SETS[name]
    p = Path(name)
    if not p.is_file():
        raise OnewordError(
            f"template file {name!r} not found" if names_a_file(name) else f"unknown template set {name!r}",
            hint=f"use one of {', '.join(SETS)} or a text file with one template per line",
        )
    lines = read_lines(p.read_text())
    if not lines:
        raise OnewordError(f"template file {p} is empty", hint="write one template per line, like 'a photo of a {}'")
    bad = [t for t in lines if not one_placeholder(t)]
    if bad:
        raise OnewordError(
            f"template file {p} has lines without exactly one '{{}}' (and no other braces): {bad[:3]}",
            hint="write each template like 'a photo of a {}'; write a literal brace as {{ or }}",
        )
    return lines
