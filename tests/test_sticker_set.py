"""Sticker-set preparation and the train command's bad-input path (no model is loaded)."""

from __future__ import annotations

import gzip
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pipeline.cli import main as cli_main
from pipeline.errors import StickerSetError
from pipeline.training.sticker_set import difference_hash, list_sticker_files, prepare_sticker_set


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def stickers(n: int, *, seed: int = 0) -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = Image.new("RGBA", (80, 60), (0, 0, 0, 0))
        draw = ImageDraw.Draw(img)
        for _ in range(4):
            pts = [tuple(int(v) for v in rng.integers(0, 80, 2)) for _ in range(4)]
            draw.polygon(pts, fill=(*(int(v) for v in rng.integers(0, 255, 3)), 255))
        out.append((f"s{i}.png", _png(img)))
    return out


def huge_png_header(width: int = 50000, height: int = 50000) -> bytes:
    """A valid PNG signature and IHDR claiming a huge image, with one tiny IDAT."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


TGS = gzip.compress(b'{"v":"5.5.2","fr":60,"ip":0,"op":180,"w":512,"h":512,"layers":[]}')


def test_alpha_is_composited_and_kept_as_mask() -> None:
    # transparent pixels hold garbage colour (bright green): it must not reach the training image
    img = Image.new("RGBA", (64, 32), (0, 255, 0, 0))
    ImageDraw.Draw(img).rectangle((8, 8, 24, 24), fill=(200, 0, 0, 255))
    files = [("a.png", _png(img)), *stickers(2, seed=4)]
    prepared = prepare_sticker_set(files, resolution=32, background=(255, 255, 255))
    rgb = np.asarray(prepared.images[0])
    mask = np.asarray(prepared.masks[0])
    assert prepared.images[0].size == (32, 32) and prepared.images[0].mode == "RGB"
    assert (rgb[mask == 0] == 255).all()  # transparent and padded pixels are the background
    assert rgb[mask == 255][:, 1].max() < 40  # the red square, no green
    # padded, not stretched: 64x32 fits as 32x16 in the middle rows
    assert mask[:8].max() == 0 and mask[24:].max() == 0
    other = prepare_sticker_set(files, resolution=32, background=(0, 0, 0))
    assert other.sha256 != prepared.sha256
    assert (np.asarray(other.images[0])[mask == 0] == 0).all()


def test_modes_exif_and_jpeg() -> None:
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
    jpeg = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: the 60x40 photo is really 40x60
    Image.fromarray(arr).save(jpeg, "JPEG", exif=exif)
    grey16 = Image.fromarray((np.linspace(0, 65535, 48 * 48).reshape(48, 48)).astype(np.uint16))
    buf16 = io.BytesIO()
    grey16.save(buf16, "PNG")
    cmyk = io.BytesIO()
    Image.new("CMYK", (50, 50), (0, 255, 255, 0)).save(cmyk, "JPEG")
    prepared = prepare_sticker_set([("photo.jpg", jpeg.getvalue()), ("deep.png", buf16.getvalue()),
                                    ("cmyk.jpg", cmyk.getvalue())], resolution=32)
    assert prepared.names == ["photo.jpg", "deep.png", "cmyk.jpg"]
    photo_mask = np.asarray(prepared.masks[0])
    # after EXIF rotation the photo is portrait: padding left and right, not top and bottom
    assert photo_mask[:, 0].max() == 0 and photo_mask[0, 16] == 255
    deep = np.asarray(prepared.images[1])
    assert deep.min() < 20 and deep.max() > 235  # 16-bit scaled, not clipped to white
    red = np.asarray(prepared.images[2])[16, 16]
    assert red[0] > 200 and red[1] < 60 and red[2] < 60


def test_duplicates_dropped_with_reasons() -> None:
    files = stickers(3)
    _name, data = files[0]
    resized = Image.open(io.BytesIO(data)).resize((160, 120))
    files += [("copy.png", data), ("bigger.png", _png(resized))]
    prepared = prepare_sticker_set(files, resolution=64)
    assert prepared.names == ["s0.png", "s1.png", "s2.png"]
    reasons = dict(prepared.skipped)
    assert "exact duplicate of s0.png" in reasons["copy.png"]
    assert "near duplicate of s0.png" in reasons["bigger.png"]
    assert difference_hash(prepared.images[0]) != difference_hash(prepared.images[1])


@pytest.mark.parametrize("files, expect", [
    ([], ["only 0 usable images", "no files were given"]),
    (stickers(2), ["only 2 usable images", "at least 3"]),
    ([*stickers(2), ("broken.png", _png(Image.new("RGB", (40, 40)))[:60])],
     ["broken.png", "corrupt"]),
    ([*stickers(2), ("notes.txt", b"hello, this is not an image at all")], ["notes.txt", "not an image"]),
    ([*stickers(2), ("bomb.png", huge_png_header())], ["bomb.png", "too large"]),
    ([*stickers(2), ("animated.tgs", TGS)], ["animated.tgs", "TGS"]),
])
def test_bad_sets_are_refused_naming_each_file(files: list[tuple[str, bytes]], expect: list[str]) -> None:
    with pytest.raises(StickerSetError) as err:
        prepare_sticker_set(files, resolution=64)
    for text in expect:
        assert text in str(err.value)


def test_usable_set_lists_what_was_skipped() -> None:
    prepared = prepare_sticker_set([*stickers(3), ("animated.tgs", TGS), ("bomb.png", huge_png_header())],
                                   resolution=64)
    assert len(prepared) == 3
    assert [n for n, _ in prepared.skipped] == ["animated.tgs", "bomb.png"]
    assert prepare_sticker_set(stickers(3), resolution=64).sha256 == prepared.sha256


def test_too_many_files() -> None:
    with pytest.raises(StickerSetError, match="at most 4"):
        prepare_sticker_set(stickers(5), resolution=32, max_images=4)


def test_paths_and_listing(tmp_path: Path) -> None:
    for name, data in stickers(3):
        (tmp_path / name).write_bytes(data)
    (tmp_path / ".hidden").write_bytes(b"x")
    files = list_sticker_files(tmp_path)
    assert [p.name for p in files] == ["s0.png", "s1.png", "s2.png"]
    assert prepare_sticker_set(files, resolution=32).names == ["s0.png", "s1.png", "s2.png"]
    with pytest.raises(StickerSetError, match="not a directory"):
        list_sticker_files(tmp_path / "missing")


def test_train_command_refuses_bad_input_before_loading_models(tmp_path: Path, tiny_zoo: Path,
                                                               capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STICKERBOT_TINY_ZOO_DIR", str(tiny_zoo))
    folder = tmp_path / "set"
    folder.mkdir()
    for name, data in [*stickers(2), ("corrupt.webp", b"RIFF\x00\x00\x00\x00WEBPjunk")]:
        (folder / name).write_bytes(data)
    out = tmp_path / "style"
    code = cli_main(["train", str(folder), "--out", str(out), "--preset", "tiny",
                     "--data-dir", str(tmp_path / "data"), "--class-noun", "cat"])
    err = capsys.readouterr().err
    assert code == 2
    assert "corrupt.webp" in err and "only 2 usable images" in err
    assert not out.exists() and not list(tmp_path.glob(".style*"))
