"""Evaluate a style: fixed, seeded text-to-image generations scored with CLIP-I, DINO, CLIP-T and
LPIPS diversity (see :mod:`pipeline.quality.metrics`), written as JSON and a contact sheet.

    <out dir>/
        metrics.json        scores, per-prompt scores, the settings that produced them
        contact_sheet.png   references in the first row, then one row per prompt
        images/pNN_K.png    every generation (prompt NN, sample K)

Generation shares the resident ``DiffusionModels`` components (no reload) in a txt2img
``StableDiffusionPipeline`` and loads the style's LoRA under a private adapter name that is
deleted afterwards, so the shared UNet and text encoder are left as they were found.

Checkpoint selection scores the trainer's intermediate adapters (``<style>/intermediate/step-N/``)
and the final one with the same prompts and seeds, and picks the best by a chosen metric.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from pipeline.errors import InputError, StyleError
from pipeline.quality.metrics import (
    METRICS,
    Lpips,
    StyleScores,
    clip_i_score,
    clip_t_score,
    cosine_matrix,
    dino_score,
    diversity_score,
    encode_images,
    encode_texts,
    load_lpips,
    neutral_prompt,
)
from pipeline.stickers.prompts import DEFAULT_NEGATIVE_PROMPT, check_template
from pipeline.storage.files import write_atomic
from pipeline.training.style import LORA_FILE, UNET_DIR, StyleInfo, read_style, write_style_info

log = logging.getLogger(__name__)

# The DreamBooth paper's prompt families, plus what a sticker pack needs. "{identifier}
# {class_noun}" names the style; CLIP-T compares against the prompt with the identifier dropped.
DEFAULT_PROMPTS: tuple[tuple[str, str], ...] = (
    ("recontextualisation", "a {identifier} {class_noun} on the beach"),
    ("recontextualisation", "a {identifier} {class_noun} in the snow"),
    ("recontextualisation", "a {identifier} {class_noun} in the jungle"),
    ("recontextualisation", "a {identifier} {class_noun} on a wooden table"),
    ("recontextualisation", "a {identifier} {class_noun} with a city in the background"),
    ("property", "a red {identifier} {class_noun}"),
    ("property", "a blue {identifier} {class_noun}"),
    ("property", "a {identifier} {class_noun} wearing a hat"),
    ("property", "a {identifier} {class_noun} wearing sunglasses"),
    ("sticker", "a {identifier} {class_noun} sticker, smiling"),
    ("sticker", "a {identifier} {class_noun} sticker, crying"),
    ("sticker", "a {identifier} {class_noun} sticker, waving hello"),
    ("sticker", "a {identifier} {class_noun} sticker, thumbs up"),
    ("sticker", "a {identifier} {class_noun} sticker, sleeping"),
)
INTERMEDIATE_DIR = "intermediate"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass(frozen=True)
class EvaluationConfig:
    images_per_prompt: int = 4  # the DreamBooth paper's 4; diversity needs at least 2
    num_inference_steps: int = 25
    guidance_scale: float = 7.0
    lora_scale: float = 1.0  # adapter strength while generating (0.8 was best in one report)
    seed: int = 0  # image k of prompt p uses seed + 1000 * p + k, whatever the batching
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    resolution: int | None = None  # None: the diffusion model's own
    thumbnail: int = 128  # contact-sheet cell side in pixels
    max_prompts: int | None = None  # use only the first N prompts (quick checks, sweeps)

    def __post_init__(self) -> None:
        if self.images_per_prompt < 1:
            raise ValueError("images_per_prompt must be at least 1 (2 or more to measure diversity)")
        if self.num_inference_steps < 1:
            raise ValueError("num_inference_steps must be at least 1")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise ValueError("resolution must be a multiple of 8, e.g. 512")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ValueError("max_prompts must be at least 1")


@dataclass
class ReferenceSet:
    """The user's stickers and their embeddings, computed once and reused by every evaluation
    of a sweep or checkpoint search."""

    images: list[Image.Image]
    clip: torch.Tensor
    dino: torch.Tensor

    @classmethod
    def from_images(cls, images: Sequence[Image.Image], *, clip: Any, dino: Any) -> ReferenceSet:
        if not images:
            raise InputError("no reference images: give the sticker set the style was trained on")
        imgs = list(images)
        return cls(images=imgs, clip=encode_images(clip, imgs), dino=encode_images(dino, imgs))


@dataclass
class EvaluationResult:
    scores: StyleScores
    prompts: list[str]  # as generated (with the identifier)
    neutral_prompts: list[str]  # as CLIP-T saw them
    per_prompt: list[dict[str, Any]]  # prompt, family, clip_i, dino, clip_t
    images: list[list[Image.Image]]  # [prompt][sample]
    json_path: Path
    sheet_path: Path
    seconds: float


# --- Prompts and references -------------------------------------------------------------------


def load_prompt_templates(path: str | Path) -> list[str]:
    """One template per line; blank lines and ``#`` comments are skipped. Each template uses
    ``{identifier}`` (and may use ``{class_noun}``)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the prompt file {path}: {exc}") from exc
    templates = []
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            templates.append(check_template(text, required={"identifier"}))
        except ValueError as exc:
            raise InputError(f"{path.name}, line {number}: {exc}") from exc
    if not templates:
        raise InputError(f"the prompt file {path} holds no prompts (one template per line, "
                         "e.g. 'a {identifier} {class_noun} on the beach')")
    return templates


