"""The job queue interface shared by the bot, the worker and every backend.

A job is a durable record: it survives a crash of the bot or the worker. A worker *claims* a
job under a lease it renews by heartbeat; a job whose lease expired (its worker died) goes back
to the queue until ``max_attempts`` is reached. Higher ``priority`` runs first: sticker jobs
outrank training so a sticker never waits behind a whole training run.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


class JobKind(enum.StrEnum):
    TRAIN = "train"
    STICKER = "sticker"
    SEGMENTER = "segmenter"  # train the background remover: bootstrap (before any sticker) or refresh
    NOOP = "noop"  # benchmarks and queue tests


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


# Default priorities: stickers before training. A segmenter bootstrap goes before stickers (they
# need it); a refresh (submitted with REFRESH_PRIORITY) after everything.
PRIORITY = {JobKind.SEGMENTER: 20, JobKind.STICKER: 10, JobKind.TRAIN: 0, JobKind.NOOP: 0}
REFRESH_PRIORITY = -10
# Seconds before a worker still without a trained segmenter asks for the bootstrap again (the
# embedded worker and the Celery side both ask; a bootstrap that failed is tried again then).
BOOTSTRAP_ASK_AGAIN = 600.0
SYSTEM_USER = 0  # the owner of jobs the product runs for itself (segmenter bootstrap and refresh)


@dataclass(frozen=True)
class Job:
    id: str
    kind: JobKind
    state: JobState
    user_id: int
    priority: int
    payload: dict[str, Any]
    attempts: int
    max_attempts: int
    worker_id: str | None
    lease_expires_at: float | None
    cancel_requested: bool
    progress: float  # 0..1
    progress_message: str
    result: dict[str, Any] | None
    error: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    updated_at: float


@dataclass(frozen=True)
class QueuePosition:
    """Where a queued job stands: ``position`` 1 = next to run; 0 = running or finished."""

    position: int
    eta_seconds: float | None  # None when there is no measured duration yet
    getting_ready: bool = False  # a sticker waits for the background remover's bootstrap


@dataclass(frozen=True)
class JobEvent:
    """A change the bot fans out to users: new state, or new progress of a running job."""

    job: Job
    seq: float = field(default=0.0)  # monotonically increasing cursor (updated_at)


class JobQueue(abc.ABC):
    """One interface for the bot (submit, cancel, get, list, position, events) and the worker
    (claim, heartbeat, progress, complete, fail)."""

    # --- bot side ---------------------------------------------------------------------
    @abc.abstractmethod
    async def submit(self, kind: JobKind, user_id: int, payload: dict[str, Any], *,
                     priority: int | None = None) -> Job:
        """Queue a job. Raises QuotaExceededError past the per-user cap of queued jobs."""

    @abc.abstractmethod
    async def cancel(self, job_id: str, *, user_id: int | None = None) -> Job:
        """Cancel a queued job at once, or ask a running one to stop at its next step.
        With ``user_id``, only the owner may cancel (JobError otherwise)."""

    @abc.abstractmethod
    async def get(self, job_id: str) -> Job | None: ...

    @abc.abstractmethod
    async def list_for_user(self, user_id: int, *, states: Sequence[JobState] | None = None,
                            limit: int = 20) -> list[Job]: ...

    @abc.abstractmethod
    async def position(self, job_id: str) -> QueuePosition: ...

    @abc.abstractmethod
    async def events_since(self, cursor: float, *, wait: float = 1.0) -> tuple[list[JobEvent], float]:
        """Jobs changed after ``cursor``, waiting up to ``wait`` seconds for one; returns the events
        and the new cursor. One loop in the bot calls this and fans out to users."""

    async def ensure_job(self, kind: JobKind, payload: dict[str, Any], *, key: str,
                         priority: int | None = None) -> tuple[Job, bool]:
        """Queue a job of the product's own (owner ``SYSTEM_USER``, no quotas) unless an
        unfinished one with the same ``key`` exists, atomically across processes: (job, created)."""
        raise NotImplementedError(f"{type(self).__name__} cannot queue system jobs yet")

    @abc.abstractmethod
    async def undelivered(self, *, limit: int = 100) -> list[Job]:
        """Finished jobs whose outcome the bot has not yet delivered (survives bot restarts)."""

    @abc.abstractmethod
    async def mark_delivered(self, job_id: str) -> None: ...

    @abc.abstractmethod
    async def counts(self) -> dict[str, dict[str, int]]:
        """``{kind: {state: n}}`` for admin stats and metrics."""

    # --- worker side ------------------------------------------------------------------
    @abc.abstractmethod
    async def claim(self, worker_id: str, *, kinds: Sequence[JobKind] | None = None) -> Job | None:
        """Atomically take the highest-priority queued job (or one whose lease expired)."""

    @abc.abstractmethod
    async def heartbeat(self, job_id: str, worker_id: str) -> bool:
        """Renew the lease. False when the lease was lost or the owner asked to cancel."""

    @abc.abstractmethod
    async def report_progress(self, job_id: str, worker_id: str, fraction: float, message: str) -> None: ...

    @abc.abstractmethod
    async def complete(self, job_id: str, worker_id: str, result: dict[str, Any]) -> Job: ...

    @abc.abstractmethod
    async def fail(self, job_id: str, worker_id: str, error: str, *, retry: bool = False) -> Job:
        """Fail the job, or with ``retry`` put it back in the queue (attempts permitting)."""

    @abc.abstractmethod
    async def release(self, job_id: str, worker_id: str, *, message: str = "waiting to continue") -> None:
        """Give a running job back to the queue without counting an attempt (graceful stop,
        preemption); ``message`` is what its owner sees while it waits."""

    @abc.abstractmethod
    async def has_waiting(self, kinds: Sequence[JobKind]) -> bool:
        """Whether a job of these kinds is queued: a training job yields when a sticker waits."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""
