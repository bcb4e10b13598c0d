"""Sticker post-processing on hand-made RGBA images: pure functions, exact numbers."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.stickers.postprocess import (
    MAX_STICKER_BYTES,
    PostOptions,
    add_shadow,
    add_stroke,
    check_sticker,
    clear_faint_alpha,
    content_box,
    encode_webp,
    finish_sticker,
    fit_to_sticker,
    rounded_cutout,
    suggest_emoji,
    trim_to_content,
)


def canvas(w: int, h: int, box: tuple[int, int, int, int], color=(200, 30, 30, 255)) -> Image.Image:
    """Transparent w x h with an opaque rectangle at ``box`` (inclusive left/top, exclusive
    right/bottom)."""
    arr = np.zeros((h, w, 4), np.uint8)
    left, top, right, bottom = box
    arr[top:bottom, left:right] = color
    return Image.fromarray(arr, "RGBA")


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 4), dtype=np.uint8)
    arr[..., 3] = 255
    return Image.fromarray(arr, "RGBA")


def alpha(img: Image.Image) -> np.ndarray:
    return np.asarray(img.getchannel("A"))


def test_clear_faint_alpha() -> None:
    arr = np.zeros((4, 4, 4), np.uint8)
    arr[..., :3] = 90
    arr[0, :, 3] = [0, 5, 7, 8]
    arr[1:, :, 3] = 255
    out = np.asarray(clear_faint_alpha(Image.fromarray(arr, "RGBA"), floor=8))
    assert out[0, :, 3].tolist() == [0, 0, 0, 8]
    assert (out[0, :3, :3] == 0).all()  # invisible pixels carry no stray colour
    assert (out[0, 3, :3] == 90).all() and (out[1:] == arr[1:]).all()


def test_content_box_and_trim() -> None:
    img = canvas(100, 80, (10, 20, 40, 30))
    assert content_box(img) == (10, 20, 40, 30)
    trimmed = trim_to_content(img)
    assert trimmed.size == (30, 10) and alpha(trimmed).min() == 255
    assert content_box(canvas(10, 10, (0, 0, 0, 0))) is None
    with pytest.raises(ValueError, match="transparent"):
        trim_to_content(canvas(10, 10, (0, 0, 0, 0)))


@pytest.mark.parametrize("size, expected", [
    ((100, 50), (512, 256)),
    ((50, 100), (256, 512)),
    ((64, 64), (512, 512)),
    ((1000, 999), (512, 511)),
    ((1, 300), (2, 512)),
    ((300, 1), (512, 2)),
    ((1, 1), (512, 512)),
    ((3000, 2000), (512, 341)),
])
def test_fit_to_sticker_longer_side_is_exactly_512(size: tuple[int, int], expected: tuple[int, int]) -> None:
    assert fit_to_sticker(noise(*size)).size == expected


def test_fit_to_sticker_many_sizes_and_padding() -> None:
    rng = np.random.default_rng(1)
    for _ in range(30):
        w, h = (int(v) for v in rng.integers(1, 900, 2))
        out = fit_to_sticker(noise(w, h), padding=int(rng.integers(0, 40)))
        assert max(out.size) == 512 and min(out.size) <= 512
    padded = fit_to_sticker(noise(100, 50), padding=16)
    assert padded.size == (512, 272)
    # Content fills exactly the inner box; the padding is transparent.
    assert content_box(padded) == (16, 16, 496, 256)
    with pytest.raises(ValueError):
        fit_to_sticker(noise(10, 10), padding=256)


@pytest.mark.parametrize("width", [1, 4, 10])
def test_stroke_is_width_output_pixels_round_and_antialiased(width: int) -> None:
    img = canvas(200, 200, (50, 50, 150, 150))
    out = np.asarray(add_stroke(img, width))
    row = out[100]
    # Straight edge: exactly ``width`` fully opaque white pixels outside the content.
    left = row[:50]
    assert (left[50 - width:, 3] == 255).all() and (left[50 - width:, :3] == 255).all()
    assert (left[:50 - width, 3] == 0).all()
    right = row[150:]
    assert (right[:width, 3] == 255).all() and (right[width:, 3] == 0).all()
    # The content itself is unchanged.
    assert (out[50:150, 50:150] == np.asarray(img)[50:150, 50:150]).all()
    # Round corner: a pixel diagonally beyond the corner farther than width + 1 stays clear,
    # while a square outline would cover it.
    d = width
    assert out[50 - d, 50 - d, 3] < 255
    if width >= 4:
        assert out[50 - d, 50 - d, 3] == 0
        partial = out[..., 3][(out[..., 3] > 0) & (out[..., 3] < 255)]
        assert partial.size > 0  # anti-aliased, not a hard staircase


def test_stroke_zero_is_identity_and_empty_is_safe() -> None:
    img = canvas(40, 40, (10, 10, 20, 20))
    assert np.array_equal(np.asarray(add_stroke(img, 0)), np.asarray(img))
    empty = canvas(40, 40, (0, 0, 0, 0))
    assert alpha(add_stroke(empty, 5)).max() == 0


def test_shadow_falls_below_the_content() -> None:
    img = canvas(100, 100, (30, 30, 70, 70))
    out = np.asarray(add_shadow(img, blur=3, offset=(0, 8), opacity=0.5))
    below, above = out[75, 50], out[25, 50]
    assert below[3] > 0 and below[:3].max() == 0  # black, partly transparent
    assert below[3] <= 128
    assert above[3] < below[3]
    assert (out[30:70, 30:70] == np.asarray(img)[30:70, 30:70]).all()


def test_rounded_cutout_has_transparent_corners() -> None:
    out = alpha(rounded_cutout(noise(100, 60), radius=0.2))
    assert out[0, 0] == 0 and out[-1, -1] == 0 and out[30, 50] == 255
    assert ((out > 0) & (out < 255)).any()


@pytest.mark.parametrize("options", [PostOptions(), PostOptions(stroke=10, shadow=True)])
def test_finish_sticker_meets_telegram_rules(options: PostOptions) -> None:
    # A fully opaque square still gets transparent pixels (the margin).
    for img in (noise(64, 64), canvas(64, 48, (5, 5, 60, 30)), noise(30, 70)):
        out = finish_sticker(img, options)
        assert max(out.size) == 512 and min(out.size) <= 512
        assert (alpha(out) == 0).any()
        box = content_box(out)
        assert box is not None and box[0] >= options.margin and box[1] >= options.margin
        w, h = check_sticker(encode_webp(out))
        assert (w, h) == out.size
    with pytest.raises(ValueError):
        finish_sticker(canvas(20, 20, (0, 0, 0, 0)), options)


def test_faint_noise_is_trimmed_away() -> None:
    arr = np.asarray(canvas(100, 100, (40, 40, 60, 60))).copy()
    arr[0:5, 0:5, 3] = 4  # segmentation noise in a corner
    out = finish_sticker(Image.fromarray(arr, "RGBA"), PostOptions(stroke=0, margin=0))
    assert out.size == (512, 512) and alpha(out).min() == 255  # only the square is left


def test_encode_webp_steps_quality_down_to_fit() -> None:
    arr = np.asarray(noise(512, 512)).copy()
    arr[:4, :, 3] = 0  # WEBP stores no alpha channel for a fully opaque image
    img = Image.fromarray(arr, "RGBA")
    first = encode_webp(img)
    assert len(first) <= MAX_STICKER_BYTES
    small = encode_webp(img, max_bytes=len(first) // 2)
    assert len(small) <= len(first) // 2
    decoded = Image.open(io.BytesIO(small))
    assert decoded.format == "WEBP" and decoded.mode == "RGBA" and decoded.size == (512, 512)
    with pytest.raises(ValueError, match="bytes even at"):
        encode_webp(img, max_bytes=500)
    with pytest.raises(ValueError):
        encode_webp(img, method=7)


def test_encode_webp_keeps_transparency() -> None:
    data = encode_webp(finish_sticker(canvas(64, 64, (10, 10, 50, 50))))
    decoded = Image.open(io.BytesIO(data))
    a = alpha(decoded.convert("RGBA"))
    assert a.min() == 0 and a.max() == 255


def test_check_sticker_names_the_broken_rule() -> None:
    def save(img: Image.Image, fmt: str) -> bytes:
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        return buf.getvalue()

    with pytest.raises(ValueError, match="not WEBP"):
        check_sticker(save(canvas(512, 512, (0, 0, 9, 9)), "PNG"))
    with pytest.raises(ValueError, match="exactly 512"):
        check_sticker(save(canvas(500, 300, (0, 0, 9, 9)), "WEBP"))
    with pytest.raises(ValueError, match="not RGBA"):
        check_sticker(save(noise(512, 300).convert("RGB"), "WEBP"))
    with pytest.raises(ValueError, match="over"):
        check_sticker(save(noise(512, 512), "WEBP"), max_bytes=100)


@pytest.mark.parametrize("caption, emoji", [
    ("a happy dog on the beach", "😄"),
    ("two cats sitting on a table", "🐱"),
    ("a man holding a cup of coffee", "👨"),
    ("a slice of pizza", "🍕"),
    ("an angry bird", "😠"),
    ("", "🙂"),
    ("zzz qqq", "🙂"),
])
def test_suggest_emoji(caption: str, emoji: str) -> None:
    assert suggest_emoji(caption) == emoji


def test_post_options_are_validated() -> None:
    with pytest.raises(ValueError):
        PostOptions(stroke=-1)
    with pytest.raises(ValueError):
        PostOptions(shadow_opacity=2)
    assert PostOptions(stroke=8, shadow=True).padding > PostOptions(stroke=8).padding > PostOptions().padding
