"""``stickerbot evaluate``: score a style (CLIP-I, DINO, CLIP-T, LPIPS diversity), pick its best
checkpoint, or rank candidate prompt templates by CLIP score."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pipeline.errors import InputError
from pipeline.settings import Settings

HELP = "measure a style's quality (CLIP-I, DINO, CLIP-T, diversity) or rank prompt templates"

# The best DreamBooth-LoRA numbers reported for SD 1.5, printed beside ours for orientation.
PUBLISHED = {"clip_i": 0.87, "dino": 0.81, "clip_t": 0.33}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--style", help="style directory (style.json + adapter)")
    parser.add_argument("--references", help="directory of the reference stickers (the training set)")
    parser.add_argument("--prompts", help="prompt templates, one per line, using {identifier} "
                                          "(and {class_noun}); default: the built-in list")
    parser.add_argument("--out", help="output directory (default: <data dir>/evaluations/<style>)")
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25, help="denoising steps per image")
    parser.add_argument("--guidance", type=float, default=7.0)
    parser.add_argument("--lora-scale", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-prompts", type=int, default=None, help="use only the first N prompts")
    parser.add_argument("--resolution", type=int, default=None,
                        help="generation and reference size (default: the model's)")
    parser.add_argument("--checkpoints", action="store_true",
                        help="score every intermediate checkpoint too and report the best")
    parser.add_argument("--metric", default="clip_i", choices=("clip_i", "dino", "clip_t", "diversity"),
                        help="what --checkpoints picks the best by")
    parser.add_argument("--promote", action="store_true",
                        help="with --checkpoints: make the best checkpoint the style's adapter")
    group = parser.add_argument_group("prompt ranking")
    group.add_argument("--rank-prompts", metavar="FILE",
                       help="rank the templates in FILE (one per line) by CLIP score instead")
    group.add_argument("--good", help="directory of images the prompt should match")
    group.add_argument("--bad", help="directory of images the prompt should not match")
    group.add_argument("--class-noun", default="", help="fills {class_noun} in ranked templates")


def _images(directory: str, *, resolution: int) -> list[Any]:
    from pipeline.quality.evaluation import load_references

    return load_references(Path(directory), resolution=resolution)


def _rank(args: argparse.Namespace, clip: Any, resolution: int) -> int:
    from pipeline.quality.prompt_ranking import format_ranking, rank_prompts

    if not args.good:
        raise InputError("--rank-prompts needs --good DIR (images the prompt should match)")
    path = Path(args.rank_prompts)
    try:
        templates = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
                     if line.strip() and not line.strip().startswith("#")]
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from exc
    if not templates:
        raise InputError(f"{path} holds no templates (one per line)")
    good = _images(args.good, resolution=resolution)
    bad = _images(args.bad, resolution=resolution) if args.bad else []
    try:
        ranking = rank_prompts(clip, templates, good=good, bad=bad, class_noun=args.class_noun)
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    print(format_ranking(ranking))
    return 0


def run(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.devices import device_and_dtype
    from pipeline.models import load_diffusion, load_image_encoder, resolve_sources
    from pipeline.quality.evaluation import (
        EvaluationConfig,
        ReferenceSet,
        evaluate_style,
        load_prompt_templates,
        promote_checkpoint,
        select_best_checkpoint,
    )
    from pipeline.quality.metrics import METRIC_LABELS, METRICS, load_lpips
    from pipeline.training.style import read_style

    # 1. check the arguments before loading anything
    sources = resolve_sources(settings)
    device, dtype = device_and_dtype(settings)
    resolution = args.resolution or sources.resolution
    if args.rank_prompts:
        return _rank(args, load_image_encoder("clip", sources, device=device), resolution)
    if not args.style or not args.references:
        raise InputError("evaluate needs --style DIR and --references DIR (or --rank-prompts FILE)")
    if args.promote and not args.checkpoints:
        raise InputError("--promote works with --checkpoints")
    style_dir = Path(args.style)
    read_style(style_dir)
    templates = load_prompt_templates(args.prompts) if args.prompts else None
    try:
        config = EvaluationConfig(
            images_per_prompt=args.images_per_prompt, num_inference_steps=args.steps,
            guidance_scale=args.guidance, lora_scale=args.lora_scale, seed=args.seed,
            max_prompts=args.max_prompts, resolution=args.resolution,
            thumbnail=min(128, resolution),
        )
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    references = _images(args.references, resolution=resolution)
    out = Path(args.out) if args.out else settings.data_dir / "evaluations" / style_dir.resolve().name

    # 2. load the models
    diffusion = load_diffusion(sources, device=device, dtype=dtype)
    clip = load_image_encoder("clip", sources, device=device)
    dino = load_image_encoder("dino", sources, device=device)
    lpips = load_lpips(device=device)
    refs = ReferenceSet.from_images(references, clip=clip, dino=dino)

    # 3. evaluate (every checkpoint, or the style as it is)
    if args.checkpoints:
        selection = select_best_checkpoint(diffusion, style_dir, refs, clip=clip, dino=dino, out_dir=out,
                                           metric=args.metric, templates=templates, config=config,
                                           lpips=lpips)
        print(f"{'step':>6}  " + "  ".join(f"{METRIC_LABELS[m]:>10}" for m in METRICS))
        for c in selection.candidates:
            mark = "  <- best" if c is selection.best else ""
            values = "  ".join(f"{_fmt(c.scores.get(m)):>10}" for m in METRICS)
            print(f"{c.step:>6}  {values}{mark}")
        print(f"best by {METRIC_LABELS[args.metric]}: step {selection.best.step}; "
              f"written {selection.json_path}")
        if args.promote:
            promote_checkpoint(style_dir, selection)
            print(f"the style now uses the step-{selection.best.step} adapter")
        return 0
    result = evaluate_style(diffusion, style_dir, refs, clip=clip, dino=dino, out_dir=out,
                            templates=templates, config=config, lpips=lpips)
    s = result.scores
    print(f"{'':<10}" + "".join(f"{METRIC_LABELS[m]:>12}" for m in METRICS))
    print(f"{'this style':<10}" + "".join(f"{_fmt(s.get(m)):>12}" for m in METRICS))
    print(f"{'published':<10}" + "".join(f"{_fmt(PUBLISHED.get(m)):>12}" for m in METRICS)
          + "   (best DreamBooth-LoRA on SD 1.5 with real encoders)")
    if s.diversity_note:
        print(s.diversity_note)
    print(f"{s.num_generated} images from {len(result.prompts)} prompts against {s.num_references} "
          f"references in {result.seconds:.1f} s")
    print(f"written {result.json_path} and {result.sheet_path}")
    return 0


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
