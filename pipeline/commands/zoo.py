"""``stickerbot zoo``: build the offline tiny model zoo (random weights, no network)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from pipeline.settings import Settings

HELP = "build the tiny random-weight model zoo used by tests and offline runs"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None, help="zoo directory (default: <data dir>/tiny-zoo)")
    parser.add_argument("--force", action="store_true", help="rebuild even if it exists")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.architectures import TINY
    from pipeline.zoo import build_zoo

    out = Path(args.out) if args.out else settings.zoo_dir
    start = time.perf_counter()
    build_zoo(out, TINY, force=args.force)
    print(f"tiny zoo ready at {out} ({time.perf_counter() - start:.1f} s)")
    return 0
