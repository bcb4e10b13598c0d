"""Procedural stickers: RGBA images with a known alpha, for tests, benchmarks and pre-training.

A sticker is built like the ones people draw: a body made of one to three shapes (ellipses,
rounded rectangles, stars and polygons, wobbly blobs), sometimes with holes cut through it,
filled with flat colours, gradients, stripes or dots, decorated with small details and text, and
usually surrounded by a thick outline (white most of the time, as on most real stickers). Some
carry a soft drop shadow whose alpha stays below the label threshold, so a model learns that a
shadow is not the sticker. Everything is drawn at twice the size and reduced, so edges are
anti-aliased the way real sticker alpha is.

The same seed always gives the same sticker (numpy's PCG64 and Pillow's drawing are
deterministic).
"""

from __future__ import annotations

import colorsys
import io
import math
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

_WORDS = (
    "hi", "wow", "ok", "lol", "yes", "no", "omg", "yay", "love", "cool", "nice", "boo", "zzz",
    "hello", "thanks", "sorry", "привет", "ура", "ok!", "GG", "BRB", "hmm", "meow", "woof",
)
_SUPERSAMPLE = 2


def _colour(rng: np.random.Generator, *, vivid: bool = True) -> tuple[int, int, int]:
    h = rng.random()
    s = rng.uniform(0.45, 1.0) if vivid else rng.uniform(0.0, 0.4)
    v = rng.uniform(0.55, 1.0) if vivid else rng.uniform(0.15, 1.0)
    r, g, b = colorsys.hsv_to_rgb(h, s, v)
    return round(r * 255), round(g * 255), round(b * 255)


def _blob_points(rng: np.random.Generator, cx: float, cy: float, radius: float) -> list[tuple[float, float]]:
    n = 96
    harmonics = rng.integers(2, 6)
    amps = rng.uniform(0.03, 0.18, size=harmonics) / np.arange(1, harmonics + 1) ** 0.5
    phases = rng.uniform(0, 2 * math.pi, size=harmonics)
    freqs = rng.integers(2, 7, size=harmonics)
    stretch = rng.uniform(0.7, 1.3)
    points = []
    for k in range(n):
        t = 2 * math.pi * k / n
        r = radius * (1 + float(np.sum(amps * np.sin(freqs * t + phases))))
        points.append((cx + r * math.cos(t) * stretch, cy + r * math.sin(t) / stretch))
    return points


def _star_points(rng: np.random.Generator, cx: float, cy: float, radius: float) -> list[tuple[float, float]]:
    spikes = int(rng.integers(3, 9))
    inner = rng.uniform(0.35, 1.0) if spikes > 4 else 1.0  # 1.0: a regular polygon
    turn = rng.uniform(0, 2 * math.pi)
    points = []
    for k in range(2 * spikes):
        r = radius if k % 2 == 0 else radius * inner
        t = turn + math.pi * k / spikes
        points.append((cx + r * math.cos(t), cy + r * math.sin(t)))
    return points


def _draw_shape(draw: ImageDraw.ImageDraw, rng: np.random.Generator, kind: str, cx: float, cy: float,
                radius: float, fill: int) -> None:
    if kind == "ellipse":
        rx, ry = radius * rng.uniform(0.6, 1.0), radius * rng.uniform(0.6, 1.0)
        draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=fill)
    elif kind == "rect":
        rx, ry = radius * rng.uniform(0.55, 1.0), radius * rng.uniform(0.55, 1.0)
        corner = min(rx, ry) * rng.uniform(0.0, 0.8)
        draw.rounded_rectangle((cx - rx, cy - ry, cx + rx, cy + ry), radius=corner, fill=fill)
    elif kind == "star":
        draw.polygon(_star_points(rng, cx, cy, radius), fill=fill)
    else:
        draw.polygon(_blob_points(rng, cx, cy, radius * 0.85), fill=fill)


