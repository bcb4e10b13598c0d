"""Comparing pictures that the same request computed in different ways.

A batched UNet call and a single one, another CPU's kernels or another thread count compute
the same image with different last bits; after decoding, a few pixels move by a few levels and
the encoded bytes differ. What the product promises across such differences is the *picture*:
:func:`assert_same_picture` holds two images to that, with tolerances far below the difference
between two seeds (which the tests check too, so the tolerance cannot hide a wrong picture).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

Picture = bytes | Image.Image | np.ndarray

# Levels of 0..255. Batched vs single on two CPUs: at most 9 levels on 3.6% of the pixels (a
# field report); two seeds differ by tens of levels on most pixels.
MEAN_TOLERANCE = 2.0
FAR_LEVELS = 32  # a pixel this far off counts as a different pixel
FAR_SHARE = 0.01  # at most this share of pixels may be far off (alpha edges may flip)


@dataclass(frozen=True)
class Difference:
    mean: float  # mean absolute difference over all channels, in levels
    far_share: float  # share of pixels with a channel more than FAR_LEVELS off

    @property
    def same_picture(self) -> bool:
        return self.mean <= MEAN_TOLERANCE and self.far_share <= FAR_SHARE


def as_array(picture: Picture) -> np.ndarray:
    if isinstance(picture, bytes):
        picture = Image.open(io.BytesIO(picture))
    if isinstance(picture, Image.Image):
        picture = np.asarray(picture.convert("RGBA") if "A" in picture.getbands() else picture)
    return np.asarray(picture)


def picture_difference(a: Picture, b: Picture) -> Difference:
    x, y = as_array(a).astype(np.int16), as_array(b).astype(np.int16)
    assert x.shape == y.shape, (x.shape, y.shape)
    diff = np.abs(x - y)
    per_pixel = diff.max(axis=-1) if diff.ndim == 3 else diff
    return Difference(mean=float(diff.mean()), far_share=float((per_pixel > FAR_LEVELS).mean()))


def assert_same_picture(a: Picture, b: Picture) -> None:
    difference = picture_difference(a, b)
    assert difference.same_picture, difference


def assert_different_pictures(a: Picture, b: Picture) -> None:
    """Far more different than :func:`assert_same_picture` allows: the tolerance is meaningful."""
    difference = picture_difference(a, b)
    assert difference.mean > 4 * MEAN_TOLERANCE, difference
