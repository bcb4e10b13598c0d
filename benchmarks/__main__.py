"""Run every benchmark (``python -m benchmarks``) or the named ones (``python -m benchmarks queue``)."""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


# Run by name only: it measures nothing without a CUDA GPU, and on one it takes minutes.
BY_NAME_ONLY = {"bench_gpu"}


def main(argv: list[str]) -> int:
    here = Path(__file__).parent
    names = sorted(m.name for m in pkgutil.iter_modules([str(here)]) if m.name.startswith("bench_"))
    if argv and argv[0].removeprefix("bench_") == "gpu":
        # Its own options (--quick, --out) and exit status (3: no CUDA GPU).
        return int(importlib.import_module("benchmarks.bench_gpu").main(argv[1:]))
    wanted = [f"bench_{a.removeprefix('bench_')}" for a in argv]
    if not wanted:
        names = [n for n in names if n not in BY_NAME_ONLY]
        print(f"(left out, run by name: {', '.join(sorted(BY_NAME_ONLY))})", flush=True)
    if wanted:
        unknown = set(wanted) - set(names)
        if unknown:
            print(f"unknown benchmarks {sorted(unknown)}; have {names}", file=sys.stderr)
            return 2
        names = wanted
    failed = []
    for name in names:
        print(f"\n=== {name} ===", flush=True)
        start = time.perf_counter()
        try:
            importlib.import_module(f"benchmarks.{name}").main()
        except Exception as exc:  # one broken benchmark must not hide the others
            print(f"{name} FAILED: {exc.__class__.__name__}: {exc}", flush=True)
            failed.append(name)
        print(f"--- {name}: {time.perf_counter() - start:.1f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
