"""Safe decoding of untrusted image bytes, and the shared geometry helpers."""

from __future__ import annotations

import gzip
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import (
    ImageTooLargeError,
    ImageTooSmallError,
    NotAnImageError,
    UnsupportedStickerError,
)
from pipeline.images import composite_on, decode_image, fit_square


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge size (a decompression bomb's calling card)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 8))
            + chunk(b"IEND", b""))


def test_rgba_png_keeps_alpha():
    img = Image.new("RGBA", (40, 30), (10, 20, 30, 0))
    img.putpixel((1, 1), (255, 0, 0, 255))
    out = decode_image(encode(img, "PNG"), name="a.png")
    assert out.image.mode == "RGBA" and out.has_alpha and out.format == "PNG"
    assert out.image.getpixel((1, 1)) == (255, 0, 0, 255)


def test_palette_transparency_survives():
    img = Image.new("P", (20, 20), 0)
    img.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    img.putpixel((5, 5), 1)
    out = decode_image(encode(img, "PNG", transparency=0), name="p.png")
    assert out.image.getpixel((0, 0))[3] == 0
    assert out.image.getpixel((5, 5)) == (0, 255, 0, 255)


def test_cmyk_jpeg_becomes_rgb_colours():
    out = decode_image(encode(Image.new("CMYK", (32, 32), (0, 255, 0, 0)), "JPEG", quality=95))
    r, g, b, a = out.image.getpixel((16, 16))
    assert r > 200 and g < 60 and b > 200 and a == 255  # magenta, not garbage


def test_sixteen_bit_png_is_scaled_not_clipped():
    arr = np.full((20, 20), 40000, dtype=np.uint16)
    out = decode_image(encode(Image.fromarray(arr), "PNG"))
    assert out.image.getpixel((3, 3))[:3] == (156, 156, 156)  # 40000/65535*255


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    out = decode_image(encode(img, "JPEG", exif=exif.tobytes()))
    assert out.image.size == (20, 40)


def test_animated_image_gives_first_frame():
    frames = [Image.new("RGB", (20, 20), c) for c in ((255, 0, 0), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    out = decode_image(buf.getvalue(), name="anim.webp")
    assert out.animated and out.image.getpixel((5, 5))[:3] == (255, 0, 0)


@pytest.mark.parametrize(
    ("data", "error", "words"),
    [
        (b"", NotAnImageError, "empty"),
        (b"just some text, not an image", NotAnImageError, "not an image"),
        (png_claiming(50000, 50000), ImageTooLargeError, "too large"),
        (png_claiming(8000, 8000), ImageTooLargeError, "over the limit"),
        (png_claiming(100, 100), NotAnImageError, "corrupt"),
        (gzip.compress(b'{"tgs": 1}'), UnsupportedStickerError, "animated"),
        (b"\x1a\x45\xdf\xa3" + b"\0" * 40, UnsupportedStickerError, "video"),
    ],
)
def test_bad_bytes_get_specific_errors_naming_the_file(data, error, words):
    with pytest.raises(error) as err:
        decode_image(data, name="upload-7.png", max_pixels=40_000_000)
    assert "upload-7.png" in str(err.value) and words in str(err.value)


def test_tiny_image_is_refused():
    with pytest.raises(ImageTooSmallError, match="1x1"):
        decode_image(encode(Image.new("RGB", (1, 1)), "PNG"), name="dot.png")


def test_composite_ignores_colours_under_transparency():
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # red garbage under full transparency
    assert composite_on(img, (255, 255, 255)).getpixel((0, 0)) == (255, 255, 255)
    assert img.convert("RGB").getpixel((0, 0)) == (255, 0, 0)  # what a plain convert would keep


@pytest.mark.parametrize("mode", ["pad", "crop"])
def test_fit_square_does_not_distort(mode):
    img = Image.new("RGBA", (200, 100), (0, 0, 0, 255))
    out = fit_square(img, 64, mode=mode)
    assert out.size == (64, 64)
    alpha = np.asarray(out.getchannel("A"))
    if mode == "pad":
        assert alpha[:15].max() == 0 and alpha[17:47].min() == 255  # letterboxed, 2:1 kept
    else:
        assert alpha.min() == 255