def load_references(directory: str | Path, *, resolution: int) -> list[Image.Image]:
    """The reference stickers of a directory, decoded safely and fitted like training images."""
    from pipeline.training.sticker_set import list_sticker_files, prepare_sticker_set

    files = list_sticker_files(Path(directory))
    prepared = prepare_sticker_set(files, resolution=resolution, min_images=1)
    for name, reason in prepared.skipped:
        log.warning("reference %s not used: %s", name, reason)
    return prepared.images


def fill_prompts(templates: Sequence[str], *, identifier: str, class_noun: str) -> list[str]:
    out = []
    for t in templates:
        text = t.format(identifier=identifier, class_noun=class_noun, caption="")
        out.append(re.sub(r"\s+", " ", text).strip(" ,"))
    return out


# --- Generation -------------------------------------------------------------------------------


def build_txt2img(diffusion: Any, *, unet: Any = None) -> Any:
    """A txt2img pipeline over the resident components (shared, not copied). ``unet`` replaces
    the base UNet (full fine-tuning styles)."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe: Any = StableDiffusionPipeline(
        vae=diffusion.vae, text_encoder=diffusion.text_encoder, tokenizer=diffusion.tokenizer,
        unet=unet if unet is not None else diffusion.unet,
        scheduler=DPMSolverMultistepScheduler.from_config(diffusion.scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextmanager
def style_loaded(diffusion: Any, style_dir: Path, info: StyleInfo, *, weights_dir: Path | None = None,
                 scale: float = 1.0) -> Iterator[Any]:
    """A txt2img pipeline with the style applied; on exit the shared models are as before."""
    weights_dir = Path(weights_dir or style_dir)
    if info.kind == "full":
        from pipeline.models import load_unet

        unet = load_unet(weights_dir / UNET_DIR, device=diffusion.device, dtype=diffusion.dtype)
        yield build_txt2img(diffusion, unet=unet)
        return
    if not (weights_dir / LORA_FILE).is_file():
        raise StyleError(f"no adapter file {LORA_FILE} in {weights_dir}")
    pipe = build_txt2img(diffusion)
    name = f"eval-{uuid.uuid4().hex[:8]}"
    modules = (diffusion.unet, diffusion.text_encoder)
    had_peft = [_peft_state(m) for m in modules]
    try:
        try:
            pipe.load_lora_weights(str(weights_dir), adapter_name=name)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise StyleError(f"cannot load the adapter in {weights_dir}: {exc}") from exc
        pipe.set_adapters([name], adapter_weights=[scale])
        yield pipe
    finally:
        for module, before in zip(modules, had_peft, strict=True):
            _remove_adapter(module, name, before)


def _peft_state(module: Any) -> tuple[bool, Any]:
    """(whether ``module`` held adapters, its transformers "peft loaded" flag)."""
    return bool(getattr(module, "peft_config", None)), getattr(module, "_hf_peft_config_loaded", None)


def _remove_adapter(module: Any, name: str, before: tuple[bool, Any]) -> None:
    """Delete adapter ``name``; a module that held no adapters before gets its LoRA wrappers
    taken out too, so it is the same object graph (and speed) as before the evaluation."""
    from diffusers.utils.peft_utils import delete_adapter_layers, recurse_remove_peft_layers

    config = getattr(module, "peft_config", None)
    if not config or name not in config:
        return
    had_adapters, loaded_flag = before
    if had_adapters:
        delete_adapter_layers(module, name)
        config.pop(name, None)
        return
    recurse_remove_peft_layers(module)
    del module.peft_config
    if hasattr(module, "_hf_peft_config_loaded"):
        module._hf_peft_config_loaded = loaded_flag


def generate_images(pipe: Any, prompts: Sequence[str], config: EvaluationConfig, *,
                    resolution: int,
                    progress: Callable[[int, int], None] | None = None) -> list[list[Image.Image]]:
    """``config.images_per_prompt`` images per prompt, each from its own fixed seed."""
    groups = []
    for p, prompt in enumerate(prompts):
        gens = [torch.Generator(device="cpu").manual_seed(config.seed + 1000 * p + k)
                for k in range(config.images_per_prompt)]
        out = pipe(
            prompt=prompt, negative_prompt=config.negative_prompt or None,
            num_images_per_prompt=config.images_per_prompt, generator=gens,
            num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale,
            height=resolution, width=resolution, output_type="pil",
        )
        groups.append(list(out.images))
        if progress is not None:
            progress(p + 1, len(prompts))
    return groups


# --- Scoring and writing ----------------------------------------------------------------------


def score_generations(groups: Sequence[Sequence[Image.Image]], neutral: Sequence[str],
                      references: ReferenceSet, *, clip: Any, dino: Any,
                      lpips: Lpips) -> tuple[StyleScores, list[dict[str, Any]]]:
    """The style's scores and each prompt's CLIP-I / DINO / CLIP-T."""
    flat = [im for g in groups for im in g]
    counts = [len(g) for g in groups]
    gen_clip = encode_images(clip, flat)
    gen_dino = encode_images(dino, flat)
    text = encode_texts(clip, list(neutral))
    text_per_image = torch.repeat_interleave(text, torch.tensor(counts), dim=0)
    per_prompt = []
    start = 0
    for i, n in enumerate(counts):
        sl = slice(start, start + n)
        per_prompt.append({
            "prompt_index": i,
            "clip_i": clip_i_score(gen_clip[sl], references.clip),
            "dino": dino_score(gen_dino[sl], references.dino),
            "clip_t": float(cosine_matrix(gen_clip[sl], text[i:i + 1]).mean()),
        })
        start += n
    scores = StyleScores(
        clip_i=clip_i_score(gen_clip, references.clip),
        dino=dino_score(gen_dino, references.dino),
        clip_t=clip_t_score(gen_clip, text_per_image),
        diversity=diversity_score(lpips, groups) if lpips.available and max(counts) >= 2 else None,
        diversity_note=lpips.reason if not lpips.available else (
            None if max(counts) >= 2 else "diversity needs at least 2 images per prompt"),
        num_generated=len(flat),
        num_references=len(references.images),
    )
    return scores, per_prompt


def _wrap(text: str, width: int) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines or [""]


def contact_sheet(references: Sequence[Image.Image], groups: Sequence[Sequence[Image.Image]],
                  labels: Sequence[str], *, cell: int = 128, label_width: int = 220) -> Image.Image:
    """References in the first row, then one row per prompt with its text on the left."""
    cols = max([len(g) for g in groups] + [min(len(references), 8), 1])
    rows: list[tuple[str, Sequence[Image.Image]]] = [("references", list(references)[:cols])]
    rows += list(zip(labels, groups, strict=True))
    pad = 4
    sheet = Image.new("RGB", (label_width + cols * (cell + pad) + pad, len(rows) * (cell + pad) + pad),
                      (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    chars = max(8, label_width // 6 - 1)
    for r, (label, images) in enumerate(rows):
        y = pad + r * (cell + pad)
        lines = [w for part in label.split("\n") for w in _wrap(part, chars)]
        for i, line in enumerate(lines[: max(1, cell // 12)]):
            draw.text((pad, y + i * 12), line, fill=(0, 0, 0))
        for c, im in enumerate(images):
            thumb = im.convert("RGBA")
            thumb.thumbnail((cell, cell), Image.Resampling.LANCZOS)
            tile = Image.new("RGBA", (cell, cell), (255, 255, 255, 255))
            tile.alpha_composite(thumb, ((cell - thumb.width) // 2, (cell - thumb.height) // 2))
            sheet.paste(tile.convert("RGB"), (label_width + pad + c * (cell + pad), y))
    return sheet


# --- The orchestrating function ---------------------------------------------------------------


def evaluate_style(
    diffusion: Any,
    style_dir: str | Path,
    references: ReferenceSet,
    *,
    clip: Any,
    dino: Any,
    out_dir: str | Path,
    templates: Sequence[str] | None = None,
    config: EvaluationConfig = EvaluationConfig(),
    lpips: Lpips | None = None,
    weights_dir: str | Path | None = None,
    save_images: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> EvaluationResult:
    """Generate the fixed prompt set with the style, score it, write JSON and a contact sheet.

    ``weights_dir`` evaluates other weights of the same style (an intermediate checkpoint).
    """
    start = time.perf_counter()
    # 1. check inputs
    style_dir = Path(style_dir)
    info = read_style(style_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if templates is None:
        families = [f for f, _ in DEFAULT_PROMPTS]
        templates = [t for _, t in DEFAULT_PROMPTS]
    else:
        families = ["custom"] * len(templates)
        for t in templates:
            check_template(t, required={"identifier"})
    if config.max_prompts is not None:
        templates, families = list(templates)[: config.max_prompts], families[: config.max_prompts]
    prompts = fill_prompts(templates, identifier=info.identifier, class_noun=info.class_noun)
    neutral = [neutral_prompt(p, identifier=info.identifier, class_noun=info.class_noun) for p in prompts]
    resolution = config.resolution or diffusion.resolution
    lp = lpips if lpips is not None else load_lpips(device=diffusion.device)

    # 2. generate with the style applied
    with style_loaded(diffusion, style_dir, info, weights_dir=Path(weights_dir) if weights_dir else None,
                      scale=config.lora_scale) as pipe:
        groups = generate_images(pipe, prompts, config, resolution=resolution, progress=progress)

    # 3. score
    scores, per_prompt = score_generations(groups, neutral, references, clip=clip, dino=dino, lpips=lp)
    for row, family, prompt, text in zip(per_prompt, families, prompts, neutral, strict=True):
        row.update(family=family, prompt=prompt, neutral_prompt=text)

    # 4. write the images, the contact sheet and the JSON
    if save_images:
        (out / "images").mkdir(exist_ok=True)
        for p, group in enumerate(groups):
            for k, im in enumerate(group):
                im.save(out / "images" / f"p{p:02d}_{k}.png")
    sheet_path = out / "contact_sheet.png"
    labels = [f"{row['prompt']}\nCLIP-I {row['clip_i']:.3f} DINO {row['dino']:.3f} "
              f"CLIP-T {row['clip_t']:.3f}" for row in per_prompt]
    contact_sheet(references.images, groups, labels, cell=config.thumbnail).save(sheet_path)
    seconds = time.perf_counter() - start
    json_path = out / "metrics.json"
    report = {
        "style": {"dir": str(style_dir), "identifier": info.identifier, "class_noun": info.class_noun,
                  "base_model": info.base_model, "kind": info.kind, "steps": info.steps,
                  "rank": info.rank, "created_at": info.created_at},
        "templates": list(templates),
        "weights_dir": str(weights_dir) if weights_dir else str(style_dir),
        "scores": asdict(scores),
        "per_prompt": per_prompt,
        "config": asdict(config) | {"resolution": resolution},
        "encoders": {"clip": getattr(clip, "source", None), "dino": getattr(dino, "source", None)},
        "seconds": round(seconds, 3),
    }
    write_atomic(json_path, json.dumps(report, indent=2).encode())
    return EvaluationResult(scores=scores, prompts=prompts, neutral_prompts=neutral,
                            per_prompt=per_prompt, images=groups, json_path=json_path,
                            sheet_path=sheet_path, seconds=seconds)


# --- Best checkpoint --------------------------------------------------------------------------


@dataclass
class CheckpointScore:
    step: int
    weights_dir: Path
    scores: StyleScores


@dataclass
class CheckpointSelection:
    metric: str
    best: CheckpointScore
    candidates: list[CheckpointScore] = field(default_factory=list)
    json_path: Path | None = None


def list_checkpoints(style_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, directory) of the style's intermediate adapters and its final one, by step."""
    style_dir = Path(style_dir)
    info = read_style(style_dir)
    found: dict[int, Path] = {}
    inter = style_dir / INTERMEDIATE_DIR
    if inter.is_dir():
        for d in inter.iterdir():
            m = _STEP_DIR.match(d.name)
            weights = d / (UNET_DIR if info.kind == "full" else LORA_FILE)
            if m and d.is_dir() and weights.exists():
                found[int(m.group(1))] = d
    # The style's own weights win over an intermediate of the same step. After a promotion they
    # are the selected checkpoint's, and are labelled with its step.
    selected = info.extra.get("selected_checkpoint") or {}
    found[int(selected.get("step", info.steps))] = style_dir
    return sorted(found.items())


