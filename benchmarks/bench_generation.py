"""Sticker generation: the resident pipeline with an adapter cache vs reloading per request.

Round-robin sticker requests across 8 styles (tiny preset, CPU, one thread), side by side in one
run:

1. What the cache saves per request (everything but the denoising itself): switching to a cached
   adapter (``set_adapters``) vs loading the style's LoRA from disk (a cache miss) vs reloading
   the img2img pipeline (text encoder, VAE, UNet) plus the LoRA, as a naive bot would.
2. Whole stickers, cached vs reloading, at the default 30 steps and at 2 denoising steps. With
   the tiny preset the denoising is large next to a reload, so this ratio is small; with SD 1.5
   a reload reads ~2-4 GB and takes seconds.
3. Per-stage p50/p95 of the cached default run (decode, caption, diffusion, segmentation, post).
4. Post-processing alone per sticker on one core (wall and CPU time: the CPU time is what the
   code costs when the machine is shared).
5. With CUDA only: SD 1.5-sized generation at 512 px (random weights have the real cost).

    python -m benchmarks generation       # BENCH_GEN_ROUNDS=2 to measure more rounds
"""

from __future__ import annotations

import io
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROUNDS = int(os.environ.get("BENCH_GEN_ROUNDS", "1"))  # measured rounds over the 8 styles
STYLES = 8


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def photo_bytes(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    h, w = 360, 480
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([xx / w * 220, yy / h * 220, np.full_like(xx, 90)], -1)
    blob = ((xx - w / 2) ** 2 / (w / 4) ** 2 + (yy - h / 2) ** 2 / (h / 3) ** 2) < 1
    img[blob] = rng.integers(0, 255, 3)
    buf = io.BytesIO()
    Image.fromarray(img.astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def run_cached(sticker_models, styles, options, photos) -> tuple[list[float], list[dict[str, float]]]:
    """Stickers round-robin over ``styles`` on one resident pipeline whose cache is warm."""
    from pipeline.stickers.sticker_pipeline import make_sticker

    for style in styles:  # fill the cache, as a worker that has served these users before
        sticker_models.generator.load_adapter(style)
    make_sticker(sticker_models, styles[0], photos[0], options)  # warm-up
    totals, stages = [], []
    for r in range(ROUNDS):
        for i, style in enumerate(styles):
            start = time.perf_counter()
            result = make_sticker(sticker_models, style, photos[(r + i) % len(photos)], options)
            totals.append(time.perf_counter() - start)
            stages.append(result.timings)
    return totals, stages


def run_reload(models, settings, styles, options, photos) -> list[float]:
    """Per request: load the diffusion components, build a pipeline, load the LoRA, generate."""
    from pipeline.models import load_diffusion, resolve_sources
    from pipeline.stickers.sticker_pipeline import StickerModels, make_sticker

    sources = resolve_sources(settings)
    totals = []
    for i, style in enumerate(styles):
        start = time.perf_counter()
        diffusion = load_diffusion(sources, device=models.device, dtype=models.dtype)
        fresh = StickerModels.create(
            type(models)(sources=models.sources, diffusion=diffusion, captioner=models.captioner,
                         segmenter=models.segmenter, device=models.device, dtype=models.dtype),
            cache_size=1)
        make_sticker(fresh, style, photos[i % len(photos)], options)
        totals.append(time.perf_counter() - start)
    return totals


def bench_overhead(models, settings, styles) -> None:
    """Per request, the cost of getting the style's weights in place (no denoising)."""
    from pipeline.models import load_diffusion, resolve_sources
    from pipeline.stickers.generation import GenerationParams, StickerGenerator

    params = GenerationParams()
    sources = resolve_sources(settings)
    rounds = 3
    hit_gen = StickerGenerator(models.diffusion, cache_size=len(styles))
    miss_gen = StickerGenerator(models.diffusion, cache_size=len(styles) // 2)
    for style in styles:
        hit_gen.prepare(style, params)
    hits, misses, reloads = [], [], []
    for _ in range(rounds):
        for style in styles:
            start = time.perf_counter()
            hit_gen.prepare(style, params)
            hits.append(time.perf_counter() - start)
    hit_gen.unload_all()
    for _ in range(rounds):
        for style in styles:
            start = time.perf_counter()
            miss_gen.prepare(style, params)  # round-robin over 8 with room for 4: always a miss
            misses.append(time.perf_counter() - start)
    miss_gen.unload_all()
    for style in styles:
        start = time.perf_counter()
        diffusion = load_diffusion(sources, device=models.device, dtype=models.dtype)
        StickerGenerator(diffusion, cache_size=1).prepare(style, params)
        reloads.append(time.perf_counter() - start)
    h50, m50, r50 = (statistics.median(v) for v in (hits, misses, reloads))
    print("1. getting a style ready, per request (round-robin over 8 styles, no denoising):")
    for label, values in (("cached adapter (set_adapters)", hits), ("cache miss (LoRA from disk)", misses),
                          ("reload pipeline + LoRA", reloads)):
        print(f"   {label:<34} p50 {percentile(values, 50) * 1000:8.2f} ms  "
              f"p95 {percentile(values, 95) * 1000:8.2f} ms")
    print(f"   reload / cached: {r50 / h50:.0f}x   reload / miss: {r50 / m50:.1f}x   (goal >= 10x)")


def bench_post() -> None:
    """finish_sticker + encode_webp on a 512-px cut-out, one core."""
    import cv2

    from pipeline.stickers.postprocess import PostOptions, encode_webp, finish_sticker

    cv2.setNumThreads(1)
    size = 512
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    rgb = np.stack([xx / size * 255, yy / size * 255, np.full_like(xx, 128)], -1)
    rgb += np.random.default_rng(0).normal(0, 12, rgb.shape)  # texture, like a generated image
    dist = np.sqrt((xx - size / 2) ** 2 / 1.2 + (yy - size / 2) ** 2) / (size * 0.35)
    alpha = np.clip((1.0 - dist) * 40, 0, 1) * 255  # a soft-edged blob
    cutout = Image.fromarray(np.dstack([np.clip(rgb, 0, 255), alpha]).astype(np.uint8), "RGBA")
    small = cutout.resize((64, 64), Image.Resampling.LANCZOS)  # the tiny preset's output size
    print("4. post-processing alone, one core (finish_sticker + encode_webp):")
    for label, image, opts in (
        ("512-px cut-out, no stroke", cutout, PostOptions(stroke=0)),
        ("512-px cut-out, stroke 8 (default)", cutout, PostOptions(stroke=8)),
        ("512-px cut-out, stroke 8 + shadow", cutout, PostOptions(stroke=8, shadow=True)),
        ("64-px cut-out (tiny), stroke 8", small, PostOptions(stroke=8)),
    ):
        times, cpu, size_kb = [], [], 0.0
        for _ in range(25):
            start, start_cpu = time.perf_counter(), time.process_time()
            data = encode_webp(finish_sticker(image, opts))
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
            size_kb = len(data) / 1024
        print(f"   {label:<36} wall p50 {percentile(times, 50) * 1000:6.1f} ms  "
              f"p95 {percentile(times, 95) * 1000:6.1f} ms | CPU p50 {percentile(cpu, 50) * 1000:6.1f} ms  "
              f"({size_kb:.0f} KB)  goal < 60 ms")


def bench_gpu() -> None:
    """SD 1.5-sized UNet/VAE/text encoder (random weights, real cost) at 512 px on CUDA."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from pipeline.architectures import SD15
    from pipeline.models import DiffusionModels
    from pipeline.stickers.generation import GenerationParams, StickerGenerator, StyleRef, write_random_style
    from pipeline.zoo import build_clip_tokenizer

    device, dtype = torch.device("cuda"), torch.float16
    tokenizer = build_clip_tokenizer()
    text_config = CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                 **SD15.text_encoder)
    modules = [UNet2DConditionModel(**SD15.unet), AutoencoderKL(**SD15.vae), CLIPTextModel(text_config)]
    unet, vae, text_encoder = (m.to(device, dtype).eval().requires_grad_(False) for m in modules)
    diffusion = DiffusionModels(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                scheduler_config=dict(SD15.scheduler), source="sd15-random",
                                resolution=512, device=device, dtype=dtype)
    with tempfile.TemporaryDirectory() as tmp:
        write_random_style(diffusion, Path(tmp) / "style", rank=16, copy_modules=False)
        write_random_style(diffusion, Path(tmp) / "lcm", rank=64, seed=1, copy_modules=False)
        style = StyleRef.open(Path(tmp) / "style")
        gen = StickerGenerator(diffusion, cache_size=4, lcm_lora=str(Path(tmp) / "lcm"))
        image = Image.open(io.BytesIO(photo_bytes(0))).convert("RGB").resize((512, 384))
        print(f"5. GPU ({torch.cuda.get_device_name(0)}), SD 1.5 sizes, fp16, 512x384, strength 0.6:")
        for label, params in (("30 steps, guidance 7", GenerationParams()),
                              ("fast: LCM-LoRA 4 steps", GenerationParams(fast=True))):
            times = []
            for i in range(8):
                torch.cuda.synchronize()
                start = time.perf_counter()
                gen.generate(image, prompt="a zqv cat sticker, a cat", negative_prompt="blurry",
                             seeds=[i], style=style, params=params)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            times = times[2:]  # warm-up
            print(f"   {label:<26} diffusion p50 {statistics.median(times) * 1000:.0f} ms  "
                  f"p95 {percentile(times, 95) * 1000:.0f} ms")


def main() -> None:
    import torch

    from pipeline.models import load_models
    from pipeline.settings import load_settings
    from pipeline.stickers.generation import StyleRef, write_random_style
    from pipeline.stickers.sticker_pipeline import STAGES, StickerModels, StickerOptions

    # Two cores shared with other work: one intra-op thread is faster and steadier on the CPU.
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        settings = load_settings(preset="tiny", data_dir=root / "data", device="cpu", dtype="float32",
                                 tiny_zoo_dir=Path(os.environ.get("STICKERBOT_TINY_ZOO_DIR",
                                                                  root / "zoo")))
        models = load_models(settings)
        styles = []
        for i in range(STYLES):
            write_random_style(models.diffusion, root / "styles" / f"style{i}", seed=i + 1)
            styles.append(StyleRef.open(root / "styles" / f"style{i}"))
        photos = [photo_bytes(i) for i in range(4)]
        print(f"tiny preset, CPU, 1 thread, {STYLES} styles round-robin, {ROUNDS} measured round(s)")
        bench_overhead(models, settings, styles)

        print("2. whole stickers, round-robin over the 8 styles:")
        default_stages: list[dict[str, float]] = []
        for options in (StickerOptions(), StickerOptions(steps=4, strength=0.5)):
            label = (f"{options.steps} steps x strength {options.strength} = "
                     f"{int(options.steps * options.strength)} denoising steps")
            cached = StickerModels.create(models, cache_size=STYLES)
            cached_totals, stages = run_cached(cached, styles, options, photos)
            cached.generator.unload_all()
            reload_totals = run_reload(models, settings, styles, options, photos)
            c50, r50 = statistics.median(cached_totals), statistics.median(reload_totals)
            print(f"   {label}: cached p50 {c50 * 1000:6.0f} ms "
                  f"(p95 {percentile(cached_totals, 95) * 1000:.0f})  reload p50 {r50 * 1000:6.0f} ms "
                  f"(p95 {percentile(reload_totals, 95) * 1000:.0f})  -> {r50 / c50:.1f}x")
            if not default_stages:
                default_stages = stages
        print("3. per-stage timings, cached, default settings (30 steps, strength 0.6):")
        for stage in (*STAGES, "total"):
            values = [s[stage] for s in default_stages]
            print(f"   {stage:<13} p50 {percentile(values, 50) * 1000:7.1f} ms  "
                  f"p95 {percentile(values, 95) * 1000:7.1f} ms")
    bench_post()
    if torch.cuda.is_available():
        bench_gpu()
    else:
        print("5. GPU: no CUDA device here; SD 1.5 figures not measured")


if __name__ == "__main__":
    main()
