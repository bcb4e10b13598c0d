"""Training pairs for the segmenter: RGBA stickers composited onto varied backgrounds.

Every sticker carries its own ground truth, its alpha channel. ``make_pair`` places one sticker
on a background with a random scale, rotation and position, and returns the composited image,
the composited (soft) alpha and the binary label:

    label = alpha >= LABEL_THRESHOLD   (0.5: a pixel more than half covered is foreground)

so soft drop shadows (alpha < 0.5) and the faint outer half of anti-aliased edges are
background. The label is computed from the composited alpha *before* the photometric
degradations (lighting changes, blur, noise, JPEG artefacts), which change the image only.

A label must be observable in the pixels. A white outline on a white background (or a dark one
on black, or a fill that matches a flat colour) has an edge nobody can see, so no model can learn
where it is. Training on it only teaches the model to blur its edges. So when less than
``PairConfig.min_visible`` (70 %) of the label's edge pixels differ visibly from the background
behind them (some channel by at least 24 of 255, before degradations), the background is drawn
again from another family, up to three times. The same rule holds for held-out pairs.

Backgrounds come in families, split between training and held-out data so an evaluation measures
generalisation to backgrounds the model never saw:

- train:    white (common), flat colours, linear gradients, value noise, stripes, checkerboards,
            "bokeh" (out-of-focus polygons and strokes over a gradient), photos with an even
            index in the sorted photo folder;
- held-out: white, flat colours, radial gradients, blurred "clouds" with speckle, plaid and
            dots, clutter of random soft shapes, photos with an odd index.

Without a photo folder, "photo" falls back to a family of its own split (train: bokeh or
noise; held-out: clouds or clutter), so no held-out family is ever seen in training.

Everything is a pure function of (split, seed, index): the same arguments give the same pixels.
numpy + cv2 + Pillow; no torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from pipeline.images import DEFAULT_MAX_PIXELS, decode_image

LABEL_THRESHOLD = 0.5
SPLITS = ("train", "heldout")
TRAIN_BACKGROUNDS = ("white", "flat", "gradient", "noise", "stripes", "checker", "bokeh", "photo")
HELDOUT_BACKGROUNDS = ("white", "flat", "radial", "clouds", "plaid", "clutter", "photo")
_PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass(frozen=True)
class PairConfig:
    """How pairs are drawn. Scales are the sticker's longer side as a fraction of the canvas."""

    size: int = 128
    scale: tuple[float, float] = (0.45, 0.95)
    max_rotation: float = 30.0  # degrees, either way
    white_share: float = 0.3  # share of plain white backgrounds
    degrade: bool = True  # lighting, blur, noise, JPEG on the image (never on the label)
    blur_p: float = 0.3
    noise_p: float = 0.3
    jpeg_p: float = 0.4
    lighting_p: float = 0.5
    min_visible: float = 0.7  # least share of the label's edge that must differ from the background


@dataclass
class Pair:
    image: np.ndarray  # uint8 (H, W, 3): what the model sees (degraded)
    mask: np.ndarray  # bool (H, W): alpha >= LABEL_THRESHOLD
    alpha: np.ndarray  # float32 (H, W) in [0, 1]: the composited sticker alpha
    clean: np.ndarray  # uint8 (H, W, 3): the composite before degradations
    background: np.ndarray  # uint8 (H, W, 3): the background alone
    family: str  # which background family


_VISIBILITY_TRIES = 4
PREMUL_CACHE_BYTES = 512 << 20  # premultiplied stickers kept per sticker list (600 of 160 px: 246 MB)
_VISIBLE_DIFF = 24  # a channel differing by this much (of 255) makes an edge pixel visible


def inner_edge(mask: np.ndarray) -> np.ndarray:
    """The mask's pixels that touch a pixel outside it (8-neighbourhood; the image border counts
    as outside)."""
    m = mask.astype(np.uint8)
    return (m - cv2.erode(m, np.ones((3, 3), np.uint8), borderType=cv2.BORDER_CONSTANT, borderValue=0)) > 0


def edge_visibility(clean: np.ndarray, bg: np.ndarray, mask: np.ndarray) -> float:
    """The share of the label's edge pixels (foreground pixels next to background) whose
    composited colour differs visibly from the background behind them (1.0 without an edge)."""
    edge = inner_edge(mask)
    if not edge.any():
        return 1.0
    diff = np.abs(clean[edge].astype(np.int16) - bg[edge].astype(np.int16)).max(axis=-1)
    return float((diff >= _VISIBLE_DIFF).mean())


