"""SDXL as a trainable family: a tiny model shaped as SDXL base 1.0's diffusers folder trains a pair of vectors
(one per text encoder), conditions its UNet exactly as diffusers' SDXL pipeline does, is evaluated, registered and
pulled, and diffusers' own StableDiffusionXLPipeline loads the file with its two documented calls and draws."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from oneword import embeddings as emb_io
from oneword.errors import OnewordError

from .conftest import DREAMBENCH

TOKEN = "<cat-xl>"


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory) -> Path:
    from oneword.random_models import build_tiny_sdxl_model

    return build_tiny_sdxl_model(tmp_path_factory.mktemp("tiny-sdxl") / "model")


@pytest.fixture(scope="module")
def sdxl_concept(sdxl_dir, tmp_path_factory):
    """Preprocess, cache and train one concept on the tiny SDXL model (checkpoints at 2 and 4); (root, trainer)."""
    from oneword.config import ConceptSpec, TrainConfig
    from oneword.images import preprocess
    from oneword.latents import cache_latents
    from oneword.train import train

    root = tmp_path_factory.mktemp("sdxl-concept")
    preprocess(DREAMBENCH / "cat", root / "data", resolution=32)
    cache_latents(root / "data", str(sdxl_dir), root / "latents")
    train(
        root / "latents",
        root / "train",
        ConceptSpec(token=TOKEN, init_word="cat"),
        TrainConfig(steps=4, checkpoint_every=2, learning_rate=5e-4),
        progress=False,
    )
    return root


def test_latents_another_familys_vae_encoded_are_refused(sdxl_concept, tiny_model_dir, cat_latents_dir, tmp_path):
    """SDXL's latents (a VAE that scales by 0.13025) trained on an SD 1.x model (0.18215): refused before a step,
    where they trained on a wrong objective with one line of warning."""
    from oneword.config import ConceptSpec, TrainConfig
    from oneword.train import train

    with pytest.raises(OnewordError, match=r"scaling factor 0\.13025") as e:
        train(sdxl_concept / "latents", tmp_path / "t", ConceptSpec(token="<x>", init_word="cat"),
              TrainConfig(steps=1), base_model=str(tiny_model_dir), progress=False)  # fmt: skip
    assert "oneword cache-latents" in e.value.hint and str(tiny_model_dir) in e.value.hint
    # in a group, that member fails and the others train
    from oneword.train import train_group

    members = [("xl", ConceptSpec(token="<xl>", init_word="cat"), sdxl_concept / "latents"),
               ("sd", ConceptSpec(token="<sd>", init_word="cat"), cat_latents_dir)]  # fmt: skip
    result = train_group(members, tmp_path / "g", TrainConfig(steps=1), base_model=str(tiny_model_dir), progress=False)
    assert (tmp_path / "g" / "sd" / "learned_embeds.safetensors").exists()
    assert not (tmp_path / "g" / "xl" / "learned_embeds.safetensors").exists()
    assert "scaling factor" in json.dumps(result)


def test_the_tiny_sdxl_model_is_read_as_sdxl(sdxl_dir):
    from oneword.models import load_base_model
    from oneword.profiles import profile, profile_of

    p = profile(str(sdxl_dir))
    assert (p.family, p.resolution) == ("sdxl", 32)
    model = load_base_model(str(sdxl_dir), parts=())
    assert (model.family, model.width, model.width_2) == ("sdxl", 32, 64)
    assert profile_of(model) == p
    assert model.tokenizer.pad_token == "<|endoftext|>" and model.tokenizer_2.pad_token == "!"
    assert type(model.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    from oneword.models import fingerprint

    # the fingerprint covers the second table: without it, the same first encoder fingerprints differently
    assert fingerprint(model.tokenizer, model.text_encoder, {}) != fingerprint(
        model.tokenizer, model.text_encoder, {}, model.text_encoder_2
    )


def test_time_ids_record_original_size_and_crop():
    from oneword.conditioning import time_ids
    from oneword.images import ImageRecord

    wide = ImageRecord("a.png", "a.jpg", "0" * 64, (64, 48), "1" * 64)  # (width, height), as PIL's size
    # short side 48 -> 32: the picture becomes 43 x 32 and the centre 32 columns start at column 5
    assert time_ids(wide, "crop", 32, flip=False) == [48, 64, 0, 5, 32, 32]
    assert time_ids(wide, "crop", 32, flip=True) == [48, 64, 0, 6, 32, 32]  # counted from the mirrored side
    tall = ImageRecord("b.png", "b.jpg", "0" * 64, (40, 80), "1" * 64)
    assert time_ids(tall, "crop", 32, flip=False) == [80, 40, 16, 0, 32, 32]
    assert time_ids(tall, "pad", 32, flip=False) == [80, 80, 0, 0, 32, 32]  # the square canvas, uncropped


@pytest.mark.slow
def test_sdxl_training_learns_both_tables_and_only_the_new_rows(sdxl_concept, sdxl_dir):
    from oneword.images import Manifest
    from oneword.latents import LatentSet
    from oneword.models import load_base_model

    root = sdxl_concept
    latents = LatentSet.load(root / "latents")
    manifest = Manifest.load(root / "data")
    assert latents.time_ids.shape == (len(manifest.images), 2, 6)
    w, h = manifest.images[0].original_size
    assert latents.time_ids[0, 0, :2].tolist() == [h, w]  # each photo's own size, not the training size
    assert latents.meta["resolution"] == 32 and latents.scaling_factor == pytest.approx(0.13025)

    emb = emb_io.load(root / "train" / "learned_embeds.safetensors")
    assert emb.token == TOKEN and emb.vectors.shape == (1, 32) and emb.vectors_2.shape == (1, 64)
    base = load_base_model(str(sdxl_dir), parts=())
    (cat_l,) = base.tokenizer("cat", add_special_tokens=False).input_ids
    (cat_g,) = base.tokenizer_2("cat", add_special_tokens=False).input_ids
    for vectors, encoder, cat in ((emb.vectors, base.text_encoder, cat_l), (emb.vectors_2, base.text_encoder_2, cat_g)):
        table = encoder.get_input_embeddings().weight
        assert not torch.allclose(vectors[0], table[cat])  # it learned
        assert torch.cdist(vectors, table).argmin().item() == cat  # from its own encoder's initializer

    files = {p.relative_to(root / "train").as_posix() for p in (root / "train").rglob("*.safetensors")}
    assert "kohya/cat-xl.safetensors" in files and not (root / "train" / "a1111").exists()
    for f in ("learned_embeds.safetensors", "kohya/cat-xl.safetensors"):
        assert set(load_file(str(root / "train" / f))) == {"clip_l", "clip_g"}  # what A1111 and ComfyUI load

    # the frozen model did not change: a fresh load has the same tables as the trained folder's model
    fresh = load_base_model(str(sdxl_dir), parts=())
    for enc in ("text_encoder", "text_encoder_2"):
        a = getattr(base, enc).get_input_embeddings().weight
        assert torch.equal(a, getattr(fresh, enc).get_input_embeddings().weight)


def test_sdxl_conditioning_is_what_diffusers_sdxl_pipeline_builds(sdxl_dir):
    """Training's text states, pooled text and time ids equal StableDiffusionXLPipeline's for the same vectors."""
    from diffusers import StableDiffusionXLPipeline

    from oneword.bench import synthetic_latents
    from oneword.conditioning import tokenize
    from oneword.config import ConceptSpec, TrainConfig
    from oneword.inversion import InversionTrainer
    from oneword.models import load_base_model

    model = load_base_model(str(sdxl_dir), parts=("unet",))
    trainer = InversionTrainer(
        model, [(ConceptSpec(token=TOKEN, init_word="cat"), synthetic_latents(4, 4))], TrainConfig(steps=2)
    )
    trainer.run(progress=False)
    (emb,) = trainer.embeddings()
    prompt = f"a photo of {TOKEN} on a beach"
    ids = tokenize(trainer.tokenizers, [prompt], "cpu")
    sizes = torch.tensor([[32.0, 32, 0, 0, 32, 32]])
    with torch.no_grad():
        hidden, added = trainer.conditioning(ids, sizes)

    pipe = StableDiffusionXLPipeline.from_pretrained(str(sdxl_dir), local_files_only=True)
    # diffusers' documented way to load an SDXL embedding: one call per text encoder
    pipe.load_textual_inversion(
        emb.vectors_2, token=TOKEN, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
    )
    pipe.load_textual_inversion(emb.vectors, token=TOKEN, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    _, _, pooled_at_placeholder, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
    # the one line README gives diffusers users: pool at the end token, as A1111, ComfyUI and kohya do
    pipe.text_encoder_2.text_model.eos_token_id = pipe.tokenizer_2.eos_token_id
    embeds, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
    assert hidden.shape == embeds.shape == (1, 77, 96)
    torch.testing.assert_close(hidden, embeds)
    torch.testing.assert_close(added["text_embeds"], pooled)
    assert not torch.allclose(pooled, pooled_at_placeholder)  # diffusers' own pooling (diffusers#10754) differs

    # pooled as CLIP was trained to pool: the end token's last state, projected (kohya's pool_workaround)
    encoder, second = trainer.model.text_encoder_2, ids[:, 1]
    assert pipe.tokenizer_2.convert_tokens_to_ids(TOKEN) > pipe.tokenizer_2.eos_token_id  # argmax would pick it
    with torch.no_grad():
        last = encoder(second).last_hidden_state
        end = (second == pipe.tokenizer_2.eos_token_id).int().argmax(-1)
        by_hand = encoder.text_projection(last[torch.arange(len(second)), end])
    torch.testing.assert_close(added["text_embeds"], by_hand)
    time_ids = pipe._get_add_time_ids(
        (32, 32),
        (0, 0),
        (32, 32),
        dtype=torch.float32,
        text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
    )
    torch.testing.assert_close(added["time_ids"], time_ids)


@pytest.mark.slow
def test_sdxl_concept_is_evaluated_registered_pulled_and_drawn_by_diffusers(
    sdxl_concept, sdxl_dir, tiny_clip_dir, tmp_path
):
    from diffusers import StableDiffusionXLPipeline

    from oneword import catalogue, registry
    from oneword.config import GenerateConfig
    from oneword.evaluation.evaluate import EvalConfig, evaluate
    from oneword.generate import generate

    root = sdxl_concept
    metrics = evaluate(
        root / "train",
        root / "data",
        root / "eval",
        EvalConfig(n_images=1, steps=2, checkpoint_budget=1, clip_model=str(tiny_clip_dir)),
    )
    assert metrics["selection"]["chosen_step"] in (2, 4) and len(metrics["selection"]["curve"]) == 2
    chosen = emb_io.load(root / "eval" / "embedding" / "learned_embeds.safetensors")
    assert chosen.vectors_2 is not None and chosen.steps == metrics["step"]
    assert Image.open(root / "eval" / "grid.png").size[1] == 32 * (2 + len(metrics["per_prompt"]))  # + photos

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    reg = registry.register(root / "train", root / "eval", tracking_uri=uri)
    assert reg.alias == "champion"
    (row,) = catalogue.list_concepts(tracking_uri=uri)
    assert row["model_family"] == "sdxl"
    with pytest.raises(OnewordError, match=r"A1111 reads an SDXL \.pt only as a bare dict") as e:
        catalogue.pull_concept(f"{reg.name}@champion", tmp_path / "x.pt", "a1111", uri)
    assert "--format kohya" in e.value.hint and not (tmp_path / "x.pt").exists()
    path, _ = catalogue.pull_concept(f"{reg.name}@champion", tmp_path / "cat-xl.safetensors", "kohya", uri)

    grid = generate(str(sdxl_dir), [path], [f"a photo of {TOKEN}"], tmp_path / "gen", GenerateConfig(n=2, steps=2))
    assert Image.open(grid).size == (160 + 2 * 32, 32)  # oneword's own generate draws with it too

    pipe = StableDiffusionXLPipeline.from_pretrained(str(sdxl_dir), local_files_only=True)
    pair = load_file(str(path))
    pipe.load_textual_inversion(
        pair["clip_g"], token=TOKEN, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
    )
    pipe.load_textual_inversion(pair["clip_l"], token=TOKEN, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    image = pipe(
        f"a photo of {TOKEN}", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)
    ).images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()

    # diffusers' format: its SDXL script's two files, which diffusers loads by path, each carrying the token
    first, _ = catalogue.pull_concept(f"{reg.name}@champion", tmp_path / "d" / "cat-xl.safetensors", "diffusers", uri)
    second = emb_io.second_file(first)
    assert second == tmp_path / "d" / "cat-xl_2.safetensors"
    pipe = StableDiffusionXLPipeline.from_pretrained(str(sdxl_dir), local_files_only=True)
    pipe.load_textual_inversion(str(first))
    pipe.load_textual_inversion(str(second), text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    for tokenizer, encoder, table in ((pipe.tokenizer, pipe.text_encoder, pair["clip_l"]),
                                      (pipe.tokenizer_2, pipe.text_encoder_2, pair["clip_g"])):  # fmt: skip
        row = encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(TOKEN)]
        torch.testing.assert_close(row, table[0])
    with pytest.raises(OnewordError, match="already exists"):  # the pair is refused whole, not half replaced
        catalogue.pull_concept(f"{reg.name}@champion", first, "diffusers", uri, replace=False)


def test_an_sd_embedding_is_refused_by_an_sdxl_model_and_back(sdxl_dir, tiny_model_dir):
    from oneword.generate import build_pipeline, load_embeddings
    from oneword.models import load_base_model

    xl = load_base_model(str(sdxl_dir))
    one = emb_io.Embedding("<a>", torch.zeros(1, 32))
    with pytest.raises(OnewordError, match="no clip_g table"):
        load_embeddings(build_pipeline(xl, "cpu"), xl, [one])
    sd = load_base_model(str(tiny_model_dir))
    pair = emb_io.Embedding("<b>", torch.zeros(1, 32), vectors_2=torch.zeros(1, 64))
    with pytest.raises(OnewordError, match="is an SDXL pair"):
        load_embeddings(build_pipeline(sd, "cpu"), sd, [pair])


def test_a_broken_single_file_sdxl_checkpoint_names_what_it_was_read_as(tmp_path):
    from safetensors.torch import save_file

    from oneword.models import load_base_model, single_file_family
    from oneword.preflight import preflight
    from oneword.profiles import image_side, profile

    ckpt = tmp_path / "sdxl.safetensors"
    save_file({"conditioner.embedders.1.model.token_embedding.weight": torch.zeros(4, 4)}, str(ckpt))
    assert single_file_family(ckpt) == "sdxl"
    with pytest.raises(OnewordError, match="read as an SDXL checkpoint") as e:
        load_base_model(str(ckpt), model_config=str(tmp_path / "nowhere"))
    assert "stable-diffusion-xl-base-1.0" in e.value.hint
    sd = tmp_path / "sd15.safetensors"
    save_file({"cond_stage_model.transformer.text_model.x": torch.zeros(2)}, str(sd))
    assert single_file_family(sd) == "sd1"
    sd2 = tmp_path / "sd21.safetensors"
    save_file({"cond_stage_model.model.token_embedding.weight": torch.zeros(4, 4)}, str(sd2))
    assert single_file_family(sd2) == "sd2"
    # the profile follows the tensor names too: SDXL trains at its 1024 px, SD 2.x at the 768 px diffusers builds
    # such a file at, neither at SD 1's 512
    assert (profile(str(ckpt)).family, image_side(str(ckpt), 0)) == ("sdxl", 1024)
    assert (profile(str(sd)).family, image_side(str(sd), 0)) == ("sd1", 512)
    assert (profile(str(sd2)).family, image_side(str(sd2), 0)) == ("sd2", 768)
    # the tokens are checked with CLIP's tokenizer, which a single file does not hold
    concepts = [{"images": str(DREAMBENCH / "cat"), "token": t, "init_word": "cat"} for t in ("<x>", "cat")]
    with pytest.raises(OnewordError) as e:
        preflight(str(sd), concepts, clip_model="toyworld-clip", tracking_uri=None)
    assert "1 problem(s)" in e.value.message and "token 'cat' is already in the vocabulary" in e.value.message
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(OnewordError, match="not a readable safetensors checkpoint"):
        load_base_model(str(tmp_path / "junk.safetensors"))


def test_the_ldm_config_beside_a_single_file_says_its_prediction_type(tmp_path):
    """diffusers takes every SD 2.x file for SD 2.1's v-prediction; the config A1111 reads beside it says which."""
    from oneword.models import single_file_prediction

    ckpt = tmp_path / "sd21-base.safetensors"
    assert single_file_prediction(ckpt) is None
    config = tmp_path / "sd21-base.yaml"
    config.write_text("model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n  params:\n    timesteps: 1000\n")
    assert single_file_prediction(ckpt) == "epsilon"
    config.write_text("model:\n  params:\n    parameterization: \"v\"\n    timesteps: 1000\n")
    assert single_file_prediction(ckpt) == "v_prediction"
    config.write_text("- not\n- a config\n")
    with pytest.raises(OnewordError, match=r"sd21-base\.yaml is not an LDM model config") as e:
        single_file_prediction(ckpt)
    assert "sd21-base.safetensors" in e.value.hint

    # what it says is part of the training's key: a config put beside the file later trains the concept anew
    # (its earlier training had the other target), while every model without one keeps its keys
    from oneword.config import ConceptSpec, TrainConfig
    from oneword.train import model_identity, training_key

    spec, photos, config = ConceptSpec(token="<k>", init_word="cat"), ["a" * 64], TrainConfig(steps=10)
    keys = {stated: training_key(spec, photos, config, model_identity("sha256:f", str(ckpt), stated))
            for stated in (None, "epsilon", "v_prediction")}  # fmt: skip
    assert len(set(keys.values())) == 3
    assert model_identity("sha256:f", str(ckpt)) == f"sha256:f {ckpt}"  # as before this was recorded


def test_bench_times_sdxl_training(sdxl_dir, capsys):
    from .test_cli import run

    code, out = run(["bench", "--base-model", str(sdxl_dir), "--steps", 2], capsys)
    assert code == 0 and "steps/s" in out and "no diffusers-example-style baseline" in out
    assert "speed-up" not in out  # nothing to compare with: that loop is SD 1.x/2.x's


def test_an_fp16_vae_flagged_force_upcast_encodes_in_fp32(sdxl_dir, tmp_path):
    from oneword.images import preprocess
    from oneword.latents import cache_latents
    from oneword.models import load_base_model

    model = load_base_model(str(sdxl_dir), parts=("vae",), dtype=torch.float16)
    assert model.vae.config.force_upcast and model.vae.dtype == torch.float16
    preprocess(DREAMBENCH / "cat", tmp_path / "data", resolution=32)
    latents = cache_latents(tmp_path / "data", model, tmp_path / "latents", cache_dir=tmp_path / "cache")
    assert model.vae.dtype == torch.float32  # upcast, as diffusers' pipelines do for this flag
    assert latents.mean.dtype == torch.float32 and torch.isfinite(latents.mean).all()
