"""SD 2.x end to end: a tiny model shaped as SD 2.1's diffusers folder goes through the kfp.local pipeline to a
registered concept, and diffusers' own StableDiffusionPipeline draws with the concept's embedding."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from oneword import registry

from .conftest import DREAMBENCH

TOKEN = "<cat-sd2>"


def test_the_tiny_sd2_model_is_read_as_sd2(tiny_sd2_model_dir):
    from oneword.models import load_base_model
    from oneword.profiles import profile, profile_of

    p = profile(str(tiny_sd2_model_dir))
    assert (p.family, p.resolution) == ("sd2", 32)  # 4 latents x 8 (the VAE's four levels), as SD 2.1's 96 x 8
    model = load_base_model(str(tiny_sd2_model_dir))
    assert (model.family, model.width, model.prediction_type) == ("sd2", 1024, "v_prediction")
    assert profile_of(model) == p
    tok = model.tokenizer
    assert (tok.pad_token, tok.pad_token_id) == ("!", 0)
    assert tok("a cat", padding="max_length", max_length=77).input_ids[-1] == 0  # padded with '!', not <|endoftext|>
    unet = model.unet.config
    assert (unet.cross_attention_dim, unet.use_linear_projection, unet.upcast_attention) == (1024, True, True)


@pytest.fixture(scope="module")
def sd2_run(tiny_sd2_model_dir, tiny_clip_dir, tmp_path_factory):
    """The textual_inversion pipeline run once under kfp.local on the tiny SD 2 model; returns its output dict."""
    import os

    from oneword.pipelines.local import run_textual_inversion

    tmp = tmp_path_factory.mktemp("sd2-run")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)  # mlflow.set_tracking_uri exports it
        out = run_textual_inversion(
            tmp / "root",
            log_file=tmp / "steps.log",
            images=str(DREAMBENCH / "cat"),
            token=TOKEN,
            init_word="cat",
            base_model=str(tiny_sd2_model_dir),
            resolution=0,  # the model's native size, read from its folder: 32 px
            steps=4,
            checkpoint_every=2,
            n_images=1,
            sampling_steps=2,
            checkpoint_budget=0,
            clip_model=str(tiny_clip_dir),
        )
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    return out


@pytest.mark.slow
def test_the_pipeline_registers_an_sd2_concept(sd2_run, tmp_path):
    import mlflow.artifacts

    from oneword.latents import LatentSet

    assert sd2_run["registered"] == "cat-sd2/1@champion"
    shown = registry.show_concept("cat-sd2@champion", sd2_run["tracking_uri"])
    assert shown["params"]["train.steps"] == "4" and "reconstruction" in shown["metrics"]
    summary = mlflow.artifacts.download_artifacts(
        run_id=shown["run_id"],
        artifact_path="training/summary.json",
        dst_path=str(tmp_path),
        tracking_uri=sd2_run["tracking_uri"],
    )
    summary = json.loads(Path(summary).read_text())  # what the registered version was trained under
    assert (summary["profile"]["family"], summary["profile"]["resolution"]) == ("sd2", 32)
    (latents,) = Path(sd2_run["run_dir"]).glob("**/cache-latents/**/latents.safetensors")
    assert LatentSet.load(latents).mean.shape[-3:] == (4, 4, 4)  # (C, h, w): 32 px over the VAE's 8x


@pytest.mark.slow
def test_diffusers_draws_with_the_registered_sd2_embedding(sd2_run, tiny_sd2_model_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    from oneword import embeddings

    path, tags = registry.pull_concept(
        "cat-sd2@champion", tmp_path / "learned_embeds.safetensors", "diffusers", sd2_run["tracking_uri"]
    )
    assert tags["oneword.token"] == TOKEN
    learned = embeddings.load(path).vectors  # (1, 1024)
    assert learned.shape == (1, 1024)
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd2_model_dir), local_files_only=True)
    pipe.load_textual_inversion(str(path), token=TOKEN)
    ids = pipe.tokenizer(f"a photo of {TOKEN}").input_ids
    (token_id,) = pipe.tokenizer.convert_tokens_to_ids([TOKEN])
    assert token_id in ids and token_id == 49408  # one new token, after SD's 49,408
    table = pipe.text_encoder.get_input_embeddings().weight.detach()
    assert torch.equal(table[token_id], learned[0])
    (cat_id,) = pipe.tokenizer("cat", add_special_tokens=False).input_ids
    assert not torch.equal(table[cat_id], learned[0])  # trained away from its initializer
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    image = pipe(
        f"a photo of {TOKEN}",
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
