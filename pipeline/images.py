"""Safe image decoding and the geometry every stage shares. Pillow and numpy only (no torch),
so the bot can check uploads too (in a thread: decoding is CPU work).

``decode_image`` turns untrusted bytes into an RGBA image or raises an :class:`ImageError` that
names the file: pixel limit checked from the header before any pixel is decoded (decompression
bombs), EXIF orientation applied, every mode (P, LA, CMYK, I;16, F, 1) converted correctly,
animated images reduced to their first frame, TGS/WEBM stickers refused as unsupported.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.errors import (
    ImageTooLargeError,
    ImageTooSmallError,
    NotAnImageError,
    UnsupportedStickerError,
)

DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MIN_SIDE = 16
MAX_FILE_BYTES = 50 * 1024 * 1024
ALLOWED_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "MPO"})

_GZIP_MAGIC = b"\x1f\x8b"  # TGS (Lottie JSON, gzipped)
_EBML_MAGIC = b"\x1a\x45\xdf\xa3"  # WEBM / Matroska


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image  # RGBA, 8 bits per channel, EXIF orientation applied
    format: str  # what the bytes were: PNG, JPEG, WEBP, ...
    has_alpha: bool  # some pixel is not fully opaque
    animated: bool  # the source had several frames; ``image`` is the first


def sniff_sticker_kind(data: bytes) -> str | None:
    """``"tgs"`` or ``"webm"`` for Telegram's animated and video stickers, else None."""
    if data[:2] == _GZIP_MAGIC:
        return "tgs"
    if data[:4] == _EBML_MAGIC:
        return "webm"
    return None


def _to_rgba(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGBA":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit (or 32-bit integer) greyscale: scale to 8 bits instead of clipping at 255.
        arr = np.asarray(img).astype(np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        grey = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGBA")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        top = 1.0 if arr.max(initial=0) <= 1.0 else 255.0
        grey = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGBA")
    if mode == "P":
        # Palette images may carry transparency in the palette: go through RGBA, never RGB.
        return img.convert("RGBA")
    if mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        return img.convert("RGB").convert("RGBA")
    return img.convert("RGBA")  # L, LA, 1, RGB, RGBa, La, PA


def decode_image(
    data: bytes,
    *,
    name: str = "image",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = DEFAULT_MIN_SIDE,
) -> DecodedImage:
    """Decode untrusted bytes into an RGBA image, or raise an ImageError naming ``name``."""
    if not data:
        raise NotAnImageError(name, "the file is empty")
    if len(data) > MAX_FILE_BYTES:
        raise ImageTooLargeError(name, f"the file is over {MAX_FILE_BYTES // (1024 * 1024)} MB")
    kind = sniff_sticker_kind(data)
    if kind == "tgs":
        raise UnsupportedStickerError(name, "animated (TGS) stickers cannot be used; send static ones")
    if kind == "webm":
        raise UnsupportedStickerError(name, "video (WEBM) stickers cannot be used; send static ones")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img: Image.Image = Image.open(io.BytesIO(data))
            fmt = (img.format or "").upper()
            if fmt not in ALLOWED_FORMATS:
                raise NotAnImageError(name, f"unsupported image format {fmt or 'unknown'}")
            width, height = img.size
            # Checked from the header, before a single pixel is decoded.
            if width * height > max_pixels:
                raise ImageTooLargeError(
                    name, f"{width}x{height} is over the limit of {max_pixels:,} pixels"
                )
            if min(width, height) < min_side:
                raise ImageTooSmallError(
                    name, f"{width}x{height} is too small (each side needs at least {min_side} px)"
                )
            animated = bool(getattr(img, "is_animated", False)) and getattr(img, "n_frames", 1) > 1
            img.seek(0)
            img.load()
            img = ImageOps.exif_transpose(img) or img
            rgba = _to_rgba(img)
    except (ImageTooLargeError, ImageTooSmallError, NotAnImageError):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow refuses some headers before we see the size; its message carries the count.
        claimed = re.search(r"\((\d+) pixels\)", str(exc))
        detail = f"it claims {int(claimed.group(1)):,} pixels, " if claimed else ""
        raise ImageTooLargeError(
            name, f"the image is too large to decode safely ({detail}the limit is {max_pixels:,})"
        ) from exc
    except UnidentifiedImageError as exc:
        raise NotAnImageError(name, "this is not an image Pillow can read") from exc
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as exc:
        raise NotAnImageError(name, f"the image is corrupt ({exc.__class__.__name__})") from exc
    alpha = np.asarray(rgba.getchannel("A"))
    return DecodedImage(
        image=rgba, format=fmt, has_alpha=bool((alpha < 255).any()), animated=animated
    )


def composite_on(image: Image.Image, color: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Alpha-composite onto a flat colour. A plain ``convert("RGB")`` would keep whatever
    garbage colours the transparent pixels hold."""
    rgba = image if image.mode == "RGBA" else image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (*color, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def fit_square(
    image: Image.Image,
    size: int,
    *,
    mode: str = "pad",
    fill: tuple[int, ...] | None = None,
    resample: Image.Resampling = Image.Resampling.LANCZOS,
) -> Image.Image:
    """Fit into ``size`` x ``size`` without distortion: ``pad`` letterboxes (with ``fill``, default
    transparent for RGBA, white otherwise), ``crop`` takes the centre square."""
    if mode not in ("pad", "crop"):
        raise ValueError(f"fit mode must be 'pad' or 'crop', not {mode!r}")
    w, h = image.size
    if mode == "crop":
        return ImageOps.fit(image, (size, size), method=resample)
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    resized = image.resize((nw, nh), resample)
    if fill is None:
        fill = (0, 0, 0, 0) if image.mode == "RGBA" else (255,) * len(image.getbands())
    canvas = Image.new(image.mode, (size, size), fill)
    canvas.paste(resized, ((size - nw) // 2, (size - nh) // 2))
    return canvas
