"""The Celery backend against the embedded queue, side by side in one run, and what N GPU workers
would serve.

1. No-op job throughput, bot to worker and back: a burst of jobs submitted by the bot's queue
   object, run by one worker process, finished as the bot's ``events_since`` sees them. Embedded:
   ``stickerbot worker --kinds noop`` on the same SQLite file. Celery: one `celery worker` (solo
   pool) on a local redis-server, events back through the Redis stream.
2. Submit-to-start latency (submit until the job record says running, as the bot sees it),
   p50/p99 over jobs submitted one at a time.
3. A simulation of N GPU workers (each serving both queues, stickers first, training yielding at
   its next step): stickers/hour and training jobs/hour as N grows, from per-job GPU times plus
   the Celery overhead measured in 1-2. The GPU times come from ``python -m benchmarks gpu``'s
   JSON (``benchmarks/results/gpu.json``) when one exists, else from published figures cited
   below (:data:`PUBLISHED`); the output says which. Its table is what docs/scale-out.md shows.
"""

from __future__ import annotations

import asyncio
import heapq
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
BURST_JOBS = 300
LATENCY_JOBS = 60

# --- per-job GPU times for the simulation ----------------------------------------------------
GPU_RESULTS = ROOT / "benchmarks" / "results" / "gpu.json"  # written by python -m benchmarks gpu


@dataclass(frozen=True)
class GpuTimes:
    """Seconds per job on one GPU worker, and where they come from."""

    sticker_s: float  # one sticker, end to end (30 steps x strength 0.6, caption, cut-out)
    adapter_load_s: float  # a style not in the worker's adapter cache, loaded from disk
    train_s: float  # one style: 1000 LoRA steps (the default for a 10-image set) with prior
    source: str


# Used when no GPU run of this project exists yet.
PUBLISHED = GpuTimes(
    # fal-ai/stable-diffusion-benchmarks (GitHub, README: SD 1.5, 512 px, 50 steps, A100 80 GB
    # SXM): diffusers on torch 2.1 with SDPA ran 31.19 it/s (1.604 s per image). A sticker runs
    # 30 x 0.6 = 18 denoising steps at that rate; BLIP and SegFormer are assumed 0.3 s together.
    sticker_s=18 / 31.19 + 0.3,
    # Assumed: reading and injecting a rank-16 LoRA (12.8 MB in fp32) on the GPU.
    adapter_load_s=0.5,
    # "About 11 minutes per 1000 steps on one A100" for SD 1.5 DreamBooth-LoRA, a public
    # community report (no primary source at hand: a figure to replace with a measured one).
    train_s=11 * 60,
    source="published A100 figures (fal-ai/stable-diffusion-benchmarks; a DreamBooth-LoRA report)",
)


def gpu_times(path: Path = GPU_RESULTS) -> GpuTimes:
    """The measured times of ``python -m benchmarks gpu`` where its JSON exists (the eager path,
    the default), else :data:`PUBLISHED`."""
    import json

    if not path.is_file():
        return PUBLISHED
    try:
        run: dict[str, Any] = json.loads(path.read_text())
        sections = run["sections"]
        if run.get("tiny"):
            raise ValueError("a tiny-model test run")
        return GpuTimes(
            sticker_s=sections["stickers_eager"]["normal"]["total"]["p50_ms"] / 1000,
            adapter_load_s=sections["style_switch_eager"]["reload_from_disk"]["switch"]["p50_ms"] / 1000,
            train_s=float(sections["training"]["default (with prior)"]["s_per_1000_steps"]),
            source=f"measured by python -m benchmarks gpu on {run['card']} ({run['started']})",
        )
    except (ValueError, KeyError, TypeError) as exc:
        print(f"  {path} is not usable ({exc.__class__.__name__}: {exc}): published figures instead")
        return PUBLISHED


