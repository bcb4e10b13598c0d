"""Training slices on one worker (issue 19): the class-image phase is preemptible and resumable,
a resumed slice re-encodes nothing, an out-of-memory error mid-training checkpoints where it
happened and the low-memory profile resumes it, the trainer's adapter sits beside the serving
adapters (no reload after a slice), and autocast follows the resident weights."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.errors import CancelledError, TrainingPreempted
from pipeline.models import DiffusionModels, load_models
from pipeline.settings import Settings
from pipeline.training.class_images import ensure_class_images
from pipeline.training.sticker_set import PreparedSet, prepare_sticker_set
from pipeline.training.style import LORA_FILE
from pipeline.training.trainer import (
    CHECKPOINT_FILE,
    INPUTS_FILE,
    TrainingConfig,
    TrainingProgress,
    choose_autocast,
    train_style,
)
from segmentation.synthetic import sticker_files


@pytest.fixture
def models(tiny_settings: Settings) -> DiffusionModels:
    """Own models: training adds (and removes) adapters."""
    return load_models(tiny_settings).diffusion


@pytest.fixture
def prepared() -> PreparedSet:
    return prepare_sticker_set(sticker_files(4, seed=2, size=80), resolution=64)


def _lora(style_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(style_dir / LORA_FILE)


def test_autocast_follows_the_resident_weights_and_a_setting_forces_either() -> None:
    assert choose_autocast(torch.float16, "auto") == torch.float16
    assert choose_autocast(torch.bfloat16, "auto") == torch.bfloat16
    assert choose_autocast(torch.float32, "auto") is None
    for weights in (torch.float16, torch.bfloat16, torch.float32):
        assert choose_autocast(weights, "no") is None
        assert choose_autocast(weights, "fp16") == torch.float16
        assert choose_autocast(weights, "bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="mixed precision"):
        choose_autocast(torch.float16, "fp8")


def _train_watching_dtypes(models: DiffusionModels, prepared: PreparedSet, config: TrainingConfig,
                           tmp_path: Path) -> tuple[Any, set[torch.dtype]]:
    seen: set[torch.dtype] = set()
    hook = models.unet.conv_in.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
    try:
        result = train_style(models, prepared, config, out_dir=tmp_path / "style", work_dir=tmp_path / "w",
                             class_cache_dir=tmp_path / "cls")
    finally:
        hook.remove()
    return result, seen


def test_bf16_autocast_trains_on_the_cpu_with_fp32_lora(models: DiffusionModels, prepared: PreparedSet,
                                                         tmp_path: Path) -> None:
    config = TrainingConfig(steps=3, rank=4, lr=1e-3, with_prior_preservation=False, seed=1,
                            mixed_precision="bf16")
    result, seen = _train_watching_dtypes(models, prepared, config, tmp_path)
    assert seen == {torch.bfloat16}  # the UNet ran under bf16 autocast
    assert all(np.isfinite(result.losses))
    lora = _lora(result.style_dir)
    assert lora and all(v.dtype == torch.float32 for v in lora.values())  # trained in fp32
    assert any(float(v.abs().sum()) > 0 for k, v in lora.items() if "lora_B" in k)  # it learned
    # fp32 weights and "auto": no autocast
    _, seen = _train_watching_dtypes(models, prepared, TrainingConfig(
        steps=1, rank=4, with_prior_preservation=False), tmp_path / "auto")
    assert seen == {torch.float32}


def test_bf16_weights_train_under_bf16_autocast_by_default(tiny_settings: Settings, prepared: PreparedSet,
                                                            tmp_path: Path) -> None:
    models = load_models(tiny_settings.model_copy(update={"dtype": "bfloat16"})).diffusion
    assert models.dtype == torch.bfloat16
    result, seen = _train_watching_dtypes(models, prepared, TrainingConfig(
        steps=2, rank=4, lr=1e-3, with_prior_preservation=False), tmp_path)
    assert seen == {torch.bfloat16} and all(np.isfinite(result.losses))
    assert all(v.dtype == torch.float32 for v in _lora(result.style_dir).values())
    assert all(p.dtype == torch.bfloat16 for p in models.unet.parameters())  # left as found


def test_class_images_stop_between_images_and_resume_where_they_stopped(
        models: DiffusionModels, tmp_path: Path) -> None:
    cache = tmp_path / "cls"
    seen: list[tuple[int, int]] = []
    kwargs: dict[str, Any] = {"prompt": "a cat", "count": 5, "cache_dir": cache, "resolution": 64, "steps": 2}
    # a sticker is waiting from the start: one image per run still gets made, then it yields
    with pytest.raises(TrainingPreempted) as err:
        ensure_class_images(models, progress=lambda a, b: seen.append((a, b)),
                            should_stop=lambda: "yield", **kwargs)
    assert seen == [(0, 5), (1, 5)] and err.value.detail == "class images 1/5"
    # a sticker arrives after the second image of the next run
    seen.clear()
    with pytest.raises(TrainingPreempted) as err:
        ensure_class_images(models, progress=lambda a, b: seen.append((a, b)),
                            should_stop=lambda: "yield" if len(seen) >= 3 else None, **kwargs)
    assert seen == [(1, 5), (2, 5), (3, 5)] and err.value.detail == "class images 3/5"
    # the images made so far are cached; the next run makes only the rest
    seen.clear()
    done = ensure_class_images(models, progress=lambda a, b: seen.append((a, b)), **kwargs)
    assert done.generated == 2 and len(done.images) == 5
    assert seen == [(3, 5), (4, 5), (5, 5)]
    # the same images an uninterrupted run makes (same seeds per image index)
    other = ensure_class_images(models, **{**kwargs, "cache_dir": tmp_path / "other"})
    for a, b in zip(done.images, other.images, strict=True):
        diff = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
        assert diff.max() <= 2
    # cancel: stops before the next image (even the first one of a run)
    with pytest.raises(CancelledError):
        ensure_class_images(models, should_stop=lambda: "cancel", **{**kwargs, "count": 8})
    assert not (cache / done.directory.name / "0005.png").exists()
    # a request that arrives while an image is drawn stops it at the next sampler step
    seen.clear()
    calls: list[int] = []

    def cancel_inside_second_image() -> str | None:
        calls.append(len(seen))  # len(seen) == 2 while the second image is made
        return "cancel" if calls.count(2) >= 2 else None  # its first sampler step

    dog = {**kwargs, "prompt": "a dog"}
    with pytest.raises(CancelledError):
        ensure_class_images(models, progress=lambda a, b: seen.append((a, b)),
                            should_stop=cancel_inside_second_image, **dog)
    assert seen == [(0, 5), (1, 5)] and calls.count(2) == 2  # no sampler step after the request
    kept = ensure_class_images(models, **dog)
    assert kept.generated == 4  # one image was cached, the half-drawn one was not


def test_out_of_memory_mid_training_checkpoints_there_and_low_memory_resumes(
        models: DiffusionModels, prepared: PreparedSet, tmp_path: Path) -> None:
    config = TrainingConfig(steps=8, rank=4, lr=1e-3, batch_size=2, num_class_images=2, class_image_steps=2,
                            checkpoint_every=100, warmup_steps=2, seed=4)
    cache = tmp_path / "cls"

    def oom_at_5(step: int) -> None:
        if step == 5:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")

    progress: list[TrainingProgress] = []
    with pytest.raises(torch.cuda.OutOfMemoryError):
        train_style(models, prepared, config, out_dir=tmp_path / "a", work_dir=tmp_path / "wa",
                    class_cache_dir=cache, on_step_start=oom_at_5, progress=progress.append)
    state = torch.load(tmp_path / "wa" / CHECKPOINT_FILE, weights_only=False)
    assert state["step"] == 5  # where it failed, not the last periodic checkpoint (none at 100)
    assert (tmp_path / "wa" / INPUTS_FILE).is_file()
    shutil.copytree(tmp_path / "wa", tmp_path / "wb")  # the reference resumes the same checkpoint

    low = config.low_memory()  # batch 1 and gradient checkpointing: the same LoRA
    resumed = train_style(models, prepared, low, out_dir=tmp_path / "a", work_dir=tmp_path / "wa",
                          class_cache_dir=cache, progress=progress.append)
    assert resumed.resumed_from == 5 and len(resumed.losses) == 3
    assert (resumed.encoded_images, resumed.class_images_generated) == (0, 0)
    steps = [p.step for p in progress if p.phase == "training"]
    assert steps == sorted(steps) and steps[-1] == 8  # progress never went backwards
    reference = train_style(models, prepared, low, out_dir=tmp_path / "b", work_dir=tmp_path / "wb",
                            class_cache_dir=cache)
    assert reference.resumed_from == 5
    a, b = _lora(tmp_path / "a"), _lora(tmp_path / "b")
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)


def test_a_sticker_after_a_training_slice_keeps_its_adapter_and_the_slice_resumes_cheaply(
        tiny_settings: Settings) -> None:
    """The trainer's adapter is added beside the serving ones and removed after each slice: the
    next sticker's style is still loaded (no reload from disk), and the resumed slice reads its
    latents and embeddings back instead of re-encoding."""
    from pipeline.jobs import Resident, run_job
    from pipeline.queue.base import Job, JobKind, JobState
    from pipeline.stickers.generation import write_random_style
    from pipeline.storage.files import DataDir

    resident = Resident.load(tiny_settings)
    data = DataDir(tiny_settings.data_dir)
    write_random_style(resident.models.diffusion, data.root / "styles" / "ready", seed=1)
    photo = data.put_blob(sticker_files(1, seed=9, size=80)[0][1], suffix=".png")[0]
    images = [data.put_blob(png, suffix=".png")[0] for _, png in sticker_files(4, seed=0, size=80)]

    def job(kind: JobKind, job_id: str, payload: dict[str, Any]) -> Job:
        return Job(id=job_id, kind=kind, state=JobState.RUNNING, user_id=1, priority=0, payload=payload,
                   attempts=1, max_attempts=3, worker_id="w", lease_expires_at=None,
                   cancel_requested=False, progress=0.0, progress_message="", result=None, error=None,
                   created_at=0.0, started_at=0.0, finished_at=None, updated_at=0.0)

    sticker = job(JobKind.STICKER, "s1", {"style_id": "ready", "style_dir": "styles/ready", "photo": photo,
                                         "seed": 1, "variants": 1})
    train = job(JobKind.TRAIN, "t1", {"style_id": "new", "images": images, "class_noun": "cat", "steps": 6})
    generator = resident.stickers.generator

    def draw() -> np.ndarray:
        from PIL import Image

        result = run_job(sticker, resident, should_stop=lambda: None, progress=lambda f, m: None)
        with Image.open(data.resolve(result["stickers"][0]["path"])) as img:
            return np.asarray(img.convert("RGBA"), dtype=np.int16)

    before = draw()
    assert generator.loads == 1
    messages: list[str] = []
    with pytest.raises(TrainingPreempted):
        run_job(train, resident, progress=lambda f, m: messages.append(m),
                should_stop=lambda: "yield" if sum(m.startswith("step") for m in messages) >= 2 else None)
    assert [m for m in messages if m.startswith("class images")] == [f"class images {i}/4" for i in range(5)]
    unet = resident.models.diffusion.unet
    assert "stickerbot_train" in unet.peft_config  # kept, switched off, for the next slice
    after = draw()
    assert generator.loads == 1  # the style stayed loaded through the training slice
    assert np.abs(after - before).max() <= 2  # and draws as before: the kept adapter is off
    result = run_job(train, resident, should_stop=lambda: None, progress=lambda f, m: None)
    assert result["resumed_from"] == 2
    counts = (result["encoded_images"], result["encoded_prompts"], result["class_images_generated"])
    assert counts == (0, 0, 0)
    assert "stickerbot_train" not in unet.peft_config  # gone once the style is written
    draw()
    assert generator.loads == 1
