"""``stickerbot segmenter train|eval``: fine-tune the background-removal SegFormer on stickers'
own alpha, and measure it on held-out stickers over held-out backgrounds.

    stickerbot segmenter train --stickers DIR [DIR ...] [--procedural N] --out DIR
        [--init CHECKPOINT | --from-scratch] [--epochs N] [--minutes M] [--size PX]
    stickerbot segmenter eval --model DIR --stickers DIR [DIR ...] --out DIR
    stickerbot segmenter bootstrap [--minutes M] [--no-progress]

``bootstrap`` does what a worker's one-off bootstrap job does (procedural stickers, Twemoji,
uploads with alpha; ``<data dir>/segmenter/<version>/``, promoted at once), with a progress bar;
a rerun after an interruption resumes it.

A rerun of ``train`` with the same ``--out`` resumes from its last state. Use the result with
``STICKERBOT_SEGMENTER_MODEL=<out>``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.settings import Settings

HELP = "bootstrap, train or evaluate the background-removal segmenter (SegFormer) on stickers"


def _common(parser: argparse.ArgumentParser) -> None:
    """--preset/--data-dir after the action too (``segmenter train --preset tiny``); SUPPRESS keeps
    a value given before the action."""
    parser.add_argument("--preset", choices=("sd15", "tiny"), default=argparse.SUPPRESS, help="model preset")
    parser.add_argument("--data-dir", default=argparse.SUPPRESS, help="data directory")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="segmenter_command", required=True, metavar="ACTION")
    train = sub.add_parser("train", help="fine-tune on stickers composited over varied backgrounds")
    train.add_argument(
        "--stickers",
        type=Path,
        nargs="*",
        default=[],
        help="folders of transparent stickers (PNG/WEBP); opaque ones are skipped",
    )
    train.add_argument("--procedural", type=int, default=0, help="add N procedural stickers")
    train.add_argument("--photos", type=Path, default=None, help="folder of photos to use as backgrounds")
    train.add_argument("--out", type=Path, required=True, help="model directory (best checkpoint + state)")
    _common(train)
    start = train.add_mutually_exclusive_group()
    start.add_argument("--init", default=None, help="checkpoint to start from (default: the preset's)")
    start.add_argument("--from-scratch", action="store_true", help="random weights, the preset's config")
    train.add_argument("--epochs", type=int, default=10)
    train.add_argument("--minutes", type=float, default=None, help="time budget (stops after it)")
    train.add_argument(
        "--size", type=int, default=None, help="training input size in px (default: tiny 64, 256)"
    )
    train.add_argument("--batch-size", type=int, default=8)
    train.add_argument(
        "--lr", type=float, default=None,
        help="default: 1.5e-3 from scratch (the from-scratch recipe: docs/segmentation.md), 2e-4 otherwise",
    )
    train.add_argument("--pairs-per-epoch", type=int, default=400)
    train.add_argument("--val-pairs", type=int, default=48)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument(
        "--workers", type=int, default=None,
        help="processes making pairs ahead of each step (default: 0 on a CPU, where the step needs "
        "every core; up to 4 beside a GPU, which would otherwise wait for them)",
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bar")

    boot = sub.add_parser("bootstrap", help="train the background remover's head now, as a worker's "
                          "first start does, and switch workers to it")
    _common(boot)
    boot.add_argument("--minutes", type=float, default=None,
                      help="training time (default: STICKERBOT_SEGMENTER_BOOTSTRAP_MINUTES)")
    boot.add_argument("--no-progress", action="store_true", help="no progress bar")

    ev = sub.add_parser("eval", help="IoU, boundary F and alpha MAE on held-out stickers (JSON + PNG)")
    _common(ev)
    ev.add_argument("--model", type=Path, required=True, help="a segmenter directory")
    ev.add_argument("--stickers", type=Path, nargs="*", default=[], help="folders of held-out stickers")
    ev.add_argument("--procedural", type=int, default=0, help="add N procedural stickers (unseen seeds)")
    ev.add_argument("--photos", type=Path, default=None, help="folder of photos (odd-index ones are used)")
    ev.add_argument("--out", type=Path, required=True, help="folder for metrics.json and contact-sheet.png")
    ev.add_argument("--count", type=int, default=64, help="number of held-out composites")
    ev.add_argument(
        "--size", type=int, default=None, help="evaluation size (default: the model's input size)"
    )
    ev.add_argument("--seed", type=int, default=1)
    ev.add_argument(
        "--flip", action="store_true", help="mirror test-time augmentation (twice the model time)"
    )
    ev.add_argument(
        "--rotate",
        action="store_true",
        help="quarter-turn test-time augmentation (four times the model time)",
    )
    ev.add_argument(
        "--scales",
        type=float,
        nargs="+",
        default=[1.0],
        help="multi-scale test-time augmentation: input sizes as multiples of the model's (e.g. 1 1.333)",
    )


def _stickers(args: argparse.Namespace, *, procedural_seed: int, size: int) -> list:
    from segmentation.pairs import load_stickers
    from segmentation.synthetic import make_stickers

    skipped: list[tuple[str, str]] = []
    stickers = load_stickers(args.stickers, skipped=skipped)
    for name, reason in skipped:
        print(f"skipped {name}: {reason}", file=sys.stderr)
    if args.procedural:
        stickers += make_stickers(args.procedural, seed=procedural_seed, size=max(64, size))
    return stickers


def _train(args: argparse.Namespace, settings: Settings) -> int:
    import torch
    from tqdm import tqdm

    from pipeline.architectures import ARCHITECTURES
    from pipeline.devices import device_and_dtype
    from pipeline.models import load_segmenter, resolve_sources
    from segmentation.pairs import load_photos
    from segmentation.training import (
        STATE_FILE,
        SegTrainConfig,
        SegTrainProgress,
        default_workers,
        fresh_segmenter,
        scratch_recipe,
        train_segmenter,
    )

    size = args.size or (64 if settings.preset == "tiny" else 256)
    stickers = _stickers(args, procedural_seed=args.seed, size=size)
    if len(stickers) < 2:
        print(
            "stickerbot segmenter train: error: need at least 2 transparent stickers "
            "(give --stickers folders or --procedural N)",
            file=sys.stderr,
        )
        return 2
    device, _ = device_and_dtype(settings)
    recipe = scratch_recipe(size) if args.from_scratch else {"lr": 2e-4}
    if args.lr is not None:
        recipe["lr"] = args.lr
    try:
        config = SegTrainConfig(
            size=size,
            batch_size=args.batch_size,
            epochs=args.epochs,
            pairs_per_epoch=args.pairs_per_epoch,
            val_pairs=args.val_pairs,
            minutes=args.minutes,
            seed=args.seed,
            workers=default_workers(device) if args.workers is None else args.workers,
            **recipe,
        )
    except ValueError as exc:
        print(f"stickerbot segmenter train: error: {exc}", file=sys.stderr)
        return 2
    # A bad option is refused above, before a model is loaded (or downloaded).
    resuming = (args.out / STATE_FILE).exists()
    if resuming and (args.out / "config.json").exists():
        segmenter = load_segmenter(args.out, device=device)  # the state's weights replace these
    elif args.from_scratch:
        segmenter = fresh_segmenter(
            ARCHITECTURES[settings.preset].segformer, size, device=device, seed=args.seed
        )
    else:
        sources = resolve_sources(settings)
        segmenter = load_segmenter(args.init or sources.segmenter, device=device, num_labels=1,
                                   cache_dir=sources.cache_dir)
    steps = -(-config.pairs_per_epoch // config.batch_size) * config.epochs
    bar = tqdm(total=steps, disable=args.no_progress, unit="step", desc="segmenter")
    seen = {"step": 0}

    def progress(p: SegTrainProgress) -> None:
        bar.update(p.step - seen["step"])
        seen["step"] = p.step
        post = {"epoch": p.epoch, "loss": f"{p.loss:.3f}"}
        if p.val_iou is not None:
            post["val_iou"] = f"{p.val_iou:.4f}"
        bar.set_postfix(post)

    torch.manual_seed(args.seed)
    photos = load_photos(args.photos, size=max(size, 128))
    try:
        result = train_segmenter(segmenter, stickers, args.out, config, photos=photos, progress=progress)
    finally:
        bar.close()
    print(
        json.dumps(
            {
                "out": str(result.out_dir),
                "best_val_iou": round(result.best_iou, 4),
                "epochs": result.epochs,
                "steps": result.steps,
                "seconds": round(result.seconds, 1),
                "stickers": len(stickers),
            }
        )
    )
    return 0


def _eval(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.devices import device_and_dtype
    from pipeline.models import load_segmenter
    from segmentation.evaluation import evaluate
    from segmentation.pairs import load_photos
    from segmentation.removal import check_scales

    stickers = _stickers(args, procedural_seed=1_000_000 + args.seed, size=args.size or 128)
    if not stickers:
        print(
            "stickerbot segmenter eval: error: no transparent stickers (give --stickers or --procedural N)",
            file=sys.stderr,
        )
        return 2
    try:
        check_scales(args.scales)  # before loading anything
    except ValueError as exc:
        print(f"stickerbot segmenter eval: error: --{exc}", file=sys.stderr)
        return 2
    device, _ = device_and_dtype(settings)
    segmenter = load_segmenter(args.model, device=device)
    metrics = evaluate(
        segmenter,
        stickers,
        count=args.count,
        size=args.size,
        seed=args.seed,
        photos=load_photos(args.photos),
        out_dir=args.out,
        flip=args.flip,
        rotate=args.rotate,
        scales=args.scales,
    )
    print(json.dumps(metrics, indent=2))
    return 0


def _bootstrap(args: argparse.Namespace, settings: Settings) -> int:
    import shutil
    import time

    from tqdm import tqdm

    from pipeline.devices import device_and_dtype
    from pipeline.jobs import train_segmenter_version
    from pipeline.models import resolve_sources
    from segmentation.versions import root_of

    if args.minutes is not None:
        if args.minutes <= 0:
            print("stickerbot segmenter bootstrap: error: --minutes must be above 0", file=sys.stderr)
            return 2
        settings = settings.model_copy(update={"segmenter_bootstrap_minutes": args.minutes})
    device, _ = device_and_dtype(settings)
    work_dir = root_of(settings.data_dir) / "work-cli"  # a rerun resumes from here
    bar = tqdm(total=100, disable=args.no_progress, unit="%", desc="segmenter bootstrap")

    def progress(fraction: float, message: str) -> None:
        bar.n = round(fraction * 100)
        bar.set_postfix_str(message)
        bar.refresh()

    try:
        name = time.strftime("bootstrap-%Y%m%d-%H%M%S")
        run = train_segmenter_version(settings, mode="bootstrap", name=name,
                                      work_dir=work_dir, device=device, sources=resolve_sources(settings),
                                      progress=progress)
    finally:
        bar.close()
    shutil.rmtree(work_dir, ignore_errors=True)
    print(json.dumps({"version": run.version, "promoted": run.promoted, "figures": run.info["figures"],
                      "counts": run.info["counts"], "notes": run.info["notes"]}, indent=2))
    return 0


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.segmenter_command == "train":
        return _train(args, settings)
    if args.segmenter_command == "bootstrap":
        return _bootstrap(args, settings)
    return _eval(args, settings)
