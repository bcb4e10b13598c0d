"""Device and dtype choice. Imports torch: only the worker and CLI model commands use it."""

from __future__ import annotations

import torch

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
    """``auto``: fp16 on an accelerator (SD 1.5 was trained for it), fp32 on the CPU."""
    if setting == "auto":
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[setting]


def device_and_dtype(settings: Settings) -> tuple[torch.device, torch.dtype]:
    device = resolve_device(settings.device)
    return device, resolve_dtype(settings.dtype, device)
