"""Model presets and loading: the only module that calls ``from_pretrained``.

Every model is named by a Hugging Face id or a local directory. The ``sd15`` preset names the
real checkpoints (downloaded into the Hugging Face cache on first use); the ``tiny`` preset
builds random-weight models of the same classes into ``<data dir>/tiny-zoo`` and then loads them
through the same functions. Stage functions (training, captioning, generation, segmentation)
receive these loaded models as arguments and never load anything themselves.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.architectures import ARCHITECTURES, Architecture
from pipeline.devices import device_and_dtype
from pipeline.errors import ModelNotFoundError, UntrainedSegmenterError
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


class _DropRecords(logging.Filter):
    """Drops log records whose message contains one of ``fragments``."""

    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.getMessage())
        return not any(f in message for f in self.fragments)


# Messages the libraries print on every offline load that read like failures and are not:
# - huggingface_hub: offline mode means the hub is not asked; the cached commit is the answer;
# - transformers: without torchvision the PIL image processors are used (the project does not
#   install torchvision: a CUDA build of it is several GB, and the PIL ones give the same input);
# - transformers' load report: load_segmenter turns it into segmenter_head_problem.
_QUIET = {
    "huggingface_hub.hf_api": _DropRecords("Could not reach the Hub"),
    "transformers.utils.import_utils": _DropRecords("requires torchvision (not installed)"),
}


def _silence_harmless_notices() -> None:
    """Install the filters above for good: the torchvision notice fires when a processor class is
    first imported, before any load starts."""
    for name, filt in _QUIET.items():
        logger = logging.getLogger(name)
        if filt not in logger.filters:
            logger.addFilter(filt)


_silence_harmless_notices()


@contextlib.contextmanager
def quiet_loading(*, load_report: bool = False) -> Iterator[None]:
    """While models load: no deprecation notice from diffusers' hub calls, and with
    ``load_report=True`` no transformers load-report table (for callers that check the keys
    themselves and say what is wrong in one line)."""
    filters: dict[str, logging.Filter] = {}
    if load_report:
        filters["transformers.modeling_utils"] = _DropRecords("LOAD REPORT")
    added = []
    for name, filt in filters.items():
        logger = logging.getLogger(name)
        if filt not in logger.filters:
            logger.addFilter(filt)
            added.append((logger, filt))
    try:
        with warnings.catch_warnings():
            # diffusers 0.42 passes an argument huggingface_hub 1.x deprecated; nothing to act on.
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
            yield
    finally:
        for logger, filt in added:
            logger.removeFilter(filt)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")


def local_model_dir(source: str, *, cache_dir: str | None = None,
                    subfolder: str | None = None) -> Path | None:
    """The directory ``source`` (a local path or a hub id already in the cache) loads from, without
    any network access; None when the hub cache has no snapshot of it yet."""
    local = Path(source).expanduser()
    if local.is_dir():
        base = local
    else:
        from huggingface_hub import snapshot_download

        try:
            base = Path(snapshot_download(source, cache_dir=cache_dir, local_files_only=True))
        except Exception:  # not cached (or not a valid id): from_pretrained will say so
            return None
    return base / subfolder if subfolder else base


def repo_cache_dir(path: Path) -> Path:
    """The ``models--org--name`` folder above a path inside a hub cache snapshot (else ``path``)."""
    for parent in (path, *path.parents):
        if parent.name.startswith("models--"):
            return parent
    return path


# The config file and the weight files (first found wins) each kind of class loads.
def _expected_files(cls: Any, variant: str | None) -> tuple[str, tuple[str, ...], str | None]:
    """(config file, weight file candidates, the class name/model_type the config must name)."""
    name = cls.__name__
    suffix = f".{variant}" if variant else ""
    if name.endswith("Scheduler"):
        return "scheduler_config.json", (), None
    if "Tokenizer" in name or "Processor" in name:  # ...ImageProcessorPil too
        return "", (), None
    config_class = getattr(cls, "config_class", None)  # transformers models (the safety checker too)
    if config_class is None:
        return "config.json", (f"diffusion_pytorch_model{suffix}.safetensors",
                               f"diffusion_pytorch_model{suffix}.bin"), name
    model_type = getattr(config_class, "model_type", None)
    return "config.json", (f"model{suffix}.safetensors", f"pytorch_model{suffix}.bin",
                           f"model{suffix}.safetensors.index.json"), model_type


def safetensors_problem(path: Path) -> str | None:
    """None when ``path`` is a whole safetensors file; else what is wrong (truncated, bad header).
    Reads only the header: the data offsets it declares must end at the file's size."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return "is empty or cut short"
            n = int.from_bytes(head, "little")
            if n > size - 8:
                return f"is truncated ({size:,} bytes; its header alone claims {n + 8:,})"
            header = json.loads(fh.read(n))
    except (OSError, ValueError) as exc:
        return f"cannot be read as safetensors ({exc.__class__.__name__})"
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        return f"is truncated ({size:,} bytes of {8 + n + end:,})"
    return None


