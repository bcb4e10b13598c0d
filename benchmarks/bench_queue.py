"""The embedded queue and the worker.

1. Submit-to-claim latency: one connection submits (the bot), another waits for work and claims
   (the worker), as two processes would; p50/p99 over a few hundred jobs (goal: p50 < 20 ms).
2. Claim+complete throughput of no-op jobs, one worker connection and two side by side
   (goal: >= 500 jobs/s).
3. Sticker latency (submit to result) on an idle worker vs while a training job runs on it, tiny
   preset on this machine's device: training yields at its next step (goal: within 2x of idle;
   without preemption a sticker would wait for the rest of the training run).
"""

from __future__ import annotations

import asyncio
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.jobs import Resident
    from pipeline.queue.sqlite import SqliteJobQueue

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LATENCY_JOBS = 300
THROUGHPUT_JOBS = 2000
STICKERS = 3
TRAIN_STEPS = 400  # far longer than the measurement: the sticker must not wait for it


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def submit_to_claim(path: Path) -> tuple[float, float]:
    from pipeline.queue.base import JobKind
    from pipeline.queue.sqlite import SqliteJobQueue

    bot = await SqliteJobQueue.open(path, max_queued_per_user=10**9)
    worker = await SqliteJobQueue.open(path, max_queued_per_user=10**9)
    submitted: dict[int, float] = {}
    latencies: list[float] = []

    async def claimer() -> None:
        while len(latencies) < LATENCY_JOBS:
            job = await worker.claim("bench")
            if job is None:
                await worker.wait_for_change(1.0)
                continue
            latencies.append(time.perf_counter() - submitted[job.payload["n"]])
            await worker.complete(job.id, "bench", {})

    try:
        task = asyncio.create_task(claimer())
        await asyncio.sleep(0.05)
        for i in range(LATENCY_JOBS):
            submitted[i] = time.perf_counter()
            await bot.submit(JobKind.NOOP, 1, {"n": i})
            await asyncio.sleep(0.005 + (i % 7) * 0.003)  # uneven arrivals
        await asyncio.wait_for(task, 60)
    finally:
        await bot.close()
        await worker.close()
    return _pct(latencies, 0.5) * 1000, _pct(latencies, 0.99) * 1000


async def throughput(path: Path, workers: int) -> float:
    from pipeline.queue.base import JobKind
    from pipeline.queue.sqlite import SqliteJobQueue

    bot = await SqliteJobQueue.open(path, max_queued_per_user=10**9)
    queues = [await SqliteJobQueue.open(path) for _ in range(workers)]
    done = 0

    async def drain(q: SqliteJobQueue, name: str) -> None:
        nonlocal done
        while (job := await q.claim(name)) is not None:
            await q.complete(job.id, name, {})
            done += 1

    try:
        for i in range(THROUGHPUT_JOBS):
            await bot.submit(JobKind.NOOP, 1, {"n": i})
        start = time.perf_counter()
        await asyncio.gather(*(drain(q, f"w{i}") for i, q in enumerate(queues)))
        elapsed = time.perf_counter() - start
    finally:
        for q in [bot, *queues]:
            await q.close()
    assert done == THROUGHPUT_JOBS
    return done / elapsed


async def sticker_latency(root: Path) -> tuple[list[float], list[float], int]:
    from pipeline.jobs import Resident
    from pipeline.queue.sqlite import SqliteJobQueue
    from pipeline.settings import load_settings
    from pipeline.stickers.generation import write_random_style
    from segmentation.synthetic import sticker_files

    settings = load_settings(preset="tiny", data_dir=root / "data", device="auto", dtype="auto")
    resident = await asyncio.to_thread(Resident.load, settings)
    write_random_style(resident.models.diffusion, resident.data.root / "styles" / "ready", seed=1)
    images = [resident.data.put_blob(png, suffix=".png")[0] for _, png in sticker_files(5, size=80)]
    queue = await SqliteJobQueue.from_settings(settings, max_queued_per_user=100)
    try:
        return await _measure_stickers(queue, resident, images, settings.lease_seconds)
    finally:
        await queue.close()


async def _measure_stickers(queue: SqliteJobQueue, resident: Resident, images: list[str],
                            lease_seconds: float) -> tuple[list[float], list[float], int]:
    from pipeline.queue.base import JobKind, JobState
    from pipeline.worker import Worker

    worker = Worker(queue, resident, data=resident.data, lease_seconds=lease_seconds)
    running = asyncio.create_task(worker.run())

    async def one_sticker(seed: int) -> float:
        job = await queue.submit(JobKind.STICKER, 2, {"style_id": "ready", "style_dir": "styles/ready",
                                                      "photo": images[0], "seed": seed, "variants": 1})
        start = time.perf_counter()
        while not (current := await queue.get(job.id)) or not current.state.finished:
            await queue.wait_for_change(0.5)
        assert current.state == JobState.SUCCEEDED, current.error
        return time.perf_counter() - start

    try:
        await one_sticker(0)  # warm-up: the adapter enters the cache
        idle = [await one_sticker(i) for i in range(1, STICKERS + 1)]
        train = await queue.submit(JobKind.TRAIN, 1, {"style_id": "bench", "images": images,
                                                      "class_noun": "cat", "steps": TRAIN_STEPS, "seed": 0})
        busy = []
        for i in range(STICKERS):
            while (t := await queue.get(train.id)) is None or t.state != JobState.RUNNING or t.progress <= 0:
                await queue.wait_for_change(0.5)
            await asyncio.sleep(0.5)  # well inside the training loop
            busy.append(await one_sticker(100 + i))
        step = int((await queue.get(train.id)).progress * TRAIN_STEPS)  # type: ignore[union-attr]
        await queue.cancel(train.id)
    finally:
        worker.request_stop()
        await running
    return idle, busy, step


def main() -> None:
    logging.getLogger().setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        p50, p99 = asyncio.run(submit_to_claim(root / "latency.sqlite3"))
        print(f"submit-to-claim latency (2 connections): p50 {p50:.1f} ms, p99 {p99:.1f} ms "
              f"(goal p50 < 20 ms) over {LATENCY_JOBS} jobs")
        one = asyncio.run(throughput(root / "t1.sqlite3", 1))
        two = asyncio.run(throughput(root / "t2.sqlite3", 2))
        print(f"claim+complete throughput: {one:.0f} jobs/s with 1 worker connection, {two:.0f} jobs/s "
              f"with 2 (goal >= 500) over {THROUGHPUT_JOBS} no-op jobs")
        idle, busy, step = asyncio.run(sticker_latency(root))
        mi, mb = statistics.median(idle), statistics.median(busy)
        print(f"sticker latency, tiny preset: idle worker median {mi:.2f} s {[round(x, 2) for x in idle]}; "
              f"while training median {mb:.2f} s {[round(x, 2) for x in busy]}; ratio {mb / mi:.2f}x "
              f"(goal <= 2x); the training job was at step {step}/{TRAIN_STEPS} when cancelled")


if __name__ == "__main__":
    main()
