"""Running the real bot (in this process or as a ``stickerbot bot`` subprocess) against the fake
Bot API, plus test pictures."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
from fake_bot_api import FakeBotAPI
from PIL import Image

from bot.app import BotApp, BotOptions
from pipeline.queue.base import JobQueue
from pipeline.settings import Settings

FAST = BotOptions(album_delay=0.4, min_edit_interval=0.2, sweep_interval=0.5, polling_timeout=1)


def picture(seed: int, *, size: int = 64, fmt: str = "PNG", alpha: bool = False) -> bytes:
    """A small distinct picture: a coloured blob on a plain background."""
    rng = np.random.default_rng(seed)
    arr = np.zeros((size, size, 4), dtype=np.uint8)
    arr[..., :3] = rng.integers(0, 255, size=3, dtype=np.uint8)
    arr[..., 3] = 0 if alpha else 255
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.integers(size // 4, 3 * size // 4, size=2)
    blob = (yy - cy) ** 2 + (xx - cx) ** 2 < (size // 4) ** 2
    arr[blob, :3] = rng.integers(0, 255, size=3, dtype=np.uint8)
    arr[blob, 3] = 255
    buf = io.BytesIO()
    img = Image.fromarray(arr, "RGBA")
    if fmt == "JPEG":
        img = img.convert("RGB")
    img.save(buf, format=fmt)
    return buf.getvalue()


async def wait_delivered(queue: JobQueue, *, seconds: float = 10.0) -> bool:
    """Whether every finished job gets marked delivered within ``seconds`` (the bot marks a job
    right after sending its outcome, so a test that saw the message may be a moment early)."""
    for _ in range(int(seconds / 0.1)):
        if not await queue.undelivered():
            return True
        await asyncio.sleep(0.1)
    return False


def bot_settings(settings: Settings, fake: FakeBotAPI, token: str) -> Settings:
    from pydantic import SecretStr

    return settings.model_copy(update={"bot_token": SecretStr(token),
                                       "telegram_api_base": fake.base_url})


@asynccontextmanager
async def running_bot(settings: Settings, options: BotOptions = FAST) -> AsyncIterator[BotApp]:
    app = await BotApp.create(settings, options)
    task = asyncio.create_task(app.run())
    try:
        yield app
    finally:
        await app.stop()
        await asyncio.wait_for(task, timeout=15)


def bot_env(env: dict[str, str], fake: FakeBotAPI, token: str) -> dict[str, str]:
    out = dict(env)
    out.update(BOT_TOKEN=token, TELEGRAM_API_BASE=fake.base_url)
    return out


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``python <args>`` in the repository root as a subprocess, output appended to ``log``."""
    root = Path(__file__).resolve().parents[1]
    env = dict(env)
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    with open(log, "ab") as fh:
        return subprocess.Popen([sys.executable, *args], env=env, cwd=root, stdout=fh,
                                stderr=subprocess.STDOUT)


def start_process(command: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``stickerbot <command>`` as a subprocess (logs to ``log``)."""
    return spawn(["-m", "pipeline.cli", command], env, log)