def label_of(alpha: np.ndarray) -> np.ndarray:
    """The binary label of a float alpha in [0, 1] (or uint8 alpha in [0, 255])."""
    if alpha.dtype == np.uint8:
        return alpha >= round(LABEL_THRESHOLD * 255)
    return alpha >= LABEL_THRESHOLD


# --- stickers and photos --------------------------------------------------------------------------


def load_stickers(
    directories: Iterable[str | Path],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    skipped: list[tuple[str, str]] | None = None,
) -> list[Image.Image]:
    """Every readable image with some transparency in the folders (sorted by name), as RGBA.
    Opaque images carry no label and are skipped, as are unreadable ones; ``skipped`` collects
    (name, reason)."""
    from pipeline.errors import ImageError, StickerSetError

    out: list[Image.Image] = []
    for directory in directories:
        folder = Path(directory)
        if not folder.is_dir():
            raise StickerSetError(f"sticker folder {folder} is not a directory")
        for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
            try:
                decoded = decode_image(path.read_bytes(), name=path.name, max_pixels=max_pixels)
            except ImageError as exc:
                if skipped is not None:
                    skipped.append((path.name, str(exc)))
                continue
            if not decoded.has_alpha:
                if skipped is not None:
                    skipped.append((path.name, "no transparency, so no label"))
                continue
            out.append(decoded.image)
    return out


def load_photos(directory: str | Path | None, *, size: int = 256) -> list[np.ndarray]:
    """Photos for backgrounds (RGB uint8, shorter side resized to ``size``), sorted by name."""
    if directory is None:
        return []
    photos = []
    for path in sorted(Path(directory).iterdir()):
        if path.suffix.lower() not in _PHOTO_SUFFIXES:
            continue
        try:
            with Image.open(path) as img:
                rgb = img.convert("RGB")
        except (OSError, ValueError):
            continue
        scale = size / min(rgb.size)
        rgb = rgb.resize((max(size, round(rgb.width * scale)), max(size, round(rgb.height * scale))))
        photos.append(np.asarray(rgb))
    return photos


# --- backgrounds ----------------------------------------------------------------------------------


def _rand_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=3).astype(np.float32)


def _value_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    grid = rng.random((cells, cells, 3)).astype(np.float32)
    return cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)


