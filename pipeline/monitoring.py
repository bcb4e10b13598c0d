"""Operations: Prometheus metrics for the bot and the workers, and structured logs.

Metrics (prometheus-client; served by :func:`start_metrics_server` on ``settings.metrics_port``):

    stickerbot_queue_depth{kind,state}              jobs per kind and state (bot, from the queue)
    stickerbot_jobs_submitted_total{kind}           jobs accepted by the queue (bot)
    stickerbot_queue_unavailable_total              submits refused because the broker was down
    stickerbot_job_duration_seconds{kind,outcome}   run time of a job on a worker
    stickerbot_job_failures_total{kind,reason}      failed jobs by reason (see failure_reason)
    stickerbot_adapter_cache_total{result}          adapter LRU lookups: hit | miss
    stickerbot_gpu_memory_bytes{device,type}        allocated | reserved | total, per CUDA device

Logs: :func:`configure_logging` writes one JSON object per line with the job and user ids of
the job being handled (:func:`job_context`) and scrubs anything that looks like a bot token.

This module is imported by the bot: it never imports torch. GPU memory is read only when the
process already imported torch (a worker).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import re
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# Seconds: a sticker takes about 1-60 s, a training run minutes to an hour.
DURATION_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)

# The bounded set of failure reasons (a label must not carry free text).
FAILURE_REASONS = ("cancelled", "out_of_memory", "bad_input", "style", "worker_lost",
                   "queue_unavailable", "error")


def failure_reason(error: BaseException | str | None) -> str:
    """Map an exception (or a stored error text) to one of :data:`FAILURE_REASONS`."""
    if error is None:
        return "error"
    if isinstance(error, BaseException):
        from pipeline.errors import CancelledError, InputError, QueueUnavailableError, StyleError

        if isinstance(error, CancelledError):
            return "cancelled"
        if isinstance(error, InputError):
            return "bad_input"
        if isinstance(error, StyleError):
            return "style"
        if isinstance(error, QueueUnavailableError):
            return "queue_unavailable"
        text = f"{type(error).__name__}: {error}"
    else:
        text = error
    low = text.lower()
    if "out of memory" in low or "outofmemory" in low:
        return "out_of_memory"
    if "cancel" in low:
        return "cancelled"
    if "worker lost" in low or "workerlost" in low or ("attempts" in low and "crash" in low):
        return "worker_lost"
    return "error"


class _GpuMemoryCollector(Collector):
    """Reads CUDA memory at scrape time, only in a process that already imported torch."""

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily("stickerbot_gpu_memory_bytes", "CUDA memory per device",
                                   labels=["device", "type"])
        torch = sys.modules.get("torch")
        if torch is not None:
            try:
                if torch.cuda.is_available() and torch.cuda.is_initialized():
                    for i in range(torch.cuda.device_count()):
                        _free, total = torch.cuda.mem_get_info(i)
                        family.add_metric([f"cuda:{i}", "allocated"], torch.cuda.memory_allocated(i))
                        family.add_metric([f"cuda:{i}", "reserved"], torch.cuda.memory_reserved(i))
                        family.add_metric([f"cuda:{i}", "total"], total)
            except RuntimeError:  # a broken driver must not break the scrape
                pass
        yield family


@dataclass
class Metrics:
    """Every stickerbot metric, registered on one registry (tests pass their own)."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.queue_depth = Gauge("stickerbot_queue_depth", "Jobs per kind and state",
                                 ["kind", "state"], registry=r)
        self.jobs_submitted = Counter("stickerbot_jobs_submitted", "Jobs accepted by the queue",
                                      ["kind"], registry=r)
        self.queue_unavailable = Counter("stickerbot_queue_unavailable",
                                         "Submits refused because the queue backend was down",
                                         registry=r)
        self.job_duration = Histogram("stickerbot_job_duration_seconds", "Run time of a job",
                                      ["kind", "outcome"], buckets=DURATION_BUCKETS, registry=r)
        self.job_failures = Counter("stickerbot_job_failures", "Failed jobs by reason",
                                    ["kind", "reason"], registry=r)
        self.adapter_cache = Counter("stickerbot_adapter_cache", "Adapter LRU lookups",
                                     ["result"], registry=r)
        r.register(_GpuMemoryCollector())

    # --- recorders ----------------------------------------------------------------------
    def record_job(self, kind: str, seconds: float, *, error: BaseException | str | None = None,
                   cancelled: bool = False) -> None:
        """One finished job run: its duration, and its failure reason when it failed."""
        if cancelled:
            outcome = "cancelled"
        elif error is not None:
            outcome = "failed"
        else:
            outcome = "succeeded"
        self.job_duration.labels(kind=kind, outcome=outcome).observe(max(0.0, seconds))
        if outcome != "succeeded":
            reason = "cancelled" if cancelled else failure_reason(error)
            self.job_failures.labels(kind=kind, reason=reason).inc()

    def record_adapter_lookup(self, *, hit: bool) -> None:
        self.adapter_cache.labels(result="hit" if hit else "miss").inc()

    def set_queue_depth(self, counts: dict[str, dict[str, int]]) -> None:
        """From ``JobQueue.counts()``; states missing from ``counts`` read 0."""
        from pipeline.queue.base import JobKind, JobState

        for kind in JobKind:
            per_state = counts.get(str(kind), {})
            for state in JobState:
                self.queue_depth.labels(kind=str(kind), state=str(state)).set(
                    per_state.get(str(state), 0))


