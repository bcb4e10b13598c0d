"""``stickerbot worker``: run jobs on this machine's accelerator (one process per GPU)."""

from __future__ import annotations

import argparse
import asyncio
import os

from pipeline.settings import Settings

HELP = "run queued training and sticker jobs on this machine's GPU (one process per accelerator)"

# Read once at start: a test hook that makes the next N runs of a kind raise CUDA out-of-memory,
# e.g. "oom:train:2" (see pipeline.worker.parse_faults). Unset in production.
FAULT_INJECT_ENV = "STICKERBOT_FAULT_INJECT"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kinds", default="sticker,train",
                        help="job kinds to run, comma-separated: sticker, train, segmenter, noop "
                             "(default: sticker,train; a sticker worker also trains the background "
                             "remover it needs; noop alone loads no model)")
    parser.add_argument("--worker-id", default=None, help="name in job records (default: host:pid:random)")
    parser.add_argument("--supervisor-pid", type=int, default=None,
                        help="stop when this process (the parent, e.g. `stickerbot run`) ends")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.errors import ConfigError
    from pipeline.queue.base import JobKind
    from pipeline.worker import parse_faults, run_worker

    if settings.queue_backend != "sqlite":
        raise ConfigError(
            f"STICKERBOT_QUEUE_BACKEND={settings.queue_backend}: jobs run on Celery workers "
            "(celery -A pipeline.celery_app worker --pool solo --queues sticker,train); "
            "`stickerbot worker` serves the embedded sqlite queue")
    try:
        kinds = [JobKind(k.strip()) for k in args.kinds.split(",") if k.strip()]
    except ValueError as exc:
        raise ConfigError(f"--kinds: {exc}; choose from sticker, train, segmenter, noop") from None
    if not kinds:
        raise ConfigError("--kinds names no job kind; choose from sticker, train, segmenter, noop")
    if args.supervisor_pid is not None:
        from pipeline.commands.run import WORKER_STOP_TIMEOUT
        from pipeline.supervision import follow_supervisor

        follow_supervisor(args.supervisor_pid, grace=WORKER_STOP_TIMEOUT)
    fault = os.environ.get(FAULT_INJECT_ENV) or None
    try:
        parse_faults(fault)
    except ValueError as exc:
        raise ConfigError(f"{FAULT_INJECT_ENV}: {exc}") from None
    return asyncio.run(run_worker(settings, kinds=kinds, worker_id=args.worker_id, fault_inject=fault))
