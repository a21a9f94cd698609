"""The toy world itself: deterministic, held-out pairs never rendered for training, a one-token grammar, and
pixel rules of the oracle that are exact on rendered pictures."""

import random

import numpy as np
import pytest

from oneword.tokenizer import load_clip_tokenizer
from oneword.toyworld import world
from oneword.toyworld.concepts import CONCEPTS, write_concept
from oneword.toyworld.oracle import background_colour, object_colour


def test_samples_are_deterministic():
    a_im, a_cap, a_scene = world.sample(42)
    b_im, b_cap, b_scene = world.sample(42)
    assert a_cap == b_cap and a_scene == b_scene
    assert np.array_equal(np.asarray(a_im), np.asarray(b_im))
    assert world.sample(43)[2] != a_scene


def test_every_caption_word_is_one_clip_token():
    tok = load_clip_tokenizer()
    rng = random.Random(0)
    words = set()
    for _ in range(3000):
        words.update(world.caption(world.sample_scene(rng), rng).split())
    words.update(world.full_caption(world.sample_scene(rng, shape="heart", training=False)).split())
    for w in sorted(words):
        assert len(tok(w, add_special_tokens=False).input_ids) == 1, w
    longest = max(len(tok(world.full_caption(world.sample_scene(rng))).input_ids) for _ in range(2000))
    assert longest <= 20  # the toy tokenizer pads to 20 positions


def test_held_out_pairs_and_the_unseen_shape_never_appear_in_training():
    rng = random.Random(1)
    seen = {(s.colour, s.shape) for s in (world.sample_scene(rng) for _ in range(20_000))}
    assert not seen & set(world.HELD_OUT)
    assert not {s for _, s in seen} & set(world.UNSEEN_SHAPES)
    assert {c for c, _ in world.HELD_OUT} <= {c for c, _ in seen}  # their colours and shapes do appear
    assert {s for _, s in world.HELD_OUT} <= {s for _, s in seen}
    with pytest.raises(ValueError, match="held out"):
        world.sample_scene(rng, colour="purple", shape="star")


def test_captions_drop_attributes_and_some_are_empty():
    rng = random.Random(2)
    scene = world.sample_scene(rng, shape="star", colour="red", size="small", pattern="striped")
    caps = [world.caption(scene, rng) for _ in range(2000)]
    assert 0.05 < caps.count("") / len(caps) < 0.15
    assert any("shape" in c.split() for c in caps) and any("star" in c for c in caps)
    assert world.full_caption(scene).startswith("a small striped red star on a")


@pytest.mark.parametrize("name", sorted(CONCEPTS))
def test_concept_pictures_show_the_concept(name, tmp_path):
    from PIL import Image

    files = write_concept(name, tmp_path)
    assert len(files) == 5
    c = CONCEPTS[name]
    for f in files:
        im = Image.open(f)
        assert im.size == (32, 32) and object_colour(im) == c.colour
    assert write_concept(name, tmp_path / "again")[0].read_bytes() == files[0].read_bytes()


def test_pixel_rules_are_exact_on_renders():
    rng = random.Random(3)
    for _ in range(300):
        s = world.sample_scene(rng)
        im = world.render(s)
        assert background_colour(im) == s.background
        assert object_colour(im, s.background) == s.colour, s
