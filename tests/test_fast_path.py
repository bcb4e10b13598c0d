"""The compiled serving fast path: styles hot-swapped into one LoRA slot under torch.compile.

The default tests compile with dynamo's ``eager`` backend: dynamo traces and guards exactly as
with inductor (recompilation is decided by its guards, whatever the backend), in seconds. The
slow test runs inductor's CPU code generation, as a GPU worker would run its CUDA one.
Own models (the fast path changes its UNet: channels_last, the slot, a compiled wrapper).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.models import load_diffusion, resolve_sources
from pipeline.settings import Settings, load_settings
from pipeline.stickers.fast_path import SLOT, compile_enabled
from pipeline.stickers.generation import GenerationParams, StickerGenerator, StyleRef, write_random_style

PARAMS = GenerationParams(steps=4, strength=0.5)  # 2 denoising steps
PROMPT = "a zqv cat sticker, cat with a hat"
# uint8 pixels after the VAE: compiled kernels may round differently in the last bits
MAX_PIXEL_DIFF = 4


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory, tiny_zoo: Path) -> Settings:
    return load_settings(preset="tiny", data_dir=tmp_path_factory.mktemp("fast-data"),
                         tiny_zoo_dir=tiny_zoo, device="cpu", dtype="float32")


def fresh_diffusion(settings: Settings):  # -> DiffusionModels
    return load_diffusion(resolve_sources(settings), device=torch.device("cpu"), dtype=torch.float32)


@pytest.fixture(scope="module")
def styles(tmp_path_factory: pytest.TempPathFactory, settings: Settings) -> dict[str, StyleRef]:
    """Three UNet-only styles of different ranks (c with alpha 6 != rank 3, saved as metadata:
    a slot that ignored alphas would serve it at half strength), one with a text-encoder LoRA,
    one of rank 8 (above the slot's 4), and a stand-in LCM-LoRA."""
    root = tmp_path_factory.mktemp("fast-styles")
    diffusion = fresh_diffusion(settings)
    specs = {"a": (2, False), "b": (4, False), "c": (3, False), "te": (4, True), "big": (8, False),
             "lcm": (4, False)}
    out = {}
    for i, (name, (rank, text)) in enumerate(specs.items()):
        write_random_style(diffusion, root / name, seed=i + 1, rank=rank, text_encoder=text,
                           lora_alpha=6 if name == "c" else None)
        out[name] = StyleRef.open(root / name)
    return out


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))


def run(gen: StickerGenerator, photo: Image.Image, style: StyleRef | None, *,
        params: GenerationParams = PARAMS) -> np.ndarray:
    out = gen.generate(photo, prompt=PROMPT, negative_prompt="blurry", seeds=[1], style=style,
                       params=params)
    return np.asarray(out[0]).astype(int)


@pytest.fixture(scope="module")
def eager_images(settings, styles, photo) -> dict[str, np.ndarray]:
    """What the ordinary (uncompiled, adapter-per-style) generator makes of each style."""
    gen = StickerGenerator(fresh_diffusion(settings), cache_size=8, lcm_lora=str(styles["lcm"].directory))
    out = {name: run(gen, photo, styles[name]) for name in ("a", "b", "c", "te", "big")}
    out["base"] = run(gen, photo, None)
    out["a-fast"] = run(gen, photo, styles["a"], params=GenerationParams(fast=True, strength=0.5))
    out["a-0.5"] = run(gen, photo, styles["a"], params=GenerationParams(steps=4, strength=0.5,
                                                                           adapter_scale=0.5))
    return out


def compiled_generator(settings, styles, backend: str) -> StickerGenerator:
    return StickerGenerator(fresh_diffusion(settings), cache_size=2, compile=True, compile_max_rank=4,
                            compile_backend=backend, lcm_lora=str(styles["lcm"].directory))


@pytest.fixture(scope="module")
def compiled(settings, styles) -> StickerGenerator:
    """One dynamo-compiled generator for the tests below, in file order."""
    return compiled_generator(settings, styles, "eager")


def graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    assert np.abs(got - want).max() <= MAX_PIXEL_DIFF


def test_compile_setting() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not compile_enabled("off", cuda) and compile_enabled("on", cpu)
    assert compile_enabled("auto", cuda) and not compile_enabled("auto", cpu)
    with pytest.raises(ValueError, match="auto, on or off"):
        compile_enabled("yes", cpu)


