"""Sticker-set preparation: untrusted files in, training-ready square RGB images out.

Pillow and numpy only (no torch), so the bot can check an upload before queueing a job.

Each file is decoded safely (:func:`pipeline.images.decode_image`: pixel limit read from the
header, EXIF orientation, every mode), fitted into the training square without distortion
(padding by default, so no part of a sticker is cut), and alpha-composited onto a flat
background colour; the alpha is kept as a mask for the optional masked loss. Exact and near
duplicates (a 64-bit difference hash within ``near_duplicate_bits``) are dropped. Files that cannot
be used are listed in ``PreparedSet.skipped`` with the reason; a set left with fewer than
``min_images`` usable images is refused with a :class:`StickerSetError` that says why each other
file was not used.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.errors import ImageError, StickerSetError
from pipeline.images import (
    DEFAULT_MAX_PIXELS,
    MAX_FILE_BYTES,
    composite_on,
    decode_image,
    fit_square,
)

MIN_IMAGES = 3
MAX_IMAGES = 120
NEAR_DUPLICATE_BITS = 3  # of 64: resized/re-encoded copies land within 0-2 bits


@dataclass
class PreparedSet:
    """A training set: ``images[i]`` (RGB, ``resolution`` square) came from ``names[i]``."""

    images: list[Image.Image]
    masks: list[Image.Image]  # "L": 255 where the sticker is opaque, 0 on padding/transparency
    names: list[str]
    resolution: int
    background: tuple[int, int, int]
    sha256: str  # of the prepared pixels, in order (recorded in style.json)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file name, reason)

    def __len__(self) -> int:
        return len(self.images)


def difference_hash(image: Image.Image) -> int:
    """64-bit dHash: brightness gradients of a 9x8 greyscale thumbnail."""
    grey = np.asarray(image.convert("L").resize((9, 8), Image.Resampling.BILINEAR), dtype=np.int16)
    bits = (grey[:, 1:] > grey[:, :-1]).flatten()
    return int(sum(1 << i for i, b in enumerate(bits) if b))


def _read(item: tuple[str, bytes] | Path | str) -> tuple[str, bytes | None, str | None]:
    """(display name, bytes or None, reason when unreadable)."""
    if isinstance(item, tuple):
        name, data = item
        return str(name), bytes(data), None
    path = Path(item)
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            return path.name, None, f"the file is over {MAX_FILE_BYTES // (1024 * 1024)} MB"
        return path.name, path.read_bytes(), None
    except OSError as exc:
        return path.name, None, f"cannot read the file ({exc.strerror or exc.__class__.__name__})"


def list_sticker_files(directory: Path) -> list[Path]:
    """The regular, non-hidden files of a directory, sorted by name (the CLI's input)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise StickerSetError(f"{directory} is not a directory")
    return sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))


def prepare_sticker_set(
    files: Iterable[tuple[str, bytes] | Path | str],
    *,
    resolution: int,
    background: tuple[int, int, int] = (255, 255, 255),
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_images: int = MIN_IMAGES,
    max_images: int = MAX_IMAGES,
    fit: str = "pad",
    near_duplicate_bits: int = NEAR_DUPLICATE_BITS,
) -> PreparedSet:
    """Decode, fit, composite and de-duplicate a sticker set (see the module docstring)."""
    items: Sequence[tuple[str, bytes] | Path | str] = list(files)
    if len(items) > max_images:
        raise StickerSetError(
            f"{len(items)} files is too many: a sticker set holds at most {max_images}; send fewer"
        )
    images: list[Image.Image] = []
    masks: list[Image.Image] = []
    names: list[str] = []
    hashes: list[int] = []
    digests: dict[bytes, str] = {}
    skipped: list[tuple[str, str]] = []
    for item in items:
        name, data, reason = _read(item)
        if data is None:
            skipped.append((name, reason or "unreadable"))
            continue
        try:
            decoded = decode_image(data, name=name, max_pixels=max_pixels)
        except ImageError as exc:
            skipped.append((name, exc.reason))
            continue
        rgba = fit_square(decoded.image, resolution, mode=fit)
        rgb = composite_on(rgba, background)
        mask = rgba.getchannel("A")
        pixels = rgb.tobytes() + mask.tobytes()
        digest = hashlib.sha256(pixels).digest()
        if digest in digests:
            skipped.append((name, f"an exact duplicate of {digests[digest]}"))
            continue
        dhash = difference_hash(rgb)
        near = next((names[i] for i, h in enumerate(hashes)
                     if bin(h ^ dhash).count("1") <= near_duplicate_bits), None)
        if near is not None:
            skipped.append((name, f"a near duplicate of {near}"))
            continue
        digests[digest] = name
        hashes.append(dhash)
        images.append(rgb)
        masks.append(mask)
        names.append(name)
    if len(images) < min_images:
        why = "; ".join(f"{n}: {r}" for n, r in skipped) or "no files were given"
        raise StickerSetError(
            f"only {len(images)} usable image{'s' if len(images) != 1 else ''} in the set; at least "
            f"{min_images} different static stickers are needed. Not used: {why}"
        )
    set_hash = hashlib.sha256(f"{resolution}:{background}".encode())
    for img, mask in zip(images, masks, strict=True):
        set_hash.update(img.tobytes())
        set_hash.update(mask.tobytes())
    return PreparedSet(images=images, masks=masks, names=names, resolution=resolution,
                       background=background, sha256=set_hash.hexdigest(), skipped=skipped)
