"""The serving fast path: the UNet and the VAE decoder under ``torch.compile``, every LoRA style
hot-swapped into one adapter slot, so switching styles copies weights and never recompiles.

The recipe (diffusers' and peft's hot-swap documentation): ``enable_lora_hotswap(target_rank=R)``
before the first LoRA load; the first load (here a zero placeholder) pads the slot to rank ``R``
and turns its scalings into tensors; compile after that; then a style goes in with
``load_lora_into_unet(..., hotswap=True)``, an in-place copy (a style of lower rank is
zero-padded, its alpha written into the scaling tensors). That call converts the file's keys and
walks the whole module tree, tens of milliseconds of Python at SD 1.5's size, so it runs once per
style: the slot's weights are then kept (scaling folded into the up-projections, so the scalings
stay 1) and a later switch to the style is two fused device ops, a copy and a multiplication by
the request's adapter scale. No Python float the compiled graph guards on ever changes.
``channels_last`` and PyTorch's SDPA attention go with it.

A style with a text-encoder LoRA (hot-swap does not support text encoders) takes the uncompiled
UNet: its UNet half still goes into the slot (so the compiled graph never sees another adapter),
its text-encoder half loads as an ordinary adapter on the text encoder, which is never compiled.
What the slot cannot take at all, a rank above ``R`` (``STICKERBOT_COMPILE_MAX_RANK``) or layers
outside the slot's targets, is served by the generator's ordinary adapter path (that adds an
adapter to the UNet, so the compiled graph compiles once more afterwards). Each reason is said
once in the log. Shapes matter to the compiler as well: the first request at a new photo size or
batch size compiles again (then dynamo marks the dimension dynamic), whatever the style; the VAE
decoder is compiled in place, so the trainer's class-image generation (batches of 4) runs it too
and compiles it once for that shape.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.training.style import LORA_FILE
from pipeline.training.trainer import COMPILED_SERVING_ATTR, UNET_LORA_TARGETS

if TYPE_CHECKING:
    import torch

    from pipeline.stickers.generation import StyleRef

log = logging.getLogger(__name__)

SLOT = "hotswap"  # the one UNet adapter every eligible style is copied into
TEXT_SLOT = "hotswap_text"  # the text-encoder half of the current style, when it has one


def compile_enabled(setting: str, device: torch.device) -> bool:
    """``on``/``off`` as said; ``auto`` = on where the models run on a CUDA GPU."""
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"compile setting must be auto, on or off, not {setting!r}")
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def _is_up(key: str) -> bool:
    """An up-projection (B) of a LoRA, in any of the layouts lora_state_dict returns: diffusers'
    ``lora.up`` / ``lora_linear_layer.up``, peft's ``lora_B``, kohya's ``lora_up``."""
    return key.endswith((".up.weight", "lora_B.weight", "lora_up.weight"))


def _placeholder(unet: Any) -> dict[str, torch.Tensor]:
    """A rank-1 all-zero LoRA in diffusers' file format on every slot target of ``unet``: the
    first load, which fixes the slot's layers (enable_lora_hotswap pads it to the target rank)."""
    import torch

    state: dict[str, torch.Tensor] = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(tuple("." + t for t in UNET_LORA_TARGETS)):
            weight = module.weight
            state[f"unet.{name}.lora.down.weight"] = weight.new_zeros(1, module.in_features)
            state[f"unet.{name}.lora.up.weight"] = weight.new_zeros(module.out_features, 1)
    return state


@dataclass
class _SlotState:
    """A style's UNet LoRA as read from its file, on the serving device, ready to copy in."""

    fingerprint: tuple[Any, ...]
    unet: dict[str, torch.Tensor]
    text_encoder: dict[str, torch.Tensor]  # empty for UNet-only styles
    network_alphas: dict[str, float] | None
    metadata: dict[str, Any] | None
    problem: str | None  # why the slot cannot take this style (None: it can)
    # The slot's down- and up-projections once the style went in, scaling folded into the ups.
    down: list[torch.Tensor] | None = None
    up: list[torch.Tensor] | None = None


