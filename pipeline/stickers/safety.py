"""The NSFW filter: the diffusion repository's safety checker looks at each generated image.

A stage function: the checker comes in as an argument (``Models.safety``, loaded by
:mod:`pipeline.models`). ``make_sticker`` drops every flagged image before background removal,
so a flagged sticker is never encoded, stored or sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from pipeline.models import SafetyChecker


def flag_unsafe(checker: SafetyChecker, images: Sequence[Image.Image]) -> list[bool]:
    """True for each image the checker flags (``StableDiffusionSafetyChecker``'s verdict, as the
    diffusers pipelines compute it: CLIP image embedding against its concept embeddings)."""
    import torch

    if not images:
        return []
    param = next(checker.model.parameters())
    rgb = [im.convert("RGB") for im in images]
    inputs = checker.feature_extractor(images=rgb, return_tensors="pt")
    clip_input = inputs["pixel_values"].to(device=param.device, dtype=param.dtype)
    # The checker blacks out flagged images in place; it gets copies, the verdict is all we use.
    arrays = [np.asarray(im, dtype=np.float32) / 255.0 for im in rgb]
    with torch.inference_mode():
        _, flags = checker.model(clip_input=clip_input, images=arrays)
    return [bool(f) for f in flags]
