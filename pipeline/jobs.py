"""What a job does: the one place that maps a job's payload to the stage calls and back to a result.

``run_job(job, resident, should_stop=..., progress=..., low_memory=...)`` runs in the worker's GPU
thread with the models the worker loaded once. Payload and result shapes (shared with the bot and
the Celery backend):

- ``train``: ``{"style_id", "images": [relative paths], "class_noun", "steps", "seed"}`` (and,
  for tests and benchmarks, ``"class_images"``: the class-prior count) ->
  ``{"style_dir": "styles/<style_id>", "identifier", "class_noun", "steps", "seconds", ...}``;
  checkpoints in ``checkpoints/<job_id>/`` (a later run of the same job resumes from them), the
  style written atomically to ``styles/<style_id>/``.
- ``sticker``: ``{"style_id", "style_dir", "photo", "seed", "variants"}`` ->
  ``{"stickers": [{"path": "results/<job_id>/<n>.webp", "emoji", "seed"}], "caption", "prompt",
  "timings", "withheld"}`` (``withheld``: variants the NSFW filter dropped; the bot says so).
- ``segmenter``: ``{"mode": "bootstrap" | "refresh", "minutes", "key"}`` -> ``{"mode", "version",
  "promoted", "figures", "serving_figures", "counts", "notes"}``; the product's own job (owner
  ``SYSTEM_USER``): trains the background remover into ``segmenter/<version>/``, resuming from
  ``checkpoints/<job_id>/``; it asks ``should_stop()`` after every epoch.
- ``noop``: ``{"sleep": seconds}`` -> ``{}`` (queue tests and benchmarks).

``should_stop()`` returns ``"yield"`` (checkpoint and raise TrainingPreempted: a sticker is
waiting, or the worker is stopping), ``"cancel"`` (raise CancelledError, leave nothing behind) or
None. Training and noop jobs ask it at every step; a sticker runs to its end (seconds).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Literal

from pipeline.errors import CancelledError, InputError, TrainingPreempted
from pipeline.queue.base import Job, JobKind
from pipeline.storage.files import DataDir, write_atomic

if TYPE_CHECKING:
    from pipeline.models import Models, ModelSources, Segmenter
    from pipeline.settings import Settings
    from pipeline.stickers.sticker_pipeline import StickerModels
    from pipeline.training.trainer import TrainingConfig
    from segmentation.bootstrap import SegmenterRun

StopRequest = Literal["cancel", "yield"] | None
ShouldStop = Callable[[], StopRequest]
Progress = Callable[[float, str], None]  # fraction 0..1, message

CHECKPOINTS = "checkpoints"
STYLES = "styles"
RESULTS = "results"
CLASS_IMAGES = "class-images"


@dataclass
class Resident:
    """What a worker loads once and every job uses: settings, the data dir, the models and the
    sticker generator (its adapter LRU cache lives as long as the worker)."""

    settings: Settings
    data: DataDir
    models: Models
    stickers: StickerModels

    @classmethod
    def load(cls, settings: Settings) -> Resident:
        from pipeline.models import load_models
        from pipeline.stickers.sticker_pipeline import StickerModels

        models = load_models(settings)
        return cls(settings=settings, data=DataDir(settings.data_dir), models=models,
                   stickers=StickerModels.configured(models, settings))


def checkpoint_dir(data: DataDir, job_id: str) -> Path:
    return data.path_for(CHECKPOINTS, job_id)


def _text(payload: dict[str, Any], key: str) -> str:
    value = payload.get(key)
    if not isinstance(value, str) or not value:
        raise InputError(f"the job's payload has no valid {key!r}")
    return value


def _relative(payload: dict[str, Any], key: str, value: Any = None) -> str:
    """A stored relative path from the payload; paths that would leave the data dir are refused
    by DataDir.resolve."""
    value = payload.get(key) if value is None else value
    if not isinstance(value, str) or not value or PurePosixPath(value).is_absolute():
        raise InputError(f"the job's payload has no valid relative path in {key!r}")
    return value


def training_config(payload: dict[str, Any], settings: Settings, *,
                    low_memory: bool = False) -> TrainingConfig:
    """The trainer's configuration for a train job: the payload's choices on the preset's defaults.

    Checkpoints come often enough that a crash or a preemption loses seconds, not minutes. The
    tiny preset (tests, CPU) keeps class-prior generation small.
    """
    from pipeline.training.trainer import TrainingConfig

    steps = payload.get("steps")
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise InputError(f"training steps must be a positive integer, not {steps!r}")
    options: dict[str, Any] = {
        "steps": steps,
        "seed": int(payload.get("seed") or 0),
        "class_noun": str(payload.get("class_noun") or "character"),
        "checkpoint_every": 25,
        "mixed_precision": settings.train_mixed_precision,
    }
    if settings.preset == "tiny":
        # Random-weight models for tests and smoke runs: a few steps show every code path.
        options.update(num_class_images=4, class_image_steps=2, checkpoint_every=2)
        if steps is None:
            options["steps"] = 30
    class_images = payload.get("class_images")
    if class_images is not None:
        if not isinstance(class_images, int) or not 1 <= class_images <= 1000:
            raise InputError(f"class_images must be an integer 1..1000, not {class_images!r}")
        options["num_class_images"] = class_images
    config = TrainingConfig(**options)
    return config.low_memory() if low_memory else config


def train_progress_message(phase: str, done: int, total: int, loss: float) -> str:
    """The progress line the bot shows (and localises: see ``bot.notifier.progress_detail``)."""
    if phase == "class_images":
        return (f"class images {done}/{total}" if done >= 0
                else f"class images: waiting for another job (0/{total})")
    return f"step {done}/{total}, loss {loss:.4f}"


def run_train(job: Job, resident: Resident, *, should_stop: ShouldStop, progress: Progress,
              low_memory: bool = False, on_step_start: Callable[[int], None] | None = None
              ) -> dict[str, Any]:
    from pipeline.memory import is_out_of_memory
    from pipeline.training.sticker_set import prepare_sticker_set
    from pipeline.training.trainer import TrainingProgress, train_style

    settings, data, payload = resident.settings, resident.data, job.payload
    # 1. check the payload and read the set
    style_id = _text(payload, "style_id")
    images = payload.get("images")
    if not isinstance(images, list) or not images:
        raise InputError("the training job names no images")
    files = [data.resolve(_relative(payload, "images", rel)) for rel in images]
    out_dir = data.path_for(STYLES, style_id)
    work_dir = checkpoint_dir(data, job.id)
    prepared = prepare_sticker_set(files, resolution=resident.models.diffusion.resolution,
                                   max_pixels=settings.max_image_pixels,
                                   max_images=settings.max_images_per_set)
    config = training_config(payload, settings, low_memory=low_memory)

    # 2. progress: the class-image phase (fraction 0: no training step done yet) and the steps.
    # The trainer adds its adapter beside the serving adapters (switched, not unloaded), so the
    # next sticker finds its style still loaded.
    def on_progress(p: TrainingProgress) -> None:
        fraction = p.step / max(p.total, 1) if p.phase == "training" else 0.0
        progress(fraction, train_progress_message(p.phase, p.step, p.total, p.loss))

    # 3. train (resumes from work_dir when an earlier slice of this job checkpointed there)
    try:
        result = train_style(resident.models.diffusion, prepared, config, out_dir=out_dir, work_dir=work_dir,
                             class_cache_dir=data.root / CLASS_IMAGES, progress=on_progress,
                             should_stop=should_stop, on_step_start=on_step_start)
    except TrainingPreempted:
        raise
    except BaseException as exc:
        if is_out_of_memory(exc):
            # The low-memory retry resumes the checkpoint (same LoRA, smaller steps).
            raise
        # Failed or cancelled for good: no partial style, no checkpoint left behind.
        shutil.rmtree(work_dir, ignore_errors=True)
        raise
    shutil.rmtree(work_dir, ignore_errors=True)
    info = result.info
    return {
        "style_dir": f"{STYLES}/{style_id}", "identifier": info.identifier, "class_noun": info.class_noun,
        "steps": result.steps, "seconds": round(result.seconds, 3), "loss": result.loss,
        "resumed_from": result.resumed_from, "images": len(prepared),
        "skipped": [list(s) for s in prepared.skipped], "low_memory": low_memory,
        "class_images_generated": result.class_images_generated,
        "encoded_images": result.encoded_images, "encoded_prompts": result.encoded_prompts,
    }


def run_sticker(job: Job, resident: Resident, *, should_stop: ShouldStop, progress: Progress,
                low_memory: bool = False) -> dict[str, Any]:
    from pipeline.stickers.generation import StyleRef
    from pipeline.stickers.sticker_pipeline import StickerOptions, make_sticker

    data, payload = resident.data, job.payload
    # 1. check the payload, the style and the photo
    style_id = _text(payload, "style_id")
    style_dir = data.resolve(_relative(payload, "style_dir"))
    photo_path = data.resolve(_relative(payload, "photo"))
    variants = payload.get("variants") or 1
    seed = payload.get("seed") or 0
    if not isinstance(variants, int) or not isinstance(seed, int):
        raise InputError("sticker variants and seed must be integers")
    # The tiny preset (random weights, CPU tests) needs no more than a few denoising steps.
    options = StickerOptions(seed=seed, variants=variants, fast=bool(payload.get("fast", False)),
                             steps=8 if resident.settings.preset == "tiny" else StickerOptions.steps)
    ref = StyleRef.open(style_dir, style_id=style_id)
    try:
        photo = photo_path.read_bytes()
    except OSError as exc:
        raise InputError(f"the photo of this job is gone ({exc.__class__.__name__})") from exc
    progress(0.1, "drawing")
    # 2. generate
    result = make_sticker(resident.stickers, ref, photo, options, photo_name=photo_path.name,
                          max_pixels=resident.settings.max_image_pixels)
    # 3. store the stickers under results/<job_id>/
    stickers = []
    for n, (webp, sticker_seed) in enumerate(zip(result.webp, result.seeds, strict=True)):
        path = data.path_for(RESULTS, job.id, f"{n}.webp")
        write_atomic(path, webp)
        stickers.append({"path": data.relative(path), "emoji": result.emoji, "seed": sticker_seed})
    return {"stickers": stickers, "caption": result.caption, "prompt": result.prompt,
            "timings": {k: round(v, 4) for k, v in result.timings.items()}, "withheld": result.withheld}


def run_noop(job: Job, resident: Resident | None, *, should_stop: ShouldStop, progress: Progress,
             low_memory: bool = False) -> dict[str, Any]:
    """Sleep ``payload["sleep"]`` seconds in steps of 50 ms, honouring stop requests like a trainer."""
    total = float(job.payload.get("sleep") or 0.0)
    start = time.monotonic()
    while (elapsed := time.monotonic() - start) < total:
        request = should_stop()
        if request == "cancel":
            raise CancelledError("the job was cancelled")
        if request == "yield":
            raise TrainingPreempted(int(elapsed * 1000), int(total * 1000))
        progress(elapsed / total, "sleeping")
        time.sleep(min(0.05, total - elapsed))
    return {"low_memory": True} if low_memory else {}


def train_segmenter_version(settings: Settings, *, mode: str, name: str, work_dir: Path, device: Any,
                            sources: ModelSources, serving: Segmenter | None = None,
                            progress: Progress | None = None,
                            should_stop: ShouldStop | None = None) -> SegmenterRun:
    """A bootstrap (from the configured encoder, or from random weights) or a refresh (from the
    serving version, measured against it): gather the data, train, measure, write the version,
    promote it when the rule allows (``segmentation.bootstrap``). Resumes from ``work_dir``."""
    from pipeline.architectures import ARCHITECTURES
    from pipeline.models import choose_segmenter, load_segmenter
    from segmentation.bootstrap import gather_data, plan_for, run_segmenter_training
    from segmentation.training import fresh_segmenter

    # 1. where it starts
    choice = choose_segmenter(settings, sources)
    minutes = (settings.segmenter_bootstrap_minutes if mode == "bootstrap"
               else settings.segmenter_refresh_minutes)
    plan = plan_for(settings.preset, size=settings.segmenter_train_size, minutes=minutes,
                    scratch=mode == "bootstrap" and choice.base.startswith("scratch:"))
    if mode == "refresh":
        if choice.version is None:
            raise InputError("a refresh needs a trained segmenter version to start from; bootstrap first")
        start = choice.source
        segmenter = load_segmenter(start, device=device)
    elif plan.scratch:
        start = choice.base
        segmenter = fresh_segmenter(ARCHITECTURES[settings.preset].segformer, plan.size, device=device)
    else:
        start = choice.base
        segmenter = load_segmenter(start, device=device, cache_dir=sources.cache_dir, num_labels=1)
    # 2. the data (procedural, Twemoji, the operator's folders, uploads with alpha)
    if progress is not None:
        progress(0.0, "gathering stickers to learn from")
    data = gather_data(plan, data_root=settings.data_dir, db_path=settings.db_path,
                       max_pixels=settings.max_image_pixels, emoji=settings.segmenter_emoji,
                       emoji_registry=settings.emoji_registry, extra_dirs=settings.segmenter_extra_dirs)
    # 3. train, measure, write, promote
    return run_segmenter_training(
        segmenter, mode=mode, name=name, base=choice.base, start=start, plan=plan, data=data,
        data_root=settings.data_dir, work_dir=work_dir, device=device,
        load_trained=lambda path: load_segmenter(path, device=device),
        serving=serving if mode == "refresh" else None, progress=progress, should_stop=should_stop)


def sync_segmenter(resident: Resident) -> bool:
    """Serve the promoted segmenter version if it is not the one loaded (a bootstrap or refresh
    finished, here or on another worker); True when it changed."""
    from pipeline.models import choose_segmenter, load_chosen_segmenter

    models = resident.models
    choice = choose_segmenter(resident.settings, models.sources)
    if models.segmenter_choice is not None and choice == models.segmenter_choice:
        return False
    models.segmenter = load_chosen_segmenter(resident.settings, choice, models.sources, device=models.device)
    models.segmenter_choice = choice
    return True


def run_segmenter(job: Job, resident: Resident, *, should_stop: ShouldStop, progress: Progress,
                  low_memory: bool = False) -> dict[str, Any]:
    from pipeline.models import choose_segmenter

    settings, payload = resident.settings, job.payload
    mode = payload.get("mode")
    if mode not in ("bootstrap", "refresh"):
        raise InputError(f"a segmenter job's mode is 'bootstrap' or 'refresh', not {mode!r}")
    # 1. a bootstrap that another worker (or the CLI) already made is not made again
    choice = choose_segmenter(settings, resident.models.sources)
    if mode == "bootstrap" and choice.problem is None:
        sync_segmenter(resident)
        return {"mode": mode, "version": choice.version, "promoted": False,
                "skipped": "a trained segmenter is already in use"}
    # 2. train (resumes from checkpoints/<job_id>/ after a crash or a pause)
    work_dir = checkpoint_dir(resident.data, job.id)
    run = train_segmenter_version(settings, mode=mode, name=f"{mode}-{job.id[:12]}", work_dir=work_dir,
                                  device=resident.models.device, sources=resident.models.sources,
                                  serving=resident.models.segmenter, progress=progress,
                                  should_stop=should_stop)
    # 3. serve it at once here; other workers pick it up from current.json
    if run.promoted:
        sync_segmenter(resident)
    shutil.rmtree(work_dir, ignore_errors=True)
    return {"mode": mode, "version": run.version, "promoted": run.promoted, "figures": run.info["figures"],
            "serving_figures": run.info["serving_figures"], "counts": run.info["counts"],
            "notes": run.info["notes"], "training": run.info["training"]}


HANDLERS: dict[JobKind, Callable[..., dict[str, Any]]] = {
    JobKind.TRAIN: run_train,
    JobKind.STICKER: run_sticker,
    JobKind.SEGMENTER: run_segmenter,
    JobKind.NOOP: run_noop,
}


def run_job(job: Job, resident: Resident | None, *, should_stop: ShouldStop, progress: Progress,
            low_memory: bool = False, on_step_start: Callable[[int], None] | None = None
            ) -> dict[str, Any]:
    """Run ``job`` and return its result (see the module docstring for the shapes).
    ``on_step_start`` reaches the trainer (training jobs only): the worker's fault hook."""
    handler = HANDLERS.get(job.kind)
    if handler is None:
        raise InputError(f"unknown job kind {job.kind!r}")
    if job.kind != JobKind.NOOP and resident is None:
        raise InputError(f"a {job.kind.value} job needs the models; this worker runs no-op jobs only")
    if job.kind == JobKind.TRAIN and on_step_start is not None:
        return handler(job, resident, should_stop=should_stop, progress=progress, low_memory=low_memory,
                       on_step_start=on_step_start)
    return handler(job, resident, should_stop=should_stop, progress=progress, low_memory=low_memory)


def discard_checkpoints(data: DataDir, keep: set[str]) -> list[str]:
    """Remove ``checkpoints/<job_id>/`` of jobs not in ``keep`` (finished or gone); returns them."""
    root = data.root / CHECKPOINTS
    removed = []
    if root.is_dir():
        for entry in root.iterdir():
            if entry.is_dir() and entry.name not in keep:
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry.name)
    return removed

