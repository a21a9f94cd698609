"""Placeholder tokens and the splice that makes only their embedding rows trainable.

diffusers' example trains the whole 49,408-row token-embedding table and copies the old rows back after every
step. Here the table stays frozen and the new rows live in small parameters of shape (n_vectors, width) that
`TokenSplice` splices into the lookup: ids below the table size read the frozen table, ids at or above it read
the new rows.

Multi-vector tokens follow diffusers' naming (`<tok>`, `<tok>_1`, `<tok>_2`, ...) and prompt expansion, so a
saved embedding gives the same text-encoder output under `load_textual_inversion` as during training.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from transformers import CLIPTokenizer

from oneword.errors import OnewordError

OBJECT_SUGGESTIONS = ("object", "thing", "toy", "animal", "style", "shape")


def vector_tokens(token: str, n_vectors: int) -> list[str]:
    """The tokenizer entries of a concept: `[token, token_1, ..., token_{n-1}]` (diffusers' convention)."""
    return [token] + [f"{token}_{i}" for i in range(1, n_vectors)]


def _continues(entry: str, token: str, entries: set[str]) -> bool:
    """diffusers reads added entries `token_1`, `token_2`, ... (in order, from 1) as further vectors of `token` in
    every prompt: `entry` is one of them if it is `token_k` and `token_1` ... `token_{k-1}` are among `entries`."""
    m = re.fullmatch(re.escape(token) + r"_([1-9][0-9]*)", entry, flags=re.IGNORECASE)
    return m is not None and all(f"{token}_{i}".lower() in entries for i in range(1, int(m.group(1))))


def clashing_entries(mine: Sequence[str], taken: Iterable[str]) -> list[str]:
    """The entries of `taken` that a prompt cannot tell from one of `mine`: equal but for case (CLIP's tokenizer
    lowercases a prompt, and an added entry matches it in any case), or read as one's further vector by
    diffusers (`<a>` and `<a>_1`: a prompt with `<a>` would draw with both concepts' vectors)."""
    taken = list(taken)
    entries = {e.lower() for e in (*mine, *taken)}
    return [
        t
        for t in taken
        if any(m.lower() == t.lower() or _continues(m, t, entries) or _continues(t, m, entries) for m in mine)
    ]


def expand_placeholder(token: str, n_active: int) -> str:
    """The text that stands for a concept in a prompt when `n_active` of its vectors are used."""
    return " ".join(vector_tokens(token, n_active))


def check_new_token(tokenizer: CLIPTokenizer, token: str, n_vectors: int = 1) -> None:
    """Refuse a placeholder that already means something to the tokenizer.

    Raises:
        OnewordError: if `token` is empty, has whitespace, is already an added token, or is itself one
            ordinary vocabulary entry (training would change the meaning of an existing word).
    """
    if not token or any(c.isspace() for c in token):
        raise OnewordError(
            f"placeholder token {token!r} must be one word with no spaces", hint="use something like '<my-cat>'"
        )
    if taken := clashing_entries(vector_tokens(token, n_vectors), tokenizer.get_added_vocab()):
        raise OnewordError(
            f"placeholder token {token!r} cannot be told from {taken[0]!r}, which is already in the tokenizer's "
            "added vocabulary (a prompt matches an added token in any case, and diffusers reads NAME_1 as NAME's "
            "second vector)",
            hint="pick another token, e.g. '<my-cat-2>'",
        )
    vocab = tokenizer.get_vocab()
    taken = [t for t in vector_tokens(token, n_vectors) if t in vocab]
    if taken:  # e.g. "kitt", a piece of "kitten": it encodes as two ids, yet the tokenizer would reuse its entry
        raise OnewordError(
            f"placeholder token {token!r} is already in the vocabulary (its entry {taken[0]!r} has id "
            f"{vocab[taken[0]]}): a concept there would change an existing word",
            hint=f"use a string the tokenizer does not know, such as '<{token.strip('<>')}>'",
        )
    ids = tokenizer(token, add_special_tokens=False).input_ids
    if len(ids) == 1:
        raise OnewordError(
            f"placeholder token {token!r} is already in the vocabulary (id {ids[0]}): a concept there would "
            "change an existing word",
            hint=f"use a string the tokenizer does not know, such as '<{token.strip('<>')}>'",
        )


def initializer_id(tokenizer: CLIPTokenizer, word: str) -> int:
    """Return the id of a one-token initializer word.

    Raises:
        OnewordError: naming the tokens the word splits into and suggesting single-token words.
    """
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if len(ids) == 1:
        return ids[0]
    raw = tokenizer.convert_ids_to_tokens(ids)
    pieces = [p.replace("</w>", "") for p in raw]
    # the words given that are one token each ("red car": red, car); not the pieces of a word, which the
    # tokenizer cannot tell from words ("xylophonist" ends in "onist", as "tower" does "eiffeltower")
    singles = [w for w in word.split() if len(tokenizer(w, add_special_tokens=False).input_ids) == 1]
    suggestions = list(dict.fromkeys(singles + list(OBJECT_SUGGESTIONS)))
    if not ids:
        raise OnewordError("the initializer word is empty", hint=f"try one of: {', '.join(suggestions[:5])}")
    raise OnewordError(
        f"initializer word {word!r} splits into {len(ids)} tokens {pieces}; it must be exactly one token",
        hint=f"try one of: {', '.join(suggestions[:5])}",
    )


def add_placeholder_tokens(tokenizer: CLIPTokenizer, token: str, n_vectors: int) -> list[int]:
    """Add a concept's `n_vectors` tokens to the tokenizer and return their ids (consecutive)."""
    check_new_token(tokenizer, token, n_vectors)
    names = vector_tokens(token, n_vectors)
    added = tokenizer.add_tokens(names)
    if added != n_vectors:
        raise OnewordError(
            f"could not add all of {names} to the tokenizer (added {added})",
            hint="one of them already exists; pick another token",
        )
    ids = tokenizer.convert_tokens_to_ids(names)
    if ids != list(range(ids[0], ids[0] + n_vectors)):
        raise OnewordError(f"tokenizer gave non-consecutive ids {ids} for {names}")
    return ids


class TokenSplice(nn.Module):
    """A token-embedding lookup: a frozen base table plus small trainable tables for new tokens.

    New tables are appended in the order their tokens were added to the tokenizer, so id `n_base + k` reads
    row `k` of their concatenation.
    """

    def __init__(self, base: nn.Embedding):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.n_base = base.num_embeddings
        self.vectors = nn.ParameterList()

    def add(self, init: torch.Tensor) -> nn.Parameter:
        """Append a trainable table initialised to `init` (n_vectors, width); return its parameter."""
        p = nn.Parameter(init.detach().clone().float())
        self.vectors.append(p)
        return p

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base table (for code that reads `get_input_embeddings().weight`)."""
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # ids: (B, T)
        out = self.base(ids.clamp(max=self.n_base - 1))  # (B, T, width)
        if len(self.vectors) == 0:
            return out
        extra = torch.cat(list(self.vectors)) if len(self.vectors) > 1 else self.vectors[0]
        rows = (ids - self.n_base).clamp(0, extra.shape[0] - 1)
        return torch.where((ids >= self.n_base).unsqueeze(-1), extra[rows].to(out.dtype), out)


def install_splice(text_encoder: nn.Module) -> TokenSplice:
    """Replace a CLIP text encoder's token embedding with a `TokenSplice` (idempotent); return it."""
    current = text_encoder.get_input_embeddings()
    if isinstance(current, TokenSplice):
        return current
    splice = TokenSplice(current)
    text_encoder.set_input_embeddings(splice)
    if text_encoder.get_input_embeddings() is not splice:
        raise OnewordError(f"could not install the token splice into {type(text_encoder).__name__}")
    return splice


def check_untrained(model, step: str) -> None:
    """Refuse a loaded model (`LoadedModel`) that a training changed in place, for the step `step` of a caller
    who loaded it once: its tokenizer holds the training's tokens and its text encoder a `TokenSplice`, and a
    step given it would fail later on a clash it did not cause, or learn beside another concept's rows."""
    encoders = [model.text_encoder] + ([model.text_encoder_2] if model.text_encoder_2 is not None else [])
    if any(isinstance(te.get_input_embeddings(), TokenSplice) for te in encoders):
        raise OnewordError(
            f"{step} was given a loaded model that a training changed in place (its tokenizer holds that training's "
            "tokens, its text encoder their rows)",
            hint="load the base model again (load_base_model) for each step that follows a training in one process",
        )
