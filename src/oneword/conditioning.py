"""Text conditioning built as each family's diffusers pipeline builds it, so that training sees what sampling sees.

- SD 1.x/2.x (`StableDiffusionPipeline.encode_prompt`, no clip skip): the text encoder's last hidden state.
- SDXL (`StableDiffusionXLPipeline.encode_prompt` and `_get_add_time_ids`): both encoders' penultimate hidden
  states concatenated on the feature axis (768 + 1280 = 2048 wide), the second encoder's projected pooled
  output as `text_embeds` (at the end token, as A1111, ComfyUI and kohya pool it, where diffusers' pipeline
  takes a placeholder's: `models.pool_at_end_token`), and `time_ids` = original size + crop top-left + target
  size, each as (height, width) (Podell et al. 2023, "SDXL", arXiv 2307.01952, Sec. 2.2).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from oneword.images import ImageRecord


class TextConditioning:
    """The UNet's text inputs from prompt ids: `(encoder_hidden_states, added_cond_kwargs or None)`.

    Args:
        encoders: the text encoders, in the pipeline's order (one for SD 1.x/2.x, two for SDXL).
    """

    def __init__(self, encoders: Sequence[nn.Module]):
        self.encoders = list(encoders)

    @property
    def sdxl(self) -> bool:
        return len(self.encoders) == 2

    def __call__(
        self, ids: torch.Tensor, time_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """Encode prompt ids `(B, n_encoders, 77)`; SDXL also needs `time_ids` (B, 6)."""
        if not self.sdxl:
            return self.encoders[0](ids[:, 0])[0], None
        if time_ids is None:
            raise ValueError("SDXL conditioning needs time_ids (original size, crop, target size)")
        first, second = (enc(ids[:, i], output_hidden_states=True) for i, enc in enumerate(self.encoders))
        hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        return hidden, {"text_embeds": second[0], "time_ids": time_ids.to(hidden.dtype)}


def tokenize(tokenizers: Sequence, prompts: Sequence[str], device: torch.device | str) -> torch.Tensor:
    """Prompt ids `(B, n_tokenizers, 77)`: each tokenizer pads and truncates to its own maximum length."""
    per_tokenizer = [
        tok(
            list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        for tok in tokenizers
    ]
    return torch.stack(per_tokenizer, dim=1).to(device)


def time_ids(record: ImageRecord, mode: str, resolution: int, flip: bool) -> list[int]:
    """SDXL's size and crop conditioning of one preprocessed image, as diffusers' SDXL training scripts compute it.

    `crop`: the short side was resized to `resolution` and the centre cut out, so the crop's top-left is where
    that cut began in the resized picture (mirrored images count from the other side). `pad`: the whole picture
    sits on a square canvas, which is the original, uncropped.
    """
    w, h = record.original_size
    if mode == "pad":
        side = max(w, h)
        return [side, side, 0, 0, resolution, resolution]
    scale = resolution / min(w, h)
    rw, rh = round(w * scale), round(h * scale)
    top, left = (rh - resolution) // 2, (rw - resolution) // 2
    if flip:
        left = rw - resolution - left
    return [h, w, top, left, resolution, resolution]


def default_time_ids(resolution: int) -> list[int]:
    """The time ids of a square picture at `resolution`, uncropped (diffusers' sampling default)."""
    return [resolution, resolution, 0, 0, resolution, resolution]
