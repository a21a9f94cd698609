from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from oneword import embeddings as E
from oneword.config import GenerateConfig
from oneword.errors import OnewordError
from oneword.generate import generate, make_grid


def test_two_concepts_in_one_prompt(tiny_model_dir, tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    files = []
    for tok in ("<a-x>", "<b-x>"):
        files.append(E.save(E.Embedding(tok, torch.randn(2, 32, generator=g)), tmp_path / f"{tok[1]}.safetensors"))
    out = tmp_path / "gen"
    grid = generate(
        str(tiny_model_dir),
        files,
        ["a photo of <a-x> next to <b-x>", "<b-x> on the moon"],
        out,
        GenerateConfig(n=3, seed=5, steps=4),
    )
    assert Image.open(grid).size == (160 + 3 * 32, 2 * 32)
    assert sorted(p.name for p in out.glob("p*.png")) == [f"p{i:02d}_s{s}.png" for i in (0, 1) for s in (5, 6, 7)]
    # the same seed draws the same picture; another concept draws another
    again = generate(
        str(tiny_model_dir),
        files[::-1],
        ["a photo of <a-x> next to <b-x>"],
        tmp_path / "again",
        GenerateConfig(n=1, seed=5, steps=4),
    )
    assert again.exists()
    a = np.asarray(Image.open(out / "p00_s5.png"))
    b = np.asarray(Image.open(tmp_path / "again" / "p00_s5.png"))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, np.asarray(Image.open(out / "p01_s5.png")))
    # drawn again into the same folder: only this call's pictures are there; a folder of something else is refused
    generate(str(tiny_model_dir), files, ["<b-x>"], out, GenerateConfig(n=1, seed=9, steps=2))
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "p00_s9.png"]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(OnewordError, match="not pictures drawn by `oneword generate`"):
        generate(str(tiny_model_dir), files, ["<b-x>"], tmp_path / "notes", GenerateConfig(n=1, steps=2))
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)  # `-o .`, which has no name to put a temporary folder beside
    generate(str(tiny_model_dir), files, ["<b-x>"], Path("."), GenerateConfig(n=1, steps=2))
    assert sorted(p.name for p in here.iterdir()) == ["grid.png", "p00_s0.png"]


def test_grid_layout():
    ims = [[Image.new("RGB", (8, 8), (i * 40, j * 40, 0)) for j in range(3)] for i in range(2)]
    g = make_grid(ims, ["first", "second"], label_width=50)
    assert g.size == (50 + 24, 16)
    assert g.getpixel((50 + 8 + 1, 8 + 1)) == (40, 40, 0)


def test_a_token_the_base_models_tokenizer_holds_already_is_said_to_be_the_models(tiny_model_dir, tmp_path):
    """A model saved after a `load_textual_inversion` holds that token: loading one file of it said "two
    embeddings use the token", of one embedding."""
    from oneword.generate import build_pipeline, load_embeddings
    from oneword.models import load_base_model

    model = load_base_model(str(tiny_model_dir))
    pipe = build_pipeline(model, "cpu")
    pipe.tokenizer.add_tokens(["<saved-in>"])  # as the saved model's tokenizer came
    f = E.save(E.Embedding("<saved-in>", torch.randn(1, 32)), tmp_path / "one.safetensors")
    with pytest.raises(OnewordError, match=r"uses '<saved-in>', which the base model's tokenizer holds already"):
        load_embeddings(pipe, model, [f])
    twice = [E.Embedding("<t-x>", torch.randn(1, 32)), E.Embedding("<t-x>", torch.randn(1, 32))]
    with pytest.raises(OnewordError, match="two embeddings use the token '<t-x>'"):
        load_embeddings(pipe, model, twice)


def test_a_model_loaded_once_draws_again_and_one_trained_into_is_refused_by_name(tiny_model_dir, cat_latents_dir,
                                                                                  tmp_path):  # fmt: skip
    """A notebook loads the base model once and hands it to each step: a second `generate` failed on the token
    the first had added ("an embedding loaded into it before it was saved"); after `train`, every step did."""
    from oneword.inversion import ConceptSpec, TrainConfig
    from oneword.models import load_base_model
    from oneword.train import train

    model = load_base_model(str(tiny_model_dir))
    vocabulary, rows = len(model.tokenizer), model.text_encoder.get_input_embeddings().weight.shape[0]
    f = E.save(E.Embedding("<once-x>", torch.randn(2, 32)), tmp_path / "once.safetensors")
    torch.manual_seed(0)
    first = generate(model, [f], ["a <once-x>"], tmp_path / "a", GenerateConfig(n=1, seed=3, steps=2))
    drawn = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(drawn, torch.rand(3))  # the caller's random stream is as if no picture had been drawn
    second = generate(model, [f], ["a <once-x>"], tmp_path / "b", GenerateConfig(n=1, seed=3, steps=2))
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(second)))  # as the first drew it
    table = model.text_encoder.get_input_embeddings()
    assert (len(model.tokenizer), table.weight.shape[0], table.weight.requires_grad) == (vocabulary, rows, False)
    assert model.text_encoder.config.vocab_size == rows  # a save_pretrained of it writes a config that fits
    train(cat_latents_dir, tmp_path / "t", ConceptSpec(token="<t-once>", init_word="cat"), TrainConfig(steps=2),
          base_model=model, progress=False)  # fmt: skip
    other = ConceptSpec(token="<u>", init_word="cat")
    for step, call in (("generate", lambda: generate(model, [f], ["a <once-x>"], tmp_path / "c")),
                       ("train", lambda: train(cat_latents_dir, tmp_path / "u", other, TrainConfig(steps=2),
                                               base_model=model, progress=False))):  # fmt: skip
        with pytest.raises(OnewordError, match=f"{step} was given a loaded model that a training changed in place"):
            call()