STICKERS_PER_STYLE = 20  # a user trains once, then makes this many stickers
PREEMPT_S = 2.0  # a training step plus writing a checkpoint when a sticker arrives (assumed)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(data_dir: Path, zoo: Path, redis_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STICKERBOT_")}
    env.update(STICKERBOT_PRESET="tiny", STICKERBOT_DATA_DIR=str(data_dir), STICKERBOT_TINY_ZOO_DIR=str(zoo),
               STICKERBOT_DEVICE="cpu", STICKERBOT_DTYPE="float32", STICKERBOT_REDIS_URL=redis_url,
               STICKERBOT_MAX_QUEUED_JOBS_PER_USER="100000",
               HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return env


def _spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as fh:
        return subprocess.Popen(args, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)


def _wait_for(path: Path, needle: str, proc: subprocess.Popen[bytes], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while needle not in path.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"worker did not start:\n{path.read_text(errors='replace')[-2000:]}")
        time.sleep(0.1)


async def _measure(queue, label: str) -> dict[str, float]:  # queue: a JobQueue
    from pipeline.queue.base import JobKind, JobState

    # 1. warm up (the worker's first job pays for imports and connections)
    job = await queue.submit(JobKind.NOOP, 1, {})
    await _wait_done(queue, {job.id}, timeout=60)
    # 2. a burst: throughput end to end
    start = time.perf_counter()
    ids = set()
    for i in range(BURST_JOBS):
        ids.add((await queue.submit(JobKind.NOOP, 2 + i % 50, {})).id)
    await _wait_done(queue, ids, timeout=300)
    throughput = BURST_JOBS / (time.perf_counter() - start)
    # 3. one at a time: submit-to-start latency as the bot sees it
    latencies = []
    for _ in range(LATENCY_JOBS):
        submitted = time.time()
        job = await queue.submit(JobKind.NOOP, 1, {})
        await _wait_done(queue, {job.id}, timeout=60)
        done = await queue.get(job.id)
        assert done is not None and done.state == JobState.SUCCEEDED and done.started_at is not None
        latencies.append(done.started_at - submitted)
    result = {"throughput": throughput, "p50": _pct(latencies, 0.5) * 1000,
              "p99": _pct(latencies, 0.99) * 1000}
    print(f"  {label:<9} {throughput:8.1f} jobs/s   submit->start p50 {result['p50']:6.1f} ms"
          f"   p99 {result['p99']:6.1f} ms", flush=True)
    return result


async def _wait_done(queue, ids: set[str], *, timeout: float) -> None:  # noqa: ASYNC109 - a deadline
    pending = set(ids)
    deadline = time.monotonic() + timeout
    cursor = 0.0
    while pending:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(pending)} jobs did not finish")
        events, cursor = await queue.events_since(cursor, wait=0.5)
        for event in events:
            if event.job.state.finished:
                pending.discard(event.job.id)


async def _embedded(tmp: Path, zoo: Path) -> dict[str, float]:
    from pipeline.queue.sqlite import SqliteJobQueue
    from pipeline.settings import load_settings

    data = tmp / "embedded"
    settings = load_settings(data_dir=data, preset="tiny", tiny_zoo_dir=zoo, max_queued_jobs_per_user=100000)
    queue = await SqliteJobQueue.from_settings(settings)
    proc = _spawn([sys.executable, "-m", "pipeline.cli", "worker", "--kinds", "noop"],
                  _env(data, zoo, "redis://unused"), tmp / "embedded-worker.log")
    try:
        return await _measure(queue, "embedded")
    finally:
        proc.terminate()
        proc.wait(30)
        await queue.close()


