"""Device and dtype choice. Imports torch: only the worker and CLI model commands use it."""

from __future__ import annotations

import torch

from pipeline.errors import ConfigError
from pipeline.settings import Settings


def resolve_device(setting: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then the CPU."""
    if setting == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(setting)


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    """``auto``: fp16 on an accelerator (SD 1.5 was trained for it), fp32 on the CPU. fp16 on the
    CPU is refused: a tiny UNet's forward pass took 10.1 s in fp16 against 0.46 s in fp32 and
    0.35 s in bf16 (torch 2.13, one thread of a 2-core x86 machine)."""
    if setting == "auto":
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    if setting == "float16" and device.type == "cpu":
        raise ConfigError("STICKERBOT_DTYPE=float16 on the CPU: half precision runs about 20 times "
                          "slower there than float32; use auto, float32 or bfloat16")
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[setting]


def device_and_dtype(settings: Settings) -> tuple[torch.device, torch.dtype]:
    device = resolve_device(settings.device)
    return device, resolve_dtype(settings.dtype, device)