class CompiledServing:
    """The compiled UNet and the hot-swap slot of one :class:`StickerGenerator`.

    ``pipe`` is the generator's eager pipeline; the compiled one shares every module (the
    compiled UNet is a wrapper over the same parameters). Not thread-safe on its own: the
    generator's lock covers it.
    """

    def __init__(self, pipe: Any, *, max_rank: int, cache_size: int, mode: str | None = None,
                 backend: str = "inductor") -> None:
        import torch
        from diffusers.models.attention_processor import AttnProcessor2_0

        if max_rank < 1:
            raise ValueError(f"STICKERBOT_COMPILE_MAX_RANK must be at least 1, not {max_rank}")
        self.max_rank = max_rank
        self.cache_size = cache_size
        unet, vae = pipe.unet, pipe.vae
        self.unet = unet
        self._pipe = pipe
        # 1. PyTorch's fused attention (SDPA) and channels_last, which convolutions prefer on GPUs
        unet.set_attn_processor(AttnProcessor2_0())
        vae.set_attn_processor(AttnProcessor2_0())
        unet.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
        # 2. the slot: hot-swap prepared for the largest rank, then the first (zero) load
        unet.enable_lora_hotswap(target_rank=max_rank)
        pipe.load_lora_into_unet(_placeholder(unet), network_alphas=None, unet=unet, adapter_name=SLOT,
                                 _pipeline=pipe)
        self._down, self._up, self._scalings = self._slot_tensors()
        # 3. compile: the UNet as a wrapper (the eager path keeps calling the bare module), the
        #    VAE decoder in place (no adapter ever touches it)
        self.compiled_unet = torch.compile(unet, mode=mode, backend=backend)
        setattr(unet, COMPILED_SERVING_ATTR, True)  # the trainer leaves no adapter behind on it
        vae.decoder.compile(mode=mode, backend=backend)
        self._states: OrderedDict[str, _SlotState] = OrderedDict()
        self._current: tuple[Any, ...] | None = ("zeros",)
        self._text_current: tuple[Any, ...] | None = None  # what TEXT_SLOT holds (None: absent)
        self._active: tuple[Any, ...] | None = None  # (lcm, text key) set last; None: unknown
        self._said: set[str] = set()
        self.swaps = 0  # weight copies into the slot, for tests and the benchmark
        self.reads = 0  # style files read from disk (misses of the state cache)

    def _slot_tensors(self) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """The slot's down- and up-projection weights and scaling tensors, one per LoRA layer,
        in a fixed order."""
        from peft.tuners.lora import LoraLayer

        # Any: peft's ModuleDict entries are typed as Modules, their weights as Tensor | Module
        down: list[Any] = []
        up: list[Any] = []
        scalings: list[Any] = []
        for module in self.unet.modules():
            if isinstance(module, LoraLayer) and SLOT in module.lora_A:
                down.append(module.lora_A[SLOT].weight)
                up.append(module.lora_B[SLOT].weight)
                scalings.append(module.scaling[SLOT])
        return down, up, scalings

    # --- what goes into the slot ------------------------------------------------------------

    def _read(self, style: StyleRef) -> _SlotState:
        """``style``'s UNet LoRA from disk (cached by id, refreshed when the files change)."""
        hit = self._states.get(style.id)
        if hit is not None and hit.fingerprint == style.fingerprint:
            self._states.move_to_end(style.id)
            return hit
        state, alphas, metadata = self._pipe.lora_state_dict(
            str(style.directory), weight_name=LORA_FILE, return_lora_metadata=True)
        self.reads += 1
        device, dtype = self.unet.device, self.unet.dtype
        moved = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
        unet_part = {k: v for k, v in moved.items() if k.startswith("unet.")}
        text_part = {k: v for k, v in moved.items() if not k.startswith("unet.")}
        problem = None
        ranks = {v.shape[0] for k, v in unet_part.items() if not _is_up(k) and v.ndim >= 2}
        if max(ranks, default=0) > self.max_rank:
            problem = f"its rank {max(ranks)} is above STICKERBOT_COMPILE_MAX_RANK ({self.max_rank})"
        elif not unet_part:
            problem = "its file holds no UNet LoRA"
        entry = _SlotState(fingerprint=style.fingerprint, unet=unet_part, text_encoder=text_part,
                           network_alphas=alphas, metadata=metadata, problem=problem)
        self._states[style.id] = entry
        while len(self._states) > self.cache_size:
            self._states.popitem(last=False)
        return entry

    def _say_once(self, reason: str, style_id: str) -> None:
        if reason not in self._said:
            self._said.add(reason)
            log.info("style %s is served uncompiled: %s (said once per reason)", style_id, reason)

    def accepts(self, style: StyleRef) -> bool:
        """Whether the slot can serve ``style``; the first refusal for each reason is logged."""
        entry = self._read(style)
        if entry.problem is not None:
            self._say_once(entry.problem, style.id)
            return False
        return True

    def needs_eager_unet(self, style: StyleRef | None) -> bool:
        """A style with a text-encoder LoRA: the uncompiled UNet serves it (said once)."""
        if style is None or not self._read(style).text_encoder:
            return False
        self._say_once("it has a text-encoder LoRA, which hot-swap does not support; its UNet "
                       "half is hot-swapped, its text-encoder half loaded as a plain adapter", style.id)
        return True

    # --- per request ------------------------------------------------------------------------

    def swap_in(self, style: StyleRef | None, scale: float) -> None:
        """Put ``style``'s LoRA (None: nothing, the base model) at ``scale`` into the slot,
        unless it is there already."""
        import torch

        key = ("zeros",) if style is None or scale == 0 else (style.fingerprint, scale)
        if key == self._current:
            return
        self._current = None  # a failed copy leaves the slot unknown, never stale
        with torch.no_grad():
            if style is None or scale == 0:
                torch._foreach_zero_(self._up)
            else:
                entry = self._read(style)
                if entry.down is None or entry.up is None:
                    self._first_load(entry)
                else:
                    torch._foreach_copy_(self._down, entry.down)
                    torch._foreach_copy_(self._up, entry.up)
                if scale != 1.0:
                    torch._foreach_mul_(self._up, scale)
        self._current = key
        self.swaps += 1

    def _first_load(self, entry: _SlotState) -> None:
        """diffusers' hot-swap of the style's file into the slot, then a snapshot of the slot
        with each layer's scaling folded into its up-projection (and the scalings back to 1)."""
        import torch

        try:
            self._pipe.load_lora_into_unet(dict(entry.unet), network_alphas=entry.network_alphas,
                                           unet=self.unet, adapter_name=SLOT, metadata=entry.metadata,
                                           _pipeline=self._pipe, hotswap=True)
        except Exception as exc:  # layers outside the slot: the dry run refused before copying
            entry.problem = f"its LoRA does not fit the slot ({str(exc)[:120]})"
            torch._foreach_zero_(self._up)
            self._current = ("zeros",)
            raise SlotRefused(entry.problem) from exc
        torch._foreach_mul_(self._up, [s.to(u.dtype) for s, u in zip(self._scalings, self._up, strict=True)])
        for scaling in self._scalings:
            scaling.fill_(1.0)
        entry.down = [t.clone() for t in self._down]
        entry.up = [t.clone() for t in self._up]

    def _swap_text(self, style: StyleRef | None, scale: float) -> None:
        """The text-encoder half of ``style`` as TEXT_SLOT (and nothing there for other styles)."""
        from diffusers.loaders.lora_base import (
            disable_lora_for_text_encoder,
            enable_lora_for_text_encoder,
            set_adapters_for_text_encoder,
        )

        text_encoder = self._pipe.text_encoder
        entry = self._read(style) if style is not None and scale != 0 else None
        key = (style.fingerprint, scale) if style is not None and entry and entry.text_encoder else None
        if key != self._text_current and self._text_current is not None:
            text_encoder.delete_adapter(TEXT_SLOT)
            self._text_current = None
        if key is None:
            if getattr(text_encoder, "peft_config", None):
                disable_lora_for_text_encoder(text_encoder)
            return
        if self._text_current is None and entry is not None:
            scaled = {k: v * scale if _is_up(k) else v for k, v in entry.text_encoder.items()}
            self._pipe.load_lora_into_text_encoder(scaled, network_alphas=entry.network_alphas,
                                                   text_encoder=text_encoder, adapter_name=TEXT_SLOT,
                                                   metadata=entry.metadata, _pipeline=self._pipe)
            self._text_current = key
        enable_lora_for_text_encoder(text_encoder)
        set_adapters_for_text_encoder([TEXT_SLOT], text_encoder, [1.0])

    def activate(self, style: StyleRef | None, scale: float, *, lcm: bool, lcm_name: str) -> None:
        """Only the slot (and the LCM-LoRA in fast mode) active on the UNet, its scalings
        untouched; on the text encoder, only ``style``'s text-encoder half if it has one.
        Skipped when nothing changed since the last call (walking the modules costs
        milliseconds); :meth:`invalidate` after anything else touched the adapters."""
        entry = self._read(style) if style is not None and scale != 0 else None
        text_key = (style.fingerprint, scale) if style is not None and entry and entry.text_encoder else None
        if self._active == (lcm, text_key):
            return
        self._active = None
        self.unet.enable_lora()
        self.unet.set_adapter([SLOT, lcm_name] if lcm else [SLOT])
        self._swap_text(style, scale)
        self._active = (lcm, text_key)

    def invalidate(self) -> None:
        """Another path (the ordinary adapters, the trainer) changed which adapters are active."""
        self._active = None


class SlotRefused(Exception):
    """The slot cannot take a style after all (the generator serves it uncompiled)."""

