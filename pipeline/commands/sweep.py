"""``stickerbot sweep``: train and evaluate every combination of a hyperparameter grid on one
sticker set, then print and save the table (Markdown and CSV), best value per metric marked."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from pipeline.errors import InputError
from pipeline.settings import Settings

HELP = "train and evaluate a grid of training settings on one sticker set (lr, rank, ...)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stickers", required=True, help="directory of the sticker set's images")
    parser.add_argument("--grid", nargs="+", required=True, metavar="KEY=V1,V2",
                        help="e.g. lr=1e-4,1e-5 rank=4,16,64 text_encoder=0,1 prior=0,1 "
                             "(keys: lr rank alpha text_encoder prior steps batch snr, or any "
                             "TrainingConfig field)")
    parser.add_argument("--out", help="output directory (default: <data dir>/sweeps/<time>); "
                                      "rerunning into the same one reuses finished runs")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps of every run (default: the trainer's set-size rule)")
    parser.add_argument("--class-noun", default="character")
    parser.add_argument("--num-class-images", type=int, default=None)
    parser.add_argument("--class-image-steps", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=int, default=None,
                        help="training and evaluation size (default: the model's)")
    parser.add_argument("--prompts", help="evaluation prompt templates, one per line")
    parser.add_argument("--max-prompts", type=int, default=None)
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--eval-steps", type=int, default=25, help="denoising steps per evaluation image")
    parser.add_argument("--guidance", type=float, default=7.0, help="evaluation guidance scale")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.devices import device_and_dtype
    from pipeline.models import load_diffusion, load_image_encoder, resolve_sources
    from pipeline.quality.evaluation import EvaluationConfig, load_prompt_templates
    from pipeline.quality.sweep import combinations, config_for, format_markdown, parse_grid, run_sweep
    from pipeline.training.sticker_set import list_sticker_files, prepare_sticker_set
    from pipeline.training.trainer import TrainingConfig

    # 1. check every input before anything loads or trains
    grid = parse_grid(args.grid)
    try:
        base = TrainingConfig(steps=args.steps, class_noun=args.class_noun, seed=args.seed,
                              num_class_images=args.num_class_images,
                              class_image_steps=args.class_image_steps)
        eval_config = EvaluationConfig(images_per_prompt=args.images_per_prompt,
                                       num_inference_steps=args.eval_steps, seed=args.seed,
                                       guidance_scale=args.guidance,
                                       max_prompts=args.max_prompts, resolution=args.resolution)
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    for params in combinations(grid):
        config_for(base, params)
    templates = load_prompt_templates(args.prompts) if args.prompts else None
    sources = resolve_sources(settings)
    resolution = args.resolution or sources.resolution
    prepared = prepare_sticker_set(list_sticker_files(Path(args.stickers)), resolution=resolution)
    for name, reason in prepared.skipped:
        print(f"not used: {name}: {reason}")
    out = Path(args.out) if args.out else settings.data_dir / "sweeps" / time.strftime("%Y%m%d-%H%M%S")
    print(f"{len(combinations(grid))} runs on {len(prepared)} stickers -> {out}")

    # 2. load the models once for every run
    device, dtype = device_and_dtype(settings)
    diffusion = load_diffusion(sources, device=device, dtype=dtype)
    clip = load_image_encoder("clip", sources, device=device)
    dino = load_image_encoder("dino", sources, device=device)

    # 3. sweep
    result = run_sweep(diffusion, prepared, grid, clip=clip, dino=dino, out_dir=out,
                       class_cache_dir=settings.data_dir / "class-images", base_config=base,
                       eval_config=eval_config, templates=templates, log_line=print)
    print()
    print(format_markdown(result), end="")
    print(f"written {result.markdown_path} and {result.csv_path}")
    return 0
