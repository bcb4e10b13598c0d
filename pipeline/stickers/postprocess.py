"""Sticker post-processing: a cut-out RGBA image in, Telegram-ready WEBP bytes out.

Pure functions of their inputs (Pillow, numpy and OpenCV's distance transform; no torch), each
tested on hand-made images:

    clear_faint_alpha -> trim_to_content -> fit_to_sticker -> add_stroke -> add_shadow -> encode_webp

Telegram's rules for a static sticker: WEBP (or PNG), one side exactly 512 px, the other at most
512 px, at most 512 KB. :func:`check_sticker` verifies them on the encoded bytes.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageDraw

STICKER_SIDE = 512
MAX_STICKER_BYTES = 512 * 1024
# Lossy qualities tried in order until the file fits. Even noisy 512x512 content is far under
# 512 KB at 80, so the later steps are a safety net.
WEBP_QUALITIES = (90, 80, 70, 60, 50, 40, 25, 10)
# libwebp's effort, 0 (fastest) .. 6 (slowest). Measured on a 512-px sticker: 0 takes about half
# the time of 2 and a quarter of 4 for files ~6% larger, far under the cap; 6 costs ~20x of 0.
WEBP_METHOD = 0
DEFAULT_EMOJI = "🙂"


@dataclass(frozen=True)
class PostOptions:
    """How a cut-out becomes a sticker. Sizes are in output (512-px sticker) pixels."""

    stroke: int = 0  # width of the white outline; 0 = none
    stroke_color: tuple[int, int, int] = (255, 255, 255)
    shadow: bool = False
    shadow_blur: float = 6.0  # Gaussian sigma of the shadow
    shadow_offset: tuple[int, int] = (0, 6)  # (dx, dy): down, like light from above
    shadow_opacity: float = 0.45
    alpha_floor: int = 8  # alpha below this is segmentation noise: made fully transparent
    margin: int = 4  # transparent border kept around the content (and stroke, shadow)

    def __post_init__(self) -> None:
        if not 0 <= self.stroke <= 64:
            raise ValueError(f"stroke must be 0..64 output pixels, not {self.stroke}")
        if not 0 <= self.alpha_floor <= 255:
            raise ValueError(f"alpha_floor must be 0..255, not {self.alpha_floor}")
        if not 0.0 <= self.shadow_opacity <= 1.0:
            raise ValueError(f"shadow_opacity must be 0..1, not {self.shadow_opacity}")
        if self.margin < 0 or self.shadow_blur < 0:
            raise ValueError("margin and shadow_blur must not be negative")

    @property
    def padding(self) -> int:
        """Transparent space kept around the content so stroke and shadow are never clipped."""
        pad = self.margin + self.stroke
        if self.shadow:
            pad += int(np.ceil(2.5 * self.shadow_blur)) + max(abs(v) for v in self.shadow_offset)
        return pad


def _rgba(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGBA" else image.convert("RGBA")


def clear_faint_alpha(image: Image.Image, floor: int = 8) -> Image.Image:
    """Alpha below ``floor`` becomes 0, and fully transparent pixels get black RGB (they are
    invisible; uniform values let WEBP compress them away and keep stray colours out)."""
    arr = np.array(_rgba(image))
    arr[arr[..., 3] < max(1, floor)] = 0  # one pass: alpha and colour together
    return Image.fromarray(arr, "RGBA")


def content_box(image: Image.Image) -> tuple[int, int, int, int] | None:
    """The box ``(left, top, right, bottom)`` of pixels with non-zero alpha, or None if none."""
    return _rgba(image).getchannel("A").getbbox()


def trim_to_content(image: Image.Image) -> Image.Image:
    """Crop to :func:`content_box`; ValueError when the image is fully transparent."""
    box = content_box(image)
    if box is None:
        raise ValueError("the image is fully transparent: nothing to make a sticker of")
    return _rgba(image).crop(box)


def fit_to_sticker(image: Image.Image, *, side: int = STICKER_SIDE, padding: int = 0) -> Image.Image:
    """Scale without distortion so the result's longer side is exactly ``side`` and the other at
    most ``side``, with ``padding`` transparent pixels around the content (inside ``side``)."""
    if padding < 0 or 2 * padding >= side - 1:
        raise ValueError(f"padding {padding} leaves no room inside {side} px")
    img = _rgba(image)
    w, h = img.size
    avail = side - 2 * padding
    scale = avail / max(w, h)
    # The longer side is set exactly; rounding only ever touches the shorter one.
    nw = avail if w >= h else max(1, min(avail, round(w * scale)))
    nh = avail if h > w else max(1, min(avail, round(h * scale)))
    if (nw, nh) != (w, h):
        # Pillow resizes RGBA through premultiplied alpha: no dark fringes at soft edges.
        img = img.resize((nw, nh), Image.Resampling.LANCZOS)
    if padding == 0:
        return img
    canvas = Image.new("RGBA", (nw + 2 * padding, nh + 2 * padding), (0, 0, 0, 0))
    canvas.paste(img, (padding, padding))
    return canvas


def add_stroke(image: Image.Image, width: int, *,
               color: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """A round, anti-aliased outline ``width`` pixels wide around the opaque content.

    From the Euclidean distance to the nearest pixel that is at least half opaque: a pixel whose
    centre lies within ``width`` of the content edge is fully covered, the next one partly. The
    image needs ``width`` transparent pixels around its content, or the outline is clipped.
    """
    img = _rgba(image)
    if width <= 0:
        return img
    arr = np.asarray(img)
    inside = arr[..., 3] >= 128
    if not inside.any():
        return img
    # distanceTransform measures the distance to the nearest zero pixel: zeros = the content.
    dist = cv2.distanceTransform((~inside).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    coverage = np.clip(width + 1.0 - dist, 0.0, 1.0)
    outline = np.empty_like(arr)
    outline[..., :3] = color
    outline[..., 3] = np.round(coverage * 255.0).astype(np.uint8)
    return Image.alpha_composite(Image.fromarray(outline, "RGBA"), img)


def add_shadow(image: Image.Image, *, blur: float = 6.0, offset: tuple[int, int] = (0, 6),
               opacity: float = 0.45) -> Image.Image:
    """A soft black drop shadow under the content, shifted by ``offset`` (dx, dy)."""
    img = _rgba(image)
    if opacity <= 0:
        return img
    alpha = np.asarray(img)[..., 3].astype(np.float32) * opacity
    dx, dy = offset
    shifted = np.zeros_like(alpha)
    h, w = alpha.shape
    src = alpha[max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
    shifted[max(0, dy):max(0, dy) + src.shape[0], max(0, dx):max(0, dx) + src.shape[1]] = src
    if blur > 0:
        shifted = cv2.GaussianBlur(shifted, (0, 0), sigmaX=blur, sigmaY=blur,
                                   borderType=cv2.BORDER_CONSTANT)
    layer = np.zeros((h, w, 4), np.uint8)
    layer[..., 3] = np.clip(np.round(shifted), 0, 255).astype(np.uint8)
    return Image.alpha_composite(Image.fromarray(layer, "RGBA"), img)


def rounded_cutout(image: Image.Image, *, radius: float = 0.15) -> Image.Image:
    """The whole image with anti-aliased rounded corners (``radius`` as a fraction of the
    shorter side): the fallback shape when segmentation finds no subject."""
    img = _rgba(image)
    w, h = img.size
    ss = 4  # supersampling for the anti-aliased edge
    mask = Image.new("L", (w * ss, h * ss), 0)
    r = max(1, round(min(w, h) * radius * ss))
    ImageDraw.Draw(mask).rounded_rectangle((0, 0, w * ss - 1, h * ss - 1), radius=r, fill=255)
    mask = mask.resize((w, h), Image.Resampling.BOX)
    alpha = np.minimum(np.asarray(img.getchannel("A")), np.asarray(mask))
    out = img.copy()
    out.putalpha(Image.fromarray(alpha, "L"))
    return out


def finish_sticker(cutout: Image.Image, options: PostOptions = PostOptions()) -> Image.Image:
    """A cut-out (RGBA, soft alpha) -> the final sticker image: one side exactly 512 px, the other
    at most 512, a transparent margin, optional stroke and shadow. ValueError when the cut-out
    has no visible content."""
    # 1. drop segmentation noise, 2. trim, 3. fit inside the padding, 4. outline, 5. shadow.
    img = clear_faint_alpha(cutout, options.alpha_floor)
    img = trim_to_content(img)
    img = fit_to_sticker(img, side=STICKER_SIDE, padding=options.padding)
    if options.stroke:
        img = add_stroke(img, options.stroke, color=options.stroke_color)
    if options.shadow:
        img = add_shadow(img, blur=options.shadow_blur, offset=options.shadow_offset,
                         opacity=options.shadow_opacity)
    return img


def encode_webp(image: Image.Image, *, max_bytes: int = MAX_STICKER_BYTES,
                qualities: tuple[int, ...] = WEBP_QUALITIES, method: int = WEBP_METHOD) -> bytes:
    """Lossy WEBP with a full-quality alpha channel, stepping the quality down until the file is
    at most ``max_bytes``. ValueError if even the lowest quality is too big."""
    if not 0 <= method <= 6:
        raise ValueError(f"WEBP method must be 0..6, not {method}")
    img = _rgba(image)
    size = 0
    for quality in qualities:
        buf = io.BytesIO()
        img.save(buf, format="WEBP", quality=quality, method=method, alpha_quality=100)
        size = buf.tell()
        if size <= max_bytes:
            return buf.getvalue()
    raise ValueError(f"the sticker is {size} bytes even at WEBP quality {qualities[-1]} "
                     f"(limit {max_bytes})")


def check_sticker(data: bytes, *, max_bytes: int = MAX_STICKER_BYTES) -> tuple[int, int]:
    """Check encoded bytes against Telegram's static-sticker rules; returns (width, height) or
    raises ValueError saying which rule fails."""
    if len(data) > max_bytes:
        raise ValueError(f"sticker is {len(data)} bytes, over {max_bytes}")
    with Image.open(io.BytesIO(data)) as img:
        if img.format != "WEBP":
            raise ValueError(f"sticker is {img.format}, not WEBP")
        img.load()
        w, h = img.size
        if max(w, h) != STICKER_SIDE or min(w, h) < 1:
            raise ValueError(f"sticker is {w}x{h}: one side must be exactly {STICKER_SIDE}")
        if img.mode != "RGBA":
            raise ValueError(f"sticker has mode {img.mode}, not RGBA")
    return w, h


# --- Emoji ----------------------------------------------------------------------------------

# First match in caption order wins; keys are whole words (a plural "s" is accepted).
_EMOJI = {
    "smiling": "😄", "smile": "😄", "happy": "😄", "laughing": "😂", "laugh": "😂",
    "sad": "😢", "crying": "😢", "angry": "😠", "surprised": "😮", "sleeping": "😴",
    "love": "❤️", "heart": "❤️", "kiss": "😘", "cool": "😎", "sunglasses": "😎", "glasses": "🤓",
    "cat": "🐱", "kitten": "🐱", "dog": "🐶", "puppy": "🐶", "bird": "🐦", "fish": "🐟",
    "horse": "🐴", "bear": "🐻", "rabbit": "🐰", "bunny": "🐰", "fox": "🦊", "monkey": "🐵",
    "robot": "🤖", "baby": "👶", "child": "🧒", "boy": "👦", "girl": "👧", "man": "👨",
    "woman": "👩", "person": "🧑", "people": "🧑",
    "pizza": "🍕", "coffee": "☕", "cup": "☕", "cake": "🍰", "food": "🍽️", "beer": "🍺",
    "wine": "🍷", "car": "🚗", "bike": "🚲", "bicycle": "🚲", "tree": "🌳", "flower": "🌸",
    "flowers": "🌸", "sun": "☀️", "sky": "🌤️", "beach": "🏖️", "water": "🌊", "house": "🏠",
    "ball": "⚽", "book": "📚", "phone": "📱", "guitar": "🎸", "music": "🎵", "hat": "🎩",
    "party": "🎉", "birthday": "🎂", "christmas": "🎄", "snow": "❄️", "fire": "🔥",
}


def suggest_emoji(caption: str, *, default: str = DEFAULT_EMOJI) -> str:
    """One emoji for the sticker from its caption (Telegram needs at least one per sticker).

    A feeling word ("smiling", "angry") wins over a thing, since people pick stickers by the
    feeling they send; else the first thing named ("cat", "pizza"); else ``default``.
    """
    words = [w[:-1] if w.endswith("s") and w[:-1] in _EMOJI and w not in _EMOJI else w
             for w in re.findall(r"[a-z]+", caption.lower())]
    for w in words:
        if w in _FEELINGS:
            return _EMOJI[w]
    for w in words:
        if w in _EMOJI:
            return _EMOJI[w]
    return default


_FEELINGS = frozenset({"smiling", "smile", "happy", "laughing", "laugh", "sad", "crying", "angry",
                       "surprised", "sleeping", "love", "kiss", "cool"})
