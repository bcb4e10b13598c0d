"""The resident img2img generator: adapters by style id in an LRU cache, no state leaks.

Own models (adapters are added to the UNet), tiny preset, 2 denoising steps per image.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pictures import assert_different_pictures, assert_same_picture
from PIL import Image

from pipeline.errors import ConfigError, StyleError
from pipeline.models import load_diffusion, resolve_sources
from pipeline.settings import Settings, load_settings
from pipeline.stickers.generation import (
    GenerationParams,
    StickerGenerator,
    StyleRef,
    fit_to_model,
    write_random_style,
)

PARAMS = GenerationParams(steps=4, strength=0.5)  # 2 denoising steps
PROMPT = "a zqv cat sticker, cat with a hat"




@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory, tiny_zoo: Path) -> Settings:
    return load_settings(preset="tiny", data_dir=tmp_path_factory.mktemp("gen-data"),
                         tiny_zoo_dir=tiny_zoo, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def diffusion(settings: Settings):  # -> DiffusionModels, this module's own
    return load_diffusion(resolve_sources(settings), device=torch.device("cpu"), dtype=torch.float32)


@pytest.fixture(scope="module")
def styles(tmp_path_factory: pytest.TempPathFactory, diffusion) -> dict[str, StyleRef]:
    root = tmp_path_factory.mktemp("styles")
    out = {}
    for i, name in enumerate("abc"):
        write_random_style(diffusion, root / name, seed=i + 1, text_encoder=(name == "b"))
        out[name] = StyleRef.open(root / name)
    return out


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))


def run(gen: StickerGenerator, photo: Image.Image, style: StyleRef | None, *, seeds=(1,),
        params: GenerationParams = PARAMS) -> list[np.ndarray]:
    out = gen.generate(photo, prompt=PROMPT, negative_prompt="blurry", seeds=list(seeds), style=style,
                       params=params)
    return [np.asarray(img) for img in out]


# --- pure geometry ----------------------------------------------------------------------------


@pytest.mark.parametrize("size, expected", [
    ((64, 64), (64, 64)),
    ((640, 480), (64, 48)),
    ((480, 640), (48, 64)),
    ((10000, 300), (64, 32)),  # a panorama is cropped to 2:1, not squashed
    ((300, 10000), (32, 64)),
    ((17, 16), (64, 60)),
])
def test_fit_to_model_keeps_aspect(size: tuple[int, int], expected: tuple[int, int]) -> None:
    out = fit_to_model(Image.new("RGB", size), resolution=64, multiple=4)
    assert out.size == expected
    assert fit_to_model(Image.new("RGB", (1200, 900)), resolution=512, multiple=64).size == (512, 384)


def test_fit_to_model_does_not_distort() -> None:
    # A circle stays a circle: its bounding box in the output is square.
    img = Image.new("RGB", (400, 200), "white")
    from PIL import ImageDraw

    ImageDraw.Draw(img).ellipse((150, 50, 250, 150), fill="black")
    out = np.asarray(fit_to_model(img, resolution=64, multiple=4).convert("L")) < 128
    ys, xs = np.nonzero(out)
    assert abs((xs.max() - xs.min()) - (ys.max() - ys.min())) <= 1


def test_generation_params_are_validated() -> None:
    with pytest.raises(ValueError, match="strength"):
        GenerationParams(strength=0)
    with pytest.raises(ValueError, match="no denoising step"):
        GenerationParams(steps=1, strength=0.5)
    with pytest.raises(ValueError, match="adapter_scale"):
        GenerationParams(adapter_scale=-1)


# --- adapters ---------------------------------------------------------------------------------


def test_adapters_change_output_scale_zero_is_base_and_switching_leaks_nothing(
        diffusion, styles, photo, settings) -> None:
    gen = StickerGenerator(diffusion, cache_size=4)
    base = run(gen, photo, None)[0]
    a1 = run(gen, photo, styles["a"])[0]
    b = run(gen, photo, styles["b"])[0]  # b also has a text-encoder LoRA
    a2 = run(gen, photo, styles["a"])[0]
    c = run(gen, photo, styles["c"])[0]
    a3 = run(gen, photo, styles["a"])[0]
    assert np.abs(a1.astype(int) - base).mean() > 1.0  # the adapter really changes the image
    assert not np.array_equal(a1, b) and not np.array_equal(a1, c)
    assert np.array_equal(a1, a2) and np.array_equal(a1, a3)  # A -> B -> A == A
    assert np.array_equal(run(gen, photo, styles["a"], params=GenerationParams(
        steps=4, strength=0.5, adapter_scale=0.0))[0], base)  # scale 0 == base
    assert np.array_equal(run(gen, photo, None)[0], base)  # base after adapters == base
    assert gen.loads == 3 and gen.cached_styles == ["b", "c", "a"]

    # A freshly loaded model with only A gives exactly the same image.
    fresh = StickerGenerator(load_diffusion(resolve_sources(settings), device=torch.device("cpu"),
                                            dtype=torch.float32))
    assert np.array_equal(run(fresh, photo, styles["a"])[0], a1)
    gen.unload_all()


def test_lru_cache_evicts_and_deletes(diffusion, styles, photo) -> None:
    gen = StickerGenerator(diffusion, cache_size=2)
    a = run(gen, photo, styles["a"])[0]
    run(gen, photo, styles["b"])
    run(gen, photo, styles["a"])  # a is now most recent
    run(gen, photo, styles["c"])  # evicts b
    assert gen.cached_styles == ["a", "c"] and gen.loads == 3
    loaded = {n for names in gen.pipe.get_list_adapters().values() for n in names}
    assert len(loaded) == 2  # b's adapter was deleted from the UNet and the text encoder
    assert np.array_equal(run(gen, photo, styles["a"])[0], a)
    assert gen.loads == 3  # a hit
    run(gen, photo, styles["b"])
    assert gen.loads == 4 and gen.cached_styles == ["a", "b"]
    gen.unload_all()


def test_unload_all_restores_bare_modules_for_the_trainer(diffusion, styles, photo) -> None:
    from peft import LoraConfig

    gen = StickerGenerator(diffusion, cache_size=4)
    base = run(gen, photo, None)[0]
    a = run(gen, photo, styles["a"])[0]
    run(gen, photo, styles["b"])
    gen.unload_all()
    assert gen.cached_styles == [] and not gen.pipe.get_list_adapters()
    names = [n for n, _ in diffusion.unet.named_modules()] + \
        [n for n, _ in diffusion.text_encoder.named_modules()]
    assert not any("lora" in n for n in names)
    assert np.array_equal(run(gen, photo, None)[0], base)
    # What the trainer does between requests: its own adapter on the same UNet, trained, removed.
    diffusion.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                          target_modules=["to_q", "to_v"]), adapter_name="trainer")
    diffusion.unet.train()
    diffusion.unet.delete_adapters("trainer")
    # The cache refills lazily and A is exactly A again.
    assert np.array_equal(run(gen, photo, styles["a"])[0], a)
    assert gen.cached_styles == ["a"]
    gen.unload_all()


def test_seeds_are_reproducible_and_variants_differ(diffusion, styles, photo) -> None:
    gen = StickerGenerator(diffusion, cache_size=2)
    one = run(gen, photo, styles["a"], seeds=(7,))[0]
    assert np.array_equal(run(gen, photo, styles["a"], seeds=(7,))[0], one)
    batch = run(gen, photo, styles["a"], seeds=(7, 8))
    # A variant does not depend on its batch, up to the last bits that batched kernels change.
    assert_same_picture(batch[0], one)
    assert_different_pictures(batch[0], batch[1])
    gen.unload_all()


def test_rewritten_style_is_reloaded(diffusion, photo, tmp_path) -> None:
    gen = StickerGenerator(diffusion, cache_size=2)
    write_random_style(diffusion, tmp_path / "s", seed=11)
    first = run(gen, photo, StyleRef.open(tmp_path / "s"))[0]
    write_random_style(diffusion, tmp_path / "s", seed=12)  # retrained under the same id
    second = run(gen, photo, StyleRef.open(tmp_path / "s"))[0]
    assert gen.loads == 2 and gen.cached_styles == ["s"]
    assert not np.array_equal(first, second)
    gen.unload_all()


def test_missing_or_damaged_adapter_is_a_style_error(diffusion, styles, photo, tmp_path) -> None:
    import shutil

    from safetensors.torch import save_file

    gen = StickerGenerator(diffusion, cache_size=2)
    a = run(gen, photo, styles["a"])[0]
    broken = tmp_path / "broken"
    shutil.copytree(styles["c"].directory, broken)
    weights = broken / "pytorch_lora_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    with pytest.raises(StyleError, match=r"'broken'.*damaged"):
        StyleRef.open(broken)
    weights.unlink()
    with pytest.raises(StyleError, match=r"'broken'.*missing"):
        StyleRef.open(broken)
    # Well-formed file, but not a LoRA for this model.
    save_file({"unet.nothing.lora.down.weight": torch.zeros(2, 2)}, str(weights))
    with pytest.raises(StyleError, match="'alien'"):
        gen.generate(photo, prompt=PROMPT, negative_prompt=None, seeds=[1],
                     style=StyleRef.open(broken, style_id="alien"), params=PARAMS)
    # Wrong shapes: a LoRA of another architecture.
    meta = json.loads((styles["c"].directory / "style.json").read_text())
    assert meta["kind"] == "lora"
    save_file({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight":
               torch.zeros(4, 999),
               "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora.up.weight":
               torch.zeros(64, 4)}, str(weights))
    with pytest.raises(StyleError, match="'alien2'"):
        gen.generate(photo, prompt=PROMPT, negative_prompt=None, seeds=[1],
                     style=StyleRef.open(broken, style_id="alien2"), params=PARAMS)
    # The generator is unharmed.
    assert np.array_equal(run(gen, photo, styles["a"])[0], a)
    gen.unload_all()


def test_fast_mode(diffusion, styles, photo, tmp_path) -> None:
    gen = StickerGenerator(diffusion, cache_size=2)
    with pytest.raises(ConfigError, match="STICKERBOT_LCM_LORA"):
        run(gen, photo, styles["a"], params=GenerationParams(fast=True))
    # A stand-in LCM-LoRA with the real one's layout: fast mode stacks it on the style adapter.
    write_random_style(diffusion, tmp_path / "lcm", seed=99)
    gen = StickerGenerator(diffusion, cache_size=2, lcm_lora=str(tmp_path / "lcm"))
    fast = GenerationParams(fast=True)
    f1 = run(gen, photo, styles["a"], params=fast)[0]
    assert np.array_equal(run(gen, photo, styles["a"], params=fast)[0], f1)
    normal = run(gen, photo, styles["a"])[0]
    assert not np.array_equal(f1, normal)
    # Leaving fast mode deactivates the LCM adapter: same as a generator that never had it.
    plain = StickerGenerator(diffusion, cache_size=2)
    gen.unload_all()
    assert np.array_equal(run(plain, photo, styles["a"])[0], normal)
    plain.unload_all()


def test_bad_generate_arguments(diffusion, photo) -> None:
    gen = StickerGenerator(diffusion)
    with pytest.raises(ValueError, match="multiple"):
        gen.generate(Image.new("RGB", (63, 64)), prompt="x", negative_prompt=None, seeds=[1])
    with pytest.raises(ValueError, match="seeds"):
        gen.generate(photo, prompt="x", negative_prompt=None, seeds=[])
    with pytest.raises(ConfigError):
        StickerGenerator(diffusion, cache_size=0)


def test_full_fine_tuned_style_swaps_the_unet(diffusion, styles, photo, tmp_path) -> None:
    import copy
    from dataclasses import replace

    from pipeline.training.style import write_style_info

    gen = StickerGenerator(diffusion, cache_size=2)
    base = run(gen, photo, None)[0]
    a = run(gen, photo, styles["a"])[0]
    # A "fine-tuned" UNet: the base one with its output layer changed, saved as diffusers does.
    from diffusers.utils.peft_utils import recurse_remove_peft_layers

    unet = recurse_remove_peft_layers(copy.deepcopy(diffusion.unet))  # earlier tests' LoRA wrappers
    with torch.no_grad():
        unet.conv_out.weight.mul_(1.5)
    unet.save_pretrained(tmp_path / "full" / "unet")
    write_style_info(tmp_path / "full", replace(styles["a"].info, kind="full", rank=None))
    full = StyleRef.open(tmp_path / "full")
    tuned = run(gen, photo, full)[0]
    assert not np.array_equal(tuned, base) and not np.array_equal(tuned, a)
    assert np.array_equal(run(gen, photo, full)[0], tuned)
    # LoRA styles and the base model are unaffected by the swap.
    assert np.array_equal(run(gen, photo, styles["a"])[0], a)
    assert np.array_equal(run(gen, photo, None)[0], base)
    with pytest.raises(StyleError, match="fast mode"):
        run(gen, photo, full, params=GenerationParams(fast=True))
    gen.unload_all()
