"""Model presets and loading: the only module that calls ``from_pretrained``.

Every model is named by a Hugging Face id or a local directory. The ``sd15`` preset names the
real checkpoints (downloaded into the Hugging Face cache on first use); the ``tiny`` preset
builds random-weight models of the same classes into ``<data dir>/tiny-zoo`` and then loads them
through the same functions. Stage functions (training, captioning, generation, segmentation)
receive these loaded models as arguments and never load anything themselves.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.architectures import ARCHITECTURES, Architecture
from pipeline.devices import device_and_dtype
from pipeline.errors import ModelNotFoundError
from pipeline.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSources:
    """Where each model comes from: a Hugging Face id or a local directory."""

    preset: str
    diffusion: str  # a diffusers Stable Diffusion repo (unet/, vae/, text_encoder/, ...)
    captioner: str  # BLIP for conditional generation, with its processor
    segmenter: str  # SegFormer for semantic segmentation, with its image processor
    clip: str  # CLIP model + processor, for CLIP-I / CLIP-T metrics
    dino: str  # DINO ViT, for the DINO metric
    resolution: int  # pixels the diffusion model trains and generates at
    lcm_lora: str | None = None  # LCM-LoRA for the fast 4-step mode
    cache_dir: str | None = None


# The real checkpoints of the default preset.
SD15_SOURCES = {
    "diffusion": "stable-diffusion-v1-5/stable-diffusion-v1-5",  # CreativeML OpenRAIL-M
    "captioner": "Salesforce/blip-image-captioning-base",  # BSD-3-Clause
    # SegFormer-b0 encoder pretrained on ImageNet-1k (NVIDIA SegFormer licence: research and
    # non-commercial use). It has no foreground head: the first worker bootstraps one into
    # <data dir>/segmenter/ (segmentation/bootstrap.py); STICKERBOT_SEGMENTER_BOOTSTRAP_FROM=scratch
    # trains from random weights instead.
    "segmenter": "nvidia/mit-b0",
    "clip": "openai/clip-vit-base-patch32",  # MIT
    "dino": "facebook/dino-vits16",  # Apache-2.0
}


def resolve_sources(settings: Settings) -> ModelSources:
    """The model sources of the configured preset, with per-model overrides applied."""
    if settings.preset == "tiny":
        from pipeline.zoo import build_zoo

        zoo = build_zoo(settings.zoo_dir, ARCHITECTURES["tiny"])
        base = {name: str(zoo / sub) for name, sub in (
            ("diffusion", "sd"), ("captioner", "blip"), ("segmenter", "segformer"),
            ("clip", "clip"), ("dino", "dino"))}
        resolution = ARCHITECTURES["tiny"].resolution
    else:
        base = dict(SD15_SOURCES)
        resolution = ARCHITECTURES["sd15"].resolution
    overrides = {
        "diffusion": settings.diffusion_model,
        "captioner": settings.captioner_model,
        "segmenter": settings.segmenter_model,
        "clip": settings.clip_model,
        "dino": settings.dino_model,
    }
    for key, value in overrides.items():
        if value:
            base[key] = value
    return ModelSources(
        preset=settings.preset,
        resolution=resolution,
        lcm_lora=settings.lcm_lora,
        cache_dir=str(settings.model_cache_dir) if settings.model_cache_dir else None,
        **base,
    )


def _from_pretrained(role: str, cls: Any, source: str, *, cache_dir: str | None = None,
                     **kwargs: Any) -> Any:
    """``cls.from_pretrained`` with an error that says which model, where, and how to fix it."""
    try:
        return cls.from_pretrained(source, cache_dir=cache_dir, **kwargs)
    except (OSError, ValueError) as exc:
        local = Path(source).expanduser()
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        where = cache_dir or os.environ.get("HF_HOME") or "~/.cache/huggingface"
        if local.exists():
            hint = f"the directory {local} exists but does not hold a loadable {cls.__name__}"
        else:
            hint = (
                f"it is neither a local directory nor in the Hugging Face cache ({where})"
                + (" and HF_HUB_OFFLINE is set" if offline else "")
                + f". Download it once with `huggingface-cli download {source}` on a machine "
                "with network, or point the setting at a local directory"
            )
        sub = kwargs.get("subfolder")
        what = f"{source}" + (f" (subfolder {sub})" if sub else "")
        raise ModelNotFoundError(
            f"cannot load the {role} model {what}: {hint}. ({exc.__class__.__name__})"
        ) from exc


# --- Containers handed to the stage functions -------------------------------------------------


@dataclass
class DiffusionModels:
    """Stable Diffusion components. ``scheduler_config`` builds training or sampling schedulers."""

    unet: Any  # UNet2DConditionModel
    vae: Any  # AutoencoderKL
    text_encoder: Any  # CLIPTextModel
    tokenizer: Any  # CLIPTokenizer
    scheduler_config: dict[str, Any]
    source: str  # the id or directory they came from (recorded in style.json)
    resolution: int
    device: torch.device
    dtype: torch.dtype

    @property
    def vae_scale_factor(self) -> int:
        return int(2 ** (len(self.vae.config.block_out_channels) - 1))


@dataclass
class Captioner:
    model: Any  # BlipForConditionalGeneration
    processor: Any  # BlipProcessor
    source: str


@dataclass
class Segmenter:
    """A SegFormer. With one label its logit is foreground; with several, ``background_labels``
    lists the classes that count as background."""

    model: Any  # SegformerForSemanticSegmentation
    processor: Any  # SegformerImageProcessor
    source: str
    background_labels: tuple[int, ...] = field(default_factory=tuple)


@dataclass
class ImageEncoder:
    """CLIP or DINO, for metrics. ``kind`` is "clip" or "dino"."""

    model: Any
    processor: Any
    kind: str
    source: str


def load_diffusion(sources: ModelSources, *, device: torch.device, dtype: torch.dtype) -> DiffusionModels:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    src, cache = sources.diffusion, sources.cache_dir
    # The fp16 variant halves the download of the real checkpoint; local dirs may lack it.
    variant = "fp16" if dtype == torch.float16 and not Path(src).exists() else None

    def load(role: str, cls: Any, sub: str, **kw: Any) -> Any:
        if variant is not None and sub in ("unet", "vae", "text_encoder"):
            try:
                return _from_pretrained(role, cls, src, cache_dir=cache, subfolder=sub,
                                        variant=variant, **kw)
            except ModelNotFoundError:
                pass
        return _from_pretrained(role, cls, src, cache_dir=cache, subfolder=sub, **kw)

    tokenizer = load("tokenizer", CLIPTokenizer, "tokenizer")
    text_encoder = load("text encoder", CLIPTextModel, "text_encoder", torch_dtype=dtype)
    vae = load("VAE", AutoencoderKL, "vae", torch_dtype=dtype)
    unet = load("UNet", UNet2DConditionModel, "unet", torch_dtype=dtype)
    scheduler = load("scheduler", DDPMScheduler, "scheduler")
    for module in (text_encoder, vae, unet):
        module.requires_grad_(False)
        module.eval()
        module.to(device)
    return DiffusionModels(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        scheduler_config=dict(scheduler.config), source=src, resolution=sources.resolution,
        device=device, dtype=dtype,
    )


def load_unet(path: str | Path, *, device: torch.device, dtype: torch.dtype) -> Any:
    """A fully fine-tuned UNet directory (the full fine-tuning mode's output)."""
    from diffusers import UNet2DConditionModel

    unet = _from_pretrained("fine-tuned UNet", UNet2DConditionModel, str(path), torch_dtype=dtype)
    return unet.to(device).eval().requires_grad_(False)


def load_captioner(sources: ModelSources, *, device: torch.device, dtype: torch.dtype) -> Captioner:
    from transformers import BlipForConditionalGeneration, BlipProcessor

    processor = _from_pretrained("captioner", BlipProcessor, sources.captioner, cache_dir=sources.cache_dir)
    model = _from_pretrained("captioner", BlipForConditionalGeneration, sources.captioner,
                             cache_dir=sources.cache_dir, dtype=dtype)
    return Captioner(model=model.to(device).eval(), processor=processor, source=sources.captioner)


def load_segmenter(source: str | Path, *, device: torch.device, dtype: torch.dtype = torch.float32,
                   cache_dir: str | None = None, num_labels: int | None = None) -> Segmenter:
    """A SegFormer from an id or directory. ``num_labels=1`` puts a fresh one-class head on an
    encoder-only checkpoint (for fine-tuning). Its decode head runs in the factored order of
    ``segmentation.head`` (same weights and outputs, far fewer multiply-adds)."""
    from transformers import SegformerForSemanticSegmentation, SegformerImageProcessor

    from segmentation.head import factor_decode_head

    src = str(source)
    processor = _from_pretrained("segmenter", SegformerImageProcessor, src, cache_dir=cache_dir)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if num_labels is not None:
        kwargs.update(num_labels=num_labels, ignore_mismatched_sizes=True)
    model = _from_pretrained("segmenter", SegformerForSemanticSegmentation, src,
                             cache_dir=cache_dir, **kwargs)
    factor_decode_head(model)
    labels = {int(k): str(v).lower() for k, v in (model.config.id2label or {}).items()}
    background = tuple(i for i, name in labels.items() if name in ("background", "bg", "unlabeled"))
    return Segmenter(model=model.to(device).eval(), processor=processor, source=src,
                     background_labels=background if model.config.num_labels > 1 else ())


def load_image_encoder(kind: str, sources: ModelSources, *, device: torch.device) -> ImageEncoder:
    """CLIP (``kind="clip"``) or DINO (``kind="dino"``), in fp32 (metrics want precision)."""
    if kind == "clip":
        from transformers import CLIPModel, CLIPProcessor

        src = sources.clip
        processor = _from_pretrained("CLIP", CLIPProcessor, src, cache_dir=sources.cache_dir)
        model = _from_pretrained("CLIP", CLIPModel, src, cache_dir=sources.cache_dir)
    elif kind == "dino":
        from transformers import ViTImageProcessor, ViTModel

        src = sources.dino
        processor = _from_pretrained("DINO", ViTImageProcessor, src, cache_dir=sources.cache_dir)
        model = _from_pretrained("DINO", ViTModel, src, cache_dir=sources.cache_dir, add_pooling_layer=False)
    else:
        raise ValueError(f"unknown image encoder kind {kind!r}: use 'clip' or 'dino'")
    return ImageEncoder(model=model.to(device).eval(), processor=processor, kind=kind, source=src)


def _config_of(source: str, cache_dir: str | None) -> dict[str, Any] | None:
    """A model's ``config.json`` from a directory or the local Hugging Face cache (no network);
    None when it is not at hand."""
    import json

    local = Path(source).expanduser()
    path: Path | None = local / "config.json" if local.is_dir() else None
    if path is None:
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.errors import HFValidationError

        try:
            found = try_to_load_from_cache(source, "config.json", cache_dir=cache_dir)
        except HFValidationError:  # neither a directory nor a hub id
            return None
        path = Path(found) if isinstance(found, str) else None
    if path is None or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def segmenter_head_problem(source: str | Path, *, cache_dir: str | None = None) -> str | None:
    """Why ``source`` cannot remove backgrounds as it is, or None when it has a trained
    foreground head (or its config is not at hand: loading it will then say what is missing).

    ``nvidia/mit-b0`` is an ImageNet classification checkpoint: loaded for segmentation, its
    decode head is new and random. A many-class head without a background class (ADE20K's)
    segments its classes, not a sticker's subject."""
    config = _config_of(str(source), cache_dir)
    if config is None:
        return None
    architectures = [str(a) for a in config.get("architectures") or []]
    if architectures and not any(a.endswith("ForSemanticSegmentation") for a in architectures):
        return (f"{source} is an encoder checkpoint ({', '.join(architectures)}) with no "
                "segmentation head: its foreground head must be trained first")
    labels = {str(v).lower() for v in (config.get("id2label") or {}).values()}
    if len(labels) > 1 and not labels & {"background", "bg", "unlabeled"}:
        return f"{source} segments {len(labels)} classes and none of them is the background"
    return None


@dataclass(frozen=True)
class SegmenterChoice:
    """Which segmenter a worker serves: a trained version in the data dir (``version``), or the
    configured one; ``problem`` says why neither can serve yet (a bootstrap must train one)."""

    base: str  # the configured segmenter, or "scratch:<preset>" when training from random weights
    source: str  # what to load now
    version: str | None
    problem: str | None


def choose_segmenter(settings: Settings, sources: ModelSources) -> SegmenterChoice:
    from segmentation import versions

    scratch = settings.segmenter_bootstrap_from == "scratch"
    base = f"scratch:{settings.preset}" if scratch else sources.segmenter
    serving = versions.serving_version(settings.data_dir, base)
    if serving is not None:
        return SegmenterChoice(base=base, source=str(serving.path), version=serving.name, problem=None)
    problem: str | None
    if scratch:
        problem = ("no segmenter trained from scratch yet (STICKERBOT_SEGMENTER_BOOTSTRAP_FROM=scratch "
                   "uses no pretrained weights)")
    else:
        problem = segmenter_head_problem(sources.segmenter, cache_dir=sources.cache_dir)
    return SegmenterChoice(base=base, source=sources.segmenter, version=None, problem=problem)


def load_chosen_segmenter(settings: Settings, choice: SegmenterChoice, sources: ModelSources, *,
                          device: torch.device) -> Segmenter:
    """The segmenter of ``choice``. Without a trained head: the configured encoder with a fresh
    one-label head (or, from scratch, random weights), a placeholder that serves no sticker."""
    if choice.problem is None:
        return load_segmenter(choice.source, device=device, cache_dir=sources.cache_dir)
    if choice.base.startswith("scratch:"):
        from segmentation.training import fresh_segmenter

        arch = ARCHITECTURES[settings.preset]
        return fresh_segmenter(arch.segformer, arch.segmenter_size, device=device)
    return load_segmenter(choice.source, device=device, cache_dir=sources.cache_dir, num_labels=1)


@dataclass
class Models:
    """What a worker keeps resident: loaded once at start, passed to every job. The segmenter
    may be replaced by a newer trained version while the worker runs (``segmenter_choice``)."""

    sources: ModelSources
    diffusion: DiffusionModels
    captioner: Captioner
    segmenter: Segmenter
    device: torch.device
    dtype: torch.dtype
    segmenter_choice: SegmenterChoice | None = None


def load_models(settings: Settings) -> Models:
    """Load the diffusion model, the captioner and the segmenter of the configured preset (a
    trained version of it from ``<data dir>/segmenter/`` when one was promoted)."""
    sources = resolve_sources(settings)
    device, dtype = device_and_dtype(settings)
    diffusion = load_diffusion(sources, device=device, dtype=dtype)
    captioner = load_captioner(sources, device=device, dtype=dtype)
    choice = choose_segmenter(settings, sources)
    segmenter = load_chosen_segmenter(settings, choice, sources, device=device)
    if choice.problem is not None:
        log.warning("segmenter: %s; a bootstrap job will train one", choice.problem)
    log.info("models loaded (preset %s) on %s/%s", sources.preset, device, dtype)
    return Models(sources=sources, diffusion=diffusion, captioner=captioner,
                  segmenter=segmenter, device=device, dtype=dtype, segmenter_choice=choice)


def check_available(sources: ModelSources) -> dict[str, str | None]:
    """For ``doctor``: each model's role -> None when its files are at hand, else the reason."""
    from huggingface_hub import snapshot_download

    result: dict[str, str | None] = {}
    for role in ("diffusion", "captioner", "segmenter", "clip", "dino"):
        src = getattr(sources, role)
        if Path(src).expanduser().is_dir():
            result[role] = None
            continue
        try:
            snapshot_download(src, cache_dir=sources.cache_dir, local_files_only=True)
            result[role] = None
        except Exception as exc:
            result[role] = f"{src} not in the local cache ({exc.__class__.__name__})"
    return result


def architecture_of(preset: str) -> Architecture:
    return ARCHITECTURES[preset]
