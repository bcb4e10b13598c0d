"""A style on disk: what training writes and generation reads.

    <style dir>/
        style.json                         StyleInfo below (format_version 1)
        pytorch_lora_weights.safetensors   LoRA mode: diffusers-format LoRA, loadable by plain
                                           ``pipe.load_lora_weights(style_dir)``, alpha kept
        unet/                              full fine-tuning mode: a diffusers UNet directory

A style directory is written atomically (see ``storage.files.atomic_directory``): it is whole or
absent. Reading checks it without importing torch.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import StyleError

STYLE_FILE = "style.json"
LORA_FILE = "pytorch_lora_weights.safetensors"
UNET_DIR = "unet"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class StyleInfo:
    identifier: str  # the rare token(s) standing for the style
    class_noun: str
    instance_prompt: str
    class_prompt: str
    base_model: str  # id or directory of the diffusion model it was trained on
    kind: str  # "lora" | "full"
    resolution: int
    steps: int
    seed: int
    train_set_sha256: str  # hash of the prepared training images, in order
    rank: int | None = None  # LoRA rank (None for full fine-tuning)
    lora_alpha: float | None = None
    text_encoder_trained: bool = False
    num_images: int = 0
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase
    extra: dict[str, Any] = field(default_factory=dict)  # hyperparameters, metrics, ...
    created_at: float = 0.0
    format_version: int = FORMAT_VERSION


def write_style_info(style_dir: Path, info: StyleInfo) -> None:
    (Path(style_dir) / STYLE_FILE).write_text(json.dumps(asdict(info), indent=2, sort_keys=True))


def _check_safetensors(path: Path) -> None:
    """Cheap integrity check of a .safetensors file: header length, JSON header, data size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) != 8:
                raise ValueError("truncated header")
            (n,) = struct.unpack("<Q", head)
            if n <= 1 or n > min(size - 8, 100_000_000):
                raise ValueError("bad header length")
            header = json.loads(fh.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                  default=0)
        if 8 + n + end != size:
            raise ValueError("file size does not match its header (truncated?)")
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        raise StyleError(f"the adapter file {path.name} is damaged ({exc})") from exc


def read_style(style_dir: str | Path, *, name: str | None = None) -> StyleInfo:
    """Read and check a style directory; StyleError naming the style when it is unusable."""
    style_dir = Path(style_dir)
    label = name or style_dir.name
    meta = style_dir / STYLE_FILE
    if not meta.is_file():
        raise StyleError(f"style {label!r} has no {STYLE_FILE} (not a style directory, or deleted)")
    try:
        raw = json.loads(meta.read_text())
        known = set(StyleInfo.__dataclass_fields__)
        info = StyleInfo(**{k: v for k, v in raw.items() if k in known})
    except (OSError, ValueError, TypeError) as exc:
        raise StyleError(f"style {label!r}: {STYLE_FILE} is damaged ({exc})") from exc
    if info.format_version > FORMAT_VERSION:
        raise StyleError(f"style {label!r} was written by a newer stickerbot "
                         f"(format {info.format_version})")
    if info.kind == "lora":
        weights = style_dir / LORA_FILE
        if not weights.is_file():
            raise StyleError(f"style {label!r}: the adapter file {LORA_FILE} is missing")
        try:
            _check_safetensors(weights)
        except StyleError as exc:
            raise StyleError(f"style {label!r}: {exc}") from exc
    elif info.kind == "full":
        if not (style_dir / UNET_DIR / "config.json").is_file():
            raise StyleError(f"style {label!r}: the fine-tuned UNet directory is missing")
    else:
        raise StyleError(f"style {label!r}: unknown kind {info.kind!r}")
    return info
