"""``stickerbot run``: everything on one machine. Migrates the database, checks the token, starts
one ``stickerbot worker`` subprocess and the bot; SIGINT/SIGTERM stop both. A worker that dies is
started again (after a pause that grows while it keeps crashing), so a crash in model code never
takes the bot down. A worker whose models do not load does not exit: it retries by itself
(pipeline/worker_health.py)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from pipeline.settings import Settings

HELP = "migrate the database, then run the bot and one worker together (Ctrl+C stops both)"
log = logging.getLogger("stickerbot.run")

WORKER_RESTART_DELAY = 5.0  # after a crash; doubled for each crash in a row ...
WORKER_RESTART_MAX_DELAY = 300.0  # ... up to this
WORKER_HEALTHY_AFTER = 120.0  # a worker that ran this long before exiting starts a new series
WORKER_STOP_TIMEOUT = 60.0  # a training step is allowed to finish and save
WORKER_NICENESS = 10  # the bot answers users first; the worker takes the rest of the CPU


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-worker", action="store_true",
                        help="start the bot only (workers run elsewhere)")


def worker_command(settings: Settings) -> list[str]:
    # --supervisor-pid: the worker ends with us, even when we are SIGKILLed (pipeline/supervision.py)
    return [sys.executable, "-m", "pipeline.cli", "worker", "--preset", settings.preset,
            "--data-dir", str(settings.data_dir), "--supervisor-pid", str(os.getpid())]


def start_worker(settings: Settings, *, env: dict[str, str] | None = None,
                 **popen: Any) -> subprocess.Popen[bytes]:
    """One ``stickerbot worker`` at a lower CPU priority than the bot.

    On a shared CPU (no GPU, or a small box) model code would otherwise take every core and the
    bot would answer late; niced, the worker gets what the bot leaves. It inherits the
    environment (the operator's variables), in its own session, so a Ctrl+C in the terminal
    reaches it only through us. It ends when we end (a parent-death signal fires when the
    *thread* that started the worker exits): call this from the main thread only."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("start workers from the main thread: they end when their starting thread does")
    proc = subprocess.Popen(worker_command(settings), env=dict(os.environ if env is None else env),
                            start_new_session=True, **popen)
    # Linux niceness is per thread and inherited by threads created later: set it right away,
    # long before the worker imports torch and starts its thread pools.
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, proc.pid, WORKER_NICENESS)
    return proc


def restart_delay(crashes_in_a_row: int) -> float:
    """Seconds before starting a worker again after its ``crashes_in_a_row``-th quick exit."""
    from pipeline.worker_health import backoff_delay

    return backoff_delay(crashes_in_a_row, initial=WORKER_RESTART_DELAY, cap=WORKER_RESTART_MAX_DELAY)


def stop_worker(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=WORKER_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def supervise(settings: Settings, with_worker: bool) -> None:
    from bot.app import BotApp

    app = await BotApp.create(settings)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    stop_tasks: list[asyncio.Task[None]] = []

    def on_signal() -> None:
        stopping.set()
        stop_tasks.append(loop.create_task(app.stop()))

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    worker = start_worker(settings) if with_worker else None

    async def watch_worker() -> None:
        nonlocal worker
        crashes = 0
        while not stopping.is_set() and worker is not None:
            started = time.monotonic()
            code = await asyncio.to_thread(worker.wait)
            if stopping.is_set():
                return
            lived = time.monotonic() - started
            crashes = 1 if lived >= WORKER_HEALTHY_AFTER else crashes + 1
            delay = restart_delay(crashes)
            log.error("the worker exited with code %s after %.0f s (crash %d in a row); starting it "
                      "again in %.0f s", code, lived, crashes, delay)
            await asyncio.sleep(delay)
            if not stopping.is_set():
                worker = start_worker(settings)  # on the loop's thread, the main one

    watcher = asyncio.create_task(watch_worker())
    try:
        await app.run(handle_signals=False)
    finally:
        stopping.set()
        if worker is not None:
            await asyncio.to_thread(stop_worker, worker)
        watcher.cancel()


def run(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.storage.db import open_database, schema_version

    # 1. the database schema
    async def migrate() -> int:
        conn = await open_database(settings.db_path)
        try:
            return await schema_version(conn)
        finally:
            await conn.close()

    version = asyncio.run(migrate())
    print(f"database {settings.db_path} at schema version {version}", flush=True)
    # 2. the token (a ConfigError that says how to get one)
    settings.require_token()
    # 3. the worker and the bot. With Celery, GPU workers are `celery -A pipeline.celery_app
    #    worker` processes (on this or other machines); an embedded one would not see its jobs.
    if settings.queue_backend == "celery":
        args.no_worker = True
    print(f"starting the bot and {'no' if args.no_worker else 'one'} worker "
          f"(preset {settings.preset}); Ctrl+C stops both", flush=True)
    asyncio.run(supervise(settings, with_worker=not args.no_worker))
    return 0
