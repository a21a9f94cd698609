"""The shipped toy model works in stock diffusers as a user would load it: no oneword code, no dtype argument.

Only the folder is found through the package (`oneword/data/toyworld/model`); loading and drawing is diffusers'.
"""

from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch

MODEL = Path(str(resources.files("oneword") / "data" / "toyworld" / "model"))
NATIVE_SIZE = 32  # pixels: the world's pictures


@pytest.mark.parametrize("pipeline_class", ["StableDiffusionPipeline", "DiffusionPipeline"])
def test_stock_diffusers_loads_the_toy_model_in_one_dtype_and_draws(pipeline_class):
    import diffusers

    pipe = getattr(diffusers, pipeline_class).from_pretrained(MODEL)  # the stock defaults: no dtype, CPU
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    modules = {name: c for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}
    assert set(modules) == {"text_encoder", "unet", "vae"}
    dtypes = {name: {p.dtype for p in m.parameters()} for name, m in modules.items()}
    assert set().union(*dtypes.values()) == {torch.float32}, dtypes  # one dtype, one that runs on any CPU

    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == NATIVE_SIZE  # what the pipeline draws by default
    images = pipe(
        "a red star on a blue background",
        num_inference_steps=3,
        generator=torch.Generator("cpu").manual_seed(0),
        output_type="np",
    ).images
    assert images.shape == (1, NATIVE_SIZE, NATIVE_SIZE, 3)
    assert np.isfinite(images).all()
    assert images.min() >= 0 and images.max() <= 1
    assert images.std() > 0.02, images.std()  # a picture, not a constant
