"""One photo in, Telegram stickers out: the entry point the worker and the CLI call.

    sticker_models = StickerModels.create(load_models(settings),
                                          cache_size=settings.adapter_cache_size,
                                          lcm_lora=settings.lcm_lora)        # once per process
    result = make_sticker(sticker_models, StyleRef.open(style_dir, style_id=sid),
                          photo_bytes, StickerOptions(seed=7, variants=2))   # per job

``make_sticker`` runs decode -> caption -> prompt -> img2img (the style's adapter) -> NSFW filter
-> background removal -> post-processing -> WEBP, timing each stage. It refuses to run with a
segmenter that has no trained foreground head (``UntrainedSegmenterError``), and a sticker the
safety checker flags is dropped (counted in ``StickerResult.withheld``), never encoded. Bad input
raises a specific :class:`~pipeline.errors.StickerbotError` (an ImageError naming the photo, a
StyleError naming the style, an InputError for bad options); every sticker it returns passes
:func:`~pipeline.stickers.postprocess.check_sticker`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from pipeline.errors import InputError
from pipeline.images import DEFAULT_MAX_PIXELS, composite_on, decode_image
from pipeline.monitoring import StageTimer
from pipeline.stickers.captioning import DEFAULT_MAX_WORDS, caption_image
from pipeline.stickers.generation import (
    MAX_VARIANTS,
    GenerationParams,
    StickerGenerator,
    StyleRef,
    fit_to_model,
)
from pipeline.stickers.postprocess import (
    PostOptions,
    check_sticker,
    encode_webp,
    finish_sticker,
    rounded_cutout,
    suggest_emoji,
)
from pipeline.stickers.prompts import (
    DEFAULT_NEGATIVE_PROMPT,
    DEFAULT_STICKER_TEMPLATE,
    check_template,
    fit_list_prompt,
    sticker_prompt,
)
from pipeline.stickers.safety import flag_unsafe

if TYPE_CHECKING:
    from pipeline.models import Models
    from pipeline.settings import Settings

log = logging.getLogger(__name__)

STAGES = ("decode", "caption", "diffusion", "safety", "segmentation", "post")
# A cut-out whose opaque part is under this fraction of the image found no subject: the sticker
# falls back to the whole generated image with rounded corners.
MIN_SUBJECT_FRACTION = 0.01
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class StickerOptions:
    """What a request may choose. Defaults: the best img2img settings in public reports."""

    strength: float = 0.6
    guidance: float = 7.0
    steps: int = 30
    adapter_scale: float = 0.8
    seed: int = 0  # variant i uses seed + i
    variants: int = 1
    stroke: int = 8  # white outline width in output pixels; 0 = none
    shadow: bool = False
    fast: bool = False  # LCM-LoRA, 4 steps, guidance 1.5 (needs settings.lcm_lora)
    prompt_template: str = DEFAULT_STICKER_TEMPLATE  # fields {identifier} {class_noun} {caption}
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    caption_prefix: str | None = None  # conditional captioning: BLIP continues this text
    max_caption_words: int = DEFAULT_MAX_WORDS
    # Mirror test-time augmentation in background removal: twice the segmenter's time, which is
    # small beside one diffusion step, for steadier edges (docs/segmentation.md).
    flip: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.variants <= MAX_VARIANTS:
            raise InputError(f"variants must be 1..{MAX_VARIANTS}, not {self.variants}")
        if not 0 <= self.seed <= MAX_SEED - MAX_VARIANTS:
            raise InputError(f"seed must be 0..{MAX_SEED - MAX_VARIANTS}, not {self.seed}")
        if self.max_caption_words < 1:
            raise InputError("max_caption_words must be at least 1")
        try:
            check_template(self.prompt_template, required={"identifier"})
            self.generation_params()
            self.post_options()
        except ValueError as exc:
            raise InputError(f"bad sticker option: {exc}") from exc

    def generation_params(self) -> GenerationParams:
        return GenerationParams(strength=self.strength, guidance=self.guidance, steps=self.steps,
                                adapter_scale=self.adapter_scale, fast=self.fast)

    def post_options(self) -> PostOptions:
        return PostOptions(stroke=self.stroke, shadow=self.shadow)

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.variants)]


@dataclass
class StickerModels:
    """What ``make_sticker`` needs, built once per process: the resident models plus the
    generator holding the img2img pipeline and the adapter cache."""

    models: Models
    generator: StickerGenerator

    @classmethod
    def create(cls, models: Models, *, cache_size: int = 4, lcm_lora: str | None = None,
               compile: bool = False, compile_max_rank: int = 16) -> StickerModels:
        return cls(models=models,
                   generator=StickerGenerator(models.diffusion, cache_size=cache_size, lcm_lora=lcm_lora,
                                              compile=compile, compile_max_rank=compile_max_rank))

    @classmethod
    def configured(cls, models: Models, settings: Settings) -> StickerModels:
        """The generator as the settings ask (adapter cache, LCM-LoRA, the compiled fast path)."""
        from pipeline.models import fetch_lcm_lora
        from pipeline.stickers.fast_path import compile_enabled

        return cls.create(models, cache_size=settings.adapter_cache_size,
                          lcm_lora=fetch_lcm_lora(models.sources),
                          compile=compile_enabled(settings.compile, models.diffusion.device),
                          compile_max_rank=settings.compile_max_rank)

    @classmethod
    def load(cls, settings: Settings) -> StickerModels:
        """Load the preset's models and build the generator (for the CLI and scripts)."""
        from pipeline.models import load_models

        return cls.configured(load_models(settings), settings)


