"""The embedded job queue (the default backend): the ``jobs`` table of the product's SQLite file.

Every write runs in one ``BEGIN IMMEDIATE`` transaction, which takes SQLite's single write lock
before reading anything, so two worker processes on one file never claim the same job and a
per-user cap cannot be passed by two submits racing each other.

Every write that the bot should see also sets ``updated_at`` above the largest value in the
table, inside that same transaction. Writes are serialised by the lock, so ``updated_at`` orders
commits, and "jobs with ``updated_at`` after my cursor" never skips a change: that is the cursor
of :meth:`SqliteJobQueue.events_since`, the one loop through which the bot fans progress out.
Heartbeats only move the lease and raise no event.

Other processes' commits are noticed through ``PRAGMA data_version`` (a cheap read of the WAL
index, no table access); this process's own commits wake waiters at once.

Attempts: a claim counts one. A lease that expires (the worker died) puts the job back in the
queue with that attempt counted, or fails it once ``max_attempts`` claims were used. A
:meth:`~SqliteJobQueue.release` (graceful stop, preemption by a sticker) gives the attempt back.

This module is imported by the bot: no torch, no model libraries.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite

from pipeline.errors import JobError, QuotaExceededError
from pipeline.queue.base import (
    PRIORITY,
    SYSTEM_USER,
    Job,
    JobEvent,
    JobKind,
    JobQueue,
    JobState,
    QueuePosition,
)
from pipeline.settings import Settings
from pipeline.storage.db import open_database

# The next change stamp: now, or just above the newest stamp when the clock lags behind it.
# Evaluated inside a write transaction, so it is above every committed stamp.
_STAMP = "MAX(:now, COALESCE((SELECT MAX(updated_at) FROM jobs), 0) + 0.000001)"
_FINISHED = tuple(s.value for s in JobState if s.finished)
_DAY = 86_400.0
# How many recent successful jobs of a kind the ETA's typical duration is taken from.
_ETA_SAMPLE = 20
# The most events one events_since call returns; the cursor lets the caller read on.
_EVENT_BATCH = 500


def job_from_row(row: Mapping[str, Any]) -> Job:
    """A :class:`Job` from a ``jobs`` row (``sqlite3.Row`` or a mapping)."""
    return Job(
        id=row["id"],
        kind=JobKind(row["kind"]),
        state=JobState(row["state"]),
        user_id=int(row["user_id"]),
        priority=int(row["priority"]),
        payload=json.loads(row["payload"] or "{}"),
        attempts=int(row["attempts"]),
        max_attempts=int(row["max_attempts"]),
        worker_id=row["worker_id"],
        lease_expires_at=row["lease_expires_at"],
        cancel_requested=bool(row["cancel_requested"]),
        progress=float(row["progress"]),
        progress_message=row["progress_message"] or "",
        result=json.loads(row["result"]) if row["result"] is not None else None,
        error=row["error"],
        created_at=float(row["created_at"]),
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        updated_at=float(row["updated_at"]),
    )


def typical_duration(durations: Sequence[float]) -> float | None:
    """The typical run time of a kind: the median of recent measured durations (robust to one
    slow outlier, e.g. a run that loaded a cold adapter); None without a measurement."""
    values = [d for d in durations if d is not None and d >= 0]
    return float(statistics.median(values)) if values else None


def estimate_eta(kind: JobKind, *, ahead: Sequence[JobKind], running: Sequence[tuple[JobKind, float]],
                 durations: Mapping[JobKind, float | None], workers: int = 1) -> float | None:
    """Seconds until a queued job of ``kind`` is expected to be finished.

    ``ahead``: kinds of the queued jobs that will be claimed before it; ``running``: kind and
    progress (0..1) of the jobs running now; ``durations``: typical seconds per kind;
    ``workers``: how many workers share the work. A running training job does not delay a
    sticker: it yields at its next step. None when a needed duration was never measured.
    """
    own = durations.get(kind)
    if own is None:
        return None
    waiting = 0.0
    for other in ahead:
        d = durations.get(other)
        if d is None:
            return None
        waiting += d
    for other, progress in running:
        if kind == JobKind.STICKER and other == JobKind.TRAIN:
            continue
        d = durations.get(other)
        if d is None:
            return None
        waiting += d * (1.0 - min(max(progress, 0.0), 1.0))
    return waiting / max(workers, 1) + own


class SqliteJobQueue(JobQueue):
    """:class:`JobQueue` on one aiosqlite connection of its own.

    One instance serves one process (its operations are serialised by an asyncio lock, since a
    connection holds one transaction at a time); any number of processes may share the file.
    """

    def __init__(self, conn: aiosqlite.Connection, *, lease_seconds: float = 30.0, max_attempts: int = 3,
                 max_queued_per_user: int = 3, stickers_per_day: int | None = 100,
                 poll_interval: float = 0.01) -> None:
        self.conn = conn
        self.lease_seconds = float(lease_seconds)
        self.max_attempts = int(max_attempts)
        self.max_queued_per_user = int(max_queued_per_user)
        self.stickers_per_day = stickers_per_day
        self.poll_interval = float(poll_interval)  # how often other processes' commits are looked for
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()  # set (and replaced) on each commit of this instance
        self._seen_version: int | None = None  # PRAGMA data_version when last read

    @classmethod
    async def open(cls, path: Path | str, **options: Any) -> SqliteJobQueue:
        """Open (and migrate) the database at ``path``; ``options`` as in the constructor."""
        conn = await open_database(path)
        return cls(conn, **options)

    @classmethod
    async def from_settings(cls, settings: Settings, **options: Any) -> SqliteJobQueue:
        defaults: dict[str, Any] = {
            "lease_seconds": settings.lease_seconds,
            "max_attempts": settings.max_attempts,
            "max_queued_per_user": settings.max_queued_jobs_per_user,
            "stickers_per_day": settings.stickers_per_day,
        }
        defaults.update(options)
        return await cls.open(settings.db_path, **defaults)

    async def close(self) -> None:
        await self.conn.close()

    # --- plumbing ---------------------------------------------------------------------
    @asynccontextmanager
    async def _write(self) -> AsyncIterator[None]:
        """One write transaction holding SQLite's write lock from its first statement."""
        async with self._lock:
            await self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                await self.conn.execute("ROLLBACK")
                raise
            await self.conn.execute("COMMIT")
            self._changed.set()
            self._changed = asyncio.Event()

    async def _rows(self, sql: str, args: Mapping[str, Any] | Sequence[Any] = ()) -> list[Any]:
        return list(await self.conn.execute_fetchall(sql, args))

    async def _read(self, sql: str, args: Mapping[str, Any] | Sequence[Any] = ()) -> list[Any]:
        async with self._lock:
            return await self._rows(sql, args)

    async def _job(self, job_id: str) -> Job | None:
        rows = await self._rows("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return job_from_row(rows[0]) if rows else None

    async def _data_version(self) -> int:
        rows = await self._read("PRAGMA data_version")
        self._seen_version = int(rows[0][0])
        return self._seen_version

    async def wait_for_change(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for a commit to the jobs database (by this instance or
        another process) made since this instance last looked. True when one was seen; a
        spurious True is possible, a missed change is not. Not busy: one tiny pragma (a read of
        the WAL index) per ``poll_interval``."""
        baseline = self._seen_version if self._seen_version is not None else await self._data_version()
        event = self._changed
        deadline = time.monotonic() + seconds
        while True:
            if await self._data_version() != baseline:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                await asyncio.wait_for(event.wait(), min(self.poll_interval, left))
                return True
            except TimeoutError:
                pass

    async def latest_cursor(self) -> float:
        """The cursor of "now": pass it to :meth:`events_since` to see only later changes."""
        rows = await self._read("SELECT COALESCE(MAX(updated_at), 0) FROM jobs")
        return float(rows[0][0])

    # --- bot side ---------------------------------------------------------------------
    async def submit(self, kind: JobKind, user_id: int, payload: dict[str, Any], *,
                     priority: int | None = None) -> Job:
        kind = JobKind(kind)
        text = json.dumps(payload)
        variants = int(payload.get("variants") or 1) if kind == JobKind.STICKER else 0
        now = time.time()
        async with self._write():
            # 1. per-user cap on unfinished jobs
            rows = await self._rows(
                "SELECT COUNT(*) FROM jobs WHERE user_id = ? AND state IN ('queued', 'running')",
                (user_id,))
            pending = int(rows[0][0])
            if pending >= self.max_queued_per_user:
                raise QuotaExceededError(
                    f"you already have {pending} job(s) waiting or running (the limit is "
                    f"{self.max_queued_per_user}); wait for one to finish or cancel one")
            # 2. stickers per day (a rolling 24 h; failed and cancelled ones do not count)
            if kind == JobKind.STICKER and self.stickers_per_day is not None:
                rows = await self._rows(
                    "SELECT COALESCE(SUM(COALESCE(json_extract(payload, '$.variants'), 1)), 0), "
                    "MIN(created_at) FROM jobs WHERE user_id = ? AND kind = 'sticker' "
                    "AND created_at >= ? AND state NOT IN ('failed', 'cancelled')",
                    (user_id, now - _DAY))
                used, oldest = int(rows[0][0]), rows[0][1]
                if used + variants > self.stickers_per_day:
                    hours = max((oldest + _DAY - now) / 3600, 0.0) if oldest is not None else 24.0
                    raise QuotaExceededError(
                        f"daily sticker limit reached ({used} of {self.stickers_per_day} in the last "
                        f"24 hours); more become available in about {hours:.0f} h")
            # 3. the job itself
            rows = await self._rows(
                f"INSERT INTO jobs (id, kind, state, user_id, priority, payload, max_attempts, "
                f"created_at, updated_at) VALUES (:id, :kind, 'queued', :user, :priority, :payload, "
                f":max_attempts, :now, {_STAMP}) RETURNING *",
                {"id": uuid.uuid4().hex, "kind": kind.value, "user": user_id,
                 "priority": PRIORITY[kind] if priority is None else int(priority), "payload": text,
                 "max_attempts": self.max_attempts, "now": now})
        return job_from_row(rows[0])

    async def ensure_job(self, kind: JobKind, payload: dict[str, Any], *, key: str,
                         priority: int | None = None) -> tuple[Job, bool]:
        kind = JobKind(kind)
        now = time.time()
        async with self._write():  # the write lock makes check-then-insert one step across processes
            rows = await self._rows(
                "SELECT * FROM jobs WHERE kind = ? AND state IN ('queued', 'running') "
                "AND json_extract(payload, '$.key') = ? ORDER BY created_at LIMIT 1", (kind.value, key))
            if rows:
                return job_from_row(rows[0]), False
            rows = await self._rows(
                f"INSERT INTO jobs (id, kind, state, user_id, priority, payload, max_attempts, "
                f"created_at, updated_at) VALUES (:id, :kind, 'queued', :user, :priority, :payload, "
                f":max_attempts, :now, {_STAMP}) RETURNING *",
                {"id": uuid.uuid4().hex, "kind": kind.value, "user": SYSTEM_USER,
                 "priority": PRIORITY[kind] if priority is None else int(priority),
                 "payload": json.dumps({**payload, "key": key}), "max_attempts": self.max_attempts,
                 "now": now})
        return job_from_row(rows[0]), True

    async def _bootstrap_left(self) -> float | None:
        """Seconds the pending segmenter bootstrap still needs (its time budget less its
        progress), or None when none is pending."""
        rows = await self._rows(
            "SELECT payload, progress FROM jobs WHERE kind = 'segmenter' AND state IN ('queued', 'running') "
            "AND json_extract(payload, '$.mode') = 'bootstrap' LIMIT 1")
        if not rows:
            return None
        payload = json.loads(rows[0]["payload"] or "{}")
        budget = float(payload.get("minutes") or 5.0) * 60 + 60.0  # + data preparation
        return budget * (1.0 - min(max(float(rows[0]["progress"]), 0.0), 1.0))

    async def cancel(self, job_id: str, *, user_id: int | None = None) -> Job:
        now = time.time()
        async with self._write():
            job = await self._job(job_id)
            if job is None:
                raise JobError(f"there is no job {job_id}")
            if user_id is not None and job.user_id != user_id:
                raise JobError(f"job {job_id} belongs to another user")
            if job.state == JobState.QUEUED:
                await self._rows(
                    f"UPDATE jobs SET state = 'cancelled', error = 'cancelled by its owner', "
                    f"finished_at = :now, progress_message = '', updated_at = {_STAMP} WHERE id = :id",
                    {"now": now, "id": job_id})
            elif job.state == JobState.RUNNING and not job.cancel_requested:
                # The worker sees it on its next heartbeat and stops at the next step.
                await self._rows(
                    f"UPDATE jobs SET cancel_requested = 1, progress_message = 'cancelling', "
                    f"updated_at = {_STAMP} WHERE id = :id", {"now": now, "id": job_id})
            job = await self._job(job_id)
        assert job is not None  # read back inside the same transaction
        return job

    async def get(self, job_id: str) -> Job | None:
        async with self._lock:
            return await self._job(job_id)

    async def list_for_user(self, user_id: int, *, states: Sequence[JobState] | None = None,
                            limit: int = 20) -> list[Job]:
        if states:
            marks = ",".join("?" * len(states))
            rows = await self._read(
                f"SELECT * FROM jobs WHERE user_id = ? AND state IN ({marks}) "
                f"ORDER BY created_at DESC, rowid DESC LIMIT ?",
                (user_id, *(JobState(s).value for s in states), limit))
        else:
            rows = await self._read(
                "SELECT * FROM jobs WHERE user_id = ? ORDER BY created_at DESC, rowid DESC LIMIT ?",
                (user_id, limit))
        return [job_from_row(r) for r in rows]

    async def typical_durations(self) -> dict[JobKind, float | None]:
        """Typical seconds per kind from the recent successful jobs (see :func:`typical_duration`)."""
        out: dict[JobKind, float | None] = {}
        async with self._lock:
            for kind in JobKind:
                rows = await self._rows(
                    "SELECT duration FROM jobs WHERE kind = ? AND state = 'succeeded' "
                    "AND duration IS NOT NULL ORDER BY finished_at DESC LIMIT ?", (kind.value, _ETA_SAMPLE))
                out[kind] = typical_duration([float(r[0]) for r in rows])
        return out

    async def position(self, job_id: str) -> QueuePosition:
        durations = await self.typical_durations()
        now = time.time()
        async with self._lock:
            rows = await self._rows("SELECT rowid AS seq, * FROM jobs WHERE id = ?", (job_id,))
            if not rows:
                raise JobError(f"there is no job {job_id}")
            job = job_from_row(rows[0])
            if job.state.finished:
                return QueuePosition(position=0, eta_seconds=0.0)
            if job.state == JobState.RUNNING:
                own = durations.get(job.kind)
                return QueuePosition(position=0,
                                     eta_seconds=None if own is None else own * (1.0 - job.progress))
            if job.kind == JobKind.STICKER and (left := await self._bootstrap_left()) is not None:
                own = durations.get(JobKind.STICKER) or 0.0
                return QueuePosition(position=1, eta_seconds=left + own, getting_ready=True)
            ahead = await self._rows(
                "SELECT kind FROM jobs WHERE state = 'queued' AND (priority > :p OR (priority = :p AND "
                "(created_at < :c OR (created_at = :c AND rowid < :seq))))",
                {"p": job.priority, "c": job.created_at, "seq": rows[0]["seq"]})
            running = await self._rows(
                "SELECT kind, progress, worker_id FROM jobs "
                "WHERE state = 'running' AND lease_expires_at >= ?",
                (now,))
        workers = len({r["worker_id"] for r in running})
        eta = estimate_eta(job.kind, ahead=[JobKind(r["kind"]) for r in ahead],
                           running=[(JobKind(r["kind"]), float(r["progress"])) for r in running],
                           durations=durations, workers=max(workers, 1))
        return QueuePosition(position=len(ahead) + 1, eta_seconds=eta)

    async def events_since(self, cursor: float, *, wait: float = 1.0) -> tuple[list[JobEvent], float]:
        deadline = time.monotonic() + wait
        while True:
            version = await self._data_version()
            rows = await self._read(
                "SELECT * FROM jobs WHERE updated_at > ? ORDER BY updated_at LIMIT ?", (cursor, _EVENT_BATCH))
            if rows:
                events = [JobEvent(job=job_from_row(r), seq=float(r["updated_at"])) for r in rows]
                return events, events[-1].seq
            left = deadline - time.monotonic()
            if left <= 0:
                return [], cursor
            await self._wait_for_version_change(version, left)

    async def _wait_for_version_change(self, version: int, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        event = self._changed
        while (left := deadline - time.monotonic()) > 0:
            try:
                await asyncio.wait_for(event.wait(), min(self.poll_interval, left))
                return
            except TimeoutError:
                pass
            if await self._data_version() != version:
                return

    async def undelivered(self, *, limit: int = 100) -> list[Job]:
        rows = await self._read(
            "SELECT * FROM jobs WHERE delivered_at IS NULL AND finished_at IS NOT NULL "
            "AND state IN ('succeeded', 'failed', 'cancelled') ORDER BY finished_at LIMIT ?", (limit,))
        return [job_from_row(r) for r in rows]

    async def mark_delivered(self, job_id: str) -> None:
        async with self._write():
            await self._rows("UPDATE jobs SET delivered_at = ? WHERE id = ?", (time.time(), job_id))

    async def counts(self) -> dict[str, dict[str, int]]:
        rows = await self._read("SELECT kind, state, COUNT(*) FROM jobs GROUP BY kind, state")
        out: dict[str, dict[str, int]] = {}
        for kind, state, n in rows:
            out.setdefault(kind, {})[state] = int(n)
        return out

    # --- worker side ------------------------------------------------------------------
    async def _requeue_expired(self, now: float) -> None:
        """Jobs whose worker stopped renewing the lease: back to the queue (the attempt stays
        counted), failed once the attempts are used up, cancelled when the owner asked."""
        await self._rows(
            f"""UPDATE jobs SET
                state = CASE WHEN cancel_requested THEN 'cancelled'
                             WHEN attempts >= max_attempts THEN 'failed' ELSE 'queued' END,
                error = CASE WHEN cancel_requested THEN 'cancelled by its owner'
                             WHEN attempts >= max_attempts THEN
                                 printf('the worker running it stopped responding; gave up after '
                                        || '%d attempts', attempts)
                             ELSE error END,
                finished_at = CASE WHEN cancel_requested OR attempts >= max_attempts THEN :now END,
                progress_message = CASE WHEN cancel_requested OR attempts >= max_attempts THEN ''
                                        ELSE 'waiting for a worker (the previous one stopped)' END,
                lease_expires_at = NULL,
                updated_at = {_STAMP}
            WHERE state = 'running' AND lease_expires_at < :now""",
            {"now": now})

    async def claim(self, worker_id: str, *, kinds: Sequence[JobKind] | None = None) -> Job | None:
        now = time.time()
        kind_clause, args = "", {"worker": worker_id, "lease": now + self.lease_seconds, "now": now}
        if kinds:
            names = [JobKind(k).value for k in kinds]
            kind_clause = "AND kind IN (" + ",".join(f":k{i}" for i in range(len(names))) + ")"
            args.update({f"k{i}": name for i, name in enumerate(names)})
        async with self._write():
            await self._requeue_expired(now)
            rows = await self._rows(
                f"""UPDATE jobs SET state = 'running', worker_id = :worker, attempts = attempts + 1,
                    lease_expires_at = :lease, started_at = :now, error = NULL,
                    progress_message = 'running', updated_at = {_STAMP}
                WHERE id = (SELECT id FROM jobs WHERE state = 'queued' {kind_clause}
                            ORDER BY priority DESC, created_at, rowid LIMIT 1)
                RETURNING *""", args)
        return job_from_row(rows[0]) if rows else None

    async def heartbeat(self, job_id: str, worker_id: str) -> bool:
        async with self._write():
            rows = await self._rows(
                "UPDATE jobs SET lease_expires_at = ? WHERE id = ? AND worker_id = ? AND state = 'running' "
                "RETURNING cancel_requested", (time.time() + self.lease_seconds, job_id, worker_id))
        return bool(rows) and not rows[0][0]

    async def report_progress(self, job_id: str, worker_id: str, fraction: float, message: str) -> None:
        now = time.time()
        async with self._write():
            await self._rows(
                f"UPDATE jobs SET progress = :p, progress_message = :m, lease_expires_at = :lease, "
                f"updated_at = {_STAMP} WHERE id = :id AND worker_id = :w AND state = 'running'",
                {"p": min(max(float(fraction), 0.0), 1.0), "m": message[:500],
                 "lease": now + self.lease_seconds, "now": now, "id": job_id, "w": worker_id})

    async def _held(self, job_id: str, worker_id: str) -> Job:
        job = await self._job(job_id)
        if job is None:
            raise JobError(f"there is no job {job_id}")
        if job.state != JobState.RUNNING or job.worker_id != worker_id:
            raise JobError(f"job {job_id} is no longer held by worker {worker_id} "
                           f"(it is {job.state.value}; the lease was lost or it was finished)")
        return job

    async def complete(self, job_id: str, worker_id: str, result: dict[str, Any]) -> Job:
        text = json.dumps(result)
        now = time.time()
        async with self._write():
            await self._held(job_id, worker_id)
            rows = await self._rows(
                f"""UPDATE jobs SET state = 'succeeded', result = :result, error = NULL, progress = 1.0,
                    progress_message = '', finished_at = :now, lease_expires_at = NULL,
                    duration = COALESCE(duration, 0) + MAX(:now - COALESCE(started_at, :now), 0),
                    updated_at = {_STAMP}
                WHERE id = :id RETURNING *""", {"result": text, "now": now, "id": job_id})
        return job_from_row(rows[0])

    async def fail(self, job_id: str, worker_id: str, error: str, *, retry: bool = False) -> Job:
        now = time.time()
        async with self._write():
            job = await self._held(job_id, worker_id)
            if job.cancel_requested:
                state, error = JobState.CANCELLED, "cancelled by its owner"
            elif retry and job.attempts < job.max_attempts:
                state = JobState.QUEUED
            else:
                state = JobState.FAILED
                if retry:
                    error = f"{error} (gave up after {job.attempts} attempts)"
            rows = await self._rows(
                f"""UPDATE jobs SET state = :state, error = :error,
                    finished_at = CASE WHEN :state = 'queued' THEN NULL ELSE :now END,
                    worker_id = CASE WHEN :state = 'queued' THEN NULL ELSE worker_id END,
                    progress_message = CASE WHEN :state = 'queued' THEN 'waiting to be retried' ELSE '' END,
                    lease_expires_at = NULL,
                    duration = COALESCE(duration, 0) + MAX(:now - COALESCE(started_at, :now), 0),
                    updated_at = {_STAMP}
                WHERE id = :id RETURNING *""",
                {"state": state.value, "error": error[:2000], "now": now, "id": job_id})
        return job_from_row(rows[0])

    async def release(self, job_id: str, worker_id: str, *, message: str = "waiting to continue") -> None:
        """Give the job back without counting the attempt (graceful stop, preemption). A job
        whose owner asked to cancel is cancelled instead. Does nothing when the lease was lost."""
        now = time.time()
        async with self._write():
            await self._rows(
                f"""UPDATE jobs SET
                    state = CASE WHEN cancel_requested THEN 'cancelled' ELSE 'queued' END,
                    error = CASE WHEN cancel_requested THEN 'cancelled by its owner' ELSE error END,
                    finished_at = CASE WHEN cancel_requested THEN :now END,
                    attempts = CASE WHEN cancel_requested THEN attempts ELSE MAX(attempts - 1, 0) END,
                    worker_id = CASE WHEN cancel_requested THEN worker_id END,
                    progress_message = CASE WHEN cancel_requested THEN '' ELSE :message END,
                    lease_expires_at = NULL,
                    duration = COALESCE(duration, 0) + MAX(:now - COALESCE(started_at, :now), 0),
                    updated_at = {_STAMP}
                WHERE id = :id AND worker_id = :w AND state = 'running'""",
                {"now": now, "message": message[:500], "id": job_id, "w": worker_id})

    async def has_waiting(self, kinds: Sequence[JobKind]) -> bool:
        names = [JobKind(k).value for k in kinds]
        if not names:
            return False
        rows = await self._read(
            "SELECT EXISTS (SELECT 1 FROM jobs WHERE state = 'queued' AND kind IN ("
            + ",".join("?" * len(names)) + "))", names)
        return bool(rows[0][0])