async def _celery(tmp: Path, zoo: Path, redis_server: str) -> dict[str, float]:
    from pipeline.queue.celery import CeleryJobQueue
    from pipeline.settings import load_settings

    port = _free_port()
    redis_proc = _spawn([redis_server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                         "--appendonly", "no", "--dir", str(tmp)], {}, tmp / "redis.log")
    url = f"redis://127.0.0.1:{port}/0"
    data = tmp / "celery"
    settings = load_settings(data_dir=data, preset="tiny", tiny_zoo_dir=zoo, queue_backend="celery",
                             redis_url=url, max_queued_jobs_per_user=100000)
    log = tmp / "celery-worker.log"
    worker = _spawn([sys.executable, "-m", "celery", "-A", "pipeline.celery_app", "worker", "--pool", "solo",
                     "--concurrency", "1", "--queues", "sticker,train", "--loglevel", "INFO",
                     "--without-gossip", "--without-mingle", "--without-heartbeat"],
                    _env(data, zoo, url), log)
    try:
        _wait_for(log, " ready.", worker)
        queue = await CeleryJobQueue.from_settings(settings)
        try:
            return await _measure(queue, "celery")
        finally:
            await queue.close()
    finally:
        worker.terminate()
        worker.wait(30)
        redis_proc.terminate()
        redis_proc.wait(10)


# --- the N-worker simulation -----------------------------------------------------------------


@dataclass
class SimResult:
    workers: int
    users_per_hour: float
    stickers_per_hour: float
    trainings_per_hour: float
    sticker_wait_p95: float
    training_turnaround_p50: float


def simulate(workers: int, *, overhead_s: float, times: GpuTimes = PUBLISHED, load: float = 0.8,
             hours: float = 12.0, seed: int = 0) -> SimResult:
    """Users arrive at random (Poisson) at ``load`` x the fleet's capacity; each trains a style,
    then asks for ``STICKERS_PER_STYLE`` stickers 30 s apart. Workers take stickers first; a
    training job yields to a waiting sticker at its next step (``PREEMPT_S``) and resumes later.
    Counts over the hours after the first (warm-up)."""
    rng = random.Random(seed)
    sticker_s = times.sticker_s + overhead_s
    per_user = times.train_s + overhead_s + STICKERS_PER_STYLE * sticker_s + times.adapter_load_s
    rate = load * workers * 3600 / per_user  # users per hour
    horizon, warmup = hours * 3600, 3600.0
    events: list[tuple[float, int, str, object]] = []  # (time, seq, kind, data)
    seq = 0

    def push(t: float, kind: str, data: object = None) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, data))

    t = 0.0
    while t < horizon:
        t += rng.expovariate(rate / 3600)
        push(t, "train", t)
    stickers: deque[float] = deque()  # arrival times
    trains: deque[list[float]] = deque()  # [remaining seconds, arrival]
    busy: list[dict[str, object] | None] = [None] * workers
    waits: list[float] = []
    turnarounds: list[float] = []
    done_stickers = done_trains = 0

    def start_next(w: int, now: float) -> None:
        if stickers:
            arrival = stickers.popleft()
            if arrival >= warmup:
                waits.append(now - arrival)
            busy[w] = {"kind": "sticker", "end": now + sticker_s + times.adapter_load_s / STICKERS_PER_STYLE}
            push(busy[w]["end"], "done", w)  # type: ignore[arg-type]
        elif trains:
            remaining, arrival = trains.popleft()
            busy[w] = {"kind": "train", "end": now + remaining, "arrival": arrival, "start": now}
            push(now + remaining, "done", w)
        else:
            busy[w] = None

    while events:
        now, _, kind, data = heapq.heappop(events)
        if now > horizon:
            break
        if kind == "train":
            trains.append([times.train_s + overhead_s, float(data)])  # type: ignore[arg-type]
        elif kind == "sticker":
            stickers.append(now)
            idle = [w for w in range(workers) if busy[w] is None]
            if not idle:
                training = [w for w in range(workers) if busy[w] is not None and busy[w]["kind"] == "train"]
                if training:  # the training job yields at its next step
                    w = training[0]
                    job = busy[w]
                    assert job is not None
                    left = float(job["end"]) - now + PREEMPT_S  # type: ignore[arg-type]
                    trains.appendleft([left, float(job["arrival"])])  # type: ignore[arg-type]
                    busy[w] = {"kind": "preempting", "end": now + PREEMPT_S}
                    push(now + PREEMPT_S, "done", w)
                continue
        elif kind == "done":
            w = int(data)  # type: ignore[arg-type]
            job = busy[w]
            if job is None or abs(float(job["end"]) - now) > 1e-9:  # type: ignore[arg-type]
                continue  # a stale completion of a preempted run
            if job["kind"] == "sticker" and now >= warmup:
                done_stickers += 1
            elif job["kind"] == "train":
                if now >= warmup:
                    done_trains += 1
                    turnarounds.append(now - float(job["arrival"]))  # type: ignore[arg-type]
                for k in range(STICKERS_PER_STYLE):
                    push(now + 30.0 * k + rng.uniform(5, 25), "sticker")
            busy[w] = None
        for w in range(workers):
            if busy[w] is None and (stickers or trains):
                start_next(w, now)
    span = (horizon - warmup) / 3600
    return SimResult(workers, rate, done_stickers / span, done_trains / span,
                     _pct(waits, 0.95) if waits else 0.0,
                     statistics.median(turnarounds) if turnarounds else float("nan"))


