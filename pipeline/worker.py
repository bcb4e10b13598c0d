"""The GPU worker: one process per accelerator, one job at a time, models loaded once.

The event loop claims jobs, renews leases, writes progress and watches for waiting stickers; the
job itself (PyTorch) runs in a thread. The thread learns what the loop saw through
``should_stop()``, asked by the trainer at every step:

- a sticker is waiting (``queue.has_waiting([STICKER])``) -> ``"yield"``: the trainer checkpoints
  to ``checkpoints/<job_id>/`` and stops, the job is released (no attempt counted), the sticker
  (higher priority) is claimed next, then the training job again, which resumes;
- the owner cancelled (heartbeat answered False) -> ``"cancel"``: no style, no checkpoint left;
- SIGTERM / SIGINT -> ``"yield"``: checkpoint, release, exit 0 (a sticker in progress finishes);
- the lease was lost (this worker stalled past it) -> ``"yield"``; another worker owns the job.

CUDA out-of-memory: memory is freed and the job retried once on the low-memory profile, then
failed with a clear reason; the worker goes on with the next job. A fault-injection hook
(``fault_inject="oom:train:2"``: the next 2 train runs raise CUDA out-of-memory before their
work starts; ``"oom:train@5:1"``: once, at the start of training step 5) tests that path on
machines without a GPU. Out of memory mid-training keeps the checkpoint (written at the failing
step's start when the weights are intact), and the retry resumes it: the low-memory profile
changes only the batch size and gradient checkpointing, not the LoRA.

Class-prior images are the first, preemptible phase of a training job: ``should_stop`` is
asked between images, progress reads "class images 12/50", and each image is cached as it is
made, so a sticker waits at most one image and the resumed job goes on from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.errors import (
    CancelledError,
    JobError,
    QueueUnavailableError,
    StickerbotError,
    TrainingPreempted,
)
from pipeline.jobs import checkpoint_dir, discard_checkpoints, run_job
from pipeline.memory import free_accelerator_memory, is_out_of_memory
from pipeline.monitoring import default_metrics, start_metrics_server
from pipeline.queue.base import BOOTSTRAP_ASK_AGAIN, Job, JobKind, JobQueue, JobState
from pipeline.storage.files import DataDir

if TYPE_CHECKING:
    from pipeline.jobs import Resident, StopRequest
    from pipeline.settings import Settings

log = logging.getLogger(__name__)

# Kinds that stop at a step boundary when the worker stops (training also when a sticker waits).
PREEMPTIBLE = (JobKind.TRAIN, JobKind.SEGMENTER, JobKind.NOOP)


def is_refresh(job: Job) -> bool:
    """A segmenter refresh: low priority, it yields to waiting stickers and training. (A
    bootstrap does not: the stickers wait for it.)"""
    return job.kind == JobKind.SEGMENTER and job.payload.get("mode") == "refresh"


def _parse_fault_spec(spec: str | None) -> tuple[dict[JobKind, int], dict[int, int]]:
    faults: dict[JobKind, int] = {}
    at_step: dict[int, int] = {}
    for part in (spec or "").split(","):
        part = part.strip()
        if not part:
            continue
        fields = part.split(":")
        if len(fields) != 3 or fields[0] != "oom" or not fields[2].isdigit():
            raise ValueError(f"bad fault {part!r}: expected oom:<kind>:<count>, e.g. oom:train:2, "
                             "or oom:train@<step>:<count>")
        kind, _, step = fields[1].partition("@")
        if step:
            if kind != JobKind.TRAIN.value or not step.isdigit():
                raise ValueError(f"bad fault {part!r}: only oom:train@<step>:<count> takes a step")
            at_step[int(step)] = at_step.get(int(step), 0) + int(fields[2])
        else:
            faults[JobKind(kind)] = faults.get(JobKind(kind), 0) + int(fields[2])
    return faults, at_step


def parse_faults(spec: str | None) -> dict[JobKind, int]:
    """``"oom:train:2,oom:sticker:1"`` -> ``{TRAIN: 2, STICKER: 1}``: how many runs of each kind
    raise CUDA out-of-memory before their work starts. Only the ``oom`` fault exists."""
    return _parse_fault_spec(spec)[0]


def parse_step_faults(spec: str | None) -> dict[int, int]:
    """``"oom:train@5:1"`` -> ``{5: 1}``: training raises CUDA out-of-memory at the start of step
    5, once (mid-training, where the low-memory retry must resume the checkpoint)."""
    return _parse_fault_spec(spec)[1]


@dataclass
class Outcome:
    """How one claimed run ended (for logs and tests)."""

    job_id: str
    state: str  # succeeded | failed | cancelled | released | lost
    detail: str = ""


class Worker:
    """Runs jobs from ``queue`` with ``resident`` models (None: no-op jobs only)."""

    def __init__(self, queue: JobQueue, resident: Resident | None, *, data: DataDir,
                 worker_id: str | None = None, kinds: Sequence[JobKind] | None = None,
                 lease_seconds: float = 30.0, preempt_poll: float = 0.1, progress_every: float = 0.5,
                 fault_inject: str | None = None) -> None:
        self.queue = queue
        self.resident = resident
        self.data = data
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        if kinds is None:
            kinds = list(JobKind) if resident is not None else [JobKind.NOOP]
        self.kinds = list(kinds)
        self.heartbeat_every = max(lease_seconds / 3.0, 0.2)
        self.preempt_poll = preempt_poll
        self.progress_every = progress_every
        self.faults = parse_faults(fault_inject)
        self.step_faults = parse_step_faults(fault_inject)
        self._faults_lock = threading.Lock()
        self._stopping = asyncio.Event()
        self._request: StopRequest = None  # read by the job thread through should_stop()
        self._progress: tuple[float, str] | None = None  # written by the job thread
        self._steps_done = 0  # progress reports of the current slice (written by the job thread)
        self._low_memory: set[str] = set()  # jobs that ran out of memory: low-memory from now on
        self._segmenter_stamp: str | None = None  # the promoted version last seen (current.json)
        self._bootstrap_asked_at: float | None = None  # monotonic time the bootstrap was last asked for
        # False while this worker's segmenter has no trained head: it takes no sticker then, so
        # its training must not yield to one (it would claim the training job straight back).
        self._segmenter_ready = True
        self.outcomes: list[Outcome] = []

    # --- control ----------------------------------------------------------------------
    def request_stop(self) -> None:
        """Graceful stop: the current job checkpoints (or finishes, for a sticker), then exit."""
        log.info("worker %s: stopping after the current step", self.worker_id)
        self._stopping.set()
        if self._request is None:
            self._request = "yield"

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def _should_stop(self) -> StopRequest:
        return self._request

    def _on_progress(self, fraction: float, message: str) -> None:
        # Never backwards within a claim (a retry after out-of-memory resumes at or after the
        # step it reached).
        if self._progress is not None:
            fraction = max(fraction, self._progress[0])
        self._progress = (fraction, message)
        self._steps_done += 1

    def _inject_fault(self, kind: JobKind) -> None:
        self._take_fault(self.faults, kind, f"for a {kind.value} job")

    def _inject_step_fault(self, step: int) -> None:
        self._take_fault(self.step_faults, step, f"at training step {step}")

    def _take_fault(self, table: dict[Any, int], key: Any, where: str) -> None:
        """Raise CUDA out-of-memory if ``table`` still holds a fault for ``key`` (one used up)."""
        with self._faults_lock:
            if table.get(key, 0) <= 0:
                return
            table[key] -= 1
        import torch

        raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (injected fault {where})")

    # --- the loop ---------------------------------------------------------------------
    async def run(self, *, max_jobs: int | None = None) -> list[Outcome]:
        """Claim and run jobs until stopped (or ``max_jobs`` runs ended)."""
        await self.discard_stale_checkpoints()
        await self.check_segmenter(initial=True)
        runs = 0
        idle_wait = min(1.0, self.heartbeat_every)
        while not self.stopping and (max_jobs is None or runs < max_jobs):
            try:
                kinds = self.kinds if await self.check_segmenter() else [
                    k for k in self.kinds if k != JobKind.STICKER]
                job = await self.queue.claim(self.worker_id, kinds=kinds)
            except (OSError, sqlite3.Error, QueueUnavailableError) as exc:
                log.warning("claiming a job failed (%s); retrying in a second", exc)
                await self._wait_for_work(1.0)
                continue
            if job is None:
                await self._wait_for_work(idle_wait)
                continue
            started = time.perf_counter()
            outcome = await self.run_claimed(job)
            record_outcome(job, outcome, time.perf_counter() - started)
            self.outcomes.append(outcome)
            runs += 1
            if outcome.state != "released":
                # A job cancelled while it waited released leaves its checkpoint behind.
                await self.discard_stale_checkpoints()
            if outcome.state == "succeeded" and job.kind == JobKind.TRAIN:
                await self.maybe_refresh_segmenter()  # a training set brings new stickers
        return self.outcomes

    # --- the background remover ---------------------------------------------------------
    async def check_segmenter(self, *, initial: bool = False) -> bool:
        """Whether this worker's segmenter can serve stickers. Picks up a newly promoted version
        (a bootstrap or refresh finished here or elsewhere) without a restart. Without a
        trained head, it queues the bootstrap once (one job for all workers: ``ensure_job``)."""
        if self.resident is None or self.resident.models.segmenter_choice is None:
            return True
        from pipeline.jobs import sync_segmenter
        from segmentation.versions import current_stamp

        stamp = current_stamp(self.data.root)
        if stamp != self._segmenter_stamp:
            self._segmenter_stamp = stamp
            if await asyncio.to_thread(sync_segmenter, self.resident):
                log.info("segmenter: now serving %s", self.resident.models.segmenter_choice)
        choice = self.resident.models.segmenter_choice
        self._segmenter_ready = choice.problem is None
        if choice.problem is None:
            if initial:
                await self.maybe_refresh_segmenter()
            return True
        now = time.monotonic()
        if self._bootstrap_asked_at is None or now - self._bootstrap_asked_at >= BOOTSTRAP_ASK_AGAIN:
            # Asked again now and then: a bootstrap that failed for good is tried once more later
            # (while one is queued or running, ensure_job returns that one).
            self._bootstrap_asked_at = now
            await self._ensure_segmenter_job("bootstrap", self.resident.settings.segmenter_bootstrap_minutes)
        return False

    async def maybe_refresh_segmenter(self) -> None:
        """Queue a low-priority refresh once ``segmenter_refresh_every`` new transparent
        stickers were uploaded since the serving version was trained."""
        if self.resident is None:
            return
        settings = self.resident.settings
        every = settings.segmenter_refresh_every
        choice = self.resident.models.segmenter_choice
        if not every or choice is None or choice.version is None:
            return
        from segmentation import versions
        from segmentation.bootstrap import count_alpha_uploads

        # Counted from the newest run on this base, promoted or kept aside: a refresh that was
        # not promoted must not be queued again at once for the same stickers.
        seen = max((int(v.info.get("uploads_seen") or 0) for v in versions.all_versions(settings.data_dir)
                    if v.base == choice.base), default=0)
        now = await asyncio.to_thread(count_alpha_uploads, settings.data_dir, settings.db_path,
                                      max_pixels=settings.max_image_pixels)
        if now - seen >= every:
            await self._ensure_segmenter_job("refresh", settings.segmenter_refresh_minutes)

    async def _ensure_segmenter_job(self, mode: str, minutes: float) -> None:
        from pipeline.queue.base import REFRESH_PRIORITY

        try:
            job, created = await self.queue.ensure_job(
                JobKind.SEGMENTER, {"mode": mode, "minutes": minutes}, key=f"segmenter-{mode}",
                priority=REFRESH_PRIORITY if mode == "refresh" else None)
        except NotImplementedError as exc:
            log.warning("segmenter %s not queued: %s", mode, exc)
            return
        log.info("segmenter %s: job %s %s", mode, job.id, "queued" if created else "already queued")

    async def _wait_for_work(self, seconds: float) -> None:
        wait = getattr(self.queue, "wait_for_change", None)
        stop = asyncio.ensure_future(self._stopping.wait())
        change = asyncio.ensure_future(wait(seconds) if wait is not None else asyncio.sleep(seconds))
        try:
            await asyncio.wait({stop, change}, timeout=seconds + 1.0, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (stop, change):
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task

    async def discard_stale_checkpoints(self) -> None:
        """Remove checkpoints of jobs that are finished or gone (cancelled while released, ...)."""
        root = self.data.root / "checkpoints"
        if not root.is_dir():
            return
        keep = set()
        for entry in root.iterdir():
            job = await self.queue.get(entry.name)
            if job is not None and not job.state.finished:
                keep.add(entry.name)
        for job_id in discard_checkpoints(self.data, keep):
            log.info("removed the checkpoint of finished job %s", job_id)

    # --- one job ----------------------------------------------------------------------
    async def run_claimed(self, job: Job) -> Outcome:
        log.info("job %s (%s, user %s): attempt %d of %d", job.id, job.kind.value, job.user_id,
                 job.attempts, job.max_attempts)
        self._request = "yield" if self.stopping and job.kind in PREEMPTIBLE else None
        self._progress = None
        self._steps_done = 0
        lost = False
        low_memory = job.id in self._low_memory
        while True:
            work = asyncio.ensure_future(asyncio.to_thread(self._execute, job, low_memory))
            lost = await self._supervise(job, work) or lost
            try:
                result = work.result()
            except Exception as exc:  # every way a job can end is handled below
                if is_out_of_memory(exc) and not low_memory and not lost:
                    log.warning("job %s ran out of accelerator memory; retrying on the low-memory "
                                "profile", job.id)
                    free_accelerator_memory()
                    low_memory = True
                    self._low_memory.add(job.id)
                    continue
                return await self._ended_with(job, exc, low_memory=low_memory, lost=lost)
            return await self._succeeded(job, result, lost=lost)

    def _execute(self, job: Job, low_memory: bool) -> dict[str, Any]:
        """In the job thread: the fault hook, then the job's handler."""
        self._inject_fault(job.kind)
        generator = self.resident.stickers.generator if self.resident is not None else None
        loads = generator.loads if generator is not None else 0
        result = run_job(job, self.resident, should_stop=self._should_stop, progress=self._on_progress,
                         low_memory=low_memory,
                         on_step_start=self._inject_step_fault if self.step_faults else None)
        if generator is not None and job.kind == JobKind.STICKER:
            default_metrics().record_adapter_lookup(hit=generator.loads == loads)
        return result

    async def _supervise(self, job: Job, work: asyncio.Future[Any]) -> bool:
        """While the job thread works: heartbeats, progress, stop requests. True if the lease was lost."""
        lost = False
        next_beat = time.monotonic() + self.heartbeat_every
        next_progress = time.monotonic()
        written: tuple[float, str] | None = None
        while not work.done():
            await asyncio.wait({work}, timeout=self.preempt_poll)
            if work.done():
                break
            now = time.monotonic()
            try:
                if self._progress is not None and self._progress != written and now >= next_progress:
                    written = self._progress
                    await self.queue.report_progress(job.id, self.worker_id, *written)
                    next_progress = now + self.progress_every
                if now >= next_beat:
                    next_beat = now + self.heartbeat_every
                    if not await self.queue.heartbeat(job.id, self.worker_id):
                        current = await self.queue.get(job.id)
                        if (current is not None and current.cancel_requested
                                and current.state == JobState.RUNNING):
                            log.info("job %s: cancelled by its owner; stopping at the next step", job.id)
                            self._request = "cancel"
                        elif self._request != "cancel":
                            log.warning("job %s: lease lost; another worker may own it now", job.id)
                            lost = True
                            self._request = "yield"
                # At least one step per slice: a steady stream of stickers slows training down
                # but cannot starve it.
                if (self._request is None and job.kind == JobKind.TRAIN and JobKind.STICKER in self.kinds
                        and self._segmenter_ready and self._steps_done > 0
                        and await self.queue.has_waiting([JobKind.STICKER])):
                    log.info("job %s: a sticker is waiting; training yields at the next step", job.id)
                    self._request = "yield"
                if (self._request is None and is_refresh(job) and self._steps_done > 0
                        and await self.queue.has_waiting([JobKind.STICKER, JobKind.TRAIN])):
                    log.info("job %s: other work is waiting; the segmenter refresh yields", job.id)
                    self._request = "yield"
                if self.stopping and self._request is None and job.kind in PREEMPTIBLE:
                    self._request = "yield"
            except (OSError, sqlite3.Error, StickerbotError) as exc:
                # The database is briefly unreachable: keep working, the lease has slack.
                log.warning("job %s: queue call failed (%s); retrying", job.id, exc)
        return lost

    async def _succeeded(self, job: Job, result: dict[str, Any], *, lost: bool) -> Outcome:
        if self._request == "cancel" and job.kind == JobKind.STICKER:
            # Stickers run to their end; a cancel that arrived meanwhile still wins.
            import shutil

            shutil.rmtree(self.data.root / "results" / job.id, ignore_errors=True)
            return await self._finish(job, "cancelled by its owner", "cancelled")
        try:
            done = await self.queue.complete(job.id, self.worker_id, result)
        except JobError as exc:
            log.warning("job %s: finished but no longer ours (%s); result dropped", job.id, exc)
            return Outcome(job.id, "lost", str(exc))
        self._low_memory.discard(job.id)
        log.info("job %s: succeeded", job.id)
        return Outcome(job.id, done.state.value)

    async def _ended_with(self, job: Job, exc: Exception, *, low_memory: bool, lost: bool) -> Outcome:
        if isinstance(exc, TrainingPreempted):
            if lost:
                return Outcome(job.id, "lost", "lease lost; checkpoint kept")
            why = "paused: the worker is restarting" if self.stopping else "paused for a sticker"
            await self.queue.release(job.id, self.worker_id, message=why)
            log.info("job %s: released at %s (%s)", job.id, exc.detail, why)
            return Outcome(job.id, "released", why)
        self._low_memory.discard(job.id)
        if isinstance(exc, CancelledError):
            import shutil

            shutil.rmtree(checkpoint_dir(self.data, job.id), ignore_errors=True)
            return await self._finish(job, "cancelled by its owner", "cancelled")
        if is_out_of_memory(exc):
            free_accelerator_memory()
            reason = ("out of accelerator memory, also on the low-memory profile (gradient "
                      "checkpointing, batch 1); the GPU is too small for this job" if low_memory
                      else "out of accelerator memory")
            return await self._finish(job, reason, "failed")
        if isinstance(exc, StickerbotError):
            # A bad photo, a damaged style, an unusable set: retrying cannot help.
            return await self._finish(job, str(exc), "failed")
        log.exception("job %s: unexpected error", job.id, exc_info=exc)
        return await self._finish(job, f"internal error ({exc.__class__.__name__}: {exc})"[:500], "failed",
                                  retry=True)

    async def _finish(self, job: Job, reason: str, state: str, *, retry: bool = False) -> Outcome:
        try:
            done = await self.queue.fail(job.id, self.worker_id, reason, retry=retry)
        except JobError as exc:
            return Outcome(job.id, "lost", str(exc))
        log.info("job %s: %s (%s)", job.id, done.state.value, done.error)
        return Outcome(job.id, done.state.value, done.error or "")


