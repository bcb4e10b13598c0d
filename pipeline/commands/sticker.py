"""``stickerbot sticker PHOTO --style STYLE_DIR -o out.webp``: one photo -> sticker(s), offline.

Checks the options, the style and the photo before loading any model, so bad input fails in
well under a second with a message on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.settings import Settings

HELP = "turn a photo into Telegram sticker(s) (WEBP) in a trained style"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("photo", help="the photo (PNG, JPEG, WEBP, ...)")
    parser.add_argument("--style", required=True, help="a style directory (style.json + adapter)")
    parser.add_argument("-o", "--out", default="sticker.webp",
                        help="output file; variants 2.. go to NAME-2.webp, NAME-3.webp, ...")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first variant (default 0)")
    parser.add_argument("--variants", type=int, default=1, help="number of stickers (1-8)")
    parser.add_argument("--strength", type=float, default=None, help="img2img strength (default 0.6)")
    parser.add_argument("--steps", type=int, default=None, help="scheduler steps (default 30)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default 7)")
    parser.add_argument("--scale", type=float, default=None, help="style adapter scale (default 0.8)")
    parser.add_argument("--stroke", type=int, default=None, help="white outline px (default 8, 0=none)")
    parser.add_argument("--shadow", action="store_true", help="add a soft drop shadow")
    parser.add_argument("--fast", action="store_true",
                        help="LCM-LoRA fast mode: 4 steps (needs STICKERBOT_LCM_LORA)")
    parser.add_argument("--template", default=None,
                        help="prompt template with {identifier}, {class_noun}, {caption}")
    parser.add_argument("--negative", default=None, help="negative prompt")
    parser.add_argument("--caption-prefix", default=None, help="text the caption starts with")


def output_paths(out: Path, count: int) -> list[Path]:
    """``out`` for the first sticker, ``<stem>-<n><suffix>`` for variant n >= 2."""
    suffix = out.suffix or ".webp"
    return [out if i == 0 else out.with_name(f"{out.stem}-{i + 1}{suffix}") for i in range(count)]


def run(args: argparse.Namespace, settings: Settings) -> int:
    import sys

    from pipeline.errors import NotAnImageError
    from pipeline.images import decode_image
    from pipeline.stickers.generation import StyleRef
    from pipeline.stickers.sticker_pipeline import StickerModels, StickerOptions, make_sticker

    # 1. check everything cheap first: options, style, photo
    given = {"strength": args.strength, "steps": args.steps, "guidance": args.guidance,
             "adapter_scale": args.scale, "stroke": args.stroke, "prompt_template": args.template,
             "negative_prompt": args.negative, "caption_prefix": args.caption_prefix}
    options = StickerOptions(seed=args.seed, variants=args.variants, shadow=args.shadow, fast=args.fast,
                             **{k: v for k, v in given.items() if v is not None})
    style = StyleRef.open(args.style)
    photo_path = Path(args.photo)
    try:
        photo = photo_path.read_bytes()
    except OSError as exc:
        raise NotAnImageError(photo_path.name, f"cannot read the file ({exc.strerror or exc})") from exc
    decode_image(photo, name=photo_path.name, max_pixels=settings.max_image_pixels)
    # 2. load the models and make the stickers
    models = StickerModels.load(settings)
    result = make_sticker(models, style, photo, options, photo_name=photo_path.name,
                          max_pixels=settings.max_image_pixels)
    if result.withheld:
        print(f"stickerbot sticker: {result.withheld} sticker(s) withheld: the safety checker flagged "
              "them (STICKERBOT_SAFETY_CHECKER)", file=sys.stderr)
    if not result.webp:
        return 1
    # 3. write them
    paths = output_paths(Path(args.out), len(result.webp))
    try:
        paths[0].parent.mkdir(parents=True, exist_ok=True)
        for path, data in zip(paths, result.webp, strict=True):
            path.write_bytes(data)
    except OSError as exc:
        print(f"stickerbot sticker: error: cannot write {paths[0]}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    for path, seed, (w, h), data in zip(paths, result.seeds, result.sizes, result.webp, strict=True):
        print(f"{path}  {w}x{h}  {len(data) / 1024:.1f} KB  seed {seed}  {result.emoji}")
    print(f"caption: {result.caption or '(none)'}")
    print(f"prompt:  {result.prompt}")
    print("timings: " + ", ".join(f"{k} {v:.2f} s" for k, v in result.timings.items()))
    return 0