def check_model_files(role: str, source: str, cls: Any, *, cache_dir: str | None = None,
                      subfolder: str | None = None, variant: str | None = None) -> str | None:
    """One line naming the model, the file and the fix when the files ``cls.from_pretrained``
    would read are missing, truncated or of another class; None when they look whole (or are
    not local yet: a first start downloads them). Reads configs and safetensors headers only."""
    directory = local_model_dir(source, cache_dir=cache_dir, subfolder=subfolder)
    if directory is None:
        return None
    config_name, weight_names, expected = _expected_files(cls, variant)
    what = source + (f" ({subfolder}/)" if subfolder else "")
    redownload = (f"delete {directory} and download it again (`hf download {source}`)"
                  if not Path(source).expanduser().is_dir() else "rebuild or re-copy that directory")
    if not directory.is_dir():
        return f"{role} model {what}: the folder {directory} is missing; fix: {redownload}"
    names = dict(getattr(cls, "vocab_files_names", None) or {})
    if names and (_offline() or Path(source).expanduser().is_dir()):
        # A tokenizer reads tokenizer.json, or else every one of its slow-tokenizer files.
        fast = names.pop("tokenizer_file", None)
        if not (fast and (directory / fast).is_file()):
            gone = [n for n in names.values() if not (directory / n).is_file()]
            if gone:
                return f"{role} model {what}: {directory / gone[0]} is missing; fix: {redownload}"
    if config_name:
        config_path = directory / config_name
        try:
            config = json.loads(config_path.read_text())
        except FileNotFoundError:
            return f"{role} model {what}: {config_path} is missing; fix: {redownload}"
        except (OSError, ValueError) as exc:
            return (f"{role} model {what}: {config_path} is not valid JSON ({exc.__class__.__name__}); "
                    f"fix: {redownload}")
        found = config.get("_class_name") or config.get("model_type")
        if expected and found and found != expected and not (
                # CLIPTextModel's config names the composite "clip" when saved from a CLIPModel
                expected == "clip_text_model" and found == "clip"):
            return (f"{role} model {what}: {config_path} describes a {found}, not the {expected} this "
                    f"role needs; fix: point the setting at a {cls.__name__} checkpoint")
    if weight_names:
        weights = next((directory / n for n in weight_names if (directory / n).exists()), None)
        if weights is None:
            if not _offline() and not Path(source).expanduser().is_dir():
                return None  # from_pretrained will download it
            return (f"{role} model {what}: no weights file ({weight_names[0]}) in {directory}; fix: "
                    f"{redownload}")
        if weights.suffix == ".safetensors":
            problem = safetensors_problem(weights)
            if problem:
                return f"{role} model {what}: {weights} {problem}; fix: {redownload}"
        elif weights.suffix == ".bin":
            import zipfile

            if not zipfile.is_zipfile(weights):
                return f"{role} model {what}: {weights} is truncated or not a PyTorch file; fix: {redownload}"
    return None


