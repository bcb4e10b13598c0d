"""Fetch the emoji sets that serve as real sticker art (Twemoji, OpenMoji) and rasterise them
to 512-px RGBA PNGs in a cache dir (never in the repository):

    python -m benchmarks.emoji_art [--cache DIR] [--size 512] [--limit N] [--sets twemoji openmoji]

Tarballs come from the npm registry at pinned versions and are checked against their sha512
integrity (``segmentation/emoji.py``). The cache defaults to ``$STICKERBOT_EMOJI_CACHE`` or
``~/.cache/stickerbot/emoji``. Credits: Twemoji graphics CC-BY 4.0 (Twitter and contributors),
OpenMoji CC-BY-SA 4.0 (the OpenMoji contributors).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from segmentation.emoji import EMOJI_SETS, EmojiUnavailable, load_emoji_stickers


def default_cache() -> Path:
    return Path(os.environ.get("STICKERBOT_EMOJI_CACHE") or Path.home() / ".cache" / "stickerbot" / "emoji")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=default_cache())
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--limit", type=int, default=None, help="a seeded sample of N per set (default all)")
    parser.add_argument("--sets", nargs="+", choices=sorted(EMOJI_SETS), default=sorted(EMOJI_SETS))
    args = parser.parse_args(argv)
    for name in args.sets:
        spec = EMOJI_SETS[name]
        start = time.perf_counter()
        try:
            images = load_emoji_stickers(spec, args.cache, size=args.size, limit=args.limit)
        except EmojiUnavailable as exc:
            print(f"{name}: unavailable: {exc}", file=sys.stderr)
            return 1
        print(f"{name} {spec.version} ({spec.licence}): {len(images)} images at {args.size} px in "
              f"{args.cache / f'{spec.name}-{spec.version}' / str(args.size)} "
              f"({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
