"""The scale-out job queue: job records in the bot's SQLite database, execution on Celery workers.

The bot is the only process that writes the job records (the same table and the same code as the
embedded backend, :class:`~pipeline.queue.sqlite.SqliteJobQueue`, so a user's view of their jobs
does not depend on the backend). Workers may run on other machines and never open the database:

    bot                                  Redis                              Celery worker (per GPU)
    submit ── INSERT job (queued) ──►
           ── send_task(run_job) ──────► queue `sticker` | `train` ───────► run_job(job)
                                                                           same handlers as the
    reader ◄── XREADGROUP ────────────── stream stickerbot:events ◄─────── embedded worker
      │        (started, progress,                                         (pipeline.jobs)
      ▼         heartbeat, succeeded,
    UPDATE job  failed, released)
      ▼
    events_since (unchanged: reads the table)

One reader task applies the stream to the table with the embedded backend's own worker-side
methods (``report_progress``, ``complete``, ``fail``, ``release``); the stream's consumer group
keeps an event until the reader acknowledged it, so a bot restart loses none. Applying is
idempotent: a "started" carries its attempt number and only moves the attempts forward.

Cancellation: the table (queued -> cancelled at once, running -> cancel requested), a Redis key
the worker's cancel check reads between training steps, and a Celery revoke.

Redis down at submit time: :class:`QueueUnavailableError` before anything is written.

Jobs of the product's own (the background remover's bootstrap): a worker whose segmenter has no
trained head sends an "ensure" event when a sticker reaches it and gives the sticker back (a
Celery retry with a countdown, no attempt counted); the reader queues the bootstrap once with
``ensure_job`` (the record store's write lock makes check-then-insert one step) and sends its
message like a submitted job's. Waiting stickers read "getting ready" from the table.

A message that never left: the bot marks each job's message as sent (a Redis key) once Celery
took it. When the bot starts, it sends again the message of every queued job without that mark:
the bot died between writing the record and sending, or Redis lost its data. A copy sent twice
is harmless: a worker runs a job once (the "done" and "run" keys).

This module is imported by the bot: no torch, no model libraries.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from pipeline.errors import JobError, QueueUnavailableError
from pipeline.monitoring import default_metrics
from pipeline.queue.base import Job, JobKind, JobState
from pipeline.queue.sqlite import _STAMP, SqliteJobQueue, job_from_row
from pipeline.settings import Settings

log = logging.getLogger(__name__)

# --- the wire protocol between the bot and the workers (pipeline.celery_app uses it too) -------
TASK_NAME = "stickerbot.run_job"
EVENTS_STREAM = "stickerbot:events"
EVENTS_GROUP = "stickerbot-bot"
# The stream is trimmed to about this many entries (the reader keeps up in milliseconds).
EVENTS_MAXLEN = 100_000
# Per-job keys live this long after their last write (a week: longer than any job waits).
KEY_TTL_SECONDS = 7 * 86_400
# Which Celery queue a kind goes to. A worker serves `sticker,train` (stickers first) or one.
QUEUE_FOR_KIND = {JobKind.STICKER: "sticker", JobKind.TRAIN: "train", JobKind.NOOP: "sticker",
                  JobKind.SEGMENTER: "sticker"}
QUEUES = ("sticker", "train")
# Message priorities (kombu's Redis transport: 0 is served first, then 3, 6, 9; across queues a
# worker reads sticker@0, train@0, sticker@3, train@3, ...). New training jobs go in at 6, so a
# training job given back part-way (preempted by a sticker, or retried) and sent again at 0 runs
# before the ones that have not started, as the embedded queue's order and the positions the
# bot reports say. Stickers are always at 0: before any training job.
PRIORITY_RESUMED = 0
PRIORITY_NEW = {JobKind.STICKER: 0, JobKind.TRAIN: 6, JobKind.NOOP: 0, JobKind.SEGMENTER: 0}


def message_priority(job: Job) -> int:
    """The priority a job's message is sent at: a job that has run part-way (sent again after
    Redis lost its data) keeps its place ahead of those that have not started."""
    return PRIORITY_RESUMED if job.progress > 0 else PRIORITY_NEW[job.kind]


def job_key(job_id: str, name: str) -> str:
    """``stickerbot:job:<id>:<name>``; names: attempts, cancel, done, run (the running lock)."""
    return f"stickerbot:job:{job_id}:{name}"


def task_message(job: Job) -> dict[str, Any]:
    """What a worker needs to run ``job``: the task's only argument (JSON)."""
    return {"id": job.id, "kind": job.kind.value, "user_id": job.user_id, "priority": job.priority,
            "payload": job.payload, "max_attempts": job.max_attempts}