def _fill_pattern(rng: np.random.Generator, size: int) -> np.ndarray:
    """An (size, size, 3) float colour field: flat, gradient, stripes or dots."""
    kind = rng.choice(["flat", "flat", "linear", "radial", "stripes", "dots"])
    a = np.array(_colour(rng), np.float32)
    b = np.array(_colour(rng, vivid=rng.random() < 0.7), np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if kind == "flat":
        return np.broadcast_to(a, (size, size, 3)).copy()
    if kind == "linear":
        t = rng.uniform(0, 2 * math.pi)
        u = (xx - 0.5) * math.cos(t) + (yy - 0.5) * math.sin(t) + 0.5
    elif kind == "radial":
        cx, cy = rng.uniform(0.3, 0.7, size=2)
        u = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) * 1.6
    elif kind == "stripes":
        t = rng.uniform(0, math.pi)
        period = rng.uniform(0.05, 0.2)
        u = ((xx * math.cos(t) + yy * math.sin(t)) / period) % 1.0 > 0.5
    else:
        period = rng.uniform(0.06, 0.15)
        u = (((xx / period) % 1 - 0.5) ** 2 + ((yy / period) % 1 - 0.5) ** 2) < 0.08
    u = np.clip(np.asarray(u, np.float32), 0, 1)[..., None]
    return a * (1 - u) + b * u


def _body(rng: np.random.Generator, big: int) -> tuple[np.ndarray, np.ndarray]:
    """The body's colour (big, big, 3) float and coverage (big, big) uint8 at supersampled size."""
    colour = np.zeros((big, big, 3), np.float32)
    coverage = np.zeros((big, big), np.uint8)
    parts = int(rng.choice([1, 1, 2, 2, 3]))
    centre = big / 2
    for p in range(parts):
        kind = str(rng.choice(["ellipse", "rect", "star", "blob"]))
        radius = big * (rng.uniform(0.2, 0.34) if p == 0 else rng.uniform(0.1, 0.22))
        cx = centre + (rng.uniform(-0.12, 0.12) * big if p == 0 else rng.uniform(-0.25, 0.25) * big)
        cy = centre + (rng.uniform(-0.12, 0.12) * big if p == 0 else rng.uniform(-0.25, 0.25) * big)
        layer = Image.new("L", (big, big), 0)
        _draw_shape(ImageDraw.Draw(layer), rng, kind, cx, cy, radius, 255)
        part = np.asarray(layer) > 0
        colour[part] = _fill_pattern(rng, big)[part]
        coverage[part] = 255
    # Holes: cut one or two small shapes out of the body (real transparency inside the sticker).
    if rng.random() < 0.35:
        ys, xs = np.nonzero(coverage)
        for _ in range(int(rng.integers(1, 3))):
            k = int(rng.integers(len(xs)))
            hole = Image.new("L", (big, big), 0)
            _draw_shape(ImageDraw.Draw(hole), rng, str(rng.choice(["ellipse", "rect", "star"])),
                        float(xs[k]), float(ys[k]), big * rng.uniform(0.04, 0.1), 255)
            coverage[np.asarray(hole) > 0] = 0
    return colour, coverage


def _details(rng: np.random.Generator, colour: np.ndarray, coverage: np.ndarray) -> None:
    """Small shapes and lines inside the body (eyes, spots), drawn into ``colour`` in place."""
    big = coverage.shape[0]
    ys, xs = np.nonzero(coverage)
    if len(xs) == 0:
        return
    layer = Image.new("RGB", (big, big), (0, 0, 0))
    mask = Image.new("L", (big, big), 0)
    draw, mdraw = ImageDraw.Draw(layer), ImageDraw.Draw(mask)
    for _ in range(int(rng.integers(1, 6))):
        k = int(rng.integers(len(xs)))
        c = _colour(rng, vivid=rng.random() < 0.5)
        r = big * rng.uniform(0.015, 0.06)
        if rng.random() < 0.7:
            box = (xs[k] - r, ys[k] - r, xs[k] + r, ys[k] + r)
            draw.ellipse(box, fill=c)
            mdraw.ellipse(box, fill=255)
        else:
            j = int(rng.integers(len(xs)))
            width = max(1, int(r / 2))
            draw.line((xs[k], ys[k], xs[j], ys[j]), fill=c, width=width)
            mdraw.line((xs[k], ys[k], xs[j], ys[j]), fill=255, width=width)
    m = (np.asarray(mask) > 0) & (coverage > 0)
    colour[m] = np.asarray(layer, np.float32)[m]


