"""Training slices on a real worker process (tiny preset, CPU): a sticker submitted during the
class-image phase starts within about one image's time and the job resumes without making any
image twice; /cancel during that phase stops the job; out-of-memory injected mid-training resumes
from the checkpoint on the low-memory profile and ends with the adapter of an uninterrupted run."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest
from test_worker import lora_tensors, queue, state_of, sticker_set, stop, until, worker_process

from pipeline.queue.base import JobKind, JobState
from pipeline.queue.sqlite import SqliteJobQueue
from pipeline.settings import Settings
from pipeline.storage.files import DataDir

__all__ = ["queue"]  # the fixture, shared with test_worker
TRAIN, STICKER = JobKind.TRAIN, JobKind.STICKER
CLASS_PROGRESS = re.compile(r"^class images (\d+)/(\d+)$")


async def test_class_image_phase_yields_to_a_sticker_and_honours_cancel(
        queue: SqliteJobQueue, tiny_settings: Settings, tiny_env: dict[str, str], tmp_path: Path,
        tiny_models: object) -> None:
    from pipeline.stickers.generation import write_random_style

    data = DataDir(tiny_settings.data_dir)
    write_random_style(tiny_models.diffusion, data.root / "styles" / "ready", seed=1)  # type: ignore[attr-defined]
    photo = sticker_set(data, n=1, seed=9)[0]
    images = sticker_set(data)
    log = tmp_path / "w.log"
    with worker_process(tiny_env, log, kinds="train,sticker", lease=3) as proc:
        train = await queue.submit(TRAIN, 1, {"style_id": "s1", "images": images, "class_noun": "cat",
                                              "steps": 4, "seed": 1, "class_images": 12})
        image_times: list[float] = []  # when each new "class images k/12" showed up

        async def mid_phase() -> bool:
            current = await state_of(queue, train.id)
            match = CLASS_PROGRESS.match(current.progress_message or "")
            if match and (not image_times or int(match.group(1)) > len(image_times) - 1):
                image_times.append(time.monotonic())
            return bool(match) and 2 <= int(match.group(1)) <= 8

        await until(mid_phase, within=150, what="the class-image phase", log=log)
        sticker = await queue.submit(STICKER, 2, {"style_id": "ready", "style_dir": "styles/ready",
                                                  "photo": photo, "seed": 1, "variants": 1})

        async def finished() -> bool:
            return (await state_of(queue, train.id)).state.finished

        await until(finished, within=240, what="the training job", log=log)
        s, t = await state_of(queue, sticker.id), await state_of(queue, train.id)
        assert (s.state, t.state) == (JobState.SUCCEEDED, JobState.SUCCEEDED), (s.error, t.error)
        assert s.started_at is not None and t.finished_at is not None and s.finished_at is not None
        # The sticker waited for at most the image in progress (plus the worker's polling and
        # claim), not for the rest of the phase.
        per_image = (image_times[-1] - image_times[0]) / max(1, len(image_times) - 1)
        assert s.started_at - s.created_at < per_image + 2.0, (s.started_at - s.created_at, per_image)
        assert s.finished_at < t.finished_at
        text = log.read_text()
        released = re.findall(r"released at class images (\d+)/12", text)
        assert released, text[-3000:]
        assert t.result is not None and t.result["class_images_generated"] == 12 - int(released[-1])
        # every image made exactly once across the two slices
        made = [int(n) for n in re.findall(r"generated (\d+) class images", text)]
        assert sum(made) == 12 and len(made) == 2

        # /cancel during the class-image phase stops the job at the next image
        doomed = await queue.submit(TRAIN, 1, {"style_id": "s2", "images": images, "class_noun": "dog",
                                               "steps": 4, "seed": 1, "class_images": 60})

        async def making_images() -> bool:
            match = CLASS_PROGRESS.match((await state_of(queue, doomed.id)).progress_message or "")
            return bool(match) and int(match.group(1)) >= 1

        await until(making_images, within=120, what="the second class-image phase", log=log)
        asked = time.monotonic()
        await queue.cancel(doomed.id, user_id=1)

        async def cancelled() -> bool:
            return (await state_of(queue, doomed.id)).state == JobState.CANCELLED

        await until(cancelled, within=30, what="the cancel", log=log)
        assert time.monotonic() - asked < per_image + 5.0  # the next heartbeat, the next image
        assert stop(proc) == 0
    assert not (data.root / "checkpoints" / doomed.id).exists()
    assert not (data.root / "styles" / "s2").exists()


async def test_out_of_memory_mid_training_resumes_from_the_checkpoint_on_low_memory(
        queue: SqliteJobQueue, tiny_settings: Settings, tiny_env: dict[str, str], tmp_path: Path) -> None:
    data = DataDir(tiny_settings.data_dir)
    payload = {"images": sticker_set(data), "class_noun": "cat", "steps": 12, "seed": 5}
    log = tmp_path / "w.log"
    with worker_process(tiny_env, log, kinds="train", lease=3, fault="oom:train@6:1") as proc:
        hit = await queue.submit(TRAIN, 1, {**payload, "style_id": "hit"})
        progress: list[float] = []

        async def finished() -> bool:
            current = await state_of(queue, hit.id)
            progress.append(current.progress)
            return current.state.finished

        await until(finished, within=240, what="the job that ran out of memory", log=log)
        # the reference: the same job uninterrupted (the fault fired once)
        reference = await queue.submit(TRAIN, 1, {**payload, "style_id": "reference"})

        async def reference_done() -> bool:
            return (await state_of(queue, reference.id)).state.finished

        await until(reference_done, within=240, what="the reference job", log=log)
        assert stop(proc) == 0
    h, r = await state_of(queue, hit.id), await state_of(queue, reference.id)
    assert (h.state, r.state) == (JobState.SUCCEEDED,) * 2, (h.error, r.error)
    assert h.attempts == 1 and h.result is not None and r.result is not None
    assert h.result["low_memory"] is True and r.result["low_memory"] is False
    assert h.result["resumed_from"] == 6  # the step it failed at, not the start
    assert (h.result["encoded_images"], h.result["class_images_generated"]) == (0, 0)
    assert progress == sorted(progress)  # progress never went backwards
    text = log.read_text()
    assert "out of memory at step 6; checkpointed there" in text
    assert "retrying on the low-memory profile" in text
    # On the tiny preset the batch is already 1: the low-memory profile differs by gradient
    # checkpointing only, which changes no more than the last bits.
    a, b = lora_tensors(data.root / "styles" / "hit"), lora_tensors(data.root / "styles" / "reference")
    assert a.keys() == b.keys() and a
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-6, err_msg=key)


def test_step_faults_are_parsed_strictly() -> None:
    from pipeline.worker import parse_faults, parse_step_faults

    spec = "oom:train@6:1,oom:sticker:1,oom:train@6:1,oom:train:2"
    assert parse_step_faults(spec) == {6: 2}
    assert parse_faults(spec) == {TRAIN: 2, STICKER: 1}
    for bad in ("oom:sticker@3:1", "oom:train@x:1", "oom:train@:1x"):
        with pytest.raises(ValueError):
            parse_step_faults(bad)


def test_the_bot_names_the_class_image_phase() -> None:
    from bot.notifier import progress_detail

    assert progress_detail("en", "class images 12/50") == "preparing class images 12/50"
    assert "12/50" in progress_detail("ru", "class images 12/50")
    assert progress_detail("en", "class images: waiting for another job (0/50)").startswith("waiting")
    assert progress_detail("en", "step 3/30, loss 0.1000") == "step 3/30, loss 0.1000"
    assert progress_detail("en", "") == ""
