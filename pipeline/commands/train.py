"""``stickerbot train STICKER_DIR --out STYLE_DIR``: learn a sticker style from a folder."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from pipeline.settings import Settings

HELP = "learn a sticker style (DreamBooth-LoRA) from a folder of stickers"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sticker_dir", type=Path, help="folder of static stickers (PNG/WEBP/JPEG)")
    parser.add_argument("--out", type=Path, required=True, help="style directory to write")
    parser.add_argument("--class-noun", default=None,
                        help="what the stickers show (default: derived from BLIP captions)")
    parser.add_argument("--identifier", default=None, help="rare token naming the style (default: chosen)")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps (default: 100 per image, 400..1500)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--no-prior", action="store_true", help="train without class-prior preservation")
    parser.add_argument("--class-images", type=int, default=None, help="number of class-prior images")
    parser.add_argument("--class-image-steps", type=int, default=25, help="sampler steps per class image")
    parser.add_argument("--lora-targets", choices=("attention", "extended"), default="attention",
                        help="attention projections only, or also projections/FF/ResNet convolutions")
    parser.add_argument("--train-text-encoder", action="store_true")
    parser.add_argument("--full-finetune", action="store_true",
                        help="train the whole UNet (GBs per style) instead of a LoRA")
    parser.add_argument("--masked-loss", action="store_true", help="ignore transparent pixels in the loss")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
    parser.add_argument("--save-intermediate-every", type=int, default=None)
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="checkpoints (default: .<out name>.work beside --out); a rerun resumes")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.devices import device_and_dtype
    from pipeline.models import load_captioner, load_diffusion, resolve_sources
    from pipeline.training.identifier import class_noun_from_captions
    from pipeline.training.sticker_set import list_sticker_files, prepare_sticker_set
    from pipeline.training.trainer import (
        UNET_LORA_TARGETS,
        UNET_LORA_TARGETS_EXTENDED,
        TrainingConfig,
        TrainingProgress,
        train_style,
    )

    # 1. check the input before loading any model
    sources = resolve_sources(settings)
    prepared = prepare_sticker_set(list_sticker_files(args.sticker_dir), resolution=sources.resolution,
                                   max_pixels=settings.max_image_pixels,
                                   max_images=settings.max_images_per_set)
    for name, reason in prepared.skipped:
        print(f"skipped {name}: {reason}", file=sys.stderr)
    try:
        config = TrainingConfig(
            steps=args.steps, seed=args.seed, rank=args.rank, lr=args.lr, batch_size=args.batch_size,
            with_prior_preservation=not args.no_prior, num_class_images=args.class_images,
            class_image_steps=args.class_image_steps,
            lora_targets=UNET_LORA_TARGETS_EXTENDED if args.lora_targets == "extended" else UNET_LORA_TARGETS,
            train_text_encoder=args.train_text_encoder, full_finetune=args.full_finetune,
            masked_loss=args.masked_loss, gradient_checkpointing=args.gradient_checkpointing,
            checkpoint_every=args.checkpoint_every, save_intermediate_every=args.save_intermediate_every,
            identifier=args.identifier, class_noun=args.class_noun or "character",
        )
    except ValueError as exc:
        print(f"stickerbot train: error: {exc}", file=sys.stderr)
        return 2
    device, dtype = device_and_dtype(settings)

    # 2. the class noun, from BLIP captions when not given
    if not args.class_noun:
        from pipeline.stickers.captioning import caption_image

        captioner = load_captioner(sources, device=device, dtype=dtype)
        captions = [caption_image(captioner, img) for img in prepared.images]
        del captioner
        noun = class_noun_from_captions(captions)
        print(f"class noun: {noun} (from captions)", file=sys.stderr)
        import dataclasses

        config = dataclasses.replace(config, class_noun=noun)

    # 3. train with a progress bar
    models = load_diffusion(sources, device=device, dtype=dtype)
    out = args.out.resolve()
    work_dir = args.work_dir or out.parent / f".{out.name}.work"
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=config.resolved_steps(len(prepared)), unit="step", file=sys.stderr,
                   desc="training")

    def on_progress(p: TrainingProgress) -> None:
        if bar is not None:
            bar.n = p.step
            bar.set_postfix(loss=f"{p.loss:.4f}", img_s=f"{p.images_per_s:.1f}", refresh=False)
            bar.refresh()

    try:
        result = train_style(models, prepared, config, out_dir=out, work_dir=work_dir,
                             class_cache_dir=settings.data_dir / "class-images", progress=on_progress)
    finally:
        if bar is not None:
            bar.close()
    with contextlib.suppress(OSError):
        work_dir.rmdir()
    info = result.info
    print(f"style written to {result.style_dir}: prompt {info.instance_prompt!r}, {result.steps} steps "
          f"in {result.seconds:.1f} s, final loss {result.loss:.4f}")
    return 0