def select_best_checkpoint(
    diffusion: Any,
    style_dir: str | Path,
    references: ReferenceSet,
    *,
    clip: Any,
    dino: Any,
    out_dir: str | Path,
    metric: str = "clip_i",
    templates: Sequence[str] | None = None,
    config: EvaluationConfig = EvaluationConfig(),
    lpips: Lpips | None = None,
) -> CheckpointSelection:
    """Evaluate every checkpoint with the same prompts and seeds; the best by ``metric``."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}: choose one of {', '.join(METRICS)}")
    lp = lpips if lpips is not None else load_lpips(device=diffusion.device)
    if metric == "diversity" and not lp.available:
        raise InputError(f"cannot select by diversity: {lp.reason}")
    out = Path(out_dir)
    candidates = []
    for step, weights in list_checkpoints(style_dir):
        result = evaluate_style(diffusion, style_dir, references, clip=clip, dino=dino,
                                out_dir=out / f"step-{step}", templates=templates, config=config,
                                lpips=lp, weights_dir=weights, save_images=False)
        candidates.append(CheckpointScore(step=step, weights_dir=weights, scores=result.scores))
        log.info("checkpoint step %d: %s %.4f", step, metric, result.scores.get(metric) or 0.0)
    # Ties go to the earlier step: less training, same quality.
    def rank(c: CheckpointScore) -> tuple[float, int]:
        value = c.scores.get(metric)
        return (float("-inf") if value is None else value, -c.step)

    best = max(candidates, key=rank)
    selection = CheckpointSelection(metric=metric, best=best, candidates=candidates)
    selection.json_path = out / "checkpoints.json"
    write_atomic(selection.json_path, json.dumps({
        "metric": metric,
        "best_step": best.step,
        "candidates": [{"step": c.step, "weights_dir": str(c.weights_dir), **asdict(c.scores)}
                       for c in candidates],
    }, indent=2).encode())
    return selection


def promote_checkpoint(style_dir: str | Path, selection: CheckpointSelection) -> StyleInfo:
    """Make the selected checkpoint the style's weights (atomic file swap) and record the choice
    in style.json (``extra["selected_checkpoint"]``). The weights being replaced are kept as
    ``intermediate/step-<their step>/`` first, so a promotion can be undone or redone."""
    from pipeline.storage.files import atomic_directory

    style_dir = Path(style_dir)
    info = read_style(style_dir)
    best = selection.best
    if best.weights_dir.resolve() != style_dir.resolve():
        if info.kind != "lora":
            raise StyleError("promoting a checkpoint is supported for LoRA styles only")
        current = int((info.extra.get("selected_checkpoint") or {}).get("step", info.steps))
        keep = style_dir / INTERMEDIATE_DIR / f"step-{current}"
        if not (keep / LORA_FILE).is_file():
            with atomic_directory(keep) as tmp:
                shutil.copyfile(style_dir / LORA_FILE, tmp / LORA_FILE)
                write_style_info(tmp, replace(info, steps=current))
        write_atomic(style_dir / LORA_FILE, (best.weights_dir / LORA_FILE).read_bytes())
    extra = dict(info.extra)
    extra["selected_checkpoint"] = {"step": best.step, "metric": selection.metric,
                                    "value": best.scores.get(selection.metric),
                                    "final_step": info.steps}
    new = replace(info, extra=extra)
    write_style_info(style_dir, new)
    read_style(style_dir)
    return new
