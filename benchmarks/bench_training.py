"""Trainer throughput: cached latents + embeddings vs re-encoding every step (what the reference
diffusers DreamBooth script does by default), on the same tiny model in one run; the time split
per phase; peak RSS; and, when CUDA is present, SD 1.5-sized training at 512 px, batch 1.

The tiny model's VAE is small next to SD 1.5's (where encoding a 512-px image costs about as much
as a UNet forward), so the CPU ratio understates what caching saves on the real model.
"""

from __future__ import annotations

import io
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

STEPS = 30
PHASES = ("data", "vae", "text_encoder", "unet", "optimizer")


def _stickers(n: int) -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(0)
    files = []
    for i in range(n):
        img = Image.new("RGBA", (96, 80), (0, 0, 0, 0))
        draw = ImageDraw.Draw(img)
        for _ in range(4):
            pts = [tuple(int(v) for v in rng.integers(0, 96, 2)) for _ in range(4)]
            draw.polygon(pts, fill=(*(int(v) for v in rng.integers(0, 255, 3)), 255))
        buf = io.BytesIO()
        img.save(buf, "PNG")
        files.append((f"s{i}.png", buf.getvalue()))
    return files


def _run(models, prepared, config, root: Path, name: str):  # -> TrainingResult
    from pipeline.training import train_style

    return train_style(models, prepared, config, out_dir=root / name, work_dir=root / f"{name}-work",
                       class_cache_dir=root / "class-images")


def _cpu_comparison(root: Path) -> None:
    from pipeline.models import load_models
    from pipeline.settings import load_settings
    from pipeline.sticker_set import prepare_sticker_set
    from pipeline.training import TrainingConfig

    settings = load_settings(preset="tiny", data_dir=root / "data", device="cpu", dtype="float32")
    models = load_models(settings).diffusion
    prepared = prepare_sticker_set(_stickers(4), resolution=models.resolution)
    base = TrainingConfig(steps=STEPS, batch_size=2, num_class_images=4, class_image_steps=2,
                          checkpoint_every=10_000, seed=0)
    _run(models, prepared, TrainingConfig(steps=2, batch_size=2, num_class_images=4,
                                          class_image_steps=2), root, "warmup")
    results = {}
    for label, cache in (("cached", True), ("re-encoding", False)):
        cfg = TrainingConfig(**{**base.__dict__, "cache_latents": cache})
        results[label] = _run(models, prepared, cfg, root, label)
    loop = {k: sum(r.timings.get(p, 0.0) for p in PHASES) for k, r in results.items()}
    rate = {k: STEPS / v for k, v in loop.items()}
    print(f"tiny preset, CPU, {torch.get_num_threads()} thread(s), batch 2 + 2 class images, {STEPS} steps")
    for label, r in results.items():
        split = ", ".join(f"{p} {r.timings.get(p, 0.0):.2f}s" for p in PHASES)
        setup = r.timings.get("cache_vae", 0.0) + r.timings.get("cache_text", 0.0)
        print(f"  {label:12s} {rate[label]:6.2f} steps/s  (loop {loop[label]:.2f}s: {split}; "
              f"caching before the loop {setup:.2f}s)")
    print(f"  speed-up from caching: {rate['cached'] / rate['re-encoding']:.2f}x (goal >= 1.3x)")
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"  peak RSS of this process (models + 4 tiny training runs): {peak_kb / 1024:.0f} MiB")


def _gpu_sd15(root: Path) -> None:
    if not torch.cuda.is_available():
        print("no GPU: skipping SD 1.5-sized training at 512 px")
        return
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from pipeline.architectures import SD15
    from pipeline.models import DiffusionModels
    from pipeline.sticker_set import prepare_sticker_set
    from pipeline.training import TrainingConfig
    from pipeline.zoo import build_clip_tokenizer

    device, dtype = torch.device("cuda"), torch.float16
    tokenizer = build_clip_tokenizer()
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, **SD15.text_encoder))
    models = DiffusionModels(
        unet=UNet2DConditionModel(**SD15.unet).to(device, dtype).eval().requires_grad_(False),
        vae=AutoencoderKL(**SD15.vae).to(device, dtype).eval().requires_grad_(False),
        text_encoder=text.to(device, dtype).eval().requires_grad_(False), tokenizer=tokenizer,
        scheduler_config=dict(SD15.scheduler), source="random-sd15", resolution=512,
        device=device, dtype=dtype)
    prepared = prepare_sticker_set(_stickers(4), resolution=512)
    for label, prior in (("no prior", False), ("prior preservation", True)):
        steps = 100
        config = TrainingConfig(steps=steps, batch_size=1, with_prior_preservation=prior,
                                num_class_images=4, class_image_steps=10, checkpoint_every=10_000)
        _run(models, prepared, TrainingConfig(steps=3, batch_size=1, with_prior_preservation=prior,
                                              num_class_images=4, class_image_steps=10), root, "gpu-warm")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = _run(models, prepared, config, root, f"gpu-{prior}")
        torch.cuda.synchronize()
        loop = sum(result.timings.get(p, 0.0) for p in PHASES)
        peak = torch.cuda.max_memory_allocated() / 2**30
        print(f"sd15 512 px batch 1 ({label}) on {torch.cuda.get_device_name()}: {steps / loop:.2f} "
              f"steps/s -> 1000 steps in {1000 * loop / steps:.0f} s; peak VRAM {peak:.2f} GiB "
              f"(whole call {time.perf_counter() - start:.1f} s)")


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-training-"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: one thread is faster and steadier
    try:
        _cpu_comparison(root)
    finally:
        torch.set_num_threads(threads)
    try:
        _gpu_sd15(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