def record_outcome(job: Job, outcome: Outcome, seconds: float) -> None:
    """Prometheus: the duration of a finished run, and why it failed. A run released for a
    sticker (or lost to another worker) is not finished and is not counted."""
    if outcome.state in ("succeeded", "failed", "cancelled"):
        default_metrics().record_job(
            job.kind.value, seconds, error=outcome.detail or "error" if outcome.state == "failed" else None,
            cancelled=outcome.state == "cancelled")


async def run_worker(settings: Settings, *, kinds: Sequence[JobKind] | None = None,
                     worker_id: str | None = None, fault_inject: str | None = None,
                     install_signals: bool = True) -> int:
    """``stickerbot worker``: open the queue, load the models once, run until SIGTERM/SIGINT."""
    from pipeline.queue import open_queue

    kinds = list(kinds) if kinds else list(JobKind)
    if JobKind.STICKER in kinds and JobKind.SEGMENTER not in kinds:
        kinds.append(JobKind.SEGMENTER)  # stickers need the background remover it trains
    # SIGTERM while the models load: exit cleanly once they are in, or at once between attempts
    early_stop = threading.Event()
    loop = asyncio.get_running_loop()
    if install_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, early_stop.set)
    resident: Resident | None = None
    if any(k != JobKind.NOOP for k in kinds):
        from pipeline.jobs import Resident
        from pipeline.worker_health import load_with_backoff

        started = time.perf_counter()
        resident = await asyncio.to_thread(
            load_with_backoff, lambda: Resident.load(settings), data_dir=settings.data_dir,
            device=settings.device, initial=settings.model_load_retry_seconds,
            cap=settings.model_load_retry_max_seconds, stop=early_stop)
        if resident is None:
            log.info("stopped before the models loaded")
            return 0
        log.info("models loaded in %.1f s (%s on %s)", time.perf_counter() - started, settings.preset,
                 resident.models.device)
        if resident.models.segmenter.head_problem and JobKind.STICKER in kinds:
            log.warning("sticker jobs wait for the segmenter bootstrap: %s",
                        resident.models.segmenter.head_problem)
    if settings.worker_metrics_port:
        try:
            start_metrics_server(settings.worker_metrics_port)
        except OSError as exc:  # the port is taken (a second worker on this host): work without
            log.warning("metrics port %s: %s", settings.worker_metrics_port, exc)
    queue = await open_queue(settings)
    worker = Worker(queue, resident, data=DataDir(settings.data_dir), worker_id=worker_id, kinds=kinds,
                    lease_seconds=settings.lease_seconds, fault_inject=fault_inject)
    if install_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.request_stop)
    if early_stop.is_set():
        worker.request_stop()
    log.info("worker %s ready: %s jobs from %s", worker.worker_id, ",".join(k.value for k in kinds),
             settings.queue_backend)
    try:
        await worker.run()
    finally:
        await queue.close()
    log.info("worker %s stopped", worker.worker_id)
    return 0
