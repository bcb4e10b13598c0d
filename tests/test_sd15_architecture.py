"""One LoRA training step through ``train_style`` on SD 1.5-sized models with random weights, built
in memory: 768-wide cross-attention, 77-token CLIP-L prompts, the VAE's 0.18215 scaling and the
real LoRA target names. Slow (about a minute of CPU and several GB of memory)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from segmentation.synthetic import sticker_files

pytestmark = pytest.mark.slow

# FACTS.md: an SD 1.5 UNet LoRA on to_q/to_k/to_v/to_out.0 has 199,296 parameters per unit of rank.
SD15_LORA_PARAMS_PER_RANK = 199_296




def test_one_lora_step_on_sd15_sized_models(tmp_path: Path) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors import safe_open
    from transformers import CLIPTextConfig, CLIPTextModel

    from pipeline.architectures import SD15
    from pipeline.models import DiffusionModels
    from pipeline.training.sticker_set import prepare_sticker_set
    from pipeline.training.style import LORA_FILE, read_style
    from pipeline.training.trainer import TrainingConfig, train_style
    from pipeline.zoo import build_clip_tokenizer

    torch.manual_seed(0)
    tokenizer = build_clip_tokenizer()  # ids stay below CLIP-L's 49408
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=49408, **SD15.text_encoder))
    models = DiffusionModels(
        unet=UNet2DConditionModel(**SD15.unet).eval().requires_grad_(False),
        vae=AutoencoderKL(**SD15.vae).eval().requires_grad_(False),
        text_encoder=text_encoder.eval().requires_grad_(False), tokenizer=tokenizer,
        scheduler_config=dict(SD15.scheduler), source="random-sd15", resolution=64,
        device=torch.device("cpu"), dtype=torch.float32)
    assert models.vae_scale_factor == 8 and models.vae.config.scaling_factor == pytest.approx(0.18215)
    prepared = prepare_sticker_set(sticker_files(3), resolution=64)
    probe_in = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    hidden = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = models.unet(probe_in, torch.tensor([10]), encoder_hidden_states=hidden).sample

    rank = 4
    result = train_style(models, prepared,
                         TrainingConfig(steps=1, rank=rank, batch_size=1, with_prior_preservation=False,
                                        lr=1e-3, seed=0),
                         out_dir=tmp_path / "style", work_dir=tmp_path / "work",
                         class_cache_dir=tmp_path / "cls")
    assert result.steps == 1 and np.isfinite(result.loss)
    info = read_style(tmp_path / "style")
    assert info.rank == rank and info.base_model == "random-sd15"
    with safe_open(str(tmp_path / "style" / LORA_FILE), "pt") as fh:
        keys = list(fh.keys())
        total = sum(fh.get_slice(k).get_shape()[0] * fh.get_slice(k).get_shape()[1] for k in keys)
        up_moved = any(fh.get_tensor(k).abs().sum() > 0 for k in keys if "lora_B" in k)
    assert all(k.startswith("unet.") for k in keys)
    assert total == SD15_LORA_PARAMS_PER_RANK * rank  # every attention projection, nothing else
    assert up_moved  # the step trained (B starts at zero)
    with torch.no_grad():
        after = models.unet(probe_in, torch.tensor([10]), encoder_hidden_states=hidden).sample
    assert torch.equal(before, after)  # the resident UNet is back as it was