def background(
    family: str,
    rng: np.random.Generator,
    size: int,
    photos: Sequence[np.ndarray] = (),
    *,
    split: str = "train",
) -> np.ndarray:
    """One background of a family, uint8 (size, size, 3). ``split`` picks the stand-in for
    "photo" when there are no photos."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(1, size - 1)
    c1, c2 = _rand_colour(rng), _rand_colour(rng)
    bg: np.ndarray
    if family == "white":
        bg = np.full((size, size, 3), 255.0 - rng.uniform(0, 12), np.float32)
    elif family == "flat":
        bg = np.broadcast_to(c1, (size, size, 3)).astype(np.float32)
    elif family == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        t = np.clip((np.cos(angle) * xx + np.sin(angle) * yy + 1) / 2, 0, 1)[..., None]
        bg = c1 * (1 - t) + c2 * t
    elif family == "radial":
        cx, cy = rng.random(2)
        t = np.clip(np.hypot(xx - cx, yy - cy) / rng.uniform(0.5, 1.2), 0, 1)[..., None]
        bg = c1 * (1 - t) + c2 * t
    elif family == "noise":
        n = _value_noise(rng, size, int(rng.integers(3, 16)))
        bg = c1 * (1 - n) + c2 * n + rng.normal(0, rng.uniform(0, 12), (size, size, 3))
    elif family == "clouds":
        n = np.sum([_value_noise(rng, size, c) / (i + 1) for i, c in enumerate((4, 9, 21))], axis=0)
        n = (n - n.min()) / max(1e-6, float(n.max() - n.min()))
        bg = c1 * (1 - n) + c2 * n + rng.normal(0, rng.uniform(2, 20), (size, size, 3))
    elif family == "stripes":
        period = rng.uniform(0.03, 0.25)
        angle = rng.uniform(0, np.pi)
        t = ((np.cos(angle) * xx + np.sin(angle) * yy) / period) % 1.0 < 0.5
        bg = np.where(t[..., None], c1, c2)
    elif family == "checker":
        period = rng.uniform(0.04, 0.25)
        t = ((xx // period + yy // period) % 2).astype(bool)
        bg = np.where(t[..., None], c1, c2)
    elif family == "plaid":
        period = rng.uniform(0.05, 0.2)
        a = (np.sin(xx / period * 2 * np.pi) > 0.3)[..., None]
        b = (np.sin(yy / period * 2 * np.pi) > 0.3)[..., None]
        bg = c1 * 0.6 + c2 * 0.4 * a + c2 * 0.4 * b
        if rng.random() < 0.5:
            dots = (np.hypot((xx / period) % 1 - 0.5, (yy / period) % 1 - 0.5) < 0.2)[..., None]
            bg = np.where(dots, _rand_colour(rng), bg)
    elif family == "bokeh":
        t = np.clip((np.cos(rng.uniform(0, 2 * np.pi)) * xx + 0.5 * yy), 0, 1)[..., None]
        bg = (c1 * (1 - t) + c2 * t).astype(np.float32)
        for _ in range(int(rng.integers(3, 12))):
            corners = int(rng.integers(3, 7))
            middle = rng.uniform(0, size, 2)
            radius = rng.uniform(size / 16, size / 4)
            angles = np.sort(rng.uniform(0, 2 * np.pi, corners))
            pts = np.stack([middle[0] + radius * np.cos(angles), middle[1] + radius * np.sin(angles)], 1)
            colour = tuple(float(v) for v in _rand_colour(rng))
            if rng.random() < 0.7:
                cv2.fillPoly(bg, [pts.astype(np.int32)], colour)
            else:
                width = int(rng.integers(1, max(2, size // 24)))
                cv2.polylines(bg, [pts.astype(np.int32)], False, colour, width)
        bg = cv2.GaussianBlur(bg, (0, 0), size * rng.uniform(0.015, 0.05))
    elif family == "clutter":
        bg = np.broadcast_to(c1, (size, size, 3)).astype(np.float32).copy()
        for _ in range(int(rng.integers(4, 14))):
            centre = (int(rng.integers(0, size)), int(rng.integers(0, size)))
            axes = (
                int(rng.integers(size // 20 + 1, size // 3)),
                int(rng.integers(size // 20 + 1, size // 3)),
            )
            cv2.ellipse(
                bg,
                centre,
                axes,
                float(rng.uniform(0, 180)),
                0,
                360,
                tuple(float(v) for v in _rand_colour(rng)),
                -1,
            )
        bg = cv2.GaussianBlur(bg, (0, 0), rng.uniform(0.8, 4.0))
    elif family == "photo":
        if not photos:
            stand_ins = ("bokeh", "noise") if split == "train" else ("clouds", "clutter")
            return background(stand_ins[int(rng.random() < 0.5)], rng, size, split=split)
        photo = photos[int(rng.integers(0, len(photos)))]
        h, w = photo.shape[:2]
        crop = int(rng.integers(min(h, w) // 2, min(h, w) + 1))
        y, x = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
        bg = cv2.resize(photo[y : y + crop, x : x + crop], (size, size), interpolation=cv2.INTER_AREA)
        if rng.random() < 0.5:
            bg = bg[:, ::-1]
        return np.ascontiguousarray(bg, dtype=np.uint8)
    else:
        raise ValueError(f"unknown background family {family!r}")
    return np.clip(bg + 0.5, 0, 255).astype(np.uint8)


# --- composition and degradations -----------------------------------------------------------------


def premultiplied(sticker: Image.Image) -> np.ndarray:
    """(H, W, 4) float32 in [0, 1]: colour times alpha, then alpha (what ``compose`` warps)."""
    rgba = np.asarray(sticker.convert("RGBA"), dtype=np.float32) / 255.0
    return np.concatenate([rgba[..., :3] * rgba[..., 3:], rgba[..., 3:]], axis=2)


def compose(
    sticker: Image.Image | np.ndarray,
    bg: np.ndarray,
    *,
    scale: float,
    angle: float,
    centre: tuple[float, float],
) -> tuple[np.ndarray, np.ndarray]:
    """Place an RGBA sticker on a background: the sticker is scaled (its own pixels times
    ``scale``), rotated by ``angle`` degrees around its centre and centred at ``centre`` (x, y) on
    the canvas. Returns (composite uint8 (H, W, 3), composited alpha float32 in [0, 1]).

    The warp runs on premultiplied colour, so the composite is exactly
    ``alpha * F + (1 - alpha) * B`` with the warped alpha, rounded once. ``sticker`` may come
    already ``premultiplied`` (a training set reuses each sticker many times)."""
    premul = sticker if isinstance(sticker, np.ndarray) else premultiplied(sticker)
    h, w = bg.shape[:2]
    sh, sw = premul.shape[:2]
    matrix = cv2.getRotationMatrix2D(((sw - 1) / 2, (sh - 1) / 2), angle, scale)
    matrix[0, 2] += centre[0] - (sw - 1) / 2
    matrix[1, 2] += centre[1] - (sh - 1) / 2
    interp = cv2.INTER_AREA if scale < 1 and angle == 0 else cv2.INTER_LINEAR
    if scale < 0.7:  # pre-shrink so the bilinear warp does not alias
        premul = cv2.resize(
            premul,
            (max(1, round(sw * scale / 0.7)), max(1, round(sh * scale / 0.7))),
            interpolation=cv2.INTER_AREA,
        )
        ratio = premul.shape[1] / sw
        matrix = cv2.getRotationMatrix2D(
            ((premul.shape[1] - 1) / 2, (premul.shape[0] - 1) / 2), angle, scale / ratio
        )
        matrix[0, 2] += centre[0] - (premul.shape[1] - 1) / 2
        matrix[1, 2] += centre[1] - (premul.shape[0] - 1) / 2
        interp = cv2.INTER_LINEAR
    warped = cv2.warpAffine(
        premul, matrix, (w, h), flags=interp, borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0, 0)
    )
    alpha = np.clip(warped[..., 3], 0.0, 1.0).astype(np.float32)
    fg = np.clip(warped[..., :3], 0.0, 1.0)
    out = fg * 255.0 + bg.astype(np.float32) * (1.0 - alpha[..., None])
    return np.clip(out + 0.5, 0, 255).astype(np.uint8), alpha


def degrade(image: np.ndarray, rng: np.random.Generator, config: PairConfig) -> np.ndarray:
    """Lighting changes, blur, sensor noise and JPEG artefacts, each with its probability."""
    out: np.ndarray = image.astype(np.float32)
    if rng.random() < config.lighting_p:
        gain = rng.uniform(0.7, 1.3) * rng.uniform(0.9, 1.1, size=3)  # brightness and colour cast
        out = (out - 128.0) * rng.uniform(0.75, 1.25) + 128.0  # contrast
        out = out * gain + rng.uniform(-20, 20)
        out = 255.0 * (np.clip(out, 0, 255) / 255.0) ** rng.uniform(0.7, 1.4)  # gamma
    if rng.random() < config.blur_p:
        out = cv2.GaussianBlur(out, (0, 0), rng.uniform(0.4, 1.4))
    if rng.random() < config.noise_p:
        out = out + rng.normal(0, rng.uniform(2, 10), out.shape)
    result = np.clip(out + 0.5, 0, 255).astype(np.uint8)
    if rng.random() < config.jpeg_p:
        ok, data = cv2.imencode(".jpg", result, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(30, 92))])
        decoded = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if ok else None
        if decoded is not None:
            result = np.asarray(decoded, dtype=np.uint8)
    return result


def _opaque_box(sticker: Image.Image) -> tuple[int, int, int, int]:
    box = sticker.getchannel("A").getbbox()
    return box if box else (0, 0, sticker.width, sticker.height)


def make_pair(
    stickers: Sequence[Image.Image],
    index: int,
    *,
    split: str = "train",
    seed: int = 0,
    config: PairConfig = PairConfig(),
    photos: Sequence[np.ndarray] = (),
    premul: np.ndarray | None = None,
) -> Pair:
    """Pair number ``index`` of (split, seed): a deterministic function of its arguments. The
    sticker is ``stickers[index % len(stickers)]`` (``premul``: that sticker ``premultiplied``,
    when the caller keeps it); everything else is drawn from a generator seeded by (split, seed,
    index)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    if not stickers:
        raise ValueError("no stickers to make pairs from")
    rng = np.random.default_rng([0x5E6, SPLITS.index(split), int(seed), int(index)])
    size = config.size
    families = TRAIN_BACKGROUNDS if split == "train" else HELDOUT_BACKGROUNDS
    split_photos = list(photos)[SPLITS.index(split) :: 2]
    sticker = stickers[index % len(stickers)]
    x0, y0, x1, y1 = _opaque_box(sticker)
    extent = max(x1 - x0, y1 - y0, 1)
    scale = rng.uniform(*config.scale) * size / extent
    angle = rng.uniform(-config.max_rotation, config.max_rotation)
    half = extent * scale / 2
    # The box centre may land so that up to a tenth of the sticker leaves the canvas.
    margin = half * 0.8
    lo, hi = margin, size - margin
    cx_box = rng.uniform(lo, hi) if hi > lo else size / 2
    cy_box = rng.uniform(lo, hi) if hi > lo else size / 2
    # compose() centres the whole sticker image; shift so the opaque box centre lands there.
    off_x = ((x0 + x1) / 2 - (sticker.width - 1) / 2 - 0.5) * scale
    off_y = ((y0 + y1) / 2 - (sticker.height - 1) / 2 - 0.5) * scale
    rad = np.deg2rad(angle)
    dx = off_x * np.cos(rad) + off_y * np.sin(rad)
    dy = -off_x * np.sin(rad) + off_y * np.cos(rad)
    family = "white" if rng.random() < config.white_share else str(rng.choice(families[1:]))
    for attempt in range(_VISIBILITY_TRIES):
        bg = background(family, rng, size, split_photos, split=split)
        source = sticker if premul is None else premul
        clean, alpha = compose(source, bg, scale=scale, angle=angle, centre=(cx_box - dx, cy_box - dy))
        mask = label_of(alpha)
        if attempt == _VISIBILITY_TRIES - 1 or edge_visibility(clean, bg, mask) >= config.min_visible:
            break
        # The sticker's edge melts into this background (a white outline on white): its label
        # could not be learned from the pixels. Draw another background of another family.
        family = str(rng.choice([f for f in families[1:] if f != family]))
    image = degrade(clean, rng, config) if config.degrade else clean.copy()
    return Pair(image=image, mask=mask, alpha=alpha, clean=clean, background=bg, family=family)


