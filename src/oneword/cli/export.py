"""`oneword export`: convert an embedding file between formats."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from oneword.cli.app import app


@app.command("export")
def export_cmd(
    embedding: Annotated[Path, typer.Argument(metavar="EMBEDDING", help="embedding file in any supported format")],
    format: Annotated[str, typer.Option("--format", "-f", help="diffusers, a1111 or kohya")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="output file (default: beside the input)")] = None,
    token: Annotated[str | None, typer.Option(help="rename the token")] = None,
    force: Annotated[bool, typer.Option("--force", help="replace an existing output file")] = False,
) -> None:
    """Write an embedding in another tool's format.

    \b
    Example:
      oneword export runs/my-cat/eval/embedding/learned_embeds.safetensors \\
        --format a1111 -o my-cat.pt
    """
    from rich import print as rprint

    from oneword import embeddings as E
    from oneword.errors import OnewordError

    if format not in E.FORMATS:
        raise OnewordError(f"unknown format {format!r}", hint=f"use one of {', '.join(E.FORMATS)}")
    emb = E.load(embedding)
    if token is not None:
        _check_token(token, emb.n_vectors)
        emb.token = token
    dest = out or embedding.with_name(E.default_filename(emb.token, format))  # type: ignore[arg-type]
    written = E.files_written(emb, dest, format)  # type: ignore[arg-type]
    if embedding.resolve() in [f.resolve() for f in written]:
        raise OnewordError(f"{dest} is the input file", hint="pass --out")
    for f in written:
        refuse_existing(f, force)
    E.save(E.shared(emb), dest, format)  # type: ignore[arg-type]
    g = emb.vectors_2
    shape = f"{emb.n_vectors}x{emb.width}" + ("" if g is None else f" + clip_g {g.shape[0]}x{g.shape[1]}")
    rprint(f"[green]{emb.token}[/] ({shape}) -> {' and '.join(map(str, written))} ({format})")
    if len(written) == 2:  # diffusers' SDXL layout: one load per text encoder
        rprint(
            f'  in diffusers: pipe.load_textual_inversion("{written[0]}")\n'
            f'  and pipe.load_textual_inversion("{written[1]}",\n'
            "      text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)"
        )
    if format != "diffusers":  # A1111, SD.Next and kohya's scripts call it by its file's stem
        rprint(f"  in A1111 prompts: {dest.stem}" + (f" (ComfyUI: embedding:{dest.stem})" if format == "kohya" else ""))
        warn_model_word(dest)


def warn_model_word(dest: Path) -> None:
    """Warn where a file that A1111 and kohya name by its stem would take over a word of the model."""
    from rich import print as rprint
    from rich.markup import escape

    from oneword import embeddings as E

    if E.is_one_word(dest.stem):
        rprint(
            f"[yellow]warning:[/] {escape(repr(dest.stem))} is a word of the model: A1111 would put this embedding "
            f"in place of every {escape(repr(dest.stem))} in every prompt; name the file "
            f"{escape(f'{dest.stem}{E.TRIGGER_SUFFIX}{dest.suffix}')}"
        )


@app.command("blend", short_help="Blend two learned concepts into one.")
def blend_cmd(
    first: Annotated[Path, typer.Argument(metavar="FIRST", help="embedding file of the first concept")],
    second: Annotated[Path, typer.Argument(metavar="SECOND", help="embedding file of the second concept")],
    token: Annotated[str, typer.Option(help="the blend's token, e.g. '<cat-dog>'")],
    out: Annotated[Path, typer.Option("--out", "-o", help="the blend's file (diffusers format)")],
    t: Annotated[float, typer.Option("--t", help="how far from the first to the second (0 to 1)")] = 0.5,
    force: Annotated[bool, typer.Option("--force", help="replace an existing output file")] = False,
) -> None:
    """Blend two learned concepts by spherical interpolation (best with --direction-only training).

    \b
    Example:
      oneword blend cat.safetensors dog.safetensors --token '<cat-dog>' \\
        -o cat-dog.safetensors
    """
    from rich import print as rprint

    from oneword import embeddings as E
    from oneword.errors import OnewordError

    if out.resolve() in (first.resolve(), second.resolve()):
        raise OnewordError(f"{out} is one of the concepts blended", hint="write the blend to a file of its own")
    a, b = E.load(first), E.load(second)
    _check_token(token, a.n_vectors)
    emb = E.blend(a, b, t, token)
    written = E.files_written(emb, out, "diffusers")
    for f in written:
        refuse_existing(f, force)
    E.save(emb, out, "diffusers")
    rprint(f"[green]{token}[/] = {t:g} of the way from {first} to {second} -> {' and '.join(map(str, written))}")


def _check_token(token: str, n_vectors: int) -> None:
    """A new token as training checks it: one word, not a word (or a piece of one) the CLIP vocabulary has, as
    every Stable Diffusion family's tokenizer shares it."""
    from oneword.tokenizer import load_clip_tokenizer
    from oneword.tokens import check_new_token

    check_new_token(load_clip_tokenizer(), token, n_vectors)


def refuse_existing(dest: Path, force: bool) -> None:
    """Another concept's file is never replaced unasked (a default name such as learned_embeds.safetensors is
    shared by every diffusers embedding)."""
    from oneword.errors import OnewordError

    if dest.is_dir():  # --force replaces a file, never a folder
        raise OnewordError(f"{dest} is a folder", hint="pass --out with a file's name")
    if dest.exists() and not force:
        raise OnewordError(f"{dest} already exists", hint="pass --out with another name, or --force to replace it")