def simulation_table(overhead_s: float, times: GpuTimes = PUBLISHED) -> str:
    ceiling = 3600 / (times.sticker_s + overhead_s)
    rows = ["| GPU workers | stickers/h, stickers only | users/h offered (mixed) | stickers/h | "
            "trainings/h | sticker wait p95 | training turnaround p50 |",
            "|---:|---:|---:|---:|---:|---:|---:|"]
    for n in (1, 2, 4, 8, 16):
        r = simulate(n, overhead_s=overhead_s, times=times)
        rows.append(f"| {n} | {n * ceiling:.0f} | {r.users_per_hour:.1f} | {r.stickers_per_hour:.0f} | "
                    f"{r.trainings_per_hour:.1f} | {r.sticker_wait_p95:.1f} s | "
                    f"{r.training_turnaround_p50 / 60:.1f} min |")
    rows.append("")
    rows.append(f"One worker doing nothing but stickers: {ceiling:.0f} stickers/h; nothing but "
                f"training: {3600 / (times.train_s + overhead_s):.1f} trainings/h. Capacity grows "
                f"linearly with N: the queue adds {overhead_s * 1000:.0f} ms per job.")
    return "\n".join(rows)


def main() -> None:
    from pipeline.architectures import TINY
    from pipeline.zoo import build_zoo

    redis_server = shutil.which("redis-server")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        zoo = build_zoo(tmp / "zoo", TINY)
        print(f"no-op jobs: a burst of {BURST_JOBS}, then {LATENCY_JOBS} one at a time; one worker process")
        embedded = asyncio.run(_embedded(tmp, zoo))
        if redis_server is None:
            print("  celery    skipped: redis-server is not installed (apt-get install redis-server)")
            overhead = 1 / embedded["throughput"]
        else:
            celery = asyncio.run(_celery(tmp, zoo, redis_server))
            print(f"  celery/embedded: throughput x{celery['throughput'] / embedded['throughput']:.2f}, "
                  f"submit->start p50 x{celery['p50'] / max(embedded['p50'], 1e-9):.2f}")
            # Per-job queue cost on a worker: the burst's time per job plus the start latency.
            overhead = 1 / celery["throughput"] + celery["p50"] / 1000
    times = gpu_times()
    print(f"\nN GPU workers (simulated, sticker {times.sticker_s:.2f} s, training "
          f"{times.train_s / 60:.0f} min per job on the GPU, {STICKERS_PER_STYLE} stickers per style, "
          f"load 80% of capacity, "
          f"measured queue overhead {overhead * 1000:.0f} ms/job; GPU times: {times.source}):")
    print(simulation_table(overhead, times))


if __name__ == "__main__":
    main()
