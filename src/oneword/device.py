"""Which device a step runs on, and in which precision it trains there."""

from __future__ import annotations

from typing import Literal

import torch

from oneword.errors import OnewordError

Precision = Literal["bf16", "fp16", "fp32"]

# Compute capabilities (major, minor) from which a precision runs natively on NVIDIA tensor cores: bf16 from
# Ampere (8.0: A100, A10, L4, H100); fp16 from Volta (7.0: V100, and Turing 7.5: T4). Older cards (Pascal 6.x)
# have no fp16 tensor cores worth the loss scaling, so fp32 is both safer and about as fast there.
BF16_FROM, FP16_FROM = (8, 0), (7, 0)

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_device(name: str) -> torch.device:
    """`auto` means CUDA when available, else CPU. On CPU, denormal floats are flushed to zero (see below)."""
    try:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    except RuntimeError as e:
        raise OnewordError(f"unknown device {name!r}", hint="use auto, cpu, cuda, cuda:1, mps, ...") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OnewordError(
            f"device {name!r}: this torch sees no CUDA GPU"
            + (" (it is a CPU-only build)" if torch.version.cuda is None else ""),
            hint="use --device cpu (or auto), or install torch's CUDA build on a machine with an NVIDIA GPU",
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise OnewordError(
            f"device {name!r}: this machine has {torch.cuda.device_count()} visible CUDA GPU(s)",
            hint="use cuda, or cuda:N with N below that count",
        )
    if device.type == "cpu":
        # Denormal floats make x86 CPUs 20-50x slower, and they appear in the frozen UNet's activations (measured:
        # 2 concepts in one batch, 20 steps, 65 s -> 1.7 s; two toy evaluations side by side, 6.7 min before).
        # Process-wide, like the TF32 switch on CUDA; flushing them to zero changes no result that matters.
        torch.set_flush_denormal(True)
    return device


def devices_seen() -> str:
    """What a step could run on, as its metrics record it: `N x GPU NAME` (the first visible GPU's), or `cpu`."""
    if not torch.cuda.is_available():
        return "cpu"
    return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"


def cuda_capability(device: torch.device) -> tuple[int, int] | None:
    """The compute capability of a CUDA device (None for other devices)."""
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def choose_precision(
    requested: str, device_type: str, capability: tuple[int, int] | None = None, gpu_name: str = "this GPU"
) -> Precision:
    """The precision a training runs in: `requested` (auto, bf16, fp16, fp32) checked against the device.

    `auto` takes the fastest precision the device runs natively: bf16 on CUDA compute capability 8.0 and newer,
    fp16 with loss scaling on 7.x (V100, T4), fp32 on older GPUs and on CPU. (`torch.cuda.is_bf16_supported()`
    also says yes where bf16 is only emulated, which is slower than fp32, so the capability decides.)

    Raises:
        OnewordError: for a precision the device cannot run natively, naming the device and what to use.
    """
    native_bf16 = device_type == "cpu" or (capability is not None and capability >= BF16_FROM)
    native_fp16 = capability is not None and capability >= FP16_FROM
    if requested == "auto":
        if device_type != "cuda" or capability is None:
            return "fp32"
        return "bf16" if native_bf16 else "fp16" if native_fp16 else "fp32"
    if requested == "bf16" and not native_bf16:
        cc = ".".join(map(str, capability)) if capability else "?"
        raise OnewordError(
            f"{gpu_name} (compute capability {cc}) has no native bf16 (it starts at 8.0)",
            hint="use --precision fp16 (loss-scaled) or auto, which picks it",
        )
    if requested == "fp16" and not native_fp16:
        raise OnewordError(
            f"fp16 training needs a CUDA GPU with compute capability 7.0 or newer, not {device_type}"
            + (f" {capability}" if capability else ""),
            hint="use --precision auto (fp32 here)",
        )
    if requested not in DTYPES:
        raise OnewordError(f"unknown precision {requested!r}", hint="use auto, bf16, fp16 or fp32")
    return requested  # type: ignore[return-value]


def device_precision(requested: str, device: torch.device) -> Precision:
    """`choose_precision` for a live device."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return choose_precision(requested, device.type, cuda_capability(device), name)