@dataclass
class StickerResult:
    webp: list[bytes]  # one Telegram-ready sticker per variant
    caption: str  # the cleaned caption ("" when the captioner said nothing usable)
    prompt: str
    negative_prompt: str
    seeds: list[int]  # seeds[i] made webp[i] (withheld variants' seeds are not listed)
    emoji: str
    timings: dict[str, float]  # seconds per stage (STAGES) and "total"
    sizes: list[tuple[int, int]] = field(default_factory=list)  # (width, height) of each sticker
    style_id: str = ""
    # True where segmentation found no subject and the whole image (rounded) was used.
    fallback_cutout: list[bool] = field(default_factory=list)
    withheld: int = 0  # variants the NSFW filter flagged: dropped, never encoded


def _has_subject(cutout: Image.Image) -> bool:
    alpha = np.asarray(cutout.getchannel("A"))
    return bool((alpha >= 128).mean() >= MIN_SUBJECT_FRACTION)


def make_sticker(models: StickerModels, style: StyleRef | str | Path, photo_bytes: bytes,
                 options: StickerOptions | None = None, *, photo_name: str = "photo",
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> StickerResult:
    """Turn one photo into ``options.variants`` stickers in ``style``.

    ``style`` is a :class:`StyleRef` (the worker opens it with the job's style id) or a style
    directory (its name is the id). Raises ImageError (naming ``photo_name``), StyleError
    (naming the style) or InputError; never returns an invalid sticker.
    """
    from pipeline.models import check_segmenter
    from segmentation.removal import remove_background

    options = options or StickerOptions()
    timer = StageTimer()
    start = time.perf_counter()
    # 1. check the style (cheap, no torch) and the background remover before any model work
    ref = style if isinstance(style, StyleRef) else StyleRef.open(style)
    check_segmenter(models.models.segmenter)
    diffusion = models.models.diffusion
    # 2. decode the photo and fit it to the model's resolution without distortion
    with timer("decode"):
        decoded = decode_image(photo_bytes, name=photo_name, max_pixels=max_pixels)
        photo = composite_on(decoded.image)
        model_input = fit_to_model(photo, resolution=diffusion.resolution,
                                   multiple=models.generator.multiple)
    # 3. caption it and build the prompt
    with timer("caption"):
        caption = caption_image(models.models.captioner, model_input, prefix=options.caption_prefix,
                                max_words=options.max_caption_words)
        tokenizer = diffusion.tokenizer

        def count_tokens(text: str) -> int:
            # verbose=False: measuring a long text is not feeding it to the model (no warning)
            return len(tokenizer(text, verbose=False).input_ids)

        limit = int(getattr(tokenizer, "model_max_length", 77) or 77)
        try:
            prompt = sticker_prompt(ref.info.identifier, ref.info.class_noun, caption,
                                    options.prompt_template, count_tokens=count_tokens, max_tokens=limit)
        except ValueError as exc:
            raise InputError(f"bad sticker option: {exc}") from exc
        negative = fit_list_prompt(options.negative_prompt, count_tokens=count_tokens, max_tokens=limit)
    # 4. img2img with the style's adapter, one image per seed
    with timer("diffusion"):
        images = models.generator.generate(
            model_input, prompt=prompt, negative_prompt=negative,
            seeds=options.seeds, style=ref, params=options.generation_params())
    # 5. the NSFW filter: a flagged image goes no further
    seeds = options.seeds
    with timer("safety"):
        if models.models.safety is not None:
            flags = flag_unsafe(models.models.safety, images)
            if any(flags):
                log.warning("the safety checker flagged %d of %d images (style %s); withheld",
                            sum(flags), len(flags), ref.id)
            images = [im for im, bad in zip(images, flags, strict=True) if not bad]
            seeds = [sd for sd, bad in zip(seeds, flags, strict=True) if not bad]
    withheld = len(options.seeds) - len(images)
    # 6. cut the subject out (soft alpha)
    with timer("segmentation"):
        cutouts = remove_background(models.models.segmenter, images, flip=options.flip) if images else []
    # 7. trim, fit to 512, outline, shadow, encode; check every file against Telegram's rules
    webps: list[bytes] = []
    sizes: list[tuple[int, int]] = []
    fallbacks: list[bool] = []
    post = options.post_options()
    with timer("post"):
        for image, cutout in zip(images, cutouts, strict=True):
            fallback = not _has_subject(cutout)
            if fallback:
                log.info("no subject found in the generated image (style %s): using a rounded "
                         "cut-out of the whole image", ref.id)
                cutout = rounded_cutout(image)
            data = encode_webp(finish_sticker(cutout, post))
            sizes.append(check_sticker(data))
            webps.append(data)
            fallbacks.append(fallback)
        emoji = suggest_emoji(caption)
    timer.totals["total"] = time.perf_counter() - start
    return StickerResult(
        webp=webps, caption=caption, prompt=prompt, negative_prompt=negative,
        seeds=seeds, emoji=emoji, timings=timer.totals, sizes=sizes, style_id=ref.id,
        fallback_cutout=fallbacks, withheld=withheld,
    )