class CeleryJobQueue(SqliteJobQueue):
    """:class:`JobQueue` whose jobs run on Celery workers. Build with :meth:`from_settings`."""

    def __init__(self, conn: Any, *, redis_url: str, celery_app: Any, publish_timeout: float = 5.0,
                 **options: Any) -> None:
        super().__init__(conn, **options)
        self.redis_url = redis_url
        self.celery_app = celery_app
        self.publish_timeout = publish_timeout
        self.redis = aioredis.Redis.from_url(redis_url, socket_connect_timeout=2.0,
                                             socket_timeout=10.0, health_check_interval=15)
        # The reader blocks in XREADGROUP on a connection of its own.
        self.reader_redis = aioredis.Redis.from_url(redis_url, socket_connect_timeout=2.0,
                                                    socket_timeout=10.0)
        self.consumer = f"bot-{id(self):x}"
        self._reader: asyncio.Task[None] | None = None
        self._closing = False
        # Set when queued jobs may have lost their messages: Redis was unreachable when the bot
        # started, or came back without its data. The event reader then calls resend_unsent().
        self._resend_pending = False
        self.applied_events = 0  # for tests and metrics

    @classmethod
    async def from_settings(cls, settings: Settings, **options: Any) -> CeleryJobQueue:
        """Open the database, connect to Redis lazily and start the one event reader."""
        from pipeline.celery_app import create_app

        options.setdefault("redis_url", settings.redis_url)
        options.setdefault("celery_app", create_app(settings))
        queue = await super().from_settings(settings, **options)
        assert isinstance(queue, CeleryJobQueue)
        queue.start_reader()
        try:
            await queue.resend_unsent()
        except (RedisError, OSError, TimeoutError):
            queue._resend_pending = True
            log.warning("could not check for unsent job messages (Redis unreachable); will when it is back")
        return queue

    async def close(self) -> None:
        self._closing = True
        if self._reader is not None:
            self._reader.cancel()
            # redis-py may finish a blocking read before it notices the cancel; the flag ends it.
            await asyncio.wait({self._reader}, timeout=5.0)
            self._reader = None
        for client in (self.redis, self.reader_redis):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.aclose(), 5.0)
        await super().close()

    # --- bot side ---------------------------------------------------------------------
    async def ensure_job(self, kind: JobKind, payload: dict[str, Any], *, key: str,
                         priority: int | None = None) -> tuple[Job, bool]:
        """The embedded backend's check-then-insert (one step under the database's write lock, so
        two bot instances, or two workers' "ensure" events, queue one job), then the message. A
        message that cannot be sent now is sent by the resend sweep once Redis answers again: the
        record stays queued without its "sent" mark."""
        job, created = await super().ensure_job(kind, payload, key=key, priority=priority)
        if not created:
            return job, False
        try:
            await asyncio.wait_for(asyncio.to_thread(self._publish, job), self.publish_timeout)
        except Exception:
            log.warning("publishing job %s failed; the resend sweep sends it", job.id, exc_info=True)
            self._resend_pending = True
            return job, True
        with contextlib.suppress(RedisError, OSError, TimeoutError):  # costs at most a resend at start
            await self._mark_sent(job)
        default_metrics().jobs_submitted.labels(kind=job.kind.value).inc()
        return job, True

    async def submit(self, kind: JobKind, user_id: int, payload: dict[str, Any], *,
                     priority: int | None = None) -> Job:
        kind = JobKind(kind)
        # 1. is the broker there? Refuse before writing anything.
        try:
            await asyncio.wait_for(self.redis.ping(), self.publish_timeout)
        except (RedisError, OSError, TimeoutError) as exc:
            default_metrics().queue_unavailable.inc()
            raise QueueUnavailableError(
                "the job queue (Redis) cannot be reached right now; try again in a minute") from exc
        # 2. the record, with the embedded backend's caps and quotas
        job = await super().submit(kind, user_id, payload, priority=priority)
        # 3. the message; if it cannot be sent after all, the record must not wait forever
        try:
            await asyncio.wait_for(asyncio.to_thread(self._publish, job), self.publish_timeout)
        except Exception as exc:
            log.warning("publishing job %s failed; marking it failed", job.id, exc_info=True)
            worker = "bot"
            if await self._start(job.id, worker, attempt=1) is not None:
                await super().fail(job.id, worker, "the job queue was unavailable; nothing ran")
            await self.mark_delivered(job.id)  # the user got "busy, try again" instead
            default_metrics().queue_unavailable.inc()
            raise QueueUnavailableError(
                "the job queue (Redis) cannot be reached right now; try again in a minute") from exc
        with contextlib.suppress(RedisError, OSError, TimeoutError):  # costs at most a resend at start
            await self._mark_sent(job)
        default_metrics().jobs_submitted.labels(kind=kind.value).inc()
        return job

    def _publish(self, job: Job) -> None:
        self.celery_app.send_task(TASK_NAME, args=[task_message(job)], task_id=job.id,
                                  queue=QUEUE_FOR_KIND[job.kind], priority=message_priority(job),
                                  retry=False)

    async def _mark_sent(self, job: Job) -> None:
        await self.redis.set(job_key(job.id, "sent"), "1", ex=KEY_TTL_SECONDS)

    async def resend_unsent(self) -> list[str]:
        """Send the task message of every queued job not marked as sent; returns their ids."""
        rows = await self._read("SELECT * FROM jobs WHERE state = 'queued' ORDER BY created_at, rowid")
        resent = []
        for job in map(job_from_row, rows):
            if await self.redis.exists(job_key(job.id, "sent")):
                continue
            await asyncio.wait_for(asyncio.to_thread(self._publish, job), self.publish_timeout)
            await self._mark_sent(job)
            resent.append(job.id)
        if resent:
            log.warning("sent again the messages of %d queued job(s) that had none", len(resent))
        return resent

    async def cancel(self, job_id: str, *, user_id: int | None = None) -> Job:
        job = await super().cancel(job_id, user_id=user_id)
        if job.state == JobState.CANCELLED or job.cancel_requested:
            try:
                await self.redis.set(job_key(job_id, "cancel"), "1", ex=KEY_TTL_SECONDS)
                await asyncio.to_thread(self.celery_app.control.revoke, job_id)
            except Exception:  # the record says cancelled; the reader re-sends it on "started"
                log.warning("could not signal the cancel of job %s to the workers", job_id,
                            exc_info=True)
        return job

    # --- the embedded worker must not run jobs of this backend ----------------------------
    async def claim(self, worker_id: str, *, kinds: Sequence[JobKind] | None = None) -> Job | None:
        raise JobError("with STICKERBOT_QUEUE_BACKEND=celery jobs run on Celery workers "
                       "(celery -A pipeline.celery_app worker), not on `stickerbot worker`")

    # --- applying the workers' events ---------------------------------------------------
    async def _start(self, job_id: str, worker_id: str, *, attempt: int) -> Job | None:
        """Mark ``job_id`` running on ``worker_id`` as attempt ``attempt`` (a redelivered job takes
        it over from a dead worker). None when the job is finished or the attempt is stale."""
        now = time.time()
        async with self._write():
            rows = await self._rows(
                f"""UPDATE jobs SET state = 'running', worker_id = :worker, attempts = :attempt,
                    lease_expires_at = :lease, started_at = :now, error = NULL,
                    progress_message = 'running', updated_at = {_STAMP}
                WHERE id = :id AND attempts < :attempt AND state IN ('queued', 'running')
                RETURNING *""",
                {"worker": worker_id, "attempt": attempt, "lease": now + self.lease_seconds,
                 "now": now, "id": job_id})
        return job_from_row(rows[0]) if rows else None

    async def apply_event(self, event: Mapping[str, str]) -> None:
        """Apply one worker event to the job table. Stale or repeated events change nothing."""
        kind = event.get("type", "")
        job_id, worker = event.get("job_id", ""), event.get("worker", "")
        try:
            if kind == "started":
                job = await self._start(job_id, worker, attempt=int(event.get("attempt", "1")))
                if job is None:
                    current = await self.get(job_id)
                    if current is not None and current.state == JobState.CANCELLED:
                        # The worker missed the cancel (Redis was down when it was asked).
                        await self.redis.set(job_key(job_id, "cancel"), "1", ex=KEY_TTL_SECONDS)
            elif kind == "progress":
                await self.report_progress(job_id, worker, float(event.get("fraction", "0")),
                                           event.get("message", ""))
            elif kind == "heartbeat":
                await self.heartbeat(job_id, worker)
            elif kind == "succeeded":
                await self.complete(job_id, worker, json.loads(event.get("result", "{}")))
            elif kind == "failed":
                await self.fail(job_id, worker, event.get("error", "failed"),
                                retry=event.get("retry") == "1")
            elif kind == "ensure":  # a worker needs a job of the product's own (the segmenter bootstrap)
                await self._apply_ensure(event)
            elif kind == "released":
                await self.release(job_id, worker, message=event.get("message", "waiting to continue"))
            else:
                log.warning("unknown worker event %r for job %s", kind, job_id)
        except JobError as exc:  # a repeated or stale event: the record already moved on
            log.debug("ignored %s event of job %s: %s", kind, job_id, exc)
        self.applied_events += 1

    async def _apply_ensure(self, event: Mapping[str, str]) -> None:
        """An "ensure" event: ``job_kind``, ``key`` and ``payload`` (JSON) of a job the worker of
        ``job_id`` (a sticker) waits for; queued once however many workers ask."""
        try:
            kind, key = JobKind(event.get("job_kind", "")), event.get("key", "")
            payload = json.loads(event.get("payload") or "{}")
        except ValueError as exc:  # a malformed event must not stop the reader
            log.warning("ignored a malformed ensure event of %s: %s", event.get("worker"), exc)
            return
        if not key or not isinstance(payload, dict):
            log.warning("ignored an ensure event of %s without key or payload", event.get("worker"))
            return
        job, created = await self.ensure_job(kind, payload, key=key)
        log.info("%s needs %s for job %s: job %s %s", event.get("worker"), key, event.get("job_id"),
                 job.id, "queued" if created else "already queued")

    async def _ensure_group(self) -> None:
        try:
            await self.reader_redis.xgroup_create(EVENTS_STREAM, EVENTS_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        else:
            # No group yet: Redis is new, or came back without its data (no persistence, a
            # failover to an empty replica, FLUSHALL). Queued jobs' messages may be gone with it.
            self._resend_pending = True

    async def pump_events(self, *, block_ms: int = 1000, count: int = 200) -> int:
        """Read and apply one batch of worker events (this consumer's unacknowledged ones first,
        left over from a crash, then new ones). Returns how many were applied."""
        await self._ensure_group()
        applied = 0
        for start in ("0", ">"):
            reply: Any = await self.reader_redis.xreadgroup(
                EVENTS_GROUP, self.consumer, {EVENTS_STREAM: start}, count=count,
                block=None if start == "0" else block_ms)
            for _stream, entries in reply or []:
                for entry_id, fields in entries:
                    if not fields:  # a pending entry trimmed away meanwhile
                        await self.reader_redis.xack(EVENTS_STREAM, EVENTS_GROUP, entry_id)
                        continue
                    event = {k.decode(): v.decode() for k, v in fields.items()}
                    await self.apply_event(event)
                    await self.reader_redis.xack(EVENTS_STREAM, EVENTS_GROUP, entry_id)
                    applied += 1
            if applied:
                return applied
        return applied

    async def _claim_orphans(self) -> None:
        """Take over events another bot instance read but never acknowledged (it crashed)."""
        with contextlib.suppress(ResponseError):
            await self.reader_redis.xautoclaim(EVENTS_STREAM, EVENTS_GROUP, self.consumer,
                                        min_idle_time=60_000, start_id="0-0", count=1000)

    async def _read_forever(self) -> None:
        delay = 0.5
        while not self._closing:
            try:
                await self._ensure_group()
                await self._claim_orphans()
                while not self._closing:
                    await self.pump_events()
                    if self._resend_pending:
                        await self.resend_unsent()
                        self._resend_pending = False
                    delay = 0.5
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis away: keep the bot up, try again with backoff
                if self._closing:
                    break
                log.warning("worker event reader: %s; retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 15.0)

    def start_reader(self) -> None:
        """Start the one task that feeds worker events into the table (and so events_since)."""
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read_forever(),
                                                                   name="celery-event-reader")

    async def workers_alive(self, *, within: float = 2.0) -> list[str]:
        """Names of the Celery workers that answered a ping within ``within`` seconds (for doctor
        and /stats). A worker busy with a job in the solo pool answers only after it."""
        replies = await asyncio.to_thread(self.celery_app.control.ping, timeout=within)
        return sorted(name for reply in replies or [] for name in reply)


async def open_celery_queue(settings: Settings) -> CeleryJobQueue:
    """The Celery backend for ``settings`` with its event reader running (what ``open_queue`` uses)."""
    return await CeleryJobQueue.from_settings(settings)
