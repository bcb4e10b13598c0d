"""The embedded job queue on a real SQLite file: claims, leases, attempts, caps, ETA, events."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from pipeline.errors import JobError, QuotaExceededError
from pipeline.queue import open_queue
from pipeline.queue.base import JobKind, JobState
from pipeline.queue.sqlite import SqliteJobQueue, estimate_eta, typical_duration
from pipeline.settings import load_settings

STICKER, TRAIN, NOOP = JobKind.STICKER, JobKind.TRAIN, JobKind.NOOP


@pytest.fixture
async def queue(tmp_path: Path):
    q = await SqliteJobQueue.open(tmp_path / "q.sqlite3", lease_seconds=5, max_attempts=3,
                                  max_queued_per_user=1000, stickers_per_day=1000)
    yield q
    await q.close()


async def test_open_queue_uses_settings(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path / "data", max_queued_jobs_per_user=2, lease_seconds=7)
    q = await open_queue(settings)
    try:
        assert isinstance(q, SqliteJobQueue)
        assert q.lease_seconds == 7 and q.max_queued_per_user == 2
        assert settings.db_path.exists()
    finally:
        await q.close()


async def test_submit_claim_complete_round_trip(queue: SqliteJobQueue) -> None:
    job = await queue.submit(NOOP, 7, {"sleep": 0.0})
    assert job.state == JobState.QUEUED and job.attempts == 0 and job.payload == {"sleep": 0.0}
    claimed = await queue.claim("w1")
    assert claimed is not None and claimed.id == job.id
    assert claimed.state == JobState.RUNNING and claimed.worker_id == "w1" and claimed.attempts == 1
    assert claimed.lease_expires_at is not None and claimed.lease_expires_at > time.time()
    assert await queue.claim("w2") is None
    done = await queue.complete(job.id, "w1", {"answer": 42})
    assert done.state == JobState.SUCCEEDED and done.result == {"answer": 42} and done.progress == 1.0
    assert done.finished_at is not None
    with pytest.raises(JobError, match="no longer held"):
        await queue.complete(job.id, "w1", {})


async def test_stickers_are_claimed_before_older_training(queue: SqliteJobQueue) -> None:
    train = await queue.submit(TRAIN, 1, {"style_id": "s"})
    sticker = await queue.submit(STICKER, 2, {"style_id": "s"})
    assert await queue.has_waiting([STICKER])
    first = await queue.claim("w")
    assert first is not None and first.id == sticker.id
    assert not await queue.has_waiting([STICKER])
    second = await queue.claim("w")
    assert second is not None and second.id == train.id


async def test_claim_filters_kinds(queue: SqliteJobQueue) -> None:
    await queue.submit(TRAIN, 1, {})
    assert await queue.claim("w", kinds=[STICKER]) is None
    job = await queue.claim("w", kinds=[TRAIN, STICKER])
    assert job is not None and job.kind == TRAIN


async def test_concurrent_claims_on_two_connections_take_each_job_once(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite3"
    a = await SqliteJobQueue.open(path, max_queued_per_user=1000)
    b = await SqliteJobQueue.open(path, max_queued_per_user=1000)
    try:
        ids = {(await a.submit(NOOP, 1, {})).id for _ in range(60)}
        taken: list[tuple[str, str]] = []

        async def drain(q: SqliteJobQueue, name: str) -> None:
            while (job := await q.claim(name)) is not None:
                taken.append((name, job.id))
                await q.complete(job.id, name, {})

        await asyncio.gather(drain(a, "a"), drain(b, "b"), drain(a, "a2"), drain(b, "b2"))
        assert sorted(j for _, j in taken) == sorted(ids)
        assert len({name for name, _ in taken}) >= 2  # both connections really competed
        counts = await a.counts()
        assert counts == {"noop": {"succeeded": 60}}
    finally:
        await a.close()
        await b.close()


async def test_expired_lease_requeues_counting_the_attempt_then_fails(tmp_path: Path) -> None:
    q = await SqliteJobQueue.open(tmp_path / "q.sqlite3", lease_seconds=0.2, max_attempts=2)
    try:
        job = await q.submit(TRAIN, 1, {})
        first = await q.claim("dead-worker")
        assert first is not None and first.attempts == 1
        await asyncio.sleep(0.3)  # the worker "died": no heartbeat
        second = await q.claim("w2")
        assert second is not None and second.id == job.id and second.attempts == 2
        # The dead worker's late result is refused: another worker holds the job now.
        assert not await q.heartbeat(job.id, "dead-worker")
        with pytest.raises(JobError):
            await q.complete(job.id, "dead-worker", {})
        await asyncio.sleep(0.3)
        assert await q.claim("w3") is None  # attempts used up
        failed = await q.get(job.id)
        assert failed is not None and failed.state == JobState.FAILED
        assert "stopped responding" in (failed.error or "") and "2 attempts" in (failed.error or "")
    finally:
        await q.close()


async def test_heartbeat_keeps_the_lease(tmp_path: Path) -> None:
    # Heartbeats a third of a lease apart outlive the lease twice over; the margin is wide, so
    # a loaded machine's stalls do not decide the outcome.
    q = await SqliteJobQueue.open(tmp_path / "q.sqlite3", lease_seconds=1.2)
    try:
        job = await q.submit(NOOP, 1, {})
        await q.claim("w1")
        for _ in range(6):
            await asyncio.sleep(0.4)
            assert await q.heartbeat(job.id, "w1")
        assert await q.claim("w2") is None
        got = await q.get(job.id)
        assert got is not None and got.state == JobState.RUNNING and got.worker_id == "w1"
    finally:
        await q.close()


async def test_release_does_not_count_an_attempt(queue: SqliteJobQueue) -> None:
    job = await queue.submit(TRAIN, 1, {})
    for _ in range(5):  # more than max_attempts: preemptions must not use attempts up
        claimed = await queue.claim("w")
        assert claimed is not None and claimed.attempts == 1
        await queue.report_progress(job.id, "w", 0.5, "step 5/10")
        await queue.release(job.id, "w", message="paused for a sticker")
        back = await queue.get(job.id)
        assert back is not None and back.state == JobState.QUEUED and back.attempts == 0
        assert back.progress == 0.5 and back.progress_message == "paused for a sticker"
        assert back.worker_id is None


async def test_fail_with_retry_requeues_until_attempts_are_used(queue: SqliteJobQueue) -> None:
    job = await queue.submit(NOOP, 1, {})
    for attempt in (1, 2):
        await queue.claim("w")
        again = await queue.fail(job.id, "w", "flaky", retry=True)
        assert again.state == JobState.QUEUED and again.attempts == attempt
    await queue.claim("w")
    final = await queue.fail(job.id, "w", "flaky", retry=True)
    assert final.state == JobState.FAILED and final.error == "flaky (gave up after 3 attempts)"
    other = await queue.submit(NOOP, 1, {})
    await queue.claim("w")
    plain = await queue.fail(other.id, "w", "bad input")
    assert plain.state == JobState.FAILED and plain.error == "bad input" and plain.attempts == 1


async def test_cancel_queued_at_once_and_running_through_heartbeat(queue: SqliteJobQueue) -> None:
    queued = await queue.submit(NOOP, 5, {})
    with pytest.raises(JobError, match="another user"):
        await queue.cancel(queued.id, user_id=6)
    with pytest.raises(JobError, match="no job"):
        await queue.cancel("nope")
    cancelled = await queue.cancel(queued.id, user_id=5)
    assert cancelled.state == JobState.CANCELLED and cancelled.finished_at is not None
    assert await queue.claim("w") is None

    running = await queue.submit(TRAIN, 5, {})
    await queue.claim("w")
    assert await queue.heartbeat(running.id, "w")
    asked = await queue.cancel(running.id, user_id=5)
    assert asked.state == JobState.RUNNING and asked.cancel_requested
    assert not await queue.heartbeat(running.id, "w")  # the worker's signal to stop
    stopped = await queue.fail(running.id, "w", "stopped at step 3")
    assert stopped.state == JobState.CANCELLED and stopped.error == "cancelled by its owner"
    # A cancelled job that was released (preempted) does not come back either.
    third = await queue.submit(TRAIN, 5, {})
    await queue.claim("w")
    await queue.cancel(third.id)
    await queue.release(third.id, "w")
    got = await queue.get(third.id)
    assert got is not None and got.state == JobState.CANCELLED
    assert await queue.claim("w") is None


async def test_per_user_cap_on_unfinished_jobs(tmp_path: Path) -> None:
    q = await SqliteJobQueue.open(tmp_path / "q.sqlite3", max_queued_per_user=2, stickers_per_day=100)
    try:
        first = await q.submit(TRAIN, 1, {})
        await q.submit(STICKER, 1, {})
        with pytest.raises(QuotaExceededError, match="limit is 2"):
            await q.submit(STICKER, 1, {})
        await q.submit(STICKER, 2, {})  # another user is not affected
        await q.claim("w", kinds=[TRAIN])
        with pytest.raises(QuotaExceededError):  # running jobs count too
            await q.submit(STICKER, 1, {})
        await q.complete(first.id, "w", {})
        await q.submit(STICKER, 1, {})
    finally:
        await q.close()


async def test_stickers_per_day_cap_counts_variants_not_failures(tmp_path: Path) -> None:
    q = await SqliteJobQueue.open(tmp_path / "q.sqlite3", max_queued_per_user=100, stickers_per_day=5)
    try:
        a = await q.submit(STICKER, 1, {"variants": 2})
        await q.submit(STICKER, 1, {"variants": 2})
        with pytest.raises(QuotaExceededError, match="daily sticker limit"):
            await q.submit(STICKER, 1, {"variants": 2})
        await q.submit(STICKER, 1, {})  # one more fits: 5 of 5
        with pytest.raises(QuotaExceededError):
            await q.submit(STICKER, 1, {})
        await q.submit(TRAIN, 1, {})  # training is not a sticker
        await q.claim("w", kinds=[STICKER])
        await q.fail(a.id, "w", "broken photo")  # a failed sticker gives its quota back
        await q.submit(STICKER, 1, {"variants": 2})
    finally:
        await q.close()


def test_estimate_eta_is_a_function_of_queue_and_durations() -> None:
    durations = {STICKER: 2.0, TRAIN: 60.0, NOOP: None}
    assert estimate_eta(STICKER, ahead=[], running=[], durations=durations) == 2.0
    assert estimate_eta(TRAIN, ahead=[STICKER, STICKER], running=[(TRAIN, 0.25)],
                        durations=durations) == pytest.approx(2 + 2 + 45 + 60)
    # A sticker does not wait for a running training job: training yields to it.
    assert estimate_eta(STICKER, ahead=[STICKER], running=[(TRAIN, 0.1)], durations=durations) == 4.0
    assert estimate_eta(TRAIN, ahead=[TRAIN, TRAIN], running=[], durations=durations, workers=2) == 120.0
    assert estimate_eta(NOOP, ahead=[], running=[], durations=durations) is None
    assert estimate_eta(STICKER, ahead=[NOOP], running=[], durations=durations) is None
    assert typical_duration([1.0, 100.0, 2.0]) == 2.0
    assert typical_duration([]) is None


async def test_position_and_eta_from_measured_durations(queue: SqliteJobQueue) -> None:
    first = await queue.submit(NOOP, 1, {})
    assert await queue.position(first.id) == (await queue.position(first.id))
    pos = await queue.position(first.id)
    assert pos.position == 1 and pos.eta_seconds is None  # nothing measured yet
    for _ in range(3):
        job = await queue.claim("w")
        assert job is not None
        await asyncio.sleep(0.2)
        await queue.complete(job.id, "w", {})
        await queue.submit(NOOP, 1, {})
    durations = await queue.typical_durations()
    measured = durations[NOOP]
    assert measured is not None and 0.2 <= measured < 1.0
    jobs = [await queue.submit(NOOP, 1, {}) for _ in range(3)]
    pos = await queue.position(jobs[-1].id)
    # 3 measured-and-requeued noop jobs: one queued ahead from the loop, plus two of ``jobs``.
    assert pos.position == 4
    assert pos.eta_seconds == pytest.approx(4 * measured)
    sticker = await queue.submit(STICKER, 2, {})
    assert (await queue.position(sticker.id)).position == 1  # stickers jump the queue
    assert (await queue.position(jobs[-1].id)).position == 5
    running = await queue.claim("w")
    assert running is not None
    assert (await queue.position(running.id)).position == 0
    with pytest.raises(JobError):
        await queue.position("missing")


async def test_events_fan_out_changes_from_another_process_connection(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite3"
    bot = await SqliteJobQueue.open(path, poll_interval=0.02)
    worker = await SqliteJobQueue.open(path)
    try:
        cursor = await bot.latest_cursor()
        events, same = await bot.events_since(cursor, wait=0.1)
        assert events == [] and same == cursor

        async def produce() -> str:
            # Events carry a job's latest state: changes closer together than the reader's
            # wake-up coalesce, so the steps are spaced out to see each one.
            await asyncio.sleep(0.2)
            job = await worker.submit(NOOP, 3, {})
            await asyncio.sleep(0.25)
            await worker.claim("w")
            await asyncio.sleep(0.25)
            await worker.heartbeat(job.id, "w")  # a lease renewal is not an event
            await worker.report_progress(job.id, "w", 0.5, "half")
            await asyncio.sleep(0.25)
            await worker.complete(job.id, "w", {"ok": True})
            return job.id

        task = asyncio.create_task(produce())
        start = time.monotonic()
        seen: list[tuple[str, float, str]] = []
        while len(seen) < 4 and time.monotonic() - start < 5:
            events, cursor = await bot.events_since(cursor, wait=2.0)
            seen += [(e.job.state.value, e.job.progress, e.job.progress_message) for e in events]
            if len(seen) == 1:
                assert time.monotonic() - start < 1.0  # woken by the commit, not by the timeout
        job_id = await task
        assert [s for s, _, _ in seen] == ["queued", "running", "running", "succeeded"]
        assert seen[2][1:] == (0.5, "half")
        events, _ = await bot.events_since(cursor, wait=0.05)
        assert events == []  # nothing is delivered twice
        assert [j.id for j in await bot.undelivered()] == [job_id]
        await bot.mark_delivered(job_id)
        assert await bot.undelivered() == []
    finally:
        await bot.close()
        await worker.close()


async def test_cursor_never_skips_interleaved_writers(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite3"
    writers = [await SqliteJobQueue.open(path, max_queued_per_user=10_000) for _ in range(3)]
    reader = await SqliteJobQueue.open(path, poll_interval=0.005)
    try:
        cursor = await reader.latest_cursor()
        ids: set[str] = set()

        async def write(q: SqliteJobQueue) -> None:
            for _ in range(40):
                ids.add((await q.submit(NOOP, 1, {})).id)

        seen: set[str] = set()
        task = asyncio.gather(*(write(w) for w in writers))
        while not task.done() or len(seen) < len(ids):
            events, cursor = await reader.events_since(cursor, wait=0.5)
            seen |= {e.job.id for e in events}
            if task.done() and not events:
                break
        await task
        assert seen == ids
    finally:
        for q in [*writers, reader]:
            await q.close()


async def test_reopening_the_database_loses_no_queued_job(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite3"
    q = await SqliteJobQueue.open(path)
    ids = [(await q.submit(kind, 1, {"n": i})).id for i, kind in enumerate([TRAIN, STICKER])]
    await q.close()
    again = await SqliteJobQueue.open(path)
    try:
        jobs = await again.list_for_user(1)
        assert {j.id for j in jobs} == set(ids) and all(j.state == JobState.QUEUED for j in jobs)
        assert [j.id for j in await again.list_for_user(1, states=[JobState.QUEUED], limit=1)] == [ids[1]]
    finally:
        await again.close()