_DEFAULT: dict[int, Metrics] = {}


def default_metrics() -> Metrics:
    """The process-wide metrics on prometheus' default registry (what the HTTP server serves)."""
    metrics = _DEFAULT.get(id(REGISTRY))
    if metrics is None:
        metrics = _DEFAULT[id(REGISTRY)] = Metrics(REGISTRY)
    return metrics


def start_metrics_server(port: int, *, addr: str = "0.0.0.0",
                         registry: CollectorRegistry | None = None) -> None:
    """Serve ``/metrics`` from a daemon thread (answers also while a job blocks the process)."""
    start_http_server(port, addr=addr, registry=registry or REGISTRY)


class _CountsSource(Protocol):
    async def counts(self) -> dict[str, dict[str, int]]: ...


async def poll_queue_depth(queue: _CountsSource, metrics: Metrics, *, interval: float = 15.0) -> None:
    """Keep ``stickerbot_queue_depth`` current; run as one task in the bot. Never raises on a
    backend hiccup (the next round tries again)."""
    while True:
        try:
            metrics.set_queue_depth(await queue.counts())
        except Exception:  # the metric goes stale, the bot keeps running
            logging.getLogger(__name__).warning("queue depth update failed", exc_info=True)
        await asyncio.sleep(interval)


# --- structured logs ----------------------------------------------------------------------

_job_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("job_id", default=None)
_user_id: contextvars.ContextVar[int | None] = contextvars.ContextVar("user_id", default=None)

# A Telegram bot token: "<digits>:<35 or so url-safe characters>", also inside API URLs.
# No word boundary before it: in ".../bot123:ABC..." the digits follow letters.
_TOKEN_RE = re.compile(r"(?<!\d)\d{3,}:[A-Za-z0-9_-]{20,}")


def redact(text: str) -> str:
    """``text`` with anything shaped like a bot token replaced by ``<token>``."""
    return _TOKEN_RE.sub("<token>", text)


@contextlib.contextmanager
def job_context(*, job_id: str | None, user_id: int | None) -> Iterator[None]:
    """Every log record inside carries these ids (also across ``await``)."""
    t1, t2 = _job_id.set(job_id), _user_id.set(user_id)
    try:
        yield
    finally:
        _job_id.reset(t1)
        _user_id.reset(t2)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, job_id, user_id, plus ``extra=`` keys."""

    _STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        job_id = getattr(record, "job_id", None) or _job_id.get()
        user_id = getattr(record, "user_id", None) or _user_id.get()
        if job_id is not None:
            entry["job_id"] = job_id
        if user_id is not None:
            entry["user_id"] = user_id
        for key, value in vars(record).items():
            if key not in self._STANDARD and key not in entry and not key.startswith("_"):
                entry[key] = value if isinstance(value, (int, float, bool, type(None))) else str(value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return redact(json.dumps(entry, ensure_ascii=False, default=str))


class _RedactingFilter(logging.Filter):
    """For plain-text handlers: scrub tokens from the rendered message."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def configure_logging(level: str = "INFO", *, json_lines: bool = True,
                      stream: Any = None) -> logging.Handler:
    """Set up the root logger once per process; returns the handler (tests read its stream)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.addFilter(_RedactingFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_stickerbot", False):
            root.removeHandler(old)
    handler._stickerbot = True  # type: ignore[attr-defined]  # marks ours for re-configuration
    root.addHandler(handler)
    root.setLevel(level)
    # httpx/aiohttp log request URLs, which hold the token: keep them quiet.
    for noisy in ("httpx", "aiohttp.access", "urllib3"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    return handler


class StageTimer:
    """Seconds spent per named stage, summed over repeats: ``with timer("unet"): ...``; read
    ``timer.totals`` (the trainer's timings in style.json, a sticker's per-stage timings)."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start
