"""The tiny zoo builds offline and every model loads through the real loader and runs."""

from __future__ import annotations

import time

import pytest
import torch
from PIL import Image

from pipeline.architectures import TINY
from pipeline.errors import ModelNotFoundError
from pipeline.models import load_image_encoder, load_segmenter, resolve_sources
from pipeline.zoo import build_zoo


def test_second_build_reuses_the_cache(tiny_zoo):
    marker = (tiny_zoo / "zoo.json").stat().st_mtime_ns
    start = time.perf_counter()
    build_zoo(tiny_zoo, TINY)
    assert time.perf_counter() - start < 1.0
    assert (tiny_zoo / "zoo.json").stat().st_mtime_ns == marker


def test_tiny_sources_point_into_the_zoo(tiny_settings):
    sources = resolve_sources(tiny_settings)
    assert sources.preset == "tiny" and sources.resolution == 64
    for role in ("diffusion", "captioner", "segmenter", "clip", "dino"):
        assert str(tiny_settings.zoo_dir) in getattr(sources, role)


def test_override_points_a_model_at_a_directory(tiny_settings, tmp_path):
    settings = tiny_settings.model_copy(update={"captioner_model": str(tmp_path / "nope")})
    assert resolve_sources(settings).captioner == str(tmp_path / "nope")


def test_unet_vae_and_text_encoder_run(tiny_models):
    d = tiny_models.diffusion
    ids = d.tokenizer(["a photo of a cat sticker"], padding="max_length",
                      max_length=d.tokenizer.model_max_length, return_tensors="pt").input_ids
    assert ids.shape == (1, 77)
    with torch.no_grad():
        emb = d.text_encoder(ids)[0]
        image = torch.rand(1, 3, 64, 64) * 2 - 1
        latents = d.vae.encode(image).latent_dist.sample() * d.vae.config.scaling_factor
        assert latents.shape == (1, 4, 64 // d.vae_scale_factor, 64 // d.vae_scale_factor)
        noise_pred = d.unet(latents, torch.tensor([10]), emb).sample
        decoded = d.vae.decode(latents / d.vae.config.scaling_factor).sample
    assert noise_pred.shape == latents.shape
    assert decoded.shape == image.shape
    assert torch.isfinite(noise_pred).all()


def test_captioner_generates_text(tiny_models):
    c = tiny_models.captioner
    inputs = c.processor(images=Image.new("RGB", (50, 40), (200, 10, 10)), return_tensors="pt")
    with torch.no_grad():
        ids = c.model.generate(**inputs, max_new_tokens=8, do_sample=False)
    text = c.processor.decode(ids[0], skip_special_tokens=True)
    assert text.strip(), "the tiny BLIP must decode to non-empty text"


def test_segmenter_logits(tiny_models):
    s = tiny_models.segmenter
    inputs = s.processor(images=Image.new("RGB", (80, 50)), return_tensors="pt")
    with torch.no_grad():
        logits = s.model(**inputs).logits
    assert logits.shape[:2] == (1, 1)  # one foreground logit, at 1/4 of the input size
    assert logits.shape[-1] == inputs["pixel_values"].shape[-1] // 4


@pytest.mark.parametrize("kind", ["clip", "dino"])
def test_metric_encoders_load(tiny_settings, kind):
    enc = load_image_encoder(kind, resolve_sources(tiny_settings), device=torch.device("cpu"))
    inputs = enc.processor(images=[Image.new("RGB", (40, 40))], return_tensors="pt")
    with torch.no_grad():
        if kind == "clip":
            out = enc.model.get_image_features(pixel_values=inputs["pixel_values"])
            out = out if isinstance(out, torch.Tensor) else out.pooler_output
        else:
            out = enc.model(pixel_values=inputs["pixel_values"]).last_hidden_state[:, 0]
    assert out.ndim == 2 and out.shape[0] == 1


def test_missing_model_error_says_which_and_how(tmp_path):
    with pytest.raises(ModelNotFoundError) as err:
        load_segmenter("nobody/no-such-model", device=torch.device("cpu"), cache_dir=str(tmp_path))
    msg = str(err.value)
    assert "nobody/no-such-model" in msg and "hf download" in msg
    assert str(tmp_path) in msg
