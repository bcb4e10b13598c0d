"""Generation: img2img from the photo with the user's style, many users on one resident model.

A worker builds one :class:`StickerGenerator` from its resident :class:`DiffusionModels` and keeps
it for its lifetime. The generator owns one ``StableDiffusionImg2ImgPipeline`` that shares those
components (nothing is reloaded per request). Style adapters (LoRA) are loaded by style id into an
LRU cache and activated per request with ``set_adapters``; an evicted adapter is deleted from the
UNet. Only the requested adapter is active during a request, so a request for style A returns
exactly what a freshly loaded A would, whatever ran before it.

Fully fine-tuned styles (``kind == "full"``) swap in their own UNet (one kept resident).
A fast mode uses an LCM-LoRA (``settings.lcm_lora``) next to the style adapter: 4 denoising steps
at guidance about 1.5.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from PIL import Image, ImageOps

from pipeline.errors import ConfigError, ModelNotFoundError, StyleError
from pipeline.training.style import LORA_FILE, STYLE_FILE, UNET_DIR, StyleInfo, read_style

if TYPE_CHECKING:
    from pipeline.models import DiffusionModels
    from pipeline.stickers.fast_path import CompiledServing

log = logging.getLogger(__name__)

FAST_STEPS = 4  # denoising steps that run in fast mode (LCM)
FAST_GUIDANCE = 1.5
LCM_ADAPTER = "lcm"
MAX_ASPECT = 2.0  # photos more elongated than 2:1 are centre-cropped to 2:1 before generation
MAX_VARIANTS = 8


@dataclass(frozen=True)
class GenerationParams:
    """img2img settings. The defaults are the best ones in public reports for SD 1.5 LoRAs."""

    strength: float = 0.6  # how far from the photo: 0 keeps it, 1 ignores it
    guidance: float = 7.0  # classifier-free guidance scale
    steps: int = 30  # scheduler steps; img2img runs int(steps * strength) of them
    adapter_scale: float = 0.8  # LoRA weight; 0 = the base model
    fast: bool = False  # LCM-LoRA: FAST_STEPS denoising steps at FAST_GUIDANCE

    def __post_init__(self) -> None:
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], not {self.strength}")
        if not 1 <= self.steps <= 200:
            raise ValueError(f"steps must be 1..200, not {self.steps}")
        if int(self.steps * self.strength) < 1:
            raise ValueError(f"steps {self.steps} x strength {self.strength} runs no denoising step; "
                             "raise one of them")
        if not 0.0 <= self.guidance <= 30.0:
            raise ValueError(f"guidance must be 0..30, not {self.guidance}")
        if not 0.0 <= self.adapter_scale <= 2.0:
            raise ValueError(f"adapter_scale must be 0..2, not {self.adapter_scale}")


@dataclass(frozen=True)
class StyleRef:
    """A checked style directory and the id it is cached under."""

    id: str
    directory: Path
    info: StyleInfo
    fingerprint: tuple[Any, ...]  # changes when the directory's weights are rewritten

    @classmethod
    def open(cls, directory: str | Path, *, style_id: str | None = None) -> StyleRef:
        """Read and check a style directory (StyleError naming the style when unusable)."""
        directory = Path(directory)
        sid = style_id or directory.name
        info = read_style(directory, name=sid)
        weights = directory / (LORA_FILE if info.kind == "lora" else UNET_DIR)
        try:
            files = [directory / STYLE_FILE, weights]
            if info.kind == "full":
                files += sorted(p for p in weights.iterdir() if p.is_file())
            stamp = tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in files)
        except OSError as exc:
            raise StyleError(f"style {sid!r} cannot be read ({exc.__class__.__name__})") from exc
        return cls(id=sid, directory=directory.resolve(), info=info, fingerprint=(str(directory.resolve()),
                                                                                   *stamp))


def size_multiple(diffusion: DiffusionModels) -> int:
    """Pixel sizes must divide by this: the VAE's downsampling times the UNet's."""
    unet_down = 2 ** (len(diffusion.unet.config.block_out_channels) - 1)
    return diffusion.vae_scale_factor * unet_down


def fit_to_model(image: Image.Image, *, resolution: int, multiple: int,
                 max_aspect: float = MAX_ASPECT) -> Image.Image:
    """The photo at the model's resolution without distortion: the longer side becomes
    ``resolution``, both sides multiples of ``multiple``. The crop is the minimal centred one that
    gives the rounded size's exact aspect (and at most ``max_aspect``:1, so a panorama keeps a
    usable height); the scale is uniform."""
    if resolution % multiple:
        raise ValueError(f"resolution {resolution} is not a multiple of {multiple}")
    w, h = image.size
    aspect = min(max(w, h) / max(1, min(w, h)), max_aspect)
    short = max(multiple, round(resolution / aspect / multiple) * multiple)
    size = (resolution, short) if w >= h else (short, resolution)
    return ImageOps.fit(image, size, method=Image.Resampling.LANCZOS)


class _NoTextEncoderLoraNotice(logging.Filter):
    """diffusers warns on every load of a UNet-only LoRA that the text encoder got no keys: that
    is the normal case for styles here, not something an operator should chase."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No LoRA keys associated to")