class _Kept:
    """Premultiplied stickers by index, and their bytes: one per sticker list."""

    def __init__(self) -> None:
        self.arrays: dict[int, np.ndarray] = {}
        self.nbytes = 0


class PairSet:
    """``length`` pairs of one split, made on demand (``pairs[i]``), optionally cached. ``epoch``
    shifts the indices so each epoch of training sees fresh placements and backgrounds."""

    def __init__(
        self,
        stickers: Sequence[Image.Image],
        *,
        length: int,
        split: str = "train",
        seed: int = 0,
        config: PairConfig = PairConfig(),
        photos: Sequence[np.ndarray] = (),
        cache: bool = False,
        share_stickers: PairSet | None = None,
    ) -> None:
        if not stickers:
            raise ValueError("no stickers to make pairs from")
        self.stickers = list(stickers)
        self.length = length
        self.split = split
        self.seed = seed
        self.config = config
        self.photos = list(photos)
        self.epoch = 0
        self._cache: dict[tuple[int, int], Pair] | None = {} if cache else None
        # sticker index -> premultiplied, up to a budget; ``share_stickers``: a set of the same
        # stickers (another size, say) whose kept ones this set uses and adds to.
        self._kept = _Kept()
        if share_stickers is not None:
            theirs = share_stickers.stickers
            same = len(theirs) == len(self.stickers)
            if not same or any(a is not b for a, b in zip(theirs, self.stickers, strict=True)):
                raise ValueError("share_stickers must be a pair set of the same stickers")
            self._kept = share_stickers._kept

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Pair:
        if not 0 <= index < self.length:
            raise IndexError(index)
        key = (self.epoch, index)
        if self._cache is not None and key in self._cache:
            return self._cache[key]
        number = index + self.epoch * self.length
        pair = make_pair(
            self.stickers,
            number,
            split=self.split,
            seed=self.seed,
            config=self.config,
            photos=self.photos,
            premul=self._premultiplied(number % len(self.stickers)),
        )
        if self._cache is not None:
            self._cache[key] = pair
        return pair

    def _premultiplied(self, which: int) -> np.ndarray:
        """Sticker ``which`` premultiplied, kept while the kept ones fit ``PREMUL_CACHE_BYTES``
        (converting it was a third of the cost of a 96-px pair)."""
        kept = self._kept.arrays.get(which)
        if kept is not None:
            return kept
        made = premultiplied(self.stickers[which])
        made.setflags(write=False)  # shared by every pair of this sticker: nothing may write to it
        if self._kept.nbytes + made.nbytes <= PREMUL_CACHE_BYTES:
            self._kept.arrays[which] = made
            self._kept.nbytes += made.nbytes
        return made
