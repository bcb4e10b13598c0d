"""The whole story with real processes: the fake Bot API here, `stickerbot bot` and a real
`stickerbot worker` (tiny preset) as subprocesses. The bot is killed with SIGKILL in the middle of
training and started again: the user still gets the style, then a sticker, then their pack."""

from __future__ import annotations

import asyncio
import io
import signal
import subprocess
from pathlib import Path

import pytest
from bot_harness import bot_env, picture, start_process, wait_delivered
from conftest import TEST_TOKEN
from fake_bot_api import FakeBotAPI, user
from PIL import Image

from pipeline.queue.base import JobKind, JobState
from pipeline.queue.sqlite import SqliteJobQueue
from pipeline.settings import Settings


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def wait_for_job(queue: SqliteJobQueue, user_id: int, kind: JobKind, *, running_with_progress: bool,
                       seconds: float = 300) -> str:
    for _ in range(int(seconds / 0.1)):
        for job in await queue.list_for_user(user_id):
            if job.kind == kind and (not running_with_progress
                                     or (job.state == JobState.RUNNING and job.progress > 0)):
                return job.id
        await asyncio.sleep(0.1)
    raise TimeoutError(f"no {kind} job in the expected state")


# Tiny training is 30 steps plus class images: minutes on a busy 2-core box. The same story with
# the test taking the worker's side of the queue runs by default (test_bot_conversation.py).
@pytest.mark.slow
@pytest.mark.timeout(1200)
async def test_whole_story_with_a_bot_restart_mid_training(tmp_path: Path, tiny_settings: Settings,
                                                           tiny_env: dict[str, str]) -> None:
    fake = FakeBotAPI(TEST_TOKEN)
    await fake.start()
    env = bot_env(tiny_env, fake, TEST_TOKEN)
    worker = start_process("worker", env, tmp_path / "worker.log")
    bot = start_process("bot", env, tmp_path / "bot.log")
    queue = await SqliteJobQueue.open(tiny_settings.db_path)
    ann = user(4242, first_name="Ann")
    try:
        # 1. /start and five stickers
        fake.send_text(ann, "/start")
        await fake.wait_text(ann.id, "I learn the style", timeout=90)
        for i in range(5):
            fid = fake.add_file(picture(300 + i, fmt="WEBP", alpha=True), kind="stickers", suffix=".webp")
            fake.send_sticker(ann, fid)
            await fake.wait_text(ann.id, f"has {i + 1} usable")
        # 2. /train: the class noun is asked for, then the job is queued
        fake.send_text(ann, "/train")
        await fake.wait_text(ann.id, "What do your stickers show?")
        fake.press(ann, "noun:cat")
        await fake.wait_text(ann.id, "(cat, 5 images) is queued")
        # 3. training runs in the worker; the bot shows progress, then is killed mid-training
        train_id = await wait_for_job(queue, ann.id, JobKind.TRAIN, running_with_progress=True)
        await fake.wait_for(lambda c: c.method == "editMessageText" and "Training «Style 1»: " in c.text,
                            timeout=120)
        bot.send_signal(signal.SIGKILL)
        bot.wait(timeout=10)
        assert not (await queue.get(train_id)).state.finished, "training ended before the bot was killed"
        restart = len(fake.calls)
        bot = start_process("bot", env, tmp_path / "bot.log")
        # 4. the restarted bot announces the style when the worker finishes it
        await fake.wait_text(ann.id, "is ready and active", timeout=600, start=restart)
        assert (await queue.get(train_id)).state == JobState.SUCCEEDED
        assert await wait_delivered(queue)
        # 5. a photo comes back as a valid 512-px WEBP sticker with its buttons
        fake.send_photo(ann, fake.add_file(picture(9, size=96, fmt="JPEG")), width=96, height=96)
        await fake.wait_text(ann.id, "Drawing your sticker")
        sent = await fake.wait_for(lambda c: c.method == "sendSticker", timeout=300)
        data = sent.files[str(sent.params["sticker"]).removeprefix("attach://")]
        img = Image.open(io.BytesIO(data))
        assert img.format == "WEBP" and max(img.size) == 512 and min(img.size) <= 512
        buttons = {d.split(":")[0]: d for _, d in fake.buttons(sent)}
        assert set(buttons) == {"again", "pack", "other"}
        # 6. add to pack: the pack is created with that very sticker
        fake.press(ann, buttons["pack"])
        await fake.wait_text(ann.id, "Created your pack")
        pack = fake.sticker_sets[f"style_{ann.id}_by_{fake.username}"]
        assert len(pack["stickers"]) == 1
        assert fake.files[pack["stickers"][0]["file_id"]].data == data
        assert pack["owner"] == ann.id
        assert not any("error id" in c.text for c in fake.calls)
    finally:
        await queue.close()
        stop(bot)
        stop(worker)
        await fake.close()
