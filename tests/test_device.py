"""The training precision follows what the GPU runs natively (the logic, on CPU: no GPU is needed to check it)."""

import pytest

from oneword.config import TrainConfig
from oneword.device import choose_precision
from oneword.errors import OnewordError

# (card, compute capability, what `auto` must pick)
CARDS = [
    ("P100", (6, 0), "fp32"),
    ("V100", (7, 0), "fp16"),
    ("T4", (7, 5), "fp16"),
    ("A100", (8, 0), "bf16"),
    ("A10/L4-class", (8, 6), "bf16"),
    ("L4", (8, 9), "bf16"),
    ("H100", (9, 0), "bf16"),
    ("B200", (10, 0), "bf16"),
]


@pytest.mark.parametrize(("card", "capability", "expected"), CARDS)
def test_auto_picks_the_native_precision(card, capability, expected):
    assert choose_precision("auto", "cuda", capability, card) == expected


def test_auto_on_cpu_is_fp32():
    assert choose_precision("auto", "cpu") == "fp32"


@pytest.mark.parametrize(("card", "capability"), [("T4", (7, 5)), ("V100", (7, 0)), ("P100", (6, 0))])
def test_bf16_is_refused_where_it_is_only_emulated(card, capability):
    with pytest.raises(OnewordError) as e:
        choose_precision("bf16", "cuda", capability, card)
    assert card in str(e.value) and "fp16" in e.value.hint


def test_fp16_needs_tensor_cores():
    with pytest.raises(OnewordError, match=r"compute capability 7\.0 or newer, not cpu"):
        choose_precision("fp16", "cpu")
    with pytest.raises(OnewordError, match=r"compute capability 7\.0 or newer, not cuda \(6, 1\)"):
        choose_precision("fp16", "cuda", (6, 1), "GTX 1080")
    assert choose_precision("fp16", "cuda", (7, 5), "T4") == "fp16"
    assert choose_precision("fp32", "cuda", (9, 0), "H100") == "fp32"


def test_the_config_accepts_every_precision_the_choice_can_return():
    for p in ("auto", "bf16", "fp16", "fp32"):
        assert TrainConfig(precision=p).precision == p
