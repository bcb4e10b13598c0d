"""img2img and adapters at SD 1.5's real sizes (random weights, built in memory): 768-wide
cross-attention, 77-token prompts, 4-level UNet, VAE scaling factor, LoRA target names.

Slow (builds ~1.1 B parameters on the CPU, ~4.5 GB): ``pytest -m slow tests/test_sd15_img2img.py``.
64-px images (8x8 latents) and 1-2 denoising steps keep the forward passes cheap.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.architectures import SD15
from pipeline.models import DiffusionModels, Models
from pipeline.stickers.generation import (
    GenerationParams,
    StickerGenerator,
    StyleRef,
    size_multiple,
    write_random_style,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sd15() -> DiffusionModels:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from pipeline.zoo import build_clip_tokenizer

    torch.manual_seed(0)
    tokenizer = build_clip_tokenizer()
    text_config = CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                 **SD15.text_encoder)
    modules = [UNet2DConditionModel(**SD15.unet), AutoencoderKL(**SD15.vae), CLIPTextModel(text_config)]
    unet, vae, text_encoder = (m.eval().requires_grad_(False) for m in modules)
    return DiffusionModels(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                           scheduler_config=dict(SD15.scheduler), source="sd15-random", resolution=64,
                           device=torch.device("cpu"), dtype=torch.float32)


def test_sd15_sized_img2img_with_an_adapter(sd15: DiffusionModels, tmp_path: Path) -> None:
    assert sd15.vae_scale_factor == 8 and size_multiple(sd15) == 64
    assert sd15.unet.config.cross_attention_dim == sd15.text_encoder.config.hidden_size == 768
    write_random_style(sd15, tmp_path / "style", rank=4, copy_modules=False)
    style = StyleRef.open(tmp_path / "style")
    gen = StickerGenerator(sd15, cache_size=2)
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    params = GenerationParams(steps=2, strength=0.5)  # one denoising step
    # A prompt longer than CLIP's 77 tokens is truncated, not an error.
    prompt = "a zqv cat sticker, " + "cat with a red hat " * 30

    def run(style_ref: StyleRef | None, p: GenerationParams = params) -> np.ndarray:
        out = gen.generate(photo, prompt=prompt, negative_prompt="blurry", seeds=[3], style=style_ref,
                           params=p)
        assert out[0].size == (64, 64)
        return np.asarray(out[0])

    base = run(None)
    styled = run(style)
    assert np.isfinite(styled.astype(float)).all() and styled.std() > 0
    assert not np.array_equal(base, styled)  # the LoRA hit the real layer names
    assert np.array_equal(run(style, GenerationParams(steps=2, strength=0.5, adapter_scale=0.0)), base)
    assert np.array_equal(run(style), styled)
    gen.unload_all()
    assert not any("lora" in name for name, _ in sd15.unet.named_modules())
    assert np.array_equal(run(None), base)


def test_sd15_sized_make_sticker(sd15: DiffusionModels, tiny_models, tmp_path: Path) -> None:
    from pipeline.stickers.postprocess import check_sticker
    from pipeline.stickers.sticker_pipeline import StickerModels, StickerOptions, make_sticker

    write_random_style(sd15, tmp_path / "style", seed=5, rank=4, copy_modules=False)
    models = Models(sources=tiny_models.sources, diffusion=sd15, captioner=tiny_models.captioner,
                    segmenter=tiny_models.segmenter, device=sd15.device, dtype=sd15.dtype)
    sticker_models = StickerModels.create(models, cache_size=1)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (90, 160, 3), dtype=np.uint8)).save(buf, "JPEG")
    result = make_sticker(sticker_models, tmp_path / "style", buf.getvalue(),
                          StickerOptions(steps=2, strength=1.0, variants=2))
    assert len(result.webp) == 2
    for data in result.webp:
        assert max(check_sticker(data)) == 512
    sticker_models.generator.unload_all()
