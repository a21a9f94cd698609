import gzip
import importlib.util
from pathlib import Path

import pytest

from oneword.tokenizer import N_MERGES, VOCAB_SIZE, build_bpe_files, bundled_files_dir, load_clip_tokenizer

SENTENCES = [
    "a photo of a cat",
    "An oil painting of a dog on the moon, trending on ArtStation!!",
    "a purple star on a blue background",
    "naïve café — déjà vu 123 4567",
    "<my-cat> in the style of Van Gogh",
    "  lots   of   spaces\tand\nnewlines ",
    "emoji 🐱🚀 and CJK 猫",
]


def _open_clip_dir() -> Path:
    spec = importlib.util.find_spec("open_clip")
    assert spec is not None, "open_clip_torch is a dev dependency (installed with --no-deps by the Makefile)"
    return Path(spec.submodule_search_locations[0])


@pytest.fixture(scope="module")
def open_clip_tokenizer():
    # open_clip's package __init__ imports torchvision; load only its tokenizer module.
    path = _open_clip_dir() / "tokenizer.py"
    spec = importlib.util.spec_from_file_location("open_clip_tokenizer_only", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.SimpleTokenizer()


def test_token_ids_equal_open_clip(open_clip_tokenizer):
    ours = load_clip_tokenizer()
    for s in SENTENCES:
        expected = [49406, *open_clip_tokenizer.encode(s), 49407]
        assert ours(s).input_ids == expected, s


def test_bundled_files_follow_exactly_from_open_clip_merges(tmp_path):
    gz = _open_clip_dir() / "bpe_simple_vocab_16e6.txt.gz"
    vocab, merges = build_bpe_files(gz, tmp_path)
    assert vocab.read_bytes() == (bundled_files_dir() / "vocab.json").read_bytes()
    assert merges.read_bytes() == (bundled_files_dir() / "merges.txt").read_bytes()
    assert len(merges.read_text().splitlines()) == N_MERGES + 1
    with gzip.open(gz) as f:
        assert f.read()  # the source file is really there


def test_tokenizer_shape_and_special_tokens():
    tok = load_clip_tokenizer()
    assert len(tok) == VOCAB_SIZE
    assert tok.model_max_length == 77
    assert tok.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"]) == [49406, 49407]
    assert load_clip_tokenizer(pad_token="!").pad_token_id == 0  # SD 2.x pads with "!"
    padded = tok("a cat", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[-1] == 49407
