"""Class-prior images: what the base model draws for the class prompt, cached and shared.

Prior preservation trains on these next to the user's stickers so the class noun keeps its
meaning. They depend only on the base model, the class prompt and the resolution (and the
sampler settings), never on the user, so one cache entry serves every style of that class:

    <class_cache_dir>/<key>/
        meta.json          what the key stands for
        0000.png ...       image i is generated from seed (key, i): a larger count only adds
                           images, a smaller one reads a prefix

Generation runs txt2img on the resident components with any loaded adapter switched off, and
takes an exclusive file lock per key, so two workers needing the same class generate it once.
It is a preemptible phase of a training job: one image at a time, each cached as soon as it is
made, with a stop check and a progress report between images (see ``ensure_class_images``).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image

from pipeline.errors import CancelledError, TrainingPreempted
from pipeline.models import DiffusionModels
from pipeline.storage.files import file_lock, write_atomic

log = logging.getLogger(__name__)


@dataclass
class ClassImages:
    images: list[Image.Image]
    directory: Path
    generated: int  # how many this call had to generate (0: all came from the cache)


def class_cache_key(*, base_model: str, prompt: str, resolution: int, steps: int,
                    guidance: float) -> str:
    raw = json.dumps({"base": base_model, "prompt": prompt, "resolution": resolution,
                      "steps": steps, "guidance": guidance}, sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


@contextmanager
def base_model_only(*modules: Any) -> Iterator[None]:
    """Switch every LoRA layer of ``modules`` off, and back to exactly its old state after."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for module in modules for m in module.modules() if isinstance(m, BaseTunerLayer)]
    before = [layer.disable_adapters for layer in layers]
    try:
        for layer in layers:
            layer.enable_adapters(False)
        yield
    finally:
        for layer, disabled in zip(layers, before, strict=True):
            layer.enable_adapters(not disabled)


def _pipeline(models: DiffusionModels) -> Any:
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe: Any = StableDiffusionPipeline(  # Any: diffusers' mixins are invisible to mypy
        vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer,
        unet=models.unet, scheduler=DPMSolverMultistepScheduler.from_config(models.scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


ClassProgress = Callable[[int, int], None]  # (images ready, images wanted)
StopCheck = Callable[[], Literal["cancel", "yield"] | None]


class _StopInsideImage(Exception):
    """Raised from the sampler's step callback: a stop request arrived mid-image."""

    def __init__(self, request: str) -> None:
        super().__init__(request)
        self.request = request


def _check_stop(should_stop: StopCheck | None, done: int, count: int, *, may_yield: bool = True) -> None:
    request = should_stop() if should_stop is not None else None
    if request == "cancel":
        raise CancelledError("cancelled while generating class images")
    if request == "yield" and may_yield:
        # Every image made so far is already in the shared cache: the next run goes on from there.
        raise TrainingPreempted(0, 0, detail=f"class images {done}/{count}")


def ensure_class_images(
    models: DiffusionModels,
    *,
    prompt: str,
    count: int,
    cache_dir: Path,
    resolution: int | None = None,
    steps: int = 25,
    guidance: float = 7.5,
    batch_size: int = 1,
    negative_prompt: str | None = None,
    should_stop: StopCheck | None = None,
    progress: ClassProgress | None = None,
) -> ClassImages:
    """``count`` class images for ``prompt``, generating only those the cache lacks.

    A preemptible phase: each image (or batch of ``batch_size``) is written to the cache as
    soon as it is made; ``should_stop`` is asked before each image and between its sampler
    steps (``"yield"`` raises TrainingPreempted, ``"cancel"`` CancelledError; an image stopped
    half-way is dropped, the images made so far stay cached for the next run, whoever's it is;
    each run makes at least one image before it yields); ``progress(ready, count)`` follows
    each image. While another process generates the same key, the wait reports
    ``progress(-1, count)`` and still honours ``should_stop``.
    """
    resolution = resolution or models.resolution
    key = class_cache_key(base_model=models.source, prompt=prompt, resolution=resolution,
                          steps=steps, guidance=guidance)
    directory = Path(cache_dir) / key
    names = [f"{i:04d}.png" for i in range(count)]
    generated = 0

    def waiting() -> None:
        if progress is not None:
            progress(-1, count)
        _check_stop(should_stop, 0, count)

    with file_lock(Path(cache_dir) / f".{key}.lock", on_wait=waiting if should_stop or progress else None):
        directory.mkdir(parents=True, exist_ok=True)
        meta = directory / "meta.json"
        if not meta.is_file():
            write_atomic(meta, json.dumps({"base_model": models.source, "prompt": prompt,
                                           "resolution": resolution, "steps": steps,
                                           "guidance": guidance}, indent=2).encode())
        missing = [i for i, name in enumerate(names) if not (directory / name).is_file()]
        if missing:
            pipe = _pipeline(models)
            seed_base = int(key[:8], 16)
            ready = count - len(missing)
            if progress is not None:
                progress(ready, count)
            try:
                with base_model_only(models.unet, models.text_encoder), torch.inference_mode():
                    for start in range(0, len(missing), batch_size):
                        # At least one image per run: a steady stream of stickers slows this phase
                        # down but cannot starve it.
                        _check_stop(should_stop, ready, count, may_yield=generated > 0)
                        chunk = missing[start:start + batch_size]
                        generators = [torch.Generator("cpu").manual_seed(seed_base + i) for i in chunk]
                        may_yield = generated > 0

                        def between_steps(_pipe: Any, _i: int, _t: Any, kwargs: dict[str, Any],
                                          may_yield: bool = may_yield) -> dict[str, Any]:
                            # A stop request also ends the image in progress (its partial work is
                            # dropped): a sticker waits one sampler step, not one image.
                            request = should_stop() if should_stop is not None else None
                            if request == "cancel" or (request == "yield" and may_yield):
                                raise _StopInsideImage(request)
                            return kwargs

                        try:
                            out = pipe(
                                [prompt] * len(chunk), negative_prompt=[negative_prompt] * len(chunk)
                                if negative_prompt else None, height=resolution, width=resolution,
                                num_inference_steps=steps, guidance_scale=guidance,
                                generator=generators, output_type="pil",
                                callback_on_step_end=between_steps if should_stop is not None else None,
                            )
                        except _StopInsideImage as stop:
                            if stop.request == "cancel":
                                raise CancelledError("cancelled while generating class images") from None
                            raise TrainingPreempted(0, 0, detail=f"class images {ready}/{count}") from None
                        for i, img in zip(chunk, out.images, strict=True):
                            buf = io.BytesIO()
                            img.convert("RGB").save(buf, format="PNG")
                            write_atomic(directory / names[i], buf.getvalue())
                        generated += len(chunk)
                        ready += len(chunk)
                        if progress is not None:
                            progress(ready, count)
            finally:  # also when the phase stops early: the images made are cached
                log.info("generated %d class images for %r in %s (%d/%d ready)", generated, prompt,
                         directory, ready, count)
        images = []
        for name in names:
            with Image.open(directory / name) as img:
                images.append(img.convert("RGB"))
    return ClassImages(images=images, directory=directory, generated=generated)
