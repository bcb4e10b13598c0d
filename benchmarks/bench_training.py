"""Trainer throughput: cached latents + embeddings vs re-encoding every step (what the reference
diffusers DreamBooth script does by default), on the same tiny model in one run; the time split
per phase; peak RSS; and, when CUDA is present, SD 1.5-sized training at 512 px, batch 1.

The tiny model's VAE is small next to SD 1.5's (where encoding a 512-px image costs about as much
as a UNet forward), so the CPU ratio understates what caching saves on the real model.
"""

from __future__ import annotations

import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segmentation.synthetic import sticker_files

STEPS = 12
PHASES = ("data", "vae", "text_encoder", "unet", "optimizer")




def _run(models, prepared, config, root: Path, name: str,
         step_times: list[float] | None = None):  # -> TrainingResult
    """One training call; ``step_times`` collects each step's wall time after the first."""
    from pipeline.training.trainer import train_style

    last: list[float] = []

    def progress(p) -> None:
        now = time.perf_counter()
        if last and step_times is not None:
            step_times.append(now - last[0])
        last[:] = [now]

    return train_style(models, prepared, config, out_dir=root / name, work_dir=root / f"{name}-work",
                       class_cache_dir=root / "class-images", progress=progress)


def _compare(models, prepared, base, root: Path, *, rounds: int, tag: str) -> None:
    """Cached vs re-encoding, interleaved in ``rounds`` so load on a shared machine hits both
    alike; steps/s from the median step time, the split from the summed phase timers."""
    from dataclasses import replace

    times: dict[str, list[float]] = {"cached": [], "re-encoding": []}
    split: dict[str, dict[str, float]] = {"cached": {}, "re-encoding": {}}
    for i in range(rounds):
        for label, cache in (("cached", True), ("re-encoding", False)):
            r = _run(models, prepared, replace(base, cache_latents=cache), root, f"{tag}-{label}-{i}",
                     times[label])
            for p in PHASES:
                split[label][p] = split[label].get(p, 0.0) + r.timings.get(p, 0.0)
    rate = {k: 1.0 / float(np.median(v)) for k, v in times.items()}
    for label in times:
        phases = ", ".join(f"{p} {split[label][p]:.2f}s" for p in PHASES)
        print(f"  {label:12s} {rate[label]:7.3f} steps/s (median of {len(times[label])} steps; "
              f"time split over all rounds: {phases})")
    print(f"  speed-up from caching: {rate['cached'] / rate['re-encoding']:.2f}x (goal >= 1.3x)")


def _cpu_comparison(root: Path) -> None:
    from pipeline.models import load_models
    from pipeline.settings import load_settings
    from pipeline.training.sticker_set import prepare_sticker_set
    from pipeline.training.trainer import TrainingConfig

    settings = load_settings(preset="tiny", data_dir=root / "data", device="cpu", dtype="float32")
    models = load_models(settings).diffusion
    prepared = prepare_sticker_set(sticker_files(4), resolution=models.resolution)
    base = TrainingConfig(steps=STEPS, batch_size=2, num_class_images=4, class_image_steps=2,
                          checkpoint_every=10_000, seed=0)
    _run(models, prepared, TrainingConfig(steps=2, batch_size=2, num_class_images=4,
                                          class_image_steps=2), root, "warmup")
    print(f"tiny preset, CPU, {torch.get_num_threads()} thread(s), batch 2 + 2 class images, "
          f"3 interleaved rounds of {STEPS} steps")
    _compare(models, prepared, base, root, rounds=3, tag="tiny")
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"  peak RSS of this process (tiny models + the tiny runs above): {peak_kb / 1024:.0f} MiB")


def _sd15_models(device: torch.device, dtype: torch.dtype, resolution: int):  # -> DiffusionModels
    """SD 1.5-sized UNet, VAE and CLIP-L text encoder with random weights, built in memory."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from pipeline.architectures import SD15
    from pipeline.models import DiffusionModels
    from pipeline.zoo import build_clip_tokenizer

    # Any: diffusers' and transformers' module methods are invisible to mypy
    unet: Any = UNet2DConditionModel(**SD15.unet)
    vae: Any = AutoencoderKL(**SD15.vae)
    text: Any = CLIPTextModel(CLIPTextConfig(vocab_size=49408, **SD15.text_encoder))
    return DiffusionModels(
        unet=unet.to(device, dtype).eval().requires_grad_(False),
        vae=vae.to(device, dtype).eval().requires_grad_(False),
        text_encoder=text.to(device, dtype).eval().requires_grad_(False),
        tokenizer=build_clip_tokenizer(), scheduler_config=dict(SD15.scheduler), source="random-sd15",
        resolution=resolution, device=device, dtype=dtype)


def _cpu_sd15_ratio(root: Path, resolution: int = 128, steps: int = 4) -> None:
    """The same comparison with SD 1.5's proportions (VAE encoder vs UNet), at a CPU-sized 128 px."""
    from pipeline.training.sticker_set import prepare_sticker_set
    from pipeline.training.trainer import TrainingConfig

    torch.manual_seed(0)
    models = _sd15_models(torch.device("cpu"), torch.float32, resolution)
    prepared = prepare_sticker_set(sticker_files(4), resolution=resolution)
    print(f"SD 1.5-sized random weights, CPU, {resolution} px, batch 1, rank 16, no prior, "
          f"2 interleaved rounds of {steps} steps")
    base = TrainingConfig(steps=steps, batch_size=1, with_prior_preservation=False, rank=16,
                          checkpoint_every=10_000)
    _compare(models, prepared, base, root, rounds=2, tag="sd15")
    del models


def _gpu_sd15(root: Path) -> None:
    if not torch.cuda.is_available():
        print("no GPU: skipping SD 1.5-sized training at 512 px")
        return
    from pipeline.training.sticker_set import prepare_sticker_set
    from pipeline.training.trainer import TrainingConfig

    models = _sd15_models(torch.device("cuda"), torch.float16, 512)
    prepared = prepare_sticker_set(sticker_files(4), resolution=512)
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
        _cpu_sd15_ratio(root)
    finally:
        torch.set_num_threads(threads)
    try:
        _gpu_sd15(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
