"""SD 2.x: a tiny model shaped as SD 2.1's diffusers folder is read as SD 2. The same model goes through the whole
kfp.local pipeline to a registered concept, which diffusers' own StableDiffusionPipeline draws with, in
`tests/test_pipelines.py::test_local_run_end_to_end`."""


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


def test_a_hub_model_gets_its_native_size_from_its_configs_in_the_hub_cache(tiny_sd2_model_dir, tmp_path):
    """A model loaded by hub id has no folder of its own: its profile's size is read from the hub's cache, as
    `profile` reads it (a 512 px SD 2 "base" model is not SD 2's 768 px)."""
    import os
    import shutil
    import subprocess
    import sys

    commit = "0" * 40
    repo = tmp_path / "hub" / "models--oneword-tests--tiny-sd2-base"
    shutil.copytree(tiny_sd2_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    code = (
        "from oneword.models import load_base_model; from oneword.profiles import profile, profile_of\n"
        "m = load_base_model('oneword-tests/tiny-sd2-base', parts=())\n"
        "print(m.family, profile_of(m).resolution, profile('oneword-tests/tiny-sd2-base').resolution)\n"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["sd2", "32", "32"]  # the folder's 4 x 8 px, not the family's 768
