"""Random-weight Stable Diffusion models built in code, with no download.

- `build_tiny_model`: a ~3M-parameter model with the real CLIP tokenizer, for tests and the default benchmark.
- `build_tiny_sd2_model`: Stable Diffusion 2.1's layout and config keys (1024-wide text encoder, v-prediction,
  `!` padding), scaled down, for end-to-end tests of the SD 2 family.
- `build_tiny_sdxl_model`: SDXL's layout (two text encoders, the second with a projection; a UNet with
  `text_time` added conditioning; an fp16-unstable VAE flagged `force_upcast`), scaled down, for SDXL tests.
- `build_sd15_shape_model`, `build_sdxl_shape_model`: SD 1.5's and SDXL base 1.0's exact architectures with
  random weights, for GPU timings (compute does not depend on the weights' values).

Each writes an ordinary diffusers folder that `oneword.models.load_base_model` loads like any other.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

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


# The text encoder config keys stabilityai/stable-diffusion-2-1 ships in text_encoder/config.json (OpenCLIP ViT-H/14's
# text tower as transformers' CLIPTextModel, converted with transformers' defaults of the time: hence bos 0, eos 2 and
# pad 1, which are not the tokenizer's ids; transformers then pools at the argmax id, which SD never reads).
SD2_TEXT_ENCODER = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,  # OpenCLIP's 24 less the last: SD 2 conditions on the penultimate layer
    num_attention_heads=16,
    max_position_embeddings=MAX_LENGTH,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    projection_dim=512,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)


def build_tiny_sd2_model(out: Path, seed: int = 0) -> Path:
    """Write a tiny random-weight model shaped as Stable Diffusion 2.1's diffusers folder (32 px, 4x4x4 latents).

    What oneword and diffusers read to tell SD 2 from SD 1 is SD 2.1's: a 1024-wide `CLIPTextModel` with 16 heads
    and GELU, the tokenizer padding with `!`, a UNet with 1024-wide cross-attention, linear projections in its
    transformers, heads per block (`attention_head_dim`) doubling with the channels and upcast attention, a VAE
    that downsamples 8x, and a DDIM scheduler predicting v. Only depths and channel counts are cut (1 text layer,
    2 UNet levels, 16-32 VAE channels); the 49,408 x 1024 token-embedding table (~200 MB) is the bulk of it.

    Args:
        out: folder to write.
        seed: seed for the random weights.

    Returns:
        `out`.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**dict(SD2_TEXT_ENCODER, num_hidden_layers=1, intermediate_size=128)))
    unet = UNet2DConditionModel(
        sample_size=4,  # SD 2.1: 96 (768 px)
        block_out_channels=(32, 64),  # SD 2.1: (320, 640, 1280, 1280)
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=1024,
        attention_head_dim=(2, 4),  # heads per block, 16 channels each; SD 2.1: (5, 10, 20, 20), 64 each
        use_linear_projection=True,
        upcast_attention=True,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        sample_size=32,  # SD 2.1: 768
        block_out_channels=(16, 32, 32, 32),  # SD 2.1: (128, 256, 512, 512): four levels, 8x down
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
    )
    return _save(
        out, load_clip_tokenizer("!"), text_encoder, unet, vae, dict(SD_SCHEDULER, prediction_type="v_prediction")
    )