_LORA_NOTICE_FILTER = _NoTextEncoderLoraNotice()


@dataclass
class _Adapter:
    name: str  # the peft adapter name inside the UNet (and text encoder)
    fingerprint: tuple[Any, ...]


class StickerGenerator:
    """img2img with per-style adapters on one resident pipeline. Build once per worker process.

    Thread-safe: one request at a time holds the pipeline (activation and denoising must not
    interleave).
    """

    def __init__(self, diffusion: DiffusionModels, *, cache_size: int = 4, lcm_lora: str | None = None,
                 full_cache_size: int = 1, compile: bool = False, compile_max_rank: int = 16,
                 compile_mode: str | None = None, compile_backend: str = "inductor") -> None:
        from diffusers import DPMSolverMultistepScheduler

        if cache_size < 1:
            raise ConfigError(f"STICKERBOT_ADAPTER_CACHE_SIZE must be at least 1, not {cache_size}")
        self.diffusion = diffusion
        self.cache_size = cache_size
        self.full_cache_size = max(1, full_cache_size)
        self.lcm_lora = lcm_lora
        # DPM-Solver++ (2M): good images in 20-30 steps; its state resets at every set_timesteps.
        self._scheduler = DPMSolverMultistepScheduler.from_config(diffusion.scheduler_config)
        self._fast_scheduler: Any = None
        self.pipe: Any = self._img2img_pipeline(diffusion.unet)
        lora_log = logging.getLogger("diffusers.loaders.lora_base")
        if _LORA_NOTICE_FILTER not in lora_log.filters:
            lora_log.addFilter(_LORA_NOTICE_FILTER)
        self._adapters: OrderedDict[str, _Adapter] = OrderedDict()
        self._full: OrderedDict[str, tuple[tuple[Any, ...], Any]] = OrderedDict()  # id -> (fp, pipe)
        self._lcm_loaded = False
        self._names = itertools.count()
        # Adapter names unique to this generator: another one on the same modules cannot clash.
        self._prefix = uuid.uuid4().hex[:8]
        self._lock = threading.RLock()
        self.loads = 0  # adapters loaded from disk so far (cache misses), for metrics and tests
        # The fast path (pipeline/stickers/fast_path.py): compiled UNet and VAE decoder, LoRA
        # styles hot-swapped into one slot. None = every request takes the eager path.
        self.compiled: CompiledServing | None = None
        self._compiled_pipe: Any = None
        if compile:
            self._start_compiled(max_rank=compile_max_rank, mode=compile_mode, backend=compile_backend)

    # --- Cache -----------------------------------------------------------------------------

    @property
    def cached_styles(self) -> list[str]:
        """Style ids with an adapter loaded, least recently used first."""
        return list(self._adapters)

    @property
    def multiple(self) -> int:
        return size_multiple(self.diffusion)

    def _loaded_names(self) -> set[str]:
        names: set[str] = set()
        for adapters in self.pipe.get_list_adapters().values():
            names.update(adapters)
        return names

    def _delete(self, name: str) -> None:
        try:
            if name in self._loaded_names():
                self.pipe.delete_adapters(name)
        except (ValueError, KeyError, AttributeError) as exc:  # half-loaded adapter: best effort
            log.warning("could not delete adapter %s: %s", name, exc)

    def load_adapter(self, style: StyleRef) -> str:
        """The adapter name of ``style``, loading it (and evicting the least recently used one)
        on a miss. A style rewritten on disk since it was cached is reloaded."""
        with self._lock:
            # 1. a hit: the cached adapter, unless the style was rewritten since
            cached = self._adapters.get(style.id)
            if cached is not None and cached.fingerprint == style.fingerprint:
                self._adapters.move_to_end(style.id)
                return cached.name
            # 2. room for it: drop a stale copy, evict the least recently used
            if cached is not None:
                self._delete(self._adapters.pop(style.id).name)
            self._evict_down_to(self.cache_size - 1)
            # 3. read it from disk
            name = f"style_{self._prefix}_{next(self._names)}"
            self._read_adapter(style, name)
            self._adapters[style.id] = _Adapter(name=name, fingerprint=style.fingerprint)
            self.loads += 1
            return name

    def _evict_down_to(self, size: int) -> None:
        while len(self._adapters) > size:
            evicted_id, evicted = self._adapters.popitem(last=False)
            self._delete(evicted.name)
            log.debug("evicted adapter of style %s", evicted_id)

    def _read_adapter(self, style: StyleRef, name: str) -> None:
        """Load ``style``'s LoRA file under adapter ``name``; StyleError naming the style when it
        does not fit this model (nothing is left behind then)."""
        if style.info.base_model != self.diffusion.source:
            log.info("style %s was trained on %s, serving on %s", style.id,
                     style.info.base_model, self.diffusion.source)
        try:
            with warnings.catch_warnings():
                # Several adapters side by side is this cache's design, not a mistake.
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                self.pipe.load_lora_weights(str(style.directory), weight_name=LORA_FILE,
                                            adapter_name=name)
        except Exception as exc:  # any failure to load is this style's fault
            self._delete(name)
            raise StyleError(f"style {style.id!r}: its adapter cannot be loaded into "
                             f"{self.diffusion.source} ({exc.__class__.__name__}: "
                             f"{str(exc)[:200]})") from exc
        if name not in self._loaded_names():
            raise StyleError(f"style {style.id!r}: its adapter file holds no LoRA weights "
                             "for this model")

    def _load_lcm(self) -> None:
        if self._lcm_loaded:
            return
        if not self.lcm_lora:
            raise ConfigError("fast mode needs an LCM-LoRA: set STICKERBOT_LCM_LORA to its id or "
                              "directory (e.g. latent-consistency/lcm-lora-sdv1-5)")
        try:
            self.pipe.load_lora_weights(self.lcm_lora, adapter_name=LCM_ADAPTER)
        except Exception as exc:  # report which setting is wrong
            self._delete(LCM_ADAPTER)
            raise ModelNotFoundError(f"cannot load the LCM-LoRA {self.lcm_lora!r} "
                                     f"(STICKERBOT_LCM_LORA): {exc.__class__.__name__}: "
                                     f"{str(exc)[:200]}") from exc
        self._lcm_loaded = True

    def _img2img_pipeline(self, unet: Any) -> Any:
        """An img2img pipeline on the resident components with ``unet``; nothing is copied."""
        from diffusers import StableDiffusionImg2ImgPipeline

        # Any: diffusers adds its LoRA and progress-bar methods through mixins mypy cannot see.
        pipe: Any = cast(Any, StableDiffusionImg2ImgPipeline(
            vae=self.diffusion.vae, text_encoder=self.diffusion.text_encoder,
            tokenizer=self.diffusion.tokenizer, unet=unet, scheduler=self._scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        ))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _full_pipeline(self, style: StyleRef) -> Any:
        from pipeline.models import load_unet

        hit = self._full.get(style.id)
        if hit is not None and hit[0] == style.fingerprint:
            self._full.move_to_end(style.id)
            return hit[1]
        self._full.pop(style.id, None)
        while len(self._full) >= self.full_cache_size:
            self._full.popitem(last=False)
        try:
            unet = load_unet(style.directory / UNET_DIR, device=self.diffusion.device,
                             dtype=self.diffusion.dtype)
        except ModelNotFoundError as exc:
            raise StyleError(f"style {style.id!r}: its fine-tuned UNet cannot be loaded") from exc
        pipe = self._img2img_pipeline(unet)
        self._full[style.id] = (style.fingerprint, pipe)
        self.loads += 1
        return pipe

    def unload_all(self) -> None:
        """Remove every adapter from the resident UNet and text encoder (and drop fine-tuned
        UNets), restoring the bare base modules; the cache refills lazily afterwards. The trainer
        does not need it: it adds its adapter beside these and leaves them as it found them."""
        with self._lock:
            if self.compiled is not None:
                # The slot and the LCM-LoRA stay (removing them would mean compiling again);
                # the slot is zeroed and the trainer puts back what it found.
                for style_adapter in self._adapters.values():
                    self._delete(style_adapter.name)
                self.compiled.swap_in(None, 0.0)
                self.compiled.invalidate()
            elif self._loaded_names():
                self.pipe.unload_lora_weights()
                self._lcm_loaded = False
            self._adapters.clear()
            self._full.clear()

    def _activate(self, names: list[str], weights: list[float]) -> None:
        # A cheap look at the configs instead of a walk over every module (_loaded_names).
        has_lora = any(getattr(m, "peft_config", None) for m in (self.pipe.unet, self.pipe.text_encoder))
        if not has_lora:
            return
        if names:
            self.pipe.enable_lora()
            self.pipe.set_adapters(names, adapter_weights=weights)
        else:
            self.pipe.disable_lora()

    def prepare(self, style: StyleRef | None, params: GenerationParams) -> tuple[Any, int, float]:
        """Make ``style`` (None: the base model) the only active adapter, loading it on a cache
        miss, and pick the scheduler: returns (pipeline, scheduler steps, guidance). ``generate``
        calls it; it is public so the switch cost can be measured on its own."""
        with self._lock:
            # 1. the compiled pipeline with the style in the hot-swap slot, where it can take it
            pipe = self._compiled_pipeline(style, params)
            if pipe is None:
                # 2. otherwise the eager pipeline and the style's adapters (and fast mode's),
                #    only those active
                if self.compiled is not None:
                    self.compiled.invalidate()
                pipe, names, weights = self._pipeline_and_adapters(style, params)
                self._activate(names, weights)
            # 3. the scheduler of the mode
            steps, guidance = self._set_scheduler(pipe, params)
            # 4. inference mode: the trainer shares these modules and may leave them in train
            #    mode (LoRA dropout); a compiled UNet's mode is its wrapped module's
            for module in (pipe.unet, pipe.vae, pipe.text_encoder):
                module = getattr(module, "_orig_mod", module)
                if module.training:
                    module.eval()
            return pipe, steps, guidance

    def _start_compiled(self, *, max_rank: int, mode: str | None, backend: str) -> None:
        from pipeline.stickers.fast_path import CompiledServing

        if self._loaded_names():
            raise ConfigError("the compiled fast path must be set up before any LoRA is loaded "
                              "into the UNet: build the StickerGenerator first")
        self.compiled = CompiledServing(self.pipe, max_rank=max_rank, cache_size=self.cache_size, mode=mode,
                                        backend=backend)
        self._compiled_pipe = self._img2img_pipeline(self.compiled.compiled_unet)
        if self.lcm_lora:
            # Loaded now, so the UNet's adapters are complete before the first compiled call.
            try:
                self._load_lcm()
            except ModelNotFoundError as exc:
                log.warning("%s; fast mode will fail until it is fixed", exc)

    def _compiled_pipeline(self, style: StyleRef | None, params: GenerationParams) -> Any:
        """The compiled pipeline with ``style`` copied into the hot-swap slot, or None where the
        fast path is off or cannot take the style (see fast_path.py)."""
        from pipeline.stickers.fast_path import SlotRefused

        if self.compiled is None or (style is not None and style.info.kind != "lora"):
            return None
        reads = self.compiled.reads
        if style is not None and not self.compiled.accepts(style):
            return None
        if params.fast:
            self._load_lcm()
        try:
            self.compiled.swap_in(style, params.adapter_scale)
        except SlotRefused:
            return None
        self.loads += self.compiled.reads - reads  # a style read from disk is a cache miss
        self.compiled.activate(style, params.adapter_scale, lcm=params.fast, lcm_name=LCM_ADAPTER)
        return self.pipe if self.compiled.needs_eager_unet(style) else self._compiled_pipe

    def _pipeline_and_adapters(self, style: StyleRef | None,
                               params: GenerationParams) -> tuple[Any, list[str], list[float]]:
        """The pipeline that serves ``style`` and the adapter names and weights to activate on
        it, loading what is missing: a full fine-tune has its own pipeline and no style adapter;
        a LoRA style (or the base model) uses the resident one. Fast mode adds the LCM-LoRA."""
        names: list[str] = []
        weights: list[float] = []
        if style is not None and style.info.kind == "full":
            if params.fast:
                raise StyleError(f"style {style.id!r} is fully fine-tuned: fast mode (LCM-LoRA) "
                                 "works with LoRA styles only")
            pipe = self._full_pipeline(style)
        else:
            pipe = self.pipe
            if style is not None:
                names.append(self.load_adapter(style))
                weights.append(params.adapter_scale)
        if params.fast:
            self._load_lcm()
            names.append(LCM_ADAPTER)
            weights.append(1.0)
        return pipe, names, weights

    def _set_scheduler(self, pipe: Any, params: GenerationParams) -> tuple[int, float]:
        """Put the mode's scheduler on ``pipe``; returns (scheduler steps, guidance)."""
        from diffusers import LCMScheduler

        if params.fast:
            if self._fast_scheduler is None:
                self._fast_scheduler = LCMScheduler.from_config(self.diffusion.scheduler_config)
            pipe.scheduler = self._fast_scheduler
            return math.ceil(FAST_STEPS / params.strength), FAST_GUIDANCE
        pipe.scheduler = self._scheduler
        return params.steps, params.guidance

    # --- Generation -------------------------------------------------------------------------

    def generate(self, image: Image.Image, *, prompt: str, negative_prompt: str | None,
                 seeds: Sequence[int], style: StyleRef | None = None,
                 params: GenerationParams = GenerationParams()) -> list[Image.Image]:
        """One RGB image per seed, at ``image``'s size (see :func:`fit_to_model`).

        ``style=None`` is the base model. The same call on the same machine gives the same
        pixels whatever ran before. Each seed gives the same picture whatever else is generated
        in the batch, up to floating-point rounding: a batch runs other kernels than one image,
        so a few pixels may move by a few levels (and the encoded bytes differ).
        """
        import torch

        if not 1 <= len(seeds) <= MAX_VARIANTS:
            raise ValueError(f"between 1 and {MAX_VARIANTS} seeds, not {len(seeds)}")
        w, h = image.size
        if w % self.multiple or h % self.multiple:
            raise ValueError(f"image size {w}x{h} is not a multiple of {self.multiple}: "
                             "use fit_to_model first")
        rgb = image.convert("RGB")
        with self._lock:
            # 1. the pipeline, adapters and scheduler of this request
            pipe, steps, guidance = self.prepare(style, params)
            # 2. denoise; CPU generators give the same noise on every device
            generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
            with torch.inference_mode():
                out = pipe(
                    prompt=prompt, negative_prompt=negative_prompt or None, image=rgb,
                    strength=params.strength, num_inference_steps=steps, guidance_scale=guidance,
                    num_images_per_prompt=len(seeds), generator=generators, output_type="pil",
                )
        return list(out.images)