def check_switching(gen: StickerGenerator, styles, photo, eager_images) -> None:
    """Warm both modes, then switch styles, scales and modes with recompilation an error."""
    fast = GenerationParams(fast=True, strength=0.5)
    assert_close(run(gen, photo, styles["a"]), eager_images["a"])
    assert_close(run(gen, photo, styles["a"], params=fast), eager_images["a-fast"])
    warm = graphs()
    assert warm > 0  # it really compiled
    with torch._dynamo.config.patch(error_on_recompile=True):
        for name in ("b", "c", "a", "b"):  # a cache of 2 over 3 styles: reads from disk too
            assert_close(run(gen, photo, styles[name]), eager_images[name])
        assert_close(run(gen, photo, None), eager_images["base"])
        assert_close(run(gen, photo, styles["a"], params=GenerationParams(steps=4, strength=0.5,
                                                                          adapter_scale=0.5)),
                     eager_images["a-0.5"])
        assert_close(run(gen, photo, styles["a"], params=fast), eager_images["a-fast"])
        assert_close(run(gen, photo, styles["c"]), eager_images["c"])
    assert graphs() == warm
    assert gen.compiled is not None and gen.compiled.swaps >= 8
    assert gen.loads == gen.compiled.reads == 6  # a, b, c, a, b, c: a cache of 2 over 3 styles
    # Only the slot ever held a style: no per-style adapter was added to the UNet.
    assert set(gen.pipe.unet.peft_config) == {SLOT, "lcm"}


def test_switching_styles_under_compile_never_recompiles_and_matches_eager(
        compiled, styles, photo, eager_images) -> None:
    check_switching(compiled, styles, photo, eager_images)


@pytest.mark.slow
def test_switching_styles_under_inductor(settings, styles, photo, eager_images) -> None:
    torch._dynamo.reset()
    check_switching(compiled_generator(settings, styles, "inductor"), styles, photo, eager_images)


def test_styles_the_slot_cannot_take_fall_back_cleanly(compiled, styles, photo, eager_images,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    gen = compiled
    assert_close(run(gen, photo, styles["a"]), eager_images["a"])
    warm = graphs()
    with caplog.at_level(logging.INFO, logger="pipeline.stickers.fast_path"):
        with torch._dynamo.config.patch(error_on_recompile=True):
            # A text-encoder LoRA: the uncompiled UNet, its UNet half in the slot.
            assert_close(run(gen, photo, styles["te"]), eager_images["te"])
            assert_close(run(gen, photo, styles["a"]), eager_images["a"])  # te's half is gone
            assert_close(run(gen, photo, styles["te"]), eager_images["te"])
            assert_close(run(gen, photo, None), eager_images["base"])
        assert graphs() == warm
        # Rank 8 above the slot's 4: the ordinary adapter path, then back to the slot.
        assert_close(run(gen, photo, styles["big"]), eager_images["big"])
        assert_close(run(gen, photo, styles["a"]), eager_images["a"])
        assert_close(run(gen, photo, styles["big"]), eager_images["big"])
    said = [r.getMessage() for r in caplog.records if "served uncompiled" in r.getMessage()]
    assert len(said) == 2  # once per reason, not once per request
    assert "text-encoder" in said[0] and "COMPILE_MAX_RANK" in said[1]


def test_unload_all_keeps_the_slot_and_training_can_share_the_unet(compiled, styles, photo,
                                                                     eager_images) -> None:
    from peft import LoraConfig

    gen = compiled
    assert_close(run(gen, photo, styles["a"]), eager_images["a"])
    gen.unload_all()
    unet = gen.pipe.unet
    assert SLOT in unet.peft_config
    ups = [p for n, p in unet.named_parameters() if f"lora_B.{SLOT}." in n]
    assert ups and all(float(p.detach().abs().sum()) == 0 for p in ups)  # the slot adds nothing
    # What the trainer does: its own adapter next to the slot, trained, removed.
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                target_modules=["to_q", "to_v"]), adapter_name="trainer")
    unet.train()
    unet.delete_adapters("trainer")
    assert gen.cached_styles == []  # the ordinary path's adapters ("big") went
    assert_close(run(gen, photo, styles["b"]), eager_images["b"])
    assert_close(run(gen, photo, None), eager_images["base"])


def test_settings_choose_the_path(settings: Settings) -> None:
    from pipeline.models import load_models
    from pipeline.stickers.sticker_pipeline import StickerModels

    models = load_models(settings)  # its own: the fast path changes the UNet
    assert StickerModels.configured(models, settings).generator.compiled is None  # off by default
    auto = StickerModels.configured(models, settings.model_copy(update={"compile": "auto"}))
    assert auto.generator.compiled is None  # auto: CUDA only
    on = StickerModels.configured(models, settings.model_copy(update={"compile": "on",
                                                                      "compile_max_rank": 8}))
    assert on.generator.compiled is not None and on.generator.compiled.max_rank == 8
