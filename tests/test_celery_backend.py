"""The Celery backend against a real redis-server and real `celery worker` subprocesses.

The module starts one redis-server on a free loopback port (append-only file on, as deployed, so
an outage loses no queued message) and two workers, `python -m celery -A pipeline.celery_app
worker --pool solo` with the tiny preset, reading their settings from the environment like a
deployed worker and sharing one data dir with the bot. The tests run in file order: the crash
test replaces a worker, so it comes last.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from bot_harness import bot_settings, picture, running_bot
from conftest import TEST_TOKEN
from fake_bot_api import FakeBotAPI, user

from pipeline.errors import QueueUnavailableError
from pipeline.queue.base import Job, JobKind, JobState
from pipeline.queue.celery import EVENTS_STREAM, CeleryJobQueue, job_key
from pipeline.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
REDIS_SERVER = shutil.which("redis-server")

pytestmark = pytest.mark.skipif(
    REDIS_SERVER is None, reason="redis-server is not installed (apt-get install redis-server)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A throw-away redis-server; ``stop``/``start`` keep the port (an outage and its end)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert REDIS_SERVER is not None
        self.directory.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


class Worker:
    """One `celery worker` subprocess; its log is kept for the assertion messages."""

    def __init__(self, name: str, env: dict[str, str], log_path: Path, queues: str = "sticker,train") -> None:
        self.name = name
        self.log_path = log_path
        self.log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "pipeline.celery_app", "worker", "--pool", "solo",
             "--concurrency", "1", "--queues", queues, "--hostname", f"{name}@%h", "--loglevel", "INFO",
             "--without-gossip", "--without-mingle", "--without-heartbeat"],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while " ready." not in self.text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"worker {self.name} did not start:\n{self.text()[-3000:]}")
            time.sleep(0.1)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


@dataclass
class Cluster:
    redis: RedisServer
    settings: Settings  # the bot's: celery backend, the shared data dir
    env: dict[str, str]  # the workers'
    log_dir: Path
    workers: list[Worker] = field(default_factory=list)

    def start_worker(self, name: str, *, wait: bool = True, **env: str) -> Worker:
        worker = Worker(name, {**self.env, **env}, self.log_dir / f"{name}.log")
        self.workers.append(worker)
        if wait:
            worker.wait_ready()
        return worker

    def worker_running(self, job: Job) -> Worker:
        pid = int(str(job.worker_id).rsplit("/", 1)[1])
        return next(w for w in self.workers if w.pid == pid)

    def logs(self) -> str:
        return "\n".join(f"--- {w.name}\n{w.text()[-2000:]}" for w in self.workers)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, tiny_zoo: Path) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("celery")
    server = RedisServer(root / "redis")
    server.start()
    settings = load_settings(preset="tiny", data_dir=root / "data", tiny_zoo_dir=tiny_zoo, device="cpu",
                             dtype="float32", queue_backend="celery", redis_url=server.url,
                             max_queued_jobs_per_user=1000, lease_seconds=2.0)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("STICKERBOT_") and k not in ("BOT_TOKEN", "TELEGRAM_API_BASE")}
    env.update(STICKERBOT_PRESET="tiny", STICKERBOT_DATA_DIR=str(settings.data_dir),
               STICKERBOT_TINY_ZOO_DIR=str(tiny_zoo), STICKERBOT_DEVICE="cpu", STICKERBOT_DTYPE="float32",
               STICKERBOT_QUEUE_BACKEND="celery", STICKERBOT_REDIS_URL=server.url,
               STICKERBOT_LEASE_SECONDS="2", STICKERBOT_CELERY_VISIBILITY_TIMEOUT="300",
               HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT),
               # Tiny models run several times faster on one thread than contending for two.
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    c = Cluster(server, settings, env, root)
    try:
        w1, w2 = c.start_worker("w1", wait=False), c.start_worker("w2", wait=False)
        w1.wait_ready()
        w2.wait_ready()
        yield c
    finally:
        for worker in c.workers:
            worker.stop(signal.SIGKILL)
        server.stop()


@pytest.fixture
async def queue(cluster: Cluster) -> AsyncIterator[CeleryJobQueue]:
    q = await CeleryJobQueue.from_settings(cluster.settings)
    yield q
    await q.close()


async def wait_finished(queue: CeleryJobQueue, job_ids: list[str], *,
                        timeout: float) -> dict[str, Job]:  # noqa: ASYNC109 - a test deadline
    """Follow ``events_since`` (as the bot does) until every job finished."""
    cursor, final = 0.0, {}
    deadline = time.monotonic() + timeout
    while len(final) < len(job_ids):
        if time.monotonic() > deadline:
            pending = [await queue.get(j) for j in job_ids if j not in final]
            raise AssertionError(f"{len(pending)} job(s) not finished: {pending[:3]}")
        events, cursor = await queue.events_since(cursor, wait=1.0)
        for event in events:
            if event.job.id in job_ids and event.job.state.finished:
                final[event.job.id] = event.job
    return final


def store_sticker_set(settings: Settings, name: str, n: int = 3) -> list[str]:
    paths = []
    for i in range(n):
        rel = f"blobs/{name}-{i}.png"
        (settings.data_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (settings.data_dir / rel).write_bytes(picture(100 + i, alpha=True))
        paths.append(rel)
    return paths


async def test_bot_trains_and_draws_on_celery_workers_and_survives_a_redis_outage(cluster: Cluster) -> None:
    fake = FakeBotAPI(TEST_TOKEN)
    await fake.start()
    settings = bot_settings(cluster.settings, fake, TEST_TOKEN)
    try:
        async with running_bot(settings) as app:
            assert type(app.ctx.queue).__name__ == "CeleryJobQueue"
            ann = user(70)
            # 1. a sticker set, then training on a Celery worker
            for i in range(3):
                fid = fake.add_file(picture(i, fmt="WEBP"), kind="stickers", suffix=".webp")
                fake.send_sticker(ann, fid)
                await fake.wait_text(70, f"has {i + 1} usable")
            fake.send_text(ann, "/train")
            await fake.wait_text(70, "What do your stickers show?")
            fake.send_text(ann, "cat")
            await fake.wait_text(70, "is queued")
            await fake.wait_text(70, "is ready and active", timeout=300)
            style = (await app.ctx.repo.list_styles(70, status="ready"))[0]
            assert (settings.data_dir / style.style_dir / "style.json").is_file()
            train_job = (await app.ctx.queue.list_for_user(70))[0]
            assert train_job.kind == JobKind.TRAIN and train_job.state == JobState.SUCCEEDED
            assert train_job.attempts == 1 and train_job.result["steps"] > 0
            assert "/" in str(train_job.worker_id)  # a Celery worker ran it, not this process
            # 2. a photo becomes a sticker drawn on a worker and sent back
            fake.send_photo(ann, fake.add_file(picture(9, fmt="JPEG")))
            await fake.wait_for(lambda c: c.method == "sendSticker", timeout=90)
            jobs = await app.ctx.queue.list_for_user(70)
            assert [j.kind for j in jobs] == [JobKind.STICKER, JobKind.TRAIN]
            assert jobs[0].state == JobState.SUCCEEDED
            sticker_path = settings.data_dir / jobs[0].result["stickers"][0]["path"]
            assert sticker_path.read_bytes()[8:12] == b"WEBP"

            # 3. Redis goes down: the user hears "try again", nothing in the database changes
            cluster.redis.stop()
            start = len(fake.calls)
            fake.send_photo(ann, fake.add_file(picture(10, fmt="JPEG")))
            await fake.wait_text(70, "queue is unavailable", start=start, timeout=30)
            assert [j.id for j in await app.ctx.queue.list_for_user(70)] == [j.id for j in jobs]
            assert (await app.ctx.repo.get_style(style.id)).status == "ready"

            # 4. Redis is back: new jobs flow again
            cluster.redis.start()
            sent = len(fake.calls_to("sendSticker", 70))
            deadline = time.monotonic() + 60
            while len(fake.calls_to("sendSticker", 70)) == sent:
                assert time.monotonic() < deadline, cluster.logs()
                start = len(fake.calls)
                fake.send_photo(ann, fake.add_file(picture(11, fmt="JPEG")))
                await fake.wait_for(lambda c: c.method in ("sendSticker", "editMessageText", "sendMessage")
                                    and ("unavailable" in c.text or c.method == "sendSticker"),
                                    start=start, timeout=60)
            final = await app.ctx.queue.list_for_user(70)
            assert final[0].kind == JobKind.STICKER and final[0].state == JobState.SUCCEEDED
    finally:
        await fake.close()


async def test_two_workers_run_100_noop_jobs_each_exactly_once(queue: CeleryJobQueue,
                                                                cluster: Cluster) -> None:
    jobs = [await queue.submit(JobKind.NOOP, user_id=1000 + i % 7, payload={"sleep": 0.01})
            for i in range(100)]
    ids = [j.id for j in jobs]
    assert len(set(ids)) == 100
    final = await wait_finished(queue, ids, timeout=90)
    r = redis.Redis.from_url(cluster.settings.redis_url)
    assert all(j.state == JobState.SUCCEEDED for j in final.values()), [
        j for j in final.values() if j.state != JobState.SUCCEEDED][:3]
    assert all(j.attempts == 1 for j in final.values())
    # Each job was started exactly once across both workers (the worker counts every start).
    assert [int(r.get(job_key(i, "attempts")) or 0) for i in ids] == [1] * 100
    assert len({j.worker_id for j in final.values()}) == 2, "both workers took jobs"
    for job_id in ids:
        stored = await queue.get(job_id)
        assert stored is not None and stored.result == {} and stored.finished_at is not None


def test_doctor_check_lists_the_live_workers(cluster: Cluster) -> None:
    from pipeline.celery_app import check_broker

    ok, text = check_broker(cluster.settings, within=3.0)
    assert ok, text
    assert "w1@" in text and "w2@" in text and "sticker 0" in text


async def test_redis_down_at_submit_raises_and_writes_nothing(queue: CeleryJobQueue,
                                                               cluster: Cluster) -> None:
    before = await queue.counts()
    cluster.redis.stop()
    try:
        with pytest.raises(QueueUnavailableError, match="try again"):
            await queue.submit(JobKind.NOOP, user_id=77, payload={})
        assert await queue.list_for_user(77) == []
        assert await queue.counts() == before
    finally:
        cluster.redis.start()
    job = await queue.submit(JobKind.NOOP, user_id=77, payload={})
    assert (await wait_finished(queue, [job.id], timeout=60))[job.id].state == JobState.SUCCEEDED


async def test_a_job_whose_message_never_left_is_sent_when_the_bot_starts(cluster: Cluster) -> None:
    from pipeline.queue.sqlite import SqliteJobQueue

    # The bot died between writing the record and sending the task: a record, no message. No
    # bot runs until it starts again below, so nothing else may send it meanwhile (a running
    # bot's event reader would, rightly, the first time it sees a Redis without its data).
    r = redis.Redis.from_url(cluster.settings.redis_url)
    died = await SqliteJobQueue.from_settings(cluster.settings)
    try:
        job = await died.submit(JobKind.NOOP, user_id=91, payload={})
    finally:
        await died.close()
    assert not r.exists(job_key(job.id, "sent"))
    restarted = await CeleryJobQueue.from_settings(cluster.settings)  # the bot starts again
    # Starting sent it: the message has left before from_settings returns.
    assert r.exists(job_key(job.id, "sent"))
    try:
        final = (await wait_finished(restarted, [job.id], timeout=60))[job.id]
        assert final.state == JobState.SUCCEEDED and final.attempts == 1
        assert await restarted.resend_unsent() == []  # sent once, marked
        sent = await restarted.submit(JobKind.NOOP, user_id=91, payload={"sleep": 2})
        assert r.exists(job_key(sent.id, "sent"))
        assert await restarted.resend_unsent() == []  # a message that left is not sent again
    finally:
        await restarted.close()


async def test_queued_jobs_are_sent_again_when_redis_comes_back_without_its_data(
        queue: CeleryJobQueue, cluster: Cluster) -> None:
    r = redis.Redis.from_url(cluster.settings.redis_url)
    # Both workers busy for a few seconds, so the next job's message waits in Redis.
    busy = [await queue.submit(JobKind.NOOP, user_id=93, payload={"sleep": 4}) for _ in range(2)]
    deadline = time.monotonic() + 30
    while not all([(await queue.get(j.id)).state == JobState.RUNNING for j in busy]):
        assert time.monotonic() < deadline, cluster.logs()
        await asyncio.sleep(0.1)
    waiting = await queue.submit(JobKind.NOOP, user_id=93, payload={})
    assert r.exists(job_key(waiting.id, "sent"))
    # Redis loses everything (a restart without persistence, a failover to an empty replica):
    # the waiting message, the sent marks, the event stream and the bot's reader group.
    r.flushall()
    final = await wait_finished(queue, [*(j.id for j in busy), waiting.id], timeout=60)
    assert final[waiting.id].state == JobState.SUCCEEDED and final[waiting.id].attempts == 1, cluster.logs()
    assert all(final[j.id].state == JobState.SUCCEEDED for j in busy)
    assert r.exists(job_key(waiting.id, "sent"))  # marked again when it was sent again


async def test_cancel_stops_a_running_job_on_its_worker(queue: CeleryJobQueue, cluster: Cluster) -> None:
    job = await queue.submit(JobKind.NOOP, user_id=88, payload={"sleep": 60})
    cursor, deadline = 0.0, time.monotonic() + 30
    while (await queue.get(job.id)).state != JobState.RUNNING:
        assert time.monotonic() < deadline
        _events, cursor = await queue.events_since(cursor, wait=0.5)
    asked = time.monotonic()
    cancelling = await queue.cancel(job.id, user_id=88)
    assert cancelling.cancel_requested and cancelling.state == JobState.RUNNING
    final = (await wait_finished(queue, [job.id], timeout=30))[job.id]
    assert final.state == JobState.CANCELLED and final.error == "cancelled by its owner"
    assert time.monotonic() - asked < 10, "the worker's cancel check stops a job within seconds"


async def test_sigterm_gives_the_running_job_back_at_once(queue: CeleryJobQueue, cluster: Cluster) -> None:
    job = await queue.submit(JobKind.NOOP, user_id=89, payload={"sleep": 6})
    cursor, deadline = 0.0, time.monotonic() + 30
    while (running := await queue.get(job.id)).state != JobState.RUNNING:
        assert time.monotonic() < deadline
        _events, cursor = await queue.events_since(cursor, wait=0.5)
    stopping = cluster.worker_running(running)
    stopping.proc.send_signal(signal.SIGTERM)  # warm shutdown: the job yields at its next step
    assert stopping.proc.wait(30) == 0
    final = (await wait_finished(queue, [job.id], timeout=60))[job.id]
    assert final.state == JobState.SUCCEEDED
    assert final.worker_id != running.worker_id  # finished by the other worker
    assert final.attempts == 1  # a graceful stop does not count as an attempt
    r = redis.Redis.from_url(cluster.settings.redis_url)
    kinds = [f[b"type"].decode() for _id, f in r.xrange(EVENTS_STREAM) if f[b"job_id"].decode() == job.id]
    assert kinds.count("released") == 1 and kinds.count("started") == 2 and kinds.count("succeeded") == 1


async def test_sigkilled_worker_job_is_redelivered_resumes_and_completes_once(
        queue: CeleryJobQueue, cluster: Cluster) -> None:
    style_id = "crash-style"
    payload = {"style_id": style_id, "images": store_sticker_set(cluster.settings, "crash"),
               "class_noun": "cat", "steps": 40, "seed": 3}
    job = await queue.submit(JobKind.TRAIN, user_id=300, payload=payload)
    # 1. wait until training is a good way in (a checkpoint every 2 steps on the tiny preset)
    cursor, deadline = 0.0, time.monotonic() + 120
    running = None
    while running is None:
        assert time.monotonic() < deadline, cluster.logs()
        events, cursor = await queue.events_since(cursor, wait=1.0)
        for event in events:
            if event.job.id == job.id and event.job.state == JobState.RUNNING and event.job.progress >= 0.25:
                running = event.job
    checkpoint = cluster.settings.data_dir / "checkpoints" / job.id
    assert checkpoint.is_dir() and any(checkpoint.iterdir())
    # 2. SIGKILL the worker that runs it; a replacement with a short visibility timeout takes the
    #    unacknowledged message back from Redis
    victim = cluster.worker_running(running)
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(10)
    cluster.start_worker("w3", STICKERBOT_CELERY_VISIBILITY_TIMEOUT="3")
    final = (await wait_finished(queue, [job.id], timeout=150))[job.id]
    assert final.state == JobState.SUCCEEDED, (final.error, cluster.logs())
    # 3. redelivered (2 attempts), resumed from the checkpoint, completed once
    assert final.attempts == 2
    assert final.result["resumed_from"] > 0
    assert final.result["steps"] == 40
    assert final.worker_id != running.worker_id
    r = redis.Redis.from_url(cluster.settings.redis_url)
    events = [fields for _id, fields in r.xrange(EVENTS_STREAM)
              if fields[b"job_id"].decode() == job.id]
    kinds = [e[b"type"].decode() for e in events]
    assert kinds.count("succeeded") == 1 and kinds.count("started") == 2
    assert (cluster.settings.data_dir / "styles" / style_id / "style.json").is_file()
    assert not checkpoint.exists()


@pytest.mark.slow
async def test_a_sticker_preempts_training_on_a_busy_worker(queue: CeleryJobQueue, cluster: Cluster) -> None:
    """One worker serving both queues: a sticker submitted during a long training run is drawn
    within seconds; the training job steps aside (checkpoint, back to the queue) and goes on
    before a training job submitted after it (the order the bot reports positions in)."""
    alive = [w for w in cluster.workers if w.proc.poll() is None]
    for extra in alive[1:]:
        extra.stop(signal.SIGTERM)
    if not alive:
        cluster.start_worker("w4")
    # 1. a small style to draw with
    style = await queue.submit(JobKind.TRAIN, user_id=400, payload={
        "style_id": "preempt-style", "images": store_sticker_set(cluster.settings, "preempt"),
        "class_noun": "cat", "steps": 4, "seed": 1})
    assert (await wait_finished(queue, [style.id], timeout=120))[style.id].state == JobState.SUCCEEDED
    # 2. a long training run, then a sticker
    long_run = await queue.submit(JobKind.TRAIN, user_id=401, payload={
        "style_id": "long-style", "images": store_sticker_set(cluster.settings, "long"),
        "class_noun": "cat", "steps": 400, "seed": 2})
    cursor, deadline = 0.0, time.monotonic() + 120
    while not ((job := await queue.get(long_run.id)).state == JobState.RUNNING and job.progress > 0.01):
        assert time.monotonic() < deadline, cluster.logs()
        _events, cursor = await queue.events_since(cursor, wait=0.5)
    later = await queue.submit(JobKind.TRAIN, user_id=403, payload={
        "style_id": "later-style", "images": store_sticker_set(cluster.settings, "later"),
        "class_noun": "cat", "steps": 4, "seed": 3})
    assert (await queue.position(later.id)).position == 1
    photo = "blobs/preempt-photo.png"
    (cluster.settings.data_dir / photo).write_bytes(picture(42))
    asked = time.monotonic()
    sticker = await queue.submit(JobKind.STICKER, user_id=402, payload={
        "style_id": "preempt-style", "style_dir": "styles/preempt-style", "photo": photo, "seed": 5,
        "variants": 1})
    done = (await wait_finished(queue, [sticker.id], timeout=120))[sticker.id]
    waited = time.monotonic() - asked
    assert done.state == JobState.SUCCEEDED, done.error
    long_now = await queue.get(long_run.id)
    assert not long_now.state.finished, "the sticker did not wait for the whole training run"
    r = redis.Redis.from_url(cluster.settings.redis_url)
    kinds = [f[b"type"].decode() for _id, f in r.xrange(EVENTS_STREAM)
             if f[b"job_id"].decode() == long_run.id]
    assert "released" in kinds, kinds
    print(f"sticker done {waited:.1f} s after it was submitted during training")
    # 3. the preempted run goes on first; the later training job still waits its turn
    deadline = time.monotonic() + 60
    while (await queue.get(long_run.id)).state != JobState.RUNNING:
        assert time.monotonic() < deadline, cluster.logs()
        assert (await queue.get(later.id)).state == JobState.QUEUED, "the later job went first"
        _events, cursor = await queue.events_since(cursor, wait=0.5)
    assert (await queue.get(later.id)).state == JobState.QUEUED
    await queue.cancel(long_run.id)
    final = (await wait_finished(queue, [long_run.id], timeout=120))[long_run.id]
    assert final.state == JobState.CANCELLED
    assert (await wait_finished(queue, [later.id], timeout=120))[later.id].state == JobState.SUCCEEDED
    assert not (cluster.settings.data_dir / "styles" / "long-style").exists()
