"""The toy-world model's parts: the same diffusers/transformers classes as Stable Diffusion, sized for a CPU.

Sizes were chosen by timing one training step on 2 CPU cores (batch 128): cross-attention only at the 4x4 and
2x2 latent resolutions costs 0.63 s/step against 1.10 s with attention at 8x8 too, for the same quality of
global attributes (colour, shape, background). A text width of 96 keeps the 49,408-row token table at 9.5 MB
in fp16, so the whole model ships in under 30 MB.
"""

from __future__ import annotations

import torch
from transformers import CLIPTextConfig

from oneword.tokenizer import VOCAB_SIZE

TEXT_WIDTH = 96
MAX_TOKENS = 20  # the longest caption is 18 tokens with BOS/EOS; the tokenizer pads to this, not 77

SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="v_prediction",
    rescale_betas_zero_snr=True,  # Lin et al. 2024: the model learns to draw from pure noise
    timestep_spacing="trailing",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,  # only read by leading spacing; 1 keeps diffusers from warning
)


def text_config() -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=TEXT_WIDTH,
        intermediate_size=4 * TEXT_WIDTH,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def make_text_encoder():
    from transformers import CLIPTextModel

    return CLIPTextModel(text_config())


def make_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 128, 128),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=32,
        norm_num_groups=32,
    )


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=16,
    )


@torch.no_grad()
def vae_roundtrip(vae, x: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Pictures in [-1, 1] as the VAE returns them (encode, sample, decode), as a generated picture looks: the
    evaluators and the oracle train on such pictures too."""
    parts = [vae.decode(vae.encode(x[i : i + chunk]).latent_dist.sample()).sample for i in range(0, len(x), chunk)]
    return torch.cat(parts).clamp(-1, 1)