def _from_pretrained(role: str, cls: Any, source: str, *, cache_dir: str | None = None,
                     **kwargs: Any) -> Any:
    """``cls.from_pretrained`` with an error that says which model, which file, and how to fix it.

    The local files are checked first (a truncated safetensors file or a config of another class
    would otherwise load as random weights with only a log line); nothing is half-loaded."""
    problem = check_model_files(role, source, cls, cache_dir=cache_dir, subfolder=kwargs.get("subfolder"),
                                variant=kwargs.get("variant"))
    if problem:
        raise ModelNotFoundError(f"cannot load the {problem}")
    try:
        with quiet_loading(load_report=bool(kwargs.get("output_loading_info"))):
            return cls.from_pretrained(source, cache_dir=cache_dir, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        local = Path(source).expanduser()
        where = (cache_dir or os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME")
                 or "~/.cache/huggingface")
        cached = None if local.exists() else local_model_dir(source, cache_dir=cache_dir,
                                                              subfolder=kwargs.get("subfolder"))
        if local.exists():
            hint = f"the directory {local} exists but does not hold a loadable {cls.__name__}"
        elif cached is not None:
            hint = (f"its cached files in {cached} are incomplete or damaged; fix: delete "
                    f"{repo_cache_dir(cached)} and download it again (`hf download {source}`)")
        else:
            hint = (
                f"it is neither a local directory nor in the Hugging Face cache ({where})"
                + (" and HF_HUB_OFFLINE is set" if _offline() else "")
                + f". Download it once with `hf download {source}` on a machine "
                "with network, or point the setting at a local directory"
            )
        sub = kwargs.get("subfolder")
        what = f"{source}" + (f" (subfolder {sub})" if sub else "")
        detail = " ".join(str(exc).split())[:300]
        raise ModelNotFoundError(
            f"cannot load the {role} model {what}: {hint}. ({exc.__class__.__name__}: {detail})"
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
    # Why it cannot cut a foreground out (segmenter_head_problem), or None: never used silently.
    head_problem: str | None = None


@dataclass
class SafetyChecker:
    """The SD 1.5 repository's NSFW classifier and its CLIP image processor."""

    model: Any  # StableDiffusionSafetyChecker
    feature_extractor: Any  # CLIPImageProcessor
    source: str


@dataclass
class ImageEncoder:
    """CLIP or DINO, for metrics. ``kind`` is "clip" or "dino"."""

    model: Any
    processor: Any
    kind: str
    source: str


def _variant_cached(directory: Path | None, cls: Any, variant: str) -> bool:
    """Whether ``directory`` (a local model folder, or None) holds ``cls``'s ``variant`` weights."""
    names = _expected_files(cls, variant)[1]
    return directory is not None and any((directory / n).exists() for n in names)


def _load_variant(role: str, cls: Any, source: str, *, cache_dir: str | None, subfolder: str,
                  variant: str, **kwargs: Any) -> Any:
    """The ``variant`` weights (``*.fp16.safetensors``) where the repository has them, else the
    plain ones. A variant file that is cached but damaged is an error, not a silent switch to the
    files twice its size."""
    directory = local_model_dir(source, cache_dir=cache_dir, subfolder=subfolder)
    cached = _variant_cached(directory, cls, variant)
    if directory is not None and not cached and _offline():
        return _from_pretrained(role, cls, source, cache_dir=cache_dir, subfolder=subfolder, **kwargs)
    try:
        return _from_pretrained(role, cls, source, cache_dir=cache_dir, subfolder=subfolder,
                                variant=variant, **kwargs)
    except ModelNotFoundError:
        if cached:
            raise
        return _from_pretrained(role, cls, source, cache_dir=cache_dir, subfolder=subfolder, **kwargs)


def load_diffusion(sources: ModelSources, *, device: torch.device, dtype: torch.dtype) -> DiffusionModels:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    src, cache = sources.diffusion, sources.cache_dir
    # The fp16 variant halves the download of the real checkpoint; local dirs may lack it.
    variant = "fp16" if dtype == torch.float16 and not Path(src).exists() else None

    def load(role: str, cls: Any, sub: str, **kw: Any) -> Any:
        if variant is not None and sub in ("unet", "vae", "text_encoder"):
            return _load_variant(role, cls, src, cache_dir=cache, subfolder=sub, variant=variant, **kw)
        return _from_pretrained(role, cls, src, cache_dir=cache, subfolder=sub, **kw)

    tokenizer = load("tokenizer", CLIPTokenizer, "tokenizer")
    text_encoder = load("text encoder", CLIPTextModel, "text_encoder", dtype=dtype)
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


BACKGROUND_LABELS = ("background", "bg", "unlabeled")
SEGMENTER_FIX = ("`stickerbot segmenter bootstrap` trains one into <data dir>/segmenter/ (a worker does it "
                 "on its first start); or train one with `stickerbot segmenter train --procedural 2000 "
                 "--out data/segmenter` and set STICKERBOT_SEGMENTER_MODEL=data/segmenter")


def segmenter_head_problem(config: Any, *, missing_keys: Iterable[str] = (), source: str = "") -> str | None:
    """Why a SegFormer cannot cut a foreground out, in one line with the fix; None when it can.

    A pure function of the loaded model's config and the keys its checkpoint lacked (the load
    report's ``missing_keys``, or the model's keys minus the checkpoint's). Problems:
    a classification checkpoint (``nvidia/mit-b0``: ImageNet labels, no decode head), decode-head
    (or encoder) weights missing from the checkpoint (a random head), and several labels none of
    which is a background class (no way to tell foreground from background).
    """
    name = source or str(getattr(config, "_name_or_path", "") or "the segmenter")
    labels = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    count = int(getattr(config, "num_labels", len(labels) or 1))
    archs = [str(a) for a in (getattr(config, "architectures", None) or [])]
    if archs and not any(a.endswith("ForSemanticSegmentation") for a in archs):
        return (f"segmenter {name} is a {archs[0]} checkpoint ({count} labels) with no trained "
                f"segmentation head, so every sticker would be an opaque rectangle; fix: {SEGMENTER_FIX}")
    missing = sorted(set(missing_keys))
    head = [k for k in missing if k.startswith("decode_head.")]
    if head:
        return (f"segmenter {name} has no decode-head weights ({len(head)} missing, e.g. {head[0]}): "
                f"its head would be random; fix: {SEGMENTER_FIX}")
    if missing:
        return (f"segmenter {name} lacks {len(missing)} weights (e.g. {missing[0]}): the checkpoint is "
                f"incomplete; fix: {SEGMENTER_FIX}")
    if count > 1 and not any(v.lower() in BACKGROUND_LABELS for v in labels.values()):
        return (f"segmenter {name} has {count} labels and none is a background class "
                f"({', '.join(list(labels.values())[:3])}, ...): it cannot tell a subject from its "
                f"background; fix: {SEGMENTER_FIX}")
    return None


def load_segmenter(source: str | Path, *, device: torch.device, dtype: torch.dtype = torch.float32,
                   cache_dir: str | None = None, num_labels: int | None = None) -> Segmenter:
    """A SegFormer from an id or directory. ``num_labels=1`` puts a fresh one-class head on an
    encoder-only checkpoint (for fine-tuning). Its decode head runs in the factored order of
    ``segmentation.head`` (same weights and outputs, far fewer multiply-adds). ``head_problem``
    says when it has no trained foreground head (see :func:`segmenter_head_problem`)."""
    from transformers import SegformerForSemanticSegmentation, SegformerImageProcessor

    from segmentation.head import factor_decode_head

    src = str(source)
    processor = _from_pretrained("segmenter", SegformerImageProcessor, src, cache_dir=cache_dir)
    kwargs: dict[str, Any] = {"dtype": dtype, "output_loading_info": True}
    if num_labels is not None:
        # New label names with the new count (an ImageNet checkpoint's 1000 would not match).
        names = ["foreground"] if num_labels == 1 else [f"label_{i}" for i in range(num_labels)]
        # (num_labels follows from id2label; passing both warns about the checkpoint's old map)
        kwargs.update(ignore_mismatched_sizes=True, id2label=dict(enumerate(names)),
                      label2id={n: i for i, n in enumerate(names)})
    model, info = _from_pretrained("segmenter", SegformerForSemanticSegmentation, src,
                                   cache_dir=cache_dir, **kwargs)
    problem = segmenter_head_problem(model.config, missing_keys=info.get("missing_keys") or (), source=src)
    if problem and num_labels is None:
        log.warning("%s", problem)
    factor_decode_head(model)
    labels = {int(k): str(v).lower() for k, v in (model.config.id2label or {}).items()}
    background = tuple(i for i, name in labels.items() if name in BACKGROUND_LABELS)
    return Segmenter(model=model.to(device).eval(), processor=processor, source=src,
                     background_labels=background if model.config.num_labels > 1 else (),
                     head_problem=problem)


def check_segmenter(segmenter: Segmenter) -> None:
    """Refuse to cut stickers out with a segmenter that has no trained foreground head."""
    if segmenter.head_problem:
        raise UntrainedSegmenterError(segmenter.head_problem)


def load_safety_checker(sources: ModelSources, *, device: torch.device, dtype: torch.dtype,
                        required: bool) -> SafetyChecker | None:
    """The diffusion repository's ``safety_checker/`` + ``feature_extractor/``. None when the
    repository has none and ``required`` is False (the tiny zoo); a ModelNotFoundError naming
    STICKERBOT_SAFETY_CHECKER when it is required and absent."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    src, cache = sources.diffusion, sources.cache_dir
    directory = local_model_dir(src, cache_dir=cache)
    index: dict[str, Any] = {}
    if directory is not None:
        with contextlib.suppress(OSError, ValueError):
            index = json.loads((directory / "model_index.json").read_text())
    declared = (index.get("safety_checker") or [None])[0] is not None
    if directory is not None and not declared:
        if required:
            raise ModelNotFoundError(
                f"the diffusion model {src} ships no safety checker (model_index.json); fix: use a "
                "repository that has one, or set STICKERBOT_SAFETY_CHECKER=false to run without the "
                "NSFW filter")
        return None
    variant = "fp16" if dtype == torch.float16 and not Path(src).exists() else None
    kwargs: dict[str, Any] = {"subfolder": "safety_checker", "dtype": dtype}
    try:
        model = _from_pretrained("safety checker", StableDiffusionSafetyChecker, src, cache_dir=cache,
                                 variant=variant, **kwargs)
    except ModelNotFoundError:
        if variant is None:
            raise
        model = _from_pretrained("safety checker", StableDiffusionSafetyChecker, src, cache_dir=cache,
                                 **kwargs)
    extractor = _from_pretrained("safety checker", CLIPImageProcessor, src, cache_dir=cache,
                                 subfolder="feature_extractor")
    return SafetyChecker(model=model.to(device).eval(), feature_extractor=extractor, source=src)


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


def segmenter_config_problem(source: str | Path, *, cache_dir: str | None = None) -> str | None:
    """:func:`segmenter_head_problem` of ``source``'s ``config.json``, read without loading any
    weights (None when the config is not at hand: loading it will then say what is missing)."""
    from types import SimpleNamespace

    config = _config_of(str(source), cache_dir)
    if config is None:
        return None
    return segmenter_head_problem(SimpleNamespace(**config), source=str(source))


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
        problem = segmenter_config_problem(sources.segmenter, cache_dir=sources.cache_dir)
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
    safety: SafetyChecker | None = None  # None: no NSFW filter (tiny zoo, or turned off)


def check_model_set(sources: ModelSources, *, dtype: torch.dtype, safety: bool,
                    segmenter: str | None = None) -> None:
    """Check every file ``load_models`` will read before any is loaded, so a damaged cache fails
    with its one line before gigabytes sit in accelerator memory (nothing half-loaded). Files not
    local yet are left to the download. ``segmenter``: the segmenter directory or id that will be
    loaded (default the configured one; "" for none, e.g. random weights)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import (
        BlipForConditionalGeneration,
        CLIPTextModel,
        CLIPTokenizer,
        SegformerForSemanticSegmentation,
    )

    src = sources.diffusion
    variant = "fp16" if dtype == torch.float16 and not Path(src).exists() else None
    parts: list[tuple[str, Any, str, str | None]] = [
        ("tokenizer", CLIPTokenizer, src, "tokenizer"), ("text encoder", CLIPTextModel, src, "text_encoder"),
        ("VAE", AutoencoderKL, src, "vae"), ("UNet", UNet2DConditionModel, src, "unet"),
        ("captioner", BlipForConditionalGeneration, sources.captioner, None),
    ]
    segmenter = sources.segmenter if segmenter is None else segmenter
    if segmenter:
        parts.append(("segmenter", SegformerForSemanticSegmentation, segmenter, None))
    if safety:
        parts.append(("safety checker", StableDiffusionSafetyChecker, src, "safety_checker"))
    for role, cls, source, sub in parts:
        folder = local_model_dir(source, cache_dir=sources.cache_dir, subfolder=sub)
        chosen = variant if variant is not None and sub not in (None, "tokenizer") and _variant_cached(
            folder, cls, variant) else None
        if sub == "safety_checker" and (folder is None or not folder.is_dir()):
            continue  # none in this repo: load_safety_checker says what to do
        problem = check_model_files(role, source, cls, cache_dir=sources.cache_dir, subfolder=sub,
                                    variant=chosen)
        if problem:
            raise ModelNotFoundError(f"cannot load the {problem}")


def load_models(settings: Settings) -> Models:
    """Load the diffusion model, the captioner and the segmenter of the configured preset (their
    files checked first, all of them; the segmenter is a trained version of it from
    ``<data dir>/segmenter/`` when one was promoted)."""
    sources = resolve_sources(settings)
    device, dtype = device_and_dtype(settings)
    choice = choose_segmenter(settings, sources)
    scratch = choice.problem is not None and choice.base.startswith("scratch:")
    check_model_set(sources, dtype=dtype, safety=settings.safety_checker,
                    segmenter="" if scratch else choice.source)
    diffusion = load_diffusion(sources, device=device, dtype=dtype)
    captioner = load_captioner(sources, device=device, dtype=dtype)
    segmenter = load_chosen_segmenter(settings, choice, sources, device=device)
    if choice.problem is not None:
        log.warning("segmenter: %s; a bootstrap job will train one", choice.problem)
    safety = None
    if settings.safety_checker:
        safety = load_safety_checker(sources, device=device, dtype=dtype, required=settings.preset == "sd15")
    log.info("models loaded (preset %s) on %s/%s%s", sources.preset, device, dtype,
             "" if safety is not None else ", no NSFW filter")
    return Models(sources=sources, diffusion=diffusion, captioner=captioner,
                  segmenter=segmenter, device=device, dtype=dtype, safety=safety, segmenter_choice=choice)


def _role_files(role: str) -> list[tuple[str, str | None]]:
    """(class path, subfolder) of what each role loads, for ``check_available``."""
    files: dict[str, list[tuple[str, str | None]]] = {
        "diffusion": [("diffusers.UNet2DConditionModel", "unet"), ("diffusers.AutoencoderKL", "vae"),
                      ("transformers.CLIPTextModel", "text_encoder")],
        "captioner": [("transformers.BlipForConditionalGeneration", None)],
        "segmenter": [("transformers.SegformerForSemanticSegmentation", None)],
        "clip": [("transformers.CLIPModel", None)],
        "dino": [("transformers.ViTModel", None)],
    }
    return files[role]


def check_available(sources: ModelSources) -> dict[str, str | None]:
    """For ``doctor``: each model's role -> None when its files are at hand and whole, else the
    reason in one line (not cached, a missing or truncated file, a config of another class)."""
    import importlib

    from huggingface_hub import snapshot_download

    result: dict[str, str | None] = {}
    for role in ("diffusion", "captioner", "segmenter", "clip", "dino"):
        src = getattr(sources, role)
        if not Path(src).expanduser().is_dir():
            try:
                snapshot_download(src, cache_dir=sources.cache_dir, local_files_only=True)
            except Exception as exc:
                result[role] = f"{src} not in the local cache ({exc.__class__.__name__})"
                continue
        problem = None
        for class_path, sub in _role_files(role):
            module, name = class_path.split(".")
            cls = getattr(importlib.import_module(module), name)
            problem = check_model_files(role, src, cls, cache_dir=sources.cache_dir, subfolder=sub)
            if problem:
                break
        result[role] = problem
    return result


def fetch_lcm_lora(sources: ModelSources) -> str | None:
    """The LCM-LoRA as a local directory (downloaded into the configured cache once), or None.

    diffusers' ``load_lora_weights`` would download a hub id into the default cache, ignoring
    STICKERBOT_MODEL_CACHE_DIR; resolving it here keeps every model in one cache."""
    src = sources.lcm_lora
    if not src or Path(src).expanduser().exists():
        return src
    from huggingface_hub import snapshot_download

    try:
        with quiet_loading():
            return snapshot_download(src, cache_dir=sources.cache_dir, local_files_only=_offline(),
                                     allow_patterns=["*.safetensors", "*.json"])
    except Exception as exc:  # not cached offline, no network, not a repo
        raise ModelNotFoundError(
            f"cannot load the LCM-LoRA {src} (STICKERBOT_LCM_LORA): {exc.__class__.__name__}; fix: "
            f"`hf download {src}` on a machine with network, or clear the setting") from exc


def architecture_of(preset: str) -> Architecture:
    return ARCHITECTURES[preset]
