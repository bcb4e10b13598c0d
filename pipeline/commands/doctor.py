"""``stickerbot doctor``: what this machine has and whether the configured preset can run."""

from __future__ import annotations

import argparse
import asyncio
import platform
import sys
from collections.abc import Callable

from pipeline.settings import Settings

HELP = "check Python, torch, GPU, models, database and queue; non-zero exit on a problem"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--skip-models", action="store_true", help="do not check model files")


def _segmenter_lines(settings: Settings, line: Callable[..., None]) -> None:
    """Which background remover a worker serves, where it came from, its held-out figures, and
    whether a bootstrap or refresh is pending (a missing head is not a problem: the first
    worker trains one)."""
    import sqlite3

    from pipeline.models import choose_segmenter, resolve_sources
    from segmentation.versions import describe, pending_text

    choice = choose_segmenter(settings, resolve_sources(settings))
    states: dict[str, int] = {}
    if settings.queue_backend == "sqlite" and settings.db_path.exists():
        try:
            conn = sqlite3.connect(f"file:{settings.db_path}?mode=ro", uri=True)
            try:
                for state, n in conn.execute("SELECT state, COUNT(*) FROM jobs WHERE kind = 'segmenter' "
                                             "GROUP BY state"):
                    states[str(state)] = int(n)
            finally:
                conn.close()
        except sqlite3.Error:
            pass
    pending = pending_text(states)
    if choice.problem is not None:
        line("segmenter", f"{choice.base}: {choice.problem}; the first worker bootstraps one"
             + (f" (pending: {pending})" if pending else " (`stickerbot segmenter bootstrap` does it now)"))
    elif choice.version is None:
        line("segmenter", f"{choice.source} (configured, has a trained head)")
    else:
        line("segmenter", describe(settings.data_dir, pending=pending))


def run(args: argparse.Namespace, settings: Settings) -> int:
    problems: list[str] = []

    def line(name: str, value: str, ok: bool = True) -> None:
        print(f"{'ok ' if ok else 'BAD'} {name:<14} {value}")
        if not ok:
            problems.append(f"{name}: {value}")

    line("python", f"{platform.python_version()} ({sys.executable})", sys.version_info >= (3, 11))
    try:
        import torch

        line("torch", torch.__version__)
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                free, total = torch.cuda.mem_get_info(i)
                line(f"cuda:{i}", f"{torch.cuda.get_device_name(i)}, "
                     f"{free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB")
        else:
            line("gpu", "none (CPU only: fine for the tiny preset, slow for sd15)",
                 ok=settings.preset == "tiny" or settings.device == "cpu")
    except ImportError:
        line("torch", "not installed (run `make install`)", ok=False)

    line("preset", settings.preset)
    if not args.skip_models:
        from pipeline.errors import StickerbotError
        from pipeline.models import check_available, resolve_sources

        try:
            sources = resolve_sources(settings)
            available = check_available(sources)
            for role, problem in available.items():
                src = getattr(sources, role)
                if role == "segmenter" and settings.segmenter_bootstrap_from == "scratch":
                    line(f"model:{role}", f"{src} not used (the remover is trained from scratch)")
                    continue
                line(f"model:{role}", src if problem is None else problem, problem is None)
            if available["segmenter"] is None:
                # A SegFormer loads in a second on the CPU; its config and keys say whether it has a
                # trained foreground head (an ImageNet classification checkpoint has none).
                import torch

                from pipeline.models import load_segmenter

                segmenter = load_segmenter(sources.segmenter, device=torch.device("cpu"),
                                           cache_dir=sources.cache_dir)
                problem = segmenter.head_problem
                line("segmenter", "has a trained foreground head" if problem is None else problem,
                     problem is None)
            line("nsfw filter", "on (the diffusion repo's safety checker)" if settings.safety_checker
                 else "off (STICKERBOT_SAFETY_CHECKER=false)",
                 settings.safety_checker or settings.preset == "tiny")
        except StickerbotError as exc:
            line("models", str(exc), ok=False)

        try:
            _segmenter_lines(settings, line)
        except StickerbotError as exc:
            line("segmenter", str(exc), ok=False)

    from pipeline.storage.db import LATEST_VERSION, open_database, schema_version

    async def db_version() -> int:
        conn = await open_database(settings.db_path)
        try:
            return await schema_version(conn)
        finally:
            await conn.close()

    try:
        version = asyncio.run(db_version())
        line("database", f"{settings.db_path} (schema {version}/{LATEST_VERSION})",
             version == LATEST_VERSION)
    except Exception as exc:
        line("database", f"{settings.db_path}: {exc}", ok=False)

    # What the workers wrote about themselves: models that failed to load, and why.
    import time

    from pipeline.worker_health import describe_failure, read_health

    for health in read_health(settings.data_dir):
        if health.failed:
            line("worker", describe_failure(health, time.time()), ok=False)
        else:
            line("worker", f"{health.name}: {health.state}")

    if settings.queue_backend == "celery":
        from pipeline.celery_app import check_broker

        ok, text = check_broker(settings)
        line("queue", f"celery: {text}", ok)
    else:
        line("queue", "sqlite (embedded)")
    print("ready" if not problems else f"{len(problems)} problem(s)")
    return 0 if not problems else 1
