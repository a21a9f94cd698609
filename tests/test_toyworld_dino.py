"""The toy world's subject-fidelity evaluator (`toyworld-dino`): trained, shipped, loaded as DINO is, and seeing
shape where the toy CLIP sees colour."""

import torch

from oneword.evaluation.metrics import DinoScorer
from oneword.toyworld.dino import held_out_margins, identities, train_dino
from oneword.toyworld.world import HELD_OUT


def test_training_writes_an_evaluator_that_loads_as_dino(tmp_path):
    report = train_dino(tmp_path / "dino", steps=2, batch=8, views_per_identity=2)
    assert set(report) == {"shape_margin", "colour_margin", "top1"}
    scorer = DinoScorer(str(tmp_path / "dino"))
    assert scorer.model.config.image_size == 32 and scorer.identity["fingerprint"].startswith("sha256:")
    # the objects it learns never include a held-out pair
    assert not {(c, s) for s, c, _ in identities()} & set(HELD_OUT)


def test_the_toy_dino_sees_shape_where_the_toy_clip_sees_colour():
    """On held-out objects (never drawn for either evaluator), each at many sizes, places and backgrounds: the
    shipped toy DINO puts a purple star nearer other purple stars than purple circles, squares or triangles by a
    clear margin and finds a picture's nearest neighbour among its own object's, where the toy CLIP barely tells
    the shapes apart (it weighs colour)."""
    from transformers import CLIPModel

    from oneword.toyworld.assets import clip_path

    dino = DinoScorer("toyworld-dino")
    assert dino.identity["name"] == "toyworld-dino"
    d = held_out_margins(lambda px: dino.model(pixel_values=px).last_hidden_state[:, 0])
    clip = CLIPModel.from_pretrained(clip_path(), dtype=torch.float32).eval()
    c = held_out_margins(lambda px: getattr(f := clip.get_image_features(pixel_values=px), "pooler_output", f))
    assert c["shape_margin"] < 0.1  # the blind spot the toy DINO is for
    assert d["shape_margin"] > c["shape_margin"] + 0.1, (d, c)
    assert d["top1"] > c["top1"] + 0.2, (d, c)

