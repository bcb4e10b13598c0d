"""The background remover's bootstrap on the scale-out backend: a real redis-server, two real
`celery worker` processes whose configured segmenter is an encoder with no head (tiny preset,
procedural stickers, a few seconds of training). A sticker that reaches such a worker waits for
the bootstrap the worker asks for ("getting ready"), then is drawn with the trained remover."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import redis
from PIL import Image
from test_celery_backend import REDIS_SERVER, RedisServer, Worker, wait_finished
from test_segmenter_bootstrap import save_classification_encoder
from test_worker import sticker_set

from pipeline.celery_app import SEGMENTER_ASKED_KEY
from pipeline.queue.base import SYSTEM_USER, JobKind, JobState
from pipeline.queue.celery import CeleryJobQueue
from pipeline.settings import Settings
from pipeline.storage.files import DataDir

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed"),
    pytest.mark.slow,  # two worker processes, a bootstrap and two stickers: about a minute on 2 cores
]


async def test_a_celery_worker_without_a_head_bootstraps_once_then_draws_the_waiting_stickers(
        tiny_settings: Settings, tiny_models, tmp_path: Path) -> None:
    from pipeline.stickers.generation import write_random_style
    from segmentation import versions

    encoder = save_classification_encoder(tmp_path / "mit-tiny")
    server = RedisServer(tmp_path / "redis")
    server.start()
    settings = tiny_settings.model_copy(update={
        "queue_backend": "celery", "redis_url": server.url, "max_queued_jobs_per_user": 1000,
        "lease_seconds": 2.0, "segmenter_model": str(encoder), "segmenter_emoji": False})
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("STICKERBOT_") and k not in ("BOT_TOKEN", "TELEGRAM_API_BASE")}
    env.update(STICKERBOT_PRESET="tiny", STICKERBOT_DATA_DIR=str(settings.data_dir),
               STICKERBOT_TINY_ZOO_DIR=str(settings.zoo_dir), STICKERBOT_DEVICE="cpu",
               STICKERBOT_DTYPE="float32", STICKERBOT_QUEUE_BACKEND="celery",
               STICKERBOT_REDIS_URL=server.url, STICKERBOT_LEASE_SECONDS="2",
               STICKERBOT_CELERY_VISIBILITY_TIMEOUT="300", STICKERBOT_SEGMENTER_MODEL=str(encoder),
               STICKERBOT_SEGMENTER_EMOJI="false", STICKERBOT_SEGMENTER_BOOTSTRAP_MINUTES="0.1",
               HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    data = DataDir(settings.data_dir)
    write_random_style(tiny_models.diffusion, data.root / "styles" / "ready", seed=1)
    photos = sticker_set(data, n=2, seed=9)
    workers = [Worker(name, env, tmp_path / f"{name}.log") for name in ("w1", "w2")]
    queue = await CeleryJobQueue.from_settings(settings)

    def logs() -> str:
        return "\n".join(f"--- {w.name}\n{w.text()[-3000:]}" for w in workers)

    try:
        for worker in workers:
            worker.wait_ready()
        stickers = [await queue.submit(JobKind.STICKER, 2, {
            "style_id": "ready", "style_dir": "styles/ready", "photo": photo, "seed": i, "variants": 1})
            for i, photo in enumerate(photos)]
        # The bootstrap is asked for and queued. Whether the waiting stickers' positions read
        # "getting ready" is asserted by test_celery_units (here the bootstrap may finish between
        # two looks); this loop only waits for it to be queued.
        deadline, seen_ready = time.monotonic() + 120, False
        while not seen_ready:
            assert time.monotonic() < deadline, f"no bootstrap queued\n{logs()}"
            boots = await queue.list_for_user(SYSTEM_USER)
            if boots and not boots[0].state.finished:
                seen_ready = all([(await queue.position(s.id)).getting_ready for s in stickers])
            elif boots:
                break  # finished between two looks: the order is checked below
            await asyncio.sleep(0.2)
        final = await wait_finished(queue, [s.id for s in stickers], timeout=240)
        [boot] = await queue.list_for_user(SYSTEM_USER)  # asked for by both workers, queued once
        assert boot.kind == JobKind.SEGMENTER and boot.payload["mode"] == "bootstrap"
        assert boot.state == JobState.SUCCEEDED and boot.attempts == 1, (boot.error, logs())
        assert boot.result["promoted"] and versions.current(data.root).name == boot.result["version"]
        assert redis.Redis.from_url(server.url).exists(SEGMENTER_ASKED_KEY)
        for sticker in stickers:
            done = final[sticker.id]
            assert done.state == JobState.SUCCEEDED, (done.error, logs())
            assert done.attempts == 1 and done.error is None  # given back while it waited, never failed
            assert done.started_at >= boot.finished_at  # no sticker before the remover was trained
            with Image.open(data.resolve(done.result["stickers"][0]["path"])) as img:
                alpha = np.asarray(img.convert("RGBA").getchannel("A"))
            assert alpha.min() == 0 and alpha.max() == 255  # a cut-out with transparency
        full = "".join(w.text() for w in workers)
        asked = [line for line in full.splitlines() if "pipeline.celery_app: sticker" in line
                 and line.endswith("asking for it")]
        assert len(asked) == 1 and "Retry in 5.0s" in full  # given back; asked for once (SET NX)
    finally:
        await queue.close()
        for worker in workers:
            worker.stop(signal.SIGKILL)
        server.stop()