def write_random_style(diffusion: DiffusionModels, style_dir: str | Path, *, seed: int = 0, rank: int = 4,
                       text_encoder: bool = False, identifier: str = "zqv", class_noun: str = "cat",
                       copy_modules: bool = True, lora_alpha: int | None = None) -> StyleInfo:
    """Write a random-weight LoRA style for ``diffusion``'s architecture into ``style_dir``, in
    exactly the format the trainer writes (diffusers LoRA + ``style.json``).

    For tests, benchmarks and smoke runs where no trained style exists. The LoRA's up-projections
    are non-zero (a fresh LoRA would be a no-op). With ``copy_modules`` (the default) the adapter
    is added to copies and ``diffusion`` is untouched; without it (real-size models, where a copy
    costs gigabytes) it is added to ``diffusion``'s own modules and deleted again, which leaves
    empty, output-neutral LoRA wrappers behind. ``lora_alpha`` other than ``rank`` is saved as
    metadata with the file, as the trainer does.
    """
    import copy

    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    from pipeline.stickers.prompts import class_prompt, instance_prompt
    from pipeline.training.style import write_style_info

    style_dir = Path(style_dir)
    style_dir.mkdir(parents=True, exist_ok=True)
    rng_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    name = f"random_style_{seed}"
    alpha = rank if lora_alpha is None else lora_alpha
    configs: dict[str, dict[str, Any]] = {}

    def lora_of(module: Any, targets: list[str]) -> dict[str, Any]:
        target = copy.deepcopy(module) if copy_modules else module
        config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False, target_modules=targets)
        configs["unet" if not configs else "text_encoder"] = config.to_dict()
        target.add_adapter(config, adapter_name=name)
        try:
            state = get_peft_model_state_dict(target, adapter_name=name)
            return convert_state_dict_to_diffusers({k: v.detach().clone() for k, v in state.items()})
        finally:
            if not copy_modules and hasattr(target, "delete_adapters"):  # diffusers models
                target.delete_adapters(name)
            elif not copy_modules:  # transformers models
                target.delete_adapter(name)

    try:
        unet_layers = lora_of(diffusion.unet, ["to_k", "to_q", "to_v", "to_out.0"])
        te_layers = (lora_of(diffusion.text_encoder, ["q_proj", "k_proj", "v_proj", "out_proj"])
                     if text_encoder else None)
    finally:
        torch.random.set_rng_state(rng_state)
    with_alpha = lora_alpha is not None and lora_alpha != rank
    StableDiffusionPipeline.save_lora_weights(
        style_dir, unet_lora_layers=unet_layers, text_encoder_lora_layers=te_layers,
        unet_lora_adapter_metadata=configs["unet"] if with_alpha else None,
        text_encoder_lora_adapter_metadata=configs.get("text_encoder") if with_alpha else None,
        safe_serialization=True,
    )
    info = StyleInfo(
        identifier=identifier, class_noun=class_noun,
        instance_prompt=instance_prompt(identifier, class_noun), class_prompt=class_prompt(class_noun),
        base_model=diffusion.source, kind="lora", resolution=diffusion.resolution, steps=0, seed=seed,
        train_set_sha256="", rank=rank, lora_alpha=float(alpha), text_encoder_trained=text_encoder,
        extra={"random": True},
    )
    write_style_info(style_dir, info)
    return info
