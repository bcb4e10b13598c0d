"""Trainer throughput: cached latents + embeddings vs re-encoding every step (what the reference
diffusers DreamBooth script does by default), on the same tiny model in one run; the time split
per phase; peak RSS; training slices on one worker (slice overhead, sticker waits during the
class-image and training phases, wall time with stickers arriving; before vs after); and, when
CUDA is present, SD 1.5-sized training at 512 px, batch 1.

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



# --- training slices on one worker: preemption costs, sticker waits, wall time ----------------

SLICE_STEPS = 30  # training steps of the wall-time runs
N_STICKERS = 5


def _bench_worker_class():  # -> type[Worker]
    """The real worker, instrumented: claim -> first new step of every resumed training run.
    With ``old=True`` it reproduces the behaviour before training slices: every serving adapter
    unloaded before training (the next sticker reloads its style from disk) and the job's cached
    latents and embeddings dropped, so each slice re-reads the class images and re-encodes."""
    from pipeline.jobs import checkpoint_dir
    from pipeline.queue.base import JobKind
    from pipeline.training.trainer import CHECKPOINT_FILE, INPUTS_FILE
    from pipeline.worker import Worker

    class BenchWorker(Worker):
        def __init__(self, *args: Any, old: bool, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.old = old
            self.overheads: list[float] = []  # seconds from a resumed run's claim to its first new step
            self.step_times: list[float] = []  # seconds between consecutive steps within a slice
            self._claimed: float | None = None
            self._last_step: float | None = None

        async def run_claimed(self, job: Any) -> Any:
            ckpt = checkpoint_dir(self.data, job.id) / CHECKPOINT_FILE
            resumed = job.kind == JobKind.TRAIN and ckpt.is_file()
            self._claimed = time.perf_counter() if resumed else None
            self._last_step = None
            return await super().run_claimed(job)

        def _on_progress(self, fraction: float, message: str) -> None:
            if message.startswith("step"):
                now = time.perf_counter()
                if self._claimed is not None:
                    self.overheads.append(now - self._claimed)
                    self._claimed = None
                elif self._last_step is not None:
                    self.step_times.append(now - self._last_step)
                self._last_step = now
            super()._on_progress(fraction, message)

        def _execute(self, job: Any, low_memory: bool) -> dict[str, Any]:
            if self.old and job.kind == JobKind.TRAIN and self.resident is not None:
                self.resident.stickers.generator.unload_all()
                (checkpoint_dir(self.data, job.id) / INPUTS_FILE).unlink(missing_ok=True)
            return super()._execute(job, low_memory)

    return BenchWorker


async def _slices_mode(resident: Any, data: Any, root: Path, *, old: bool, images: list[str],
                       photo: str) -> dict[str, Any]:
    import asyncio

    from pipeline.queue.base import JobKind
    from pipeline.queue.sqlite import SqliteJobQueue

    tag = "before" if old else "after"
    q = await SqliteJobQueue.open(root / f"{tag}.sqlite3", max_queued_per_user=1000, stickers_per_day=100_000)
    worker = _bench_worker_class()(q, resident, data=data, old=old, lease_seconds=60.0, preempt_poll=0.02,
                                   progress_every=0.0)
    task = asyncio.create_task(worker.run())
    sticker_payload = {"style_id": "ready", "style_dir": "styles/ready", "photo": photo, "seed": 1,
                       "variants": 1}
    generator = resident.stickers.generator
    loads_before = generator.loads

    async def job(job_id: str) -> Any:
        current = await q.get(job_id)
        assert current is not None
        return current

    async def wait_until(check: Any, what: str, within: float = 600.0) -> Any:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            value = await check()
            if value:
                return value
            await asyncio.sleep(0.01)
        raise TimeoutError(what)

    async def finished(job_id: str) -> Any:
        return await wait_until(lambda: _done(job_id), f"job {job_id}")

    async def _done(job_id: str) -> Any:
        current = await job(job_id)
        return current if current.state.finished else None

    async def sticker() -> Any:
        s = await q.submit(JobKind.STICKER, 2, sticker_payload)
        return await finished(s.id)

    try:
        # 1. stickers on an idle worker
        idle = [await sticker() for _ in range(4)][1:]  # the first one loads the style
        idle_latency = float(np.median([s.finished_at - s.created_at for s in idle]))

        # 2. a sticker during the class-image phase (the real preset's count for 4 images: 40)
        train = await q.submit(JobKind.TRAIN, 1, {"style_id": f"{tag}-class", "images": images,
                                                  "class_noun": f"{tag}cat", "steps": 12, "seed": 1,
                                                  "class_images": 40})
        marks: list[tuple[int, float]] = []

        async def class_phase() -> bool:
            msg = (await job(train.id)).progress_message or ""
            if msg.startswith("class images ") and "/" in msg and ":" not in msg:
                k = int(msg.split()[2].split("/")[0])
                if not marks or marks[-1][0] != k:
                    marks.append((k, time.perf_counter()))
                return k >= 3
            return False

        during_class = []
        for _ in range(2):  # two stickers, some images apart
            await wait_until(class_phase, "the class-image phase")
            during_class.append(await sticker())
            await wait_until(class_phase_done_marks(job, train.id, marks), "more class images")
        per_image = (marks[-1][1] - marks[0][1]) / max(1, marks[-1][0] - marks[0][0])
        await finished(train.id)

        # 3. training alone, then with 5 stickers arriving during it (class images cached now),
        # then alone again (the mean of both runs alone is the reference on a shared machine)
        payload = {"images": images, "class_noun": f"{tag}cat", "steps": SLICE_STEPS, "seed": 2}

        async def train_alone(style_id: str) -> float:
            alone = await finished((await q.submit(JobKind.TRAIN, 1, {**payload, "style_id": style_id})).id)
            return float(alone.finished_at - alone.created_at)

        first_alone = await train_alone(f"{tag}-alone-1")
        worker.overheads.clear()
        t0 = time.perf_counter()
        busy = await q.submit(JobKind.TRAIN, 1, {**payload, "style_id": f"{tag}-busy"})
        stickers = []
        for i in range(N_STICKERS):
            await asyncio.sleep(max(0.0, t0 + first_alone * (i + 1) / (N_STICKERS + 1) - time.perf_counter()))
            stickers.append(await q.submit(JobKind.STICKER, 2, sticker_payload))
        done = [await finished(busy.id)] + [await finished(s.id) for s in stickers]
        wall = max(d.finished_at for d in done) - busy.created_at
        overheads = list(worker.overheads)
        alone = (first_alone + await train_alone(f"{tag}-alone-2")) / 2
        during_train = [s.finished_at - s.created_at for s in done[1:]]
        return {
            "idle": idle_latency, "per_image": per_image, "step": float(np.median(worker.step_times)),
            "during_class": float(np.median([s.finished_at - s.created_at for s in during_class])),
            "during_train": float(np.median(during_train)),
            "overhead": float(np.median(overheads)) if overheads else float("nan"),
            "slices": len(overheads), "train_alone": alone, "wall": wall,
            "ratio": wall / (alone + N_STICKERS * idle_latency),
            "reloads": generator.loads - loads_before,
        }
    finally:
        worker.request_stop()
        await task
        await q.close()


def class_phase_done_marks(job: Any, job_id: str, marks: list[tuple[int, float]]) -> Any:
    """A check that records class-image progress until two more images are done."""
    start = marks[-1][0]

    async def check() -> bool:
        msg = (await job(job_id)).progress_message or ""
        if msg.startswith("class images ") and ":" not in msg:
            k = int(msg.split()[2].split("/")[0])
            if marks[-1][0] != k:
                marks.append((k, time.perf_counter()))
            return k >= start + 2
        return msg.startswith("step")

    return check


def _slices(root: Path) -> None:
    import asyncio

    from pipeline.jobs import Resident
    from pipeline.settings import load_settings
    from pipeline.stickers.generation import write_random_style
    from pipeline.storage.files import DataDir

    settings = load_settings(preset="tiny", data_dir=root / "slices", device="cpu", dtype="float32")
    resident = Resident.load(settings)
    data = DataDir(settings.data_dir)
    write_random_style(resident.models.diffusion, data.root / "styles" / "ready", seed=1)
    photo = data.put_blob(sticker_files(1, seed=9, size=80)[0][1], suffix=".png")[0]
    images = [data.put_blob(png, suffix=".png")[0] for _, png in sticker_files(4, seed=0, size=80)]
    print(f"training slices on one in-process worker: tiny preset, CPU, 64 px, 4 images, 40 class "
          f"images (the sd15 rule for 4 images), {SLICE_STEPS} steps, {N_STICKERS} stickers. 'before' "
          "reproduces the old slice costs (unload_all + re-encoding at every slice); the old "
          "class-image phase could not be preempted at all (a sticker waited for all 40 images)")
    figures = {}
    for old in (True, False):
        figures["before" if old else "after"] = asyncio.run(
            _slices_mode(resident, data, root, old=old, images=images, photo=photo))
    for tag, f in figures.items():
        print(f"  {tag:6s} step {f['step']:.3f} s, class image {f['per_image']:.3f} s | slice overhead "
              f"(claim -> first new step, median of {f['slices']}) {f['overhead']:.3f} s = "
              f"{f['overhead'] / f['step']:.2f} steps (goal < 2)")
        print(f"  {tag:6s} sticker latency (medians): idle {f['idle']:.2f} s, during class images "
              f"{f['during_class']:.2f} s (goal <= {f['idle'] + f['per_image']:.2f}), during training "
              f"{f['during_train']:.2f} s (goal <= {f['idle'] + f['step']:.2f}); adapter reloads from "
              f"disk {f['reloads']}")
        print(f"  {tag:6s} training {f['train_alone']:.2f} s alone (mean of 2); with {N_STICKERS} stickers "
              f"arriving "
              f"{f['wall']:.2f} s = {f['ratio']:.2f}x the sum of both alone (goal <= 1.2x)")


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-training-"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: one thread is faster and steadier
    try:
        _cpu_comparison(root)
        _cpu_sd15_ratio(root)
        _slices(root)
    finally:
        torch.set_num_threads(threads)
    try:
        _gpu_sd15(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