def build_sd15_shape_model(out: Path, seed: int = 0) -> Path:
    """Write a random-weight model with Stable Diffusion 1.5's architecture (UNet 859.5M parameters).

    Returns:
        `out`.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(seed)
    # SD 1.5's text encoder is the same CLIP ViT-L/14 as SDXL's first, converted with the tokenizer's bos/eos ids
    text_encoder = CLIPTextModel(CLIPTextConfig(**dict(SDXL_TEXT_ENCODER, bos_token_id=49406, eos_token_id=49407)))
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


# SDXL base 1.0's text encoders as its diffusers folder ships them: CLIP ViT-L/14 (text_encoder) and OpenCLIP
# ViT-bigG/14 with its text projection (text_encoder_2, whose pooled output conditions the UNet).
SDXL_TEXT_ENCODER = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=MAX_LENGTH,
    hidden_act="quick_gelu",
    projection_dim=768,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)
SDXL_TEXT_ENCODER_2 = dict(
    SDXL_TEXT_ENCODER, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    hidden_act="gelu", projection_dim=1280,
)  # fmt: skip
# SDXL base 1.0's UNet: 2,048-wide cross-attention (768 + 1280), six time ids embedded 256 wide each plus the
# 1,280-wide pooled text (6 x 256 + 1280 = 2816).
SDXL_UNET = dict(
    sample_size=128,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_embed_type_num_heads=64,
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    layers_per_block=2,
)
SDXL_VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4,
    layers_per_block=2,
    sample_size=1024,
    scaling_factor=0.13025,
    force_upcast=True,  # SDXL's VAE overflows in fp16; diffusers decodes it in fp32 when this is set
)
SDXL_SCHEDULER = dict(SD_SCHEDULER, steps_offset=1, timestep_spacing="leading")


def _save_xl(out: Path, encoders: tuple, unet, vae) -> Path:
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    tokenizer, text_encoder, tokenizer_2, text_encoder_2 = encoders
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=DDIMScheduler(**SDXL_SCHEDULER),
    )
    pipe.save_pretrained(out)
    return out


def build_tiny_sdxl_model(out: Path, seed: int = 0) -> Path:
    """Write a tiny random-weight model shaped as SDXL base 1.0's diffusers folder (32 px, 4x4x4 latents).

    What oneword and diffusers read to tell SDXL apart is SDXL's: `text_encoder` a `CLIPTextModel`, padding with
    `<|endoftext|>`; `text_encoder_2` a `CLIPTextModelWithProjection`, padding with `!`; a UNet whose
    cross-attention is the two widths together and whose `text_time` embedding takes six time ids and the
    projected pooled text; a VAE flagged `force_upcast` with SDXL's scaling factor. Widths are cut to 32 and 64
    (SDXL: 768 and 1280), depths to one or two layers.

    Args:
        out: folder to write.
        seed: seed for the random weights.

    Returns:
        `out`.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(seed)
    # bos/eos/pad stay SDXL's (0, 2, 1): with eos 2, transformers pools at the highest token id, which a
    # placeholder token is in diffusers' pipeline; oneword's loader makes it pool at the end token
    # (models.pool_at_end_token), and the tests see both
    small = dict(num_hidden_layers=2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(**dict(SDXL_TEXT_ENCODER, hidden_size=32, intermediate_size=64, num_attention_heads=4, **small))
    )
    text_encoder_2 = CLIPTextModelWithProjection(
        CLIPTextConfig(
            **dict(
                SDXL_TEXT_ENCODER_2, hidden_size=64, intermediate_size=128, num_attention_heads=4, projection_dim=32,
                **small,
            )
        )
    )  # fmt: skip
    unet = UNet2DConditionModel(
        **dict(
            SDXL_UNET,
            sample_size=4,
            block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1),
            attention_head_dim=(2, 4),
            cross_attention_dim=32 + 64,
            addition_embed_type_num_heads=4,
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,
            layers_per_block=1,
            norm_num_groups=8,
        )
    )
    vae = AutoencoderKL(
        **dict(SDXL_VAE, sample_size=32, block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8)
    )
    encoders = (load_clip_tokenizer(), text_encoder, load_clip_tokenizer("!"), text_encoder_2)
    return _save_xl(out, encoders, unet, vae)


def build_sdxl_shape_model(out: Path, seed: int = 0) -> Path:
    """Write a random-weight model with SDXL base 1.0's architecture (UNet 2.57B parameters), for timings.

    Returns:
        `out`.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(seed)
    encoders = (
        load_clip_tokenizer(),
        CLIPTextModel(CLIPTextConfig(**SDXL_TEXT_ENCODER)),
        load_clip_tokenizer("!"),
        CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_ENCODER_2)),
    )
    return _save_xl(out, encoders, UNet2DConditionModel(**SDXL_UNET), AutoencoderKL(**SDXL_VAE))


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
