"""What a worker says about itself where ``stickerbot doctor`` and the admins' ``/stats`` read it.

A worker whose models do not load (a missing download on an offline machine, a full disk, a
driver problem) retries with a growing delay up to a cap, logs why once per attempt, and keeps
its state in ``<data dir>/workers/<host>-<device>.json`` (one file per accelerator; on a shared
data volume, one per machine and GPU), so an operator reads "models failed to load: <reason>"
instead of watching a silent restart loop.

    loading ──► ready
       │   ▲
       ▼   │ (after the delay: 5, 10, 20, ... s, at most the cap)
    models_failed
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

log = logging.getLogger(__name__)

HEALTH_DIR = "workers"
LOADING, READY, MODELS_FAILED = "loading", "ready", "models_failed"
MAX_REASON_CHARS = 600

T = TypeVar("T")


@dataclass(frozen=True)
class WorkerHealth:
    name: str  # host and device: the file's name
    state: str  # loading | ready | models_failed
    reason: str = ""  # why the models failed to load (one line)
    attempt: int = 0  # failed attempts in a row
    retry_in: float | None = None  # seconds from updated_at to the next attempt
    pid: int = 0
    updated_at: float = 0.0

    @property
    def failed(self) -> bool:
        return self.state == MODELS_FAILED


def health_name(device: str) -> str:
    """The file name of this machine's worker on ``device`` (``cuda:1`` -> ``host-cuda-1``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{socket.gethostname()}-{device}")


def write_health(data_dir: Path, health: WorkerHealth) -> None:
    """Replace the worker's file atomically (a reader never sees half of it). Never raises: the
    file is for people, and a worker must not stop for want of it."""
    folder = Path(data_dir) / HEALTH_DIR
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{health.name}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(asdict(health)), encoding="utf-8")
        os.replace(tmp, folder / f"{health.name}.json")
    except OSError as exc:
        log.warning("could not write the worker's health file: %s", exc)


def read_health(data_dir: Path) -> list[WorkerHealth]:
    """Every worker's last word, by name; unreadable files are skipped."""
    out = []
    folder = Path(data_dir) / HEALTH_DIR
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        with contextlib.suppress(OSError, ValueError, TypeError):
            out.append(WorkerHealth(**json.loads(path.read_text(encoding="utf-8"))))
    return out


def describe_failure(health: WorkerHealth, now: float) -> str:
    """One line for doctor and /stats: "models failed to load: <reason>" and when."""
    ago = max(0.0, now - health.updated_at)
    text = f"models failed to load: {health.reason} (worker {health.name}, attempt {health.attempt}, "
    text += f"{format_duration(ago)} ago"
    if health.retry_in is not None:
        left = health.retry_in - ago
        text += f", next try in {format_duration(left)}" if left > 0 else ", next try overdue: is it running?"
    return text + ")"


def format_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{int(seconds)} s"
    if seconds < 7200:
        return f"{int(seconds // 60)} min"
    return f"{seconds / 3600:.1f} h"


def backoff_delay(attempt: int, *, initial: float, cap: float) -> float:
    """Seconds before attempt ``attempt + 1`` after ``attempt`` failures in a row: doubling from
    ``initial``, never above ``cap``."""
    return min(cap, initial * 2.0 ** max(0, min(attempt - 1, 60)))


def failure_reason(exc: BaseException) -> str:
    """A one-line reason: stickerbot's own errors say what to do; others get their type."""
    from pipeline.errors import StickerbotError

    text = str(exc) if isinstance(exc, StickerbotError) else f"{type(exc).__name__}: {exc}"
    text = " ".join(text.split())
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 1] + "…"


def load_with_backoff(load: Callable[[], T], *, data_dir: Path, device: str, initial: float,
                      cap: float, stop: threading.Event) -> T | None:
    """``load()`` until it succeeds; None if ``stop`` is set while waiting to try again.

    Each failure is logged once (the traceback with the first one) and written to the health
    file, with the delay before the next attempt."""
    name = health_name(device)
    attempt = 0
    while True:
        write_health(data_dir, WorkerHealth(name, LOADING, attempt=attempt, pid=os.getpid(),
                                            updated_at=time.time()))
        try:
            value = load()
        except Exception as exc:
            attempt += 1
            delay = backoff_delay(attempt, initial=initial, cap=cap)
            reason = failure_reason(exc)
            log.error("models failed to load (attempt %d): %s; trying again in %.1f s", attempt, reason,
                      delay, exc_info=attempt == 1)
            write_health(data_dir, WorkerHealth(name, MODELS_FAILED, reason=reason, attempt=attempt,
                                                retry_in=delay, pid=os.getpid(), updated_at=time.time()))
            if stop.wait(delay):
                return None
            continue
        write_health(data_dir, WorkerHealth(name, READY, pid=os.getpid(), updated_at=time.time()))
        return value
