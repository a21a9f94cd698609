"""Stable Diffusion's CLIP BPE tokenizer, built offline.

CLIP's byte-level BPE (Radford et al. 2021) ships with `open_clip_torch` as
`bpe_simple_vocab_16e6.txt.gz`. The 49,408-entry `vocab.json` and `merges.txt`
that Stable Diffusion's tokenizer uses follow from it exactly: 256 byte
symbols, the same 256 with an end-of-word marker, the first 48,894 merges and
the two special tokens. The two files ship as package data; `build_bpe_files`
regenerates them.
"""

from __future__ import annotations

import gzip
import json
from importlib import resources
from pathlib import Path

from transformers import CLIPTokenizer

VOCAB_SIZE = 49408
N_MERGES = VOCAB_SIZE - 2 * 256 - 2  # 48,894
MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """Map every byte to a printable unicode character, as GPT-2 and CLIP do.

    Returns:
        A dict from byte value (0-255) to a one-character string.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def build_bpe_files(bpe_gz: Path, out_dir: Path) -> tuple[Path, Path]:
    """Write Stable Diffusion's `vocab.json` and `merges.txt` from CLIP's merges file.

    Args:
        bpe_gz: path to open_clip's `bpe_simple_vocab_16e6.txt.gz`.
        out_dir: folder to write the two files into (created if missing).

    Returns:
        The paths of `vocab.json` and `merges.txt`.
    """
    with gzip.open(bpe_gz) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = lines[1 : N_MERGES + 1]  # line 0 is a version header
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    vocab += ["".join(m.split()) for m in merges]
    vocab += [BOS, EOS]
    assert len(vocab) == VOCAB_SIZE, len(vocab)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = out_dir / "vocab.json", out_dir / "merges.txt"
    vocab_path.write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    merges_path.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab_path, merges_path


def bundled_files_dir() -> Path:
    """Return the package-data folder that holds `vocab.json` and `merges.txt`."""
    return Path(str(resources.files("oneword") / "data" / "clip_tokenizer"))


def load_clip_tokenizer(pad_token: str = EOS) -> CLIPTokenizer:
    """Build Stable Diffusion's CLIP tokenizer from the bundled files, with no download.

    Args:
        pad_token: `<|endoftext|>` as in SD 1.x, or `!` as in SD 2.x.

    Returns:
        A `CLIPTokenizer` with `model_max_length` 77.
    """
    d = bundled_files_dir()
    return CLIPTokenizer(
        vocab=str(d / "vocab.json"),
        merges=str(d / "merges.txt"),
        bos_token=BOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=pad_token,
        model_max_length=MAX_LENGTH,
    )
