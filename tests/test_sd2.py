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
