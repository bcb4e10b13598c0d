"""The Celery application of the scale-out backend: configuration, routing, the one task, and the
worker's start-up (models loaded once per worker process).

Run one worker per GPU, with the solo pool (one job at a time on its GPU)::

    celery -A pipeline.celery_app worker --pool solo --concurrency 1 --queues sticker,train

``--queues sticker,train`` serves both queues, stickers first (the queues are read in the order
given); ``--queues sticker`` or ``--queues train`` dedicates a worker. The worker reads the same
settings as every stickerbot process (environment / ``.env``) and needs the shared data dir.

Delivery: ``task_acks_late`` with ``worker_prefetch_multiplier=1`` acknowledges a message only
after its job finished, so a worker that dies (SIGKILL, power loss, OOM killer) leaves the message
unacknowledged and Redis hands it to another worker once the visibility timeout has passed; the
training handler then resumes from ``checkpoints/<job_id>/`` on the shared data dir. The
visibility timeout must be longer than the longest training run, or a job still running would be
handed out a second time (a per-job lock in Redis keeps the copy waiting, it never runs twice at
once).

A sticker that reaches a worker whose segmenter has no trained head waits for the background
remover's bootstrap: the worker asks the bot for it (an "ensure" event) and retries the sticker
after a countdown, its attempt not counted (``_segmenter_ready``).

The bot imports this module to send tasks: model libraries are imported only inside the worker.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis
from celery import Celery, signals

from pipeline.errors import CancelledError, TrainingPreempted
from pipeline.queue.base import BOOTSTRAP_ASK_AGAIN, Job, JobKind, JobState
from pipeline.queue.celery import (
    EVENTS_MAXLEN,
    EVENTS_STREAM,
    KEY_TTL_SECONDS,
    PRIORITY_RESUMED,
    QUEUE_FOR_KIND,
    QUEUES,
    TASK_NAME,
    job_key,
)
from pipeline.settings import Settings, load_settings

if TYPE_CHECKING:
    from pipeline.jobs import StopRequest

log = logging.getLogger(__name__)

# Longer than the longest training run (1000 SD 1.5 LoRA steps take about 11 min on an A100; a
# slow GPU with full fine-tuning can take an hour or two).
DEFAULT_VISIBILITY_TIMEOUT = 6 * 3600.0


# How long a finished job's worker waits for Redis to come back to report the outcome.
OUTCOME_PERSIST_S = 600.0

# A sticker that reached a worker whose segmenter is not trained yet comes back after this many
# seconds (held by a worker until then; the bootstrap, queued meanwhile, runs first).
SEGMENTER_WAIT_S = 5.0
# Set (NX, with a TTL) by the worker that asked the bot for the segmenter bootstrap.
SEGMENTER_ASKED_KEY = "stickerbot:segmenter-bootstrap:asked"


def create_app(settings: Settings) -> Celery:
    """A Celery app for ``settings`` (broker and result backend: ``settings.redis_url``)."""
    visibility = float(settings.celery_visibility_timeout)
    app = Celery("stickerbot", broker=settings.redis_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        # Results go through the event stream into the bot's database, not the result backend.
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        worker_pool="solo",
        worker_hijack_root_logger=False,
        task_default_queue="sticker",
        task_routes={TASK_NAME: {"queue": "sticker"}},
        task_create_missing_queues=True,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=3.0,
        broker_transport_options={
            "visibility_timeout": visibility,
            # How often a worker looks for messages of dead workers older than the timeout.
            "unacked_restore_interval": max(1, min(60, int(visibility / 4))),
            "unacked_restore_throttle": 1,
            # Read the queues in the order the worker lists them (sticker before train) instead of
            # round robin: a waiting sticker is always taken before a training job.
            "queue_order_strategy": "priority",
            "socket_connect_timeout": 3.0,
        },
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    app.stickerbot_settings = settings  # read by the worker hooks
    app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True)(_run_job_task)
    _connect_worker_signals(app)
    return app


def __getattr__(name: str) -> Any:
    """``celery -A pipeline.celery_app`` asks for ``app``: built then from the settings of the
    environment, once (not at import time: the bot imports this module with its own settings)."""
    if name == "app":
        app = create_app(load_settings())
        globals()["app"] = app
        return app
    raise AttributeError(name)


# --- the worker process -------------------------------------------------------------------


@dataclass
class WorkerRuntime:
    """What one worker process keeps between jobs: settings, Redis, models (loaded once)."""

    settings: Settings
    worker_id: str
    redis: redis.Redis
    # Queues this worker consumes: a training job yields at a step boundary when a sticker waits
    # in one of them.
    queues: tuple[str, ...] = QUEUES
    stopping: threading.Event = field(default_factory=threading.Event)
    low_memory: set[str] = field(default_factory=set)  # jobs that ran out of memory once
    _resident: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def resident(self) -> Any:
        """The embedded worker's :class:`pipeline.jobs.Resident` (models, adapter LRU), loaded on
        first use and kept for the life of the process (worker init calls this at start)."""
        with self._lock:
            if self._resident is None:
                from pipeline import worker_health as wh
                from pipeline.jobs import Resident

                started = time.monotonic()
                name, data_dir = wh.health_name(self.settings.device), self.settings.data_dir
                try:
                    self._resident = Resident.load(self.settings)
                except Exception as exc:  # the process exits; doctor and /stats say why
                    wh.write_health(data_dir, wh.WorkerHealth(
                        name, wh.MODELS_FAILED, reason=wh.failure_reason(exc), attempt=1,
                        pid=os.getpid(), updated_at=time.time()))
                    raise
                wh.write_health(data_dir, wh.WorkerHealth(name, wh.READY, pid=os.getpid(),
                                                          updated_at=time.time()))
                log.info("models loaded in %.1f s (%s)", time.monotonic() - started, self.settings.preset)
            return self._resident

    def emit(self, event_type: str, job_id: str, *, persist_for: float = 0.0, **fields: Any) -> None:
        """One event for the bot's reader (see pipeline.queue.celery). With ``persist_for``, a
        Redis outage is waited out that many seconds (an outcome must not be lost); without, the
        error propagates (progress callers drop it)."""
        entry: dict[Any, Any] = {"type": event_type, "job_id": job_id, "worker": self.worker_id,
                                 "ts": f"{time.time():.6f}"}
        entry.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()})
        deadline, delay = time.monotonic() + persist_for, 0.5
        while True:
            try:
                self.redis.xadd(EVENTS_STREAM, entry, maxlen=EVENTS_MAXLEN, approximate=True)
                return
            except redis.RedisError as exc:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("job %s: cannot report %s (%s); retrying in %.0f s", job_id, event_type,
                            exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 15.0)


def _runtime(app: Celery) -> WorkerRuntime:
    runtime = getattr(app, "stickerbot_runtime", None)
    if runtime is None:
        settings: Settings = app.stickerbot_settings
        runtime = WorkerRuntime(
            settings=settings,
            worker_id=f"{socket.gethostname()}/{os.getpid()}",
            redis=redis.Redis.from_url(settings.redis_url, socket_connect_timeout=3.0, socket_timeout=30.0),
        )
        app.stickerbot_runtime = runtime
    return runtime


def _start_worker(app: Celery) -> None:
    from pipeline.monitoring import configure_logging, start_metrics_server

    settings: Settings = app.stickerbot_settings
    configure_logging(settings.log_level, json_lines=settings.log_format == "json")
    runtime = _runtime(app)
    if settings.worker_metrics_port:
        try:
            start_metrics_server(settings.worker_metrics_port)
        except OSError as exc:  # a second worker on the same host and port: no metrics, still work
            log.warning("metrics port %s: %s", settings.worker_metrics_port, exc)
    runtime.resident()


def _connect_worker_signals(app: Celery) -> None:
    """Worker start-up and shutdown hooks of ``app`` (signals are process-wide; the handlers
    check the app, so a bot that only sends tasks is never affected)."""

    def on_process_init(**_: Any) -> None:
        # Sent once in the solo pool's own process, and once per child of a prefork pool (not
        # recommended on a GPU): each such process loads its models once, before consuming.
        _start_worker(app)

    def on_shutting_down(**_: Any) -> None:
        # Warm shutdown (SIGTERM): a training job checkpoints at its next step and goes back to
        # the queue instead of holding its message until the visibility timeout.
        runtime = getattr(app, "stickerbot_runtime", None)
        if runtime is not None:
            runtime.stopping.set()

    signals.worker_process_init.connect(on_process_init, weak=False,
                                        dispatch_uid=f"stickerbot.init.{id(app)}")
    signals.worker_shutting_down.connect(on_shutting_down, weak=False,
                                         dispatch_uid=f"stickerbot.shutdown.{id(app)}")


# --- the task -----------------------------------------------------------------------------


def job_from_message(message: dict[str, Any], *, attempt: int) -> Job:
    """The :class:`Job` a handler receives, rebuilt from the task message."""
    now = time.time()
    kind = JobKind(message["kind"])
    return Job(id=message["id"], kind=kind, state=JobState.RUNNING, user_id=int(message["user_id"]),
               priority=int(message.get("priority", 0)), payload=dict(message.get("payload") or {}),
               attempts=attempt, max_attempts=int(message.get("max_attempts", 3)), worker_id=None,
               lease_expires_at=None, cancel_requested=False, progress=0.0, progress_message="",
               result=None, error=None, created_at=now, started_at=now, finished_at=None, updated_at=now)


class _Heartbeat(threading.Thread):
    """Keeps the job's run lock and the bot's lease alive while the handler works."""

    def __init__(self, runtime: WorkerRuntime, job_id: str, lease_ms: int) -> None:
        super().__init__(daemon=True, name=f"heartbeat-{job_id}")
        self.runtime, self.job_id, self.lease_ms = runtime, job_id, lease_ms
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.lease_ms / 3000):
            try:
                self.runtime.redis.pexpire(job_key(self.job_id, "run"), self.lease_ms)
                self.runtime.emit("heartbeat", self.job_id)
            except redis.RedisError as exc:
                log.warning("heartbeat of job %s: %s", self.job_id, exc)


class JobHooks:
    """What a handler may ask the world while it runs: progress out, stop requests in.

    ``should_stop()`` answers "cancel" (the owner cancelled: Redis key), "yield" (the worker is
    shutting down: checkpoint and give the job back) or None. Both calls are throttled so a
    training loop may call them every step.
    """

    def __init__(self, runtime: WorkerRuntime, job: Job, *, interval: float = 0.5) -> None:
        self.runtime, self.job_id, self.interval = runtime, job.id, interval
        # A training job on a worker that also serves stickers steps aside for a waiting one.
        self.yields_to_stickers = job.kind == JobKind.TRAIN and "sticker" in runtime.queues
        self._last_progress = 0.0
        self._last_check = 0.0
        self._cancelled = False
        self._sticker_waiting = False

    def progress(self, fraction: float, message: str = "") -> None:
        now = time.monotonic()
        if fraction < 1.0 and now - self._last_progress < self.interval:
            return
        self._last_progress = now
        try:
            self.runtime.emit("progress", self.job_id, fraction=f"{fraction:.4f}", message=message)
        except redis.RedisError as exc:  # progress is best effort; the work goes on
            log.warning("job %s: progress not reported (%s)", self.job_id, exc)

    def should_stop(self) -> StopRequest:
        if self.runtime.stopping.is_set():
            return "yield"
        now = time.monotonic()
        if not self._cancelled and now - self._last_check >= self.interval:
            self._last_check = now
            # Redis away for a moment: keep working, ask again later.
            with contextlib.suppress(redis.RedisError):
                self._cancelled = bool(self.runtime.redis.exists(job_key(self.job_id, "cancel")))
                if self.yields_to_stickers and not self._cancelled:
                    # kombu's Redis transport keeps a queue's messages in a list named after it.
                    self._sticker_waiting = bool(self.runtime.redis.llen("sticker"))
        if self._cancelled:
            return "cancel"
        return "yield" if self._sticker_waiting else None

    def is_cancelled(self) -> bool:
        return self.should_stop() == "cancel"


def _run_job_task(self: Any, message: dict[str, Any]) -> str:
    """Run one job: the Celery task body. Returns what happened (for the worker's log)."""
    runtime = _runtime(self.app)
    if self.app.amqp.queues.consume_from:
        runtime.queues = tuple(self.app.amqp.queues.consume_from)
    r, job_id = runtime.redis, message["id"]
    lease_ms = int(runtime.settings.lease_seconds * 1000)
    # 1. a copy of a job that already finished (redelivered after it completed): nothing to do
    if r.exists(job_key(job_id, "done")):
        return "duplicate"
    # 2. a sticker needs a trained background remover: without one, the bootstrap is asked for
    #    and the sticker comes back after it (no attempt counted; the user reads "getting ready")
    if (message.get("kind") == JobKind.STICKER.value and not r.exists(job_key(job_id, "cancel"))
            and not _segmenter_ready(runtime, job_id)):
        raise self.retry(countdown=SEGMENTER_WAIT_S, max_retries=None)
    # 3. one run at a time: a copy that arrives while the job runs elsewhere waits its turn
    if not r.set(job_key(job_id, "run"), runtime.worker_id, nx=True, px=lease_ms):
        raise self.retry(countdown=max(1.0, runtime.settings.lease_seconds), max_retries=None)
    heartbeat = _Heartbeat(runtime, job_id, lease_ms)
    try:
        # 4. count the attempt (a worker that died mid-job counted one too)
        attempt = int(r.incr(job_key(job_id, "attempts")))
        r.expire(job_key(job_id, "attempts"), KEY_TTL_SECONDS)
        runtime.emit("started", job_id, attempt=str(attempt))
        if r.exists(job_key(job_id, "cancel")):
            return _finish(runtime, job_id, error="cancelled by its owner", outcome="cancelled")
        max_attempts = int(message.get("max_attempts", 3))
        if attempt > max_attempts:
            return _finish(runtime, job_id, outcome="failed", error=(
                f"the workers running it stopped {attempt - 1} times; gave up after "
                f"{max_attempts} attempts"))
        heartbeat.start()
        # 5. the same handlers as the embedded worker
        job = job_from_message(message, attempt=attempt)
        hooks = JobHooks(runtime, job)
        started = time.monotonic()
        try:
            result = run_handler(runtime, job, hooks)
        except TrainingPreempted:
            # Checkpoint written: give the job back (the attempt too) and queue it again.
            heartbeat.done.set()
            why = ("paused: the worker is restarting" if runtime.stopping.is_set()
                   else "paused for a sticker")
            runtime.emit("released", job_id, persist_for=OUTCOME_PERSIST_S, message=why)
            r.decr(job_key(job_id, "attempts"))
            r.delete(job_key(job_id, "run"))
            _republish(self.app, message)
            return "released"
        except CancelledError:
            _record(job.kind, time.monotonic() - started, cancelled=True)
            _discard_outputs(runtime, job)
            return _finish(runtime, job_id, outcome="cancelled", error="cancelled by its owner")
        except Exception as exc:
            _record(job.kind, time.monotonic() - started, error=exc)
            return _failed(self.app, runtime, message, job, exc, attempt=attempt)
        if job.kind == JobKind.STICKER and hooks.is_cancelled():
            # Stickers run to their end; a cancel that arrived meanwhile still wins.
            _discard_outputs(runtime, job)
            return _finish(runtime, job_id, outcome="cancelled", error="cancelled by its owner")
        runtime.low_memory.discard(job_id)
        _record(job.kind, time.monotonic() - started)
        return _finish(runtime, job_id, outcome="succeeded", result=result)
    finally:
        heartbeat.done.set()
        if heartbeat.is_alive():
            heartbeat.join(timeout=5)
        if r.get(job_key(job_id, "run")) == runtime.worker_id.encode():
            r.delete(job_key(job_id, "run"))


def _segmenter_ready(runtime: WorkerRuntime, job_id: str) -> bool:
    """Whether this worker's segmenter can cut stickers, after picking up a version promoted
    meanwhile. When it cannot (no trained head and no promoted version), asks the bot for the
    bootstrap job: once per ``BOOTSTRAP_ASK_AGAIN`` across all workers (a Redis SET NX), so a
    bootstrap that failed for good is asked for again later, as the embedded worker does."""
    from pipeline.jobs import sync_segmenter

    try:
        resident = runtime.resident()
        if resident.models.segmenter_choice is None:
            return True
        if sync_segmenter(resident):
            log.info("segmenter: now serving %s", resident.models.segmenter_choice)
    except Exception:  # models or a promoted version that do not load: the handler reports it
        log.warning("sticker %s: the segmenter check failed", job_id, exc_info=True)
        return True
    choice = resident.models.segmenter_choice
    if choice.problem is None:
        return True
    minutes = runtime.settings.segmenter_bootstrap_minutes
    try:
        if runtime.redis.set(SEGMENTER_ASKED_KEY, runtime.worker_id, nx=True, ex=int(BOOTSTRAP_ASK_AGAIN)):
            log.warning("sticker %s waits for the segmenter bootstrap (%s); asking for it", job_id,
                        choice.problem)
            try:
                runtime.emit("ensure", job_id, job_kind=JobKind.SEGMENTER.value, key="segmenter-bootstrap",
                             payload=json.dumps({"mode": "bootstrap", "minutes": minutes}))
            except redis.RedisError:
                with contextlib.suppress(redis.RedisError):  # not asked: the next try asks
                    runtime.redis.delete(SEGMENTER_ASKED_KEY)
                raise
    except redis.RedisError as exc:  # the sticker's next try asks again
        log.warning("sticker %s: the segmenter bootstrap was not asked for (%s)", job_id, exc)
    return False


def _finish(runtime: WorkerRuntime, job_id: str, *, outcome: str, result: Any = None,
            error: str | None = None, retry: bool = False) -> str:
    """The last event of a run and the "done" mark (written before the message is acknowledged,
    so a redelivered copy finds it). ``retry`` on the last attempt lets the record say so."""
    if outcome == "succeeded":
        runtime.emit("succeeded", job_id, persist_for=OUTCOME_PERSIST_S,
                     result=json.dumps(result if result is not None else {}))
    else:
        runtime.emit("failed", job_id, persist_for=OUTCOME_PERSIST_S, error=error or outcome,
                     retry="1" if retry else "0")
    runtime.redis.set(job_key(job_id, "done"), outcome, ex=KEY_TTL_SECONDS)
    return outcome


def _republish(app: Celery, message: dict[str, Any]) -> None:
    """Queue a job again that has already run part-way: ahead of the jobs that have not started."""
    app.send_task(TASK_NAME, args=[message], task_id=message["id"],
                  queue=QUEUE_FOR_KIND[JobKind(message["kind"])], priority=PRIORITY_RESUMED)


def _record(kind: JobKind, seconds: float, *, error: BaseException | None = None,
            cancelled: bool = False) -> None:
    from pipeline.monitoring import default_metrics

    default_metrics().record_job(kind.value, seconds, error=error, cancelled=cancelled)


def run_handler(runtime: WorkerRuntime, job: Job, hooks: JobHooks) -> dict[str, Any]:
    """The embedded worker's handler for ``job`` (:func:`pipeline.jobs.run_job`), with its
    out-of-memory policy: once more on the low-memory profile, then fail."""
    from pipeline.jobs import run_job, sync_segmenter
    from pipeline.memory import free_accelerator_memory, is_out_of_memory

    resident = runtime.resident()
    if job.kind == JobKind.STICKER and sync_segmenter(resident):  # a version promoted meanwhile
        log.info("segmenter: now serving %s", resident.models.segmenter_choice)
    while True:
        low_memory = job.id in runtime.low_memory
        loads = resident.stickers.generator.loads
        try:
            result = run_job(job, resident, should_stop=hooks.should_stop, progress=hooks.progress,
                             low_memory=low_memory)
            if job.kind == JobKind.STICKER:
                from pipeline.monitoring import default_metrics

                default_metrics().record_adapter_lookup(hit=resident.stickers.generator.loads == loads)
            return result
        except Exception as exc:
            if not is_out_of_memory(exc) or low_memory:
                raise
            log.warning("job %s ran out of accelerator memory; retrying on the low-memory profile",
                        job.id)
            free_accelerator_memory()
            runtime.low_memory.add(job.id)


def _failed(app: Celery, runtime: WorkerRuntime, message: dict[str, Any], job: Job, exc: Exception, *,
            attempt: int) -> str:
    """A handler error, classified as the embedded worker does: bad input, a damaged style or
    out of memory on the low-memory profile fail for good; anything unexpected is tried again
    (on any worker) while attempts remain."""
    from pipeline.errors import StickerbotError
    from pipeline.memory import free_accelerator_memory, is_out_of_memory

    runtime.low_memory.discard(job.id)
    if is_out_of_memory(exc):
        free_accelerator_memory()
        return _finish(runtime, job.id, outcome="failed", error=(
            "out of accelerator memory, also on the low-memory profile (gradient checkpointing, "
            "batch 1); the GPU is too small for this job"))
    if isinstance(exc, StickerbotError):
        return _finish(runtime, job.id, outcome="failed", error=str(exc))
    log.error("job %s: unexpected error", job.id, exc_info=exc)
    error = f"internal error ({exc.__class__.__name__}: {exc})"[:500]
    if attempt >= job.max_attempts:
        return _finish(runtime, job.id, outcome="failed", error=error, retry=True)
    runtime.emit("failed", job.id, error=error, retry="1")
    runtime.redis.delete(job_key(job.id, "run"))
    _republish(app, message)
    return "retried"


def _discard_outputs(runtime: WorkerRuntime, job: Job) -> None:
    """A cancelled job leaves nothing behind: no checkpoint, no sticker files."""
    import shutil

    from pipeline.jobs import RESULTS, checkpoint_dir
    from pipeline.storage.files import DataDir

    data = DataDir(runtime.settings.data_dir)
    shutil.rmtree(checkpoint_dir(data, job.id), ignore_errors=True)
    shutil.rmtree(data.root / RESULTS / job.id, ignore_errors=True)


def check_broker(settings: Settings, *, within: float = 2.0) -> tuple[bool, str]:
    """For ``stickerbot doctor``: whether Redis answers and which Celery workers reply to a ping
    (a worker busy with a job in the solo pool replies only after it). Returns (ok, description)."""
    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=within, socket_timeout=within)
    try:
        client.ping()
        waiting = {queue: int(client.llen(queue)) for queue in QUEUES}
    except redis.RedisError as exc:
        return False, f"Redis at {_safe_url(settings.redis_url)} cannot be reached ({exc.__class__.__name__})"
    finally:
        client.close()
    app = create_app(settings)
    try:
        replies = app.control.ping(timeout=within) or []
    finally:
        app.close()
    workers = sorted(name for reply in replies for name in reply)
    queued = ", ".join(f"{q} {n}" for q, n in waiting.items())
    if not workers:
        return False, (f"Redis ok ({queued} waiting) but no Celery worker answered within {within:.0f} s; "
                       "start one: celery -A pipeline.celery_app worker --pool solo -Q sticker,train")
    return True, f"Redis ok ({queued} waiting); workers: {', '.join(workers)}"


def _safe_url(url: str) -> str:
    """The Redis URL without its password."""
    _credentials, sep, tail = url.rpartition("@")
    return f"{url.split('://', 1)[0]}://***@{tail}" if sep else url


__all__ = ["QUEUES", "JobHooks", "WorkerRuntime", "check_broker", "create_app"]