def _text(rng: np.random.Generator, colour: np.ndarray, coverage: np.ndarray) -> None:
    """A word, inside the body or as a caption with its own stroke (which adds coverage)."""
    big = coverage.shape[0]
    word = str(rng.choice(_WORDS))
    font = ImageFont.load_default(size=int(big * rng.uniform(0.09, 0.17)))
    stroke = int(big * rng.uniform(0.008, 0.02))
    fill, edge = _colour(rng), (255, 255, 255) if rng.random() < 0.5 else (20, 20, 20)
    layer = Image.new("RGB", (big, big), (0, 0, 0))
    mask = Image.new("L", (big, big), 0)
    x = big * rng.uniform(0.2, 0.5)
    y = big * (rng.uniform(0.68, 0.78) if rng.random() < 0.5 else rng.uniform(0.35, 0.55))
    ImageDraw.Draw(layer).text((x, y), word, font=font, fill=fill, stroke_width=stroke, stroke_fill=edge,
                               anchor="lm")
    ImageDraw.Draw(mask).text((x, y), word, font=font, fill=255, stroke_width=stroke, stroke_fill=255,
                              anchor="lm")
    m = np.asarray(mask) > 0
    colour[m] = np.asarray(layer, np.float32)[m]
    coverage[m] = 255


def make_sticker(seed: int, size: int = 256) -> Image.Image:
    """One procedural sticker, ``size`` x ``size`` RGBA, transparent around it. Same seed, same
    pixels."""
    if size < 16:
        raise ValueError(f"sticker size must be at least 16 px, not {size}")
    rng = np.random.default_rng([0x57AC, int(seed)])
    big = size * _SUPERSAMPLE
    # 1. body, holes, details, text
    colour, coverage = _body(rng, big)
    if rng.random() < 0.7:
        _details(rng, colour, coverage)
    if rng.random() < 0.4:
        _text(rng, colour, coverage)
    # 2. outline: the coverage grown by a few pixels, in one colour, beneath everything
    alpha = coverage.astype(np.float32) / 255.0
    if rng.random() < 0.75:
        width = max(1, int(big * rng.uniform(0.01, 0.04)))
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * width + 1, 2 * width + 1))
        grown = cv2.dilate(coverage, kernel) > 0
        roll = rng.random()
        edge = (255, 255, 255) if roll < 0.6 else (15, 15, 15) if roll < 0.9 else _colour(rng)
        ring = grown & (coverage == 0)
        colour[ring] = edge
        alpha = grown.astype(np.float32)
    # 3. a soft drop shadow, kept under the label threshold (alpha < 0.5)
    if rng.random() < 0.12:
        shift = int(big * rng.uniform(0.01, 0.03))
        shadow = np.roll(np.roll(alpha, shift, axis=0), shift, axis=1)
        shadow = cv2.GaussianBlur(shadow, (0, 0), big * 0.01) * rng.uniform(0.2, 0.4)
        under = (alpha == 0) & (shadow > 0)
        colour[under] = (0, 0, 0)
        alpha = np.maximum(alpha, shadow)
    # 4. reduce to the final size: premultiplied area averaging gives anti-aliased edges
    premul = colour * alpha[..., None]
    small_p = cv2.resize(premul, (size, size), interpolation=cv2.INTER_AREA)
    small_a = cv2.resize(alpha, (size, size), interpolation=cv2.INTER_AREA)
    rgb = np.where(small_a[..., None] > 1e-6, small_p / np.maximum(small_a[..., None], 1e-6), 0.0)
    rgba = np.empty((size, size, 4), np.uint8)
    rgba[..., :3] = np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
    rgba[..., 3] = np.clip(small_a * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(rgba, "RGBA")


def make_stickers(count: int, *, seed: int = 0, size: int = 256) -> list[Image.Image]:
    """``count`` stickers with seeds ``seed, seed + 1, ...``."""
    return [make_sticker(seed + i, size) for i in range(count)]


def sticker_files(count: int, *, seed: int = 0, size: int = 96) -> list[tuple[str, bytes]]:
    """``count`` procedural stickers as ``(name, PNG bytes)`` pairs: a ready sticker set for the
    trainer, the worker and their tests and benchmarks."""
    files = []
    for i in range(count):
        buf = io.BytesIO()
        make_sticker(seed + i, size).save(buf, "PNG")
        files.append((f"sticker-{seed + i:06d}.png", buf.getvalue()))
    return files


def write_stickers(directory: str | Path, count: int, *, seed: int = 0, size: int = 256) -> list[Path]:
    """Save ``count`` procedural stickers as PNG files (``sticker-<seed>.png``) into ``directory``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = out / f"sticker-{seed + i:06d}.png"
        make_sticker(seed + i, size).save(path)
        paths.append(path)
    return paths


def alpha_of(stickers: Sequence[Image.Image]) -> list[np.ndarray]:
    """Each sticker's alpha as uint8 (H, W)."""
    return [np.asarray(s.getchannel("A")) for s in stickers]
