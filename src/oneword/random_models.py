"""Random-weight Stable Diffusion models built in code, with no download.

- `build_tiny_model`: a ~3M-parameter model with the real CLIP tokenizer, for tests and the default benchmark.
- `build_sd15_shape_model`: Stable Diffusion 1.5's exact architecture with random weights, for GPU timings
  (compute does not depend on the weights' values).

Both write an ordinary diffusers folder that `oneword.models.load_base_model` loads like any other.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel

from oneword.tokenizer import EOS, MAX_LENGTH, VOCAB_SIZE, load_clip_tokenizer

SD_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


def _save(out: Path, tokenizer, text_encoder, unet, vae, scheduler_kwargs: dict) -> Path:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**scheduler_kwargs),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out)
    return out


def build_tiny_model(
    out: Path,
    seed: int = 0,
    width: int = 32,
    prediction_type: str = "epsilon",
    pad_token: str = EOS,
) -> Path:
    """Write a tiny random-weight SD-style model (32 px images, 8x8x4 latents) to `out`.

    Args:
        out: folder to write.
        seed: seed for the random weights.
        width: text-embedding width (the UNet's cross-attention width).
        prediction_type: `epsilon` (as SD 1.x) or `v_prediction` (as SD 2.x at 768 px).
        pad_token: `<|endoftext|>` (SD 1.x) or `!` (SD 2.x).

    Returns:
        `out`.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_LENGTH,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=width,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        sample_size=32,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
    )
    return _save(
        out,
        load_clip_tokenizer(pad_token),
        text_encoder,
        unet,
        vae,
        dict(SD_SCHEDULER, prediction_type=prediction_type),
    )


def build_sd15_shape_model(out: Path, seed: int = 0) -> Path:
    """Write a random-weight model with Stable Diffusion 1.5's architecture (UNet 859.5M parameters).

    Returns:
        `out`.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=MAX_LENGTH,
            hidden_act="quick_gelu",
            projection_dim=768,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=1,
        )
    )
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
    vae = AutoencoderKL(
        sample_size=512,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
    )
    return _save(out, load_clip_tokenizer(), text_encoder, unet, vae, SD_SCHEDULER)


def build_tiny_clip(out: Path, seed: int = 0, image_size: int = 32) -> Path:
    """Write a tiny random-weight CLIP (transformers' CLIPModel + CLIPProcessor) for evaluation tests."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPVisionConfig

    torch.manual_seed(seed)
    text = CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    vision = CLIPVisionConfig(
        image_size=image_size,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
    )
    model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16))
    proc = CLIPProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        ),
        tokenizer=load_clip_tokenizer(),
    )
    model.save_pretrained(out)
    proc.save_pretrained(out)
    return out


def build_tiny_dino(out: Path, seed: int = 0, image_size: int = 32) -> Path:
    """Write a tiny random-weight ViT (DINO's architecture family) with its image processor."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(seed)
    model = ViTModel(
        ViTConfig(
            image_size=image_size,
            patch_size=8,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
        ),
        add_pooling_layer=False,
    )
    model.save_pretrained(out)
    ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(out)
    return out
