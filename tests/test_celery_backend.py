"""The Celery backend against a real redis-server and real `celery worker` subprocesses.

Each test module run starts its own redis-server on a free loopback port; the workers are
`python -m celery -A pipeline.celery_app worker --pool solo` with the tiny preset, reading their
settings from the environment like a deployed worker.
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
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import redis

from pipeline.errors import QueueUnavailableError
from pipeline.queue.base import Job, JobKind, JobState
from pipeline.queue.celery import CeleryJobQueue, job_key
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
             "--appendonly", "no", "--dir", str(self.directory)],
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

    def wait_ready(self, timeout: float = 60) -> None:
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


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def celery_settings(tiny_settings: Settings, redis_server: RedisServer) -> Settings:
    redis.Redis.from_url(redis_server.url).flushall()
    return load_settings(**{**tiny_settings.model_dump(), "queue_backend": "celery",
                            "redis_url": redis_server.url, "max_queued_jobs_per_user": 1000,
                            "lease_seconds": 2.0})


@pytest.fixture
def worker_env(tiny_env: dict[str, str], celery_settings: Settings) -> dict[str, str]:
    env = dict(tiny_env)
    env.update(STICKERBOT_QUEUE_BACKEND="celery", STICKERBOT_REDIS_URL=celery_settings.redis_url,
               STICKERBOT_LEASE_SECONDS=str(celery_settings.lease_seconds),
               STICKERBOT_CELERY_VISIBILITY_TIMEOUT="300", PYTHONPATH=str(ROOT))
    return env


@pytest.fixture
def start_worker(worker_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    workers: list[Worker] = []

    def start(name: str, *, wait: bool = True, **env: str) -> Worker:
        worker = Worker(name, {**worker_env, **env}, tmp_path / f"{name}-{len(workers)}.log")
        workers.append(worker)
        if wait:
            worker.wait_ready()
        return worker

    yield start
    for worker in workers:
        worker.stop(signal.SIGKILL)


@pytest.fixture
async def queue(celery_settings: Settings) -> AsyncIterator[CeleryJobQueue]:
    q = await CeleryJobQueue.from_settings(celery_settings)
    yield q
    await q.close()


async def wait_finished(queue: CeleryJobQueue, job_ids: list[str], *, timeout: float) -> dict[str, Job]:
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


async def test_two_workers_run_100_noop_jobs_each_exactly_once(queue: CeleryJobQueue,
                                                                start_worker, celery_settings) -> None:
    w1, w2 = start_worker("w1", wait=False), start_worker("w2", wait=False)
    w1.wait_ready()
    w2.wait_ready()
    jobs = [await queue.submit(JobKind.NOOP, user_id=1 + i % 7, payload={"sleep": 0.01})
            for i in range(100)]
    ids = [j.id for j in jobs]
    assert len(set(ids)) == 100
    final = await wait_finished(queue, ids, timeout=60)
    r = redis.Redis.from_url(celery_settings.redis_url)
    assert all(j.state == JobState.SUCCEEDED for j in final.values()), [
        j for j in final.values() if j.state != JobState.SUCCEEDED][:3]
    assert all(j.attempts == 1 for j in final.values())
    # Each job was started exactly once across both workers (the worker counts every start).
    assert [int(r.get(job_key(i, "attempts")) or 0) for i in ids] == [1] * 100
    assert len({j.worker_id for j in final.values()}) == 2, "both workers took jobs"
    for job_id in ids:
        stored = await queue.get(job_id)
        assert stored is not None and stored.result == {} and stored.finished_at is not None


async def test_redis_down_at_submit_refuses_without_losing_anything(
        tmp_path: Path, tiny_settings: Settings, tiny_env: dict[str, str]) -> None:
    server = RedisServer(tmp_path / "redis-outage")
    server.start()
    settings = load_settings(**{**tiny_settings.model_dump(), "queue_backend": "celery",
                                "redis_url": server.url, "max_queued_jobs_per_user": 100})
    queue = await CeleryJobQueue.from_settings(settings)
    env = {**tiny_env, "STICKERBOT_QUEUE_BACKEND": "celery", "STICKERBOT_REDIS_URL": server.url,
           "PYTHONPATH": str(ROOT)}
    worker = Worker("outage", env, tmp_path / "outage.log")
    try:
        worker.wait_ready()
        before = await queue.submit(JobKind.NOOP, user_id=5, payload={})
        assert (await wait_finished(queue, [before.id], timeout=30))[before.id].state == JobState.SUCCEEDED

        server.stop()
        with pytest.raises(QueueUnavailableError, match="try again"):
            await queue.submit(JobKind.NOOP, user_id=5, payload={})
        # Nothing was written for the refused job; the earlier one is intact.
        jobs = await queue.list_for_user(5)
        assert [j.id for j in jobs] == [before.id]
        assert jobs[0].state == JobState.SUCCEEDED and await queue.undelivered() == [jobs[0]]

        server.start()  # Redis is back: the worker reconnects, new jobs flow again
        deadline = time.monotonic() + 30
        while True:
            try:
                after = await queue.submit(JobKind.NOOP, user_id=5, payload={})
                break
            except QueueUnavailableError:
                assert time.monotonic() < deadline, "Redis came back but submits still fail"
                await asyncio.sleep(0.2)
        final = await wait_finished(queue, [after.id], timeout=45)
        assert final[after.id].state == JobState.SUCCEEDED
        assert len(await queue.list_for_user(5)) == 2
    finally:
        worker.stop(signal.SIGKILL)
        await queue.close()
        server.stop()
