"""The Celery backend's parts that need no broker: configuration, the event-applying code on a
real SQLite file, the bot-side import weight, and the operations module (metrics, JSON logs)."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from conftest import TEST_TOKEN
from prometheus_client import CollectorRegistry, generate_latest

from pipeline.celery_app import (
    DEFAULT_VISIBILITY_TIMEOUT,
    check_broker,
    create_app,
    job_from_message,
)
from pipeline.errors import CancelledError, ConfigError, ImageError, StyleError
from pipeline.monitoring import (
    Metrics,
    configure_logging,
    failure_reason,
    job_context,
    redact,
    start_metrics_server,
)
from pipeline.queue.base import JobKind, JobState
from pipeline.queue.celery import QUEUE_FOR_KIND, TASK_NAME, CeleryJobQueue, message_priority, task_message
from pipeline.queue.sqlite import SqliteJobQueue
from pipeline.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent


def test_app_delivers_at_least_once_one_job_at_a_time(tiny_settings: Settings) -> None:
    app = create_app(tiny_settings)
    conf = app.conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1 and conf.worker_concurrency == 1
    assert conf.worker_pool == "solo"
    options = conf.broker_transport_options
    assert options["visibility_timeout"] == DEFAULT_VISIBILITY_TIMEOUT >= 3600
    assert options["queue_order_strategy"] == "priority"  # sticker before train, not round robin
    assert TASK_NAME in app.tasks
    assert conf.broker_url == tiny_settings.redis_url
    assert set(QUEUE_FOR_KIND.values()) == {"sticker", "train"}


def test_doctor_check_names_an_unreachable_redis_without_its_password(tiny_settings: Settings) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    settings = tiny_settings.model_copy(update={"redis_url": f"redis://:s3cret@127.0.0.1:{port}/0"})
    ok, text = check_broker(settings, within=1.0)
    assert not ok and "cannot be reached" in text and f"127.0.0.1:{port}" in text
    assert "s3cret" not in text


def test_visibility_timeout_is_a_setting(monkeypatch: pytest.MonkeyPatch, tiny_settings: Settings) -> None:
    monkeypatch.setenv("STICKERBOT_CELERY_VISIBILITY_TIMEOUT", "7200")
    settings = load_settings(data_dir=tiny_settings.data_dir)
    assert settings.celery_visibility_timeout == 7200
    assert create_app(settings).conf.broker_transport_options["visibility_timeout"] == 7200
    monkeypatch.setenv("STICKERBOT_CELERY_VISIBILITY_TIMEOUT", "-1")
    with pytest.raises(ConfigError, match="STICKERBOT_CELERY_VISIBILITY_TIMEOUT"):
        load_settings()


def test_message_priorities_put_stickers_and_resumed_training_first() -> None:
    """Kombu's Redis transport serves priority 0 first: stickers and training that already ran
    part-way go there, new training jobs behind them."""
    from dataclasses import replace

    sticker = job_from_message({"id": "s", "kind": "sticker", "user_id": 1, "priority": 10}, attempt=0)
    train = job_from_message({"id": "t", "kind": "train", "user_id": 1}, attempt=0)
    assert message_priority(sticker) == 0
    assert message_priority(train) > 0
    assert message_priority(replace(train, progress=0.3)) == 0


def test_task_message_round_trips_to_the_job_a_handler_sees() -> None:
    from pipeline.queue.base import Job

    job = Job(id="j1", kind=JobKind.TRAIN, state=JobState.QUEUED, user_id=7, priority=0,
              payload={"style_id": "s", "images": ["blobs/a.png"], "steps": 3, "seed": 1, "class_noun": None},
              attempts=0, max_attempts=3, worker_id=None, lease_expires_at=None, cancel_requested=False,
              progress=0.0, progress_message="", result=None, error=None, created_at=1.0, started_at=None,
              finished_at=None, updated_at=1.0)
    message = json.loads(json.dumps(task_message(job)))  # what travels through Redis
    seen = job_from_message(message, attempt=2)
    assert (seen.id, seen.kind, seen.user_id, seen.payload, seen.attempts, seen.max_attempts) == (
        "j1", JobKind.TRAIN, 7, job.payload, 2, 3)


async def test_worker_events_apply_to_the_record_idempotently(tmp_path: Path) -> None:
    db = tmp_path / "jobs.sqlite3"
    plain = await SqliteJobQueue.open(db)
    # The event reader's Redis is never contacted here: events are applied directly.
    queue = await CeleryJobQueue.open(db, redis_url="redis://127.0.0.1:1/0", celery_app=None)
    try:
        job = await plain.submit(JobKind.TRAIN, 5, {"style_id": "s"})
        await queue.apply_event({"type": "started", "job_id": job.id, "worker": "a/1", "attempt": "1"})
        await queue.apply_event({"type": "progress", "job_id": job.id, "worker": "a/1",
                                 "fraction": "0.5", "message": "step 5/10"})
        got = await queue.get(job.id)
        assert (got.state, got.attempts, got.worker_id, got.progress) == (JobState.RUNNING, 1, "a/1", 0.5)
        # the reader re-applies an event after a crash: nothing moves
        await queue.apply_event({"type": "started", "job_id": job.id, "worker": "a/1", "attempt": "1"})
        assert (await queue.get(job.id)).progress == 0.5
        # worker a/1 died; the redelivered job starts on b/2 as attempt 2; a/1's late events are stale
        await queue.apply_event({"type": "started", "job_id": job.id, "worker": "b/2", "attempt": "2"})
        await queue.apply_event({"type": "succeeded", "job_id": job.id, "worker": "a/1", "result": "{}"})
        got = await queue.get(job.id)
        assert (got.state, got.attempts, got.worker_id) == (JobState.RUNNING, 2, "b/2")
        await queue.apply_event({"type": "succeeded", "job_id": job.id, "worker": "b/2",
                                 "result": json.dumps({"steps": 10})})
        await queue.apply_event({"type": "failed", "job_id": job.id, "worker": "b/2", "error": "late"})
        got = await queue.get(job.id)
        assert (got.state, got.result, got.error) == (JobState.SUCCEEDED, {"steps": 10}, None)
        # a released (preempted) job goes back to the queue with its attempt given back
        other = await plain.submit(JobKind.TRAIN, 5, {"style_id": "t"})
        await queue.apply_event({"type": "started", "job_id": other.id, "worker": "c/3", "attempt": "1"})
        await queue.apply_event({"type": "released", "job_id": other.id, "worker": "c/3",
                                 "message": "paused for a sticker"})
        got = await queue.get(other.id)
        assert (got.state, got.attempts, got.progress_message) == (JobState.QUEUED, 0, "paused for a sticker")
        # a job cancelled while queued is never resurrected by a late "started"
        third = await plain.submit(JobKind.NOOP, 5, {})
        await plain.cancel(third.id)
        with pytest.raises(Exception):  # noqa: B017 - Redis is unreachable on purpose
            await queue.apply_event({"type": "started", "job_id": third.id, "worker": "d/4", "attempt": "1"})
        assert (await queue.get(third.id)).state == JobState.CANCELLED
        # the embedded worker cannot claim jobs of this backend (they would run twice)
        with pytest.raises(Exception, match="Celery workers"):
            await queue.claim("embedded")
    finally:
        await queue.close()
        await plain.close()


def test_bot_side_modules_import_no_model_library(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from pipeline.settings import load_settings\n"
        "import pipeline.queue.celery, pipeline.monitoring\n"
        "from pipeline.celery_app import create_app\n"
        "create_app(load_settings(queue_backend='celery'))\n"
        "print(','.join(m for m in ('torch', 'diffusers', 'transformers', 'peft', 'accelerate') "
        "if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "STICKERBOT_DATA_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


# --- operations -------------------------------------------------------------------------


def test_failure_reasons_are_a_small_fixed_set() -> None:
    assert failure_reason(CancelledError("x")) == "cancelled"
    assert failure_reason(ImageError("a.png", "not an image")) == "bad_input"
    assert failure_reason(StyleError("damaged")) == "style"
    assert failure_reason(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")) == "out_of_memory"
    assert failure_reason("the worker running it stopped responding; gave up after 3 attempts") == "error"
    assert failure_reason("the workers running it stopped 3 times; crash; gave up after 3 attempts") == \
        "worker_lost"
    assert failure_reason(KeyError("x")) == "error"


def test_metrics_record_jobs_queue_depth_and_cache() -> None:
    metrics = Metrics(CollectorRegistry())
    metrics.record_job("sticker", 2.0)
    metrics.record_job("train", 30.0, error=RuntimeError("CUDA out of memory"))
    metrics.record_job("train", 5.0, cancelled=True)
    metrics.record_adapter_lookup(hit=True)
    metrics.record_adapter_lookup(hit=True)
    metrics.record_adapter_lookup(hit=False)
    metrics.set_queue_depth({"sticker": {"queued": 4, "running": 1}, "train": {"queued": 2}})
    text = generate_latest(metrics.registry).decode()
    assert 'stickerbot_queue_depth{kind="sticker",state="queued"} 4.0' in text
    assert 'stickerbot_queue_depth{kind="train",state="running"} 0.0' in text
    assert 'stickerbot_job_failures_total{kind="train",reason="out_of_memory"} 1.0' in text
    assert 'stickerbot_job_failures_total{kind="train",reason="cancelled"} 1.0' in text
    assert 'stickerbot_job_duration_seconds_count{kind="sticker",outcome="succeeded"} 1.0' in text
    assert 'stickerbot_job_duration_seconds_sum{kind="train",outcome="failed"} 30.0' in text
    assert 'stickerbot_adapter_cache_total{result="hit"} 2.0' in text
    assert 'stickerbot_adapter_cache_total{result="miss"} 1.0' in text
    assert "stickerbot_gpu_memory_bytes" in text


def test_metrics_endpoint_serves_over_http() -> None:
    registry = CollectorRegistry()
    Metrics(registry).record_job("noop", 0.1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start_metrics_server(port, addr="127.0.0.1", registry=registry)
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'stickerbot_job_duration_seconds_count{kind="noop",outcome="succeeded"} 1.0' in body


def test_json_logs_carry_job_and_user_ids_and_never_the_token() -> None:
    stream = io.StringIO()
    handler = configure_logging("INFO", stream=stream)
    # Only our handler sees these records: other tests' filters on the root handlers (the bot's
    # token filter) edit records in place.
    logging.getLogger().removeHandler(handler)
    log = logging.getLogger("stickerbot.test.json")
    log.propagate = False
    log.addHandler(handler)
    try:
        with job_context(job_id="job-42", user_id=7):
            log.info("calling https://api.telegram.org/bot%s/getMe", TEST_TOKEN)
            try:
                raise ValueError(f"bad token {TEST_TOKEN}")
            except ValueError:
                log.exception("failed", extra={"stage": "send"})
        log.info("outside")
    finally:
        log.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert TEST_TOKEN not in stream.getvalue()
    assert TEST_TOKEN.split(":")[1] not in stream.getvalue()
    first, second, third = lines
    assert first["job_id"] == "job-42" and first["user_id"] == 7 and "<token>" in first["msg"]
    assert second["stage"] == "send" and "ValueError" in second["exc"] and second["level"] == "ERROR"
    assert "job_id" not in third
    assert redact("no secrets here 12:34") == "no secrets here 12:34"


class RecordingApp:
    """A Celery app stand-in that records the task messages sent (or fails to send them)."""

    def __init__(self, *, fail: bool = False) -> None:
        self.sent: list[tuple[str, str, int]] = []
        self.fail = fail

    def send_task(self, name: str, *, args: list, task_id: str, queue: str, priority: int,
                  retry: bool) -> None:
        if self.fail:
            raise OSError("the broker is away")
        assert name == TASK_NAME and args[0]["id"] == task_id
        self.sent.append((task_id, queue, priority))


def ensure_event(worker: str, **fields: str) -> dict[str, str]:
    return {"type": "ensure", "job_id": "sticker-1", "worker": worker, "job_kind": "segmenter",
            "key": "segmenter-bootstrap", "payload": json.dumps({"mode": "bootstrap", "minutes": 0.5}),
            **fields}


async def test_ensure_job_queues_and_sends_the_segmenter_bootstrap_once(tmp_path: Path) -> None:
    """Workers' "ensure" events, read by two bot instances at once, queue one bootstrap and send
    one message; a waiting sticker reads "getting ready"; a message that could not be sent is
    left to the resend sweep; a malformed event changes nothing."""
    import asyncio

    from pipeline.queue.base import SYSTEM_USER

    db = tmp_path / "jobs.sqlite3"
    apps = [RecordingApp(), RecordingApp(), RecordingApp(fail=True)]
    # Redis is unreachable here: the "sent" mark is best effort (at worst a resend at start).
    bots = [await CeleryJobQueue.open(db, redis_url="redis://127.0.0.1:1/0", celery_app=app)
            for app in apps]
    plain = await SqliteJobQueue.open(db)
    try:
        sticker = await plain.submit(JobKind.STICKER, 7, {"style_id": "s", "photo": "p.png"})
        await asyncio.gather(*(bot.apply_event(ensure_event(worker))
                               for bot, worker in zip(bots[:2] * 2, ["a/1", "b/2", "a/1", "c/3"],
                                                      strict=True)))
        [boot] = await plain.list_for_user(SYSTEM_USER)
        assert (boot.kind, boot.state) == (JobKind.SEGMENTER, JobState.QUEUED)
        assert boot.payload == {"mode": "bootstrap", "minutes": 0.5, "key": "segmenter-bootstrap"}
        assert boot.priority > sticker.priority
        assert apps[0].sent + apps[1].sent == [(boot.id, "sticker", 0)]  # one message, stickers' queue
        position = await bots[0].position(sticker.id)
        assert position.getting_ready and position.eta_seconds is not None and position.eta_seconds > 30
        again, created = await bots[1].ensure_job(JobKind.SEGMENTER, {"mode": "bootstrap"},
                                                  key="segmenter-bootstrap")
        assert (again.id, created) == (boot.id, False)
        # the message of a new job cannot be sent: the record waits for the resend sweep
        assert not bots[2]._resend_pending
        refresh, created = await bots[2].ensure_job(JobKind.SEGMENTER, {"mode": "refresh"},
                                                    key="segmenter-refresh")
        assert created and (await plain.get(refresh.id)).state == JobState.QUEUED
        assert bots[2]._resend_pending and apps[2].sent == []
        # once the bootstrap finished, the next ask queues a new one (a failed one is tried again)
        await bots[0].apply_event({"type": "started", "job_id": boot.id, "worker": "a/1", "attempt": "1"})
        await bots[0].apply_event({"type": "failed", "job_id": boot.id, "worker": "a/1", "error": "broke"})
        await bots[0].apply_event(ensure_event("a/1"))
        sent = apps[0].sent + apps[1].sent
        assert len(sent) == 2 and sent[0][0] != sent[1][0]
        # malformed events are logged and ignored; the reader goes on
        await bots[0].apply_event(ensure_event("a/1", job_kind="nonsense", key="other"))
        await bots[0].apply_event(ensure_event("a/1", payload="{not json", key="other"))
        await bots[0].apply_event(ensure_event("a/1", key=""))
        assert len(await plain.list_for_user(SYSTEM_USER)) == 3
    finally:
        for bot in bots:
            await bot.close()
        await plain.close()


def test_a_worker_without_a_trained_segmenter_asks_for_the_bootstrap_once(
        monkeypatch: pytest.MonkeyPatch, tiny_settings: Settings) -> None:
    """The worker-side gate of a sticker: not ready while the segmenter has no head; the first
    worker to notice asks the bot (one "ensure" event across workers: Redis SET NX); an ask that
    could not be sent is asked again with the next try; a trained head lets stickers through."""
    from types import SimpleNamespace

    import redis

    import pipeline.jobs
    from pipeline.celery_app import SEGMENTER_ASKED_KEY, _segmenter_ready

    class FakeRedis:
        def __init__(self) -> None:
            self.keys: dict[str, str] = {}

        def set(self, key: str, value: str, *, nx: bool, ex: int) -> bool:
            assert nx and ex >= 60
            if key in self.keys:
                return False
            self.keys[key] = value
            return True

        def delete(self, key: str) -> None:
            self.keys.pop(key, None)

    monkeypatch.setattr(pipeline.jobs, "sync_segmenter", lambda resident: False)
    choice = SimpleNamespace(problem="an encoder with no trained segmentation head", version=None)
    resident = SimpleNamespace(models=SimpleNamespace(segmenter_choice=choice))
    emitted: list[tuple[str, str, dict]] = []
    shared = FakeRedis()
    workers = [SimpleNamespace(resident=lambda: resident, settings=tiny_settings, redis=shared, worker_id=w,
                               emit=lambda kind, job_id, **fields: emitted.append((kind, job_id, fields)))
               for w in ("a/1", "b/2")]
    assert not _segmenter_ready(workers[0], "s1") and not _segmenter_ready(workers[1], "s2")
    assert not _segmenter_ready(workers[0], "s3")
    [(kind, job_id, fields)] = emitted
    assert (kind, job_id, fields["job_kind"]) == ("ensure", "s1", "segmenter")
    assert fields["key"] == "segmenter-bootstrap"
    assert json.loads(fields["payload"]) == {"mode": "bootstrap",
                                             "minutes": tiny_settings.segmenter_bootstrap_minutes}
    # Redis refused the event: the mark is dropped, so the sticker's next try asks again
    shared.keys.clear()

    def refused(*_: object, **__: object) -> None:
        raise redis.ConnectionError("gone")

    workers[1].emit = refused
    assert not _segmenter_ready(workers[1], "s4") and SEGMENTER_ASKED_KEY not in shared.keys
    # a trained head (promoted meanwhile): stickers go through, nothing is asked
    choice.problem = None
    assert _segmenter_ready(workers[0], "s5") and len(emitted) == 1
