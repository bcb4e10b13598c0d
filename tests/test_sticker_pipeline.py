"""make_sticker end to end on the tiny preset: every output is a valid Telegram sticker, bad
input gives a specific error, seeds reproduce. Own models (adapters are added to the UNet)."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from pictures import assert_different_pictures, assert_same_picture
from PIL import Image

from pipeline.errors import (
    ImageTooLargeError,
    ImageTooSmallError,
    InputError,
    NotAnImageError,
    StyleError,
    UnsupportedStickerError,
)
from pipeline.models import load_models
from pipeline.settings import Settings, load_settings
from pipeline.stickers.generation import StyleRef, write_random_style
from pipeline.stickers.postprocess import MAX_STICKER_BYTES, check_sticker
from pipeline.stickers.sticker_pipeline import STAGES, StickerModels, StickerOptions, make_sticker

FAST = {"steps": 4, "strength": 0.5}  # 2 denoising steps: the pipeline, not the quality, is tested
REPO = Path(__file__).resolve().parents[1]




@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory, tiny_zoo: Path) -> Settings:
    return load_settings(preset="tiny", data_dir=tmp_path_factory.mktemp("sticker-data"),
                         tiny_zoo_dir=tiny_zoo, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def sticker_models(settings: Settings) -> StickerModels:
    return StickerModels.create(load_models(settings), cache_size=2)


@pytest.fixture(scope="module")
def style_dir(tmp_path_factory: pytest.TempPathFactory, sticker_models: StickerModels) -> Path:
    path = tmp_path_factory.mktemp("styles") / "mystyle"
    write_random_style(sticker_models.models.diffusion, path, seed=3, class_noun="dog")
    return path


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def photo(w: int = 96, h: int = 72, seed: int = 0) -> Image.Image:
    """A smooth photo-like image: a coloured blob on a gradient."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rng = np.random.default_rng(seed)
    base = np.stack([xx / w * 200, yy / h * 200, np.full_like(xx, 120)], -1)
    blob = ((xx - w / 2) ** 2 / (w / 4) ** 2 + (yy - h / 2) ** 2 / (h / 4) ** 2) < 1
    base[blob] = rng.integers(0, 255, 3)
    return Image.fromarray(base.astype(np.uint8), "RGB")


def bomb_png() -> bytes:
    """A tiny PNG whose header claims 30000 x 30000 pixels."""
    data = bytearray(encode(Image.new("RGB", (8, 8)), "PNG"))
    ihdr = 8 + 8  # signature, then length + type of the IHDR chunk
    data[ihdr:ihdr + 8] = struct.pack(">II", 30000, 30000)
    crc = zlib.crc32(bytes(data[12:ihdr + 13]))
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    return encode(photo(120, 60), "JPEG", exif=exif.tobytes())


def rgba_photo() -> bytes:
    img = photo(80, 80).convert("RGBA")
    arr = np.asarray(img).copy()
    arr[:, :20, 3] = 0
    arr[:, 20:30, 3] = 100
    return encode(Image.fromarray(arr, "RGBA"), "PNG")


GOOD_INPUTS = {
    "jpeg": lambda: encode(photo(), "JPEG"),
    "panorama": lambda: encode(photo(10000, 300), "JPEG", quality=70),
    "grayscale": lambda: encode(photo().convert("L"), "JPEG"),
    "cmyk": lambda: encode(photo().convert("CMYK"), "JPEG"),
    "png16": lambda: encode(Image.fromarray(np.asarray(photo().convert("L"), np.uint16) * 257), "PNG"),
    "exif_rotated": exif_rotated_jpeg,
    "rgba_photo": rgba_photo,
    "webp": lambda: encode(photo(), "WEBP"),
}

BAD_INPUTS = {
    "not_an_image": (lambda: b"hello, this is text", NotAnImageError),
    "empty": (lambda: b"", NotAnImageError),
    "corrupt": (lambda: encode(photo(), "JPEG")[:300], NotAnImageError),
    "garbled_header": (lambda: b"\x89PNG\r\n\x1a\n" + os.urandom(200), NotAnImageError),
    "bomb": (bomb_png, ImageTooLargeError),
    "one_pixel": (lambda: encode(Image.new("RGB", (1, 1)), "PNG"), ImageTooSmallError),
    "tgs": (lambda: gzip.compress(b'{"tgs": 1}'), UnsupportedStickerError),
}


def assert_telegram_sticker(data: bytes) -> None:
    w, h = check_sticker(data)  # WEBP, one side exactly 512, the other at most 512, size cap
    assert max(w, h) == 512 and min(w, h) <= 512 and len(data) <= MAX_STICKER_BYTES
    img = Image.open(io.BytesIO(data))
    img.load()
    assert img.mode == "RGBA"
    assert (np.asarray(img.getchannel("A")) == 0).any()  # some fully transparent pixels


@pytest.mark.parametrize("kind", sorted(GOOD_INPUTS))
def test_every_input_gives_a_valid_sticker(kind: str, sticker_models, style_dir) -> None:
    result = make_sticker(sticker_models, style_dir, GOOD_INPUTS[kind](), StickerOptions(**FAST),
                          photo_name=f"{kind}.img")
    assert len(result.webp) == 1
    assert_telegram_sticker(result.webp[0])


@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
def test_bad_input_is_a_clear_error(kind: str, sticker_models, style_dir) -> None:
    make, error = BAD_INPUTS[kind]
    with pytest.raises(error) as info:
        make_sticker(sticker_models, style_dir, make(), StickerOptions(**FAST), photo_name=f"{kind}.jpg")
    assert f"{kind}.jpg" in str(info.value)  # names the file


def test_result_and_variants(sticker_models, style_dir) -> None:
    data = encode(photo(seed=1), "JPEG")
    result = make_sticker(sticker_models, style_dir, data,
                          StickerOptions(seed=5, variants=2, stroke=6, shadow=True, **FAST))
    assert len(result.webp) == 2 and result.seeds == [5, 6] and len(result.sizes) == 2
    for sticker in result.webp:
        assert_telegram_sticker(sticker)
    assert_different_pictures(result.webp[0], result.webp[1])  # different seeds, different stickers
    assert result.prompt.startswith("a zqv dog sticker")
    assert result.caption in result.prompt
    assert result.emoji and result.style_id == "mystyle"
    assert set(STAGES) <= set(result.timings) and all(v >= 0 for v in result.timings.values())
    assert result.timings["total"] >= result.timings["diffusion"]
    # The same request on the same machine gives the same stickers, byte for byte.
    same = make_sticker(sticker_models, style_dir, data,
                        StickerOptions(seed=5, variants=2, stroke=6, shadow=True, **FAST))
    assert same.webp == result.webp
    # A variant's seed reproduces its picture alone, but not its bytes: a batch of two runs
    # other kernels than a batch of one, and the last bits differ on some CPUs.
    alone = make_sticker(sticker_models, style_dir, data,
                         StickerOptions(seed=6, stroke=6, shadow=True, **FAST))
    assert_same_picture(alone.webp[0], result.webp[1])


def test_background_removal_mirrors_by_default(sticker_models, style_dir, monkeypatch) -> None:
    import segmentation.removal as removal

    seen: list[bool] = []
    real = removal.remove_background

    def spy(segmenter, images, **kwargs):
        seen.append(kwargs.get("flip", False))
        return real(segmenter, images, **kwargs)

    monkeypatch.setattr(removal, "remove_background", spy)
    data = encode(photo(seed=2), "JPEG")
    assert_telegram_sticker(make_sticker(sticker_models, style_dir, data, StickerOptions(**FAST)).webp[0])
    assert_telegram_sticker(
        make_sticker(sticker_models, style_dir, data, StickerOptions(flip=False, **FAST)).webp[0])
    assert seen == [True, False]


def test_style_matters_and_base_differs(sticker_models, style_dir, tmp_path) -> None:
    data = encode(photo(seed=2), "JPEG")
    other = tmp_path / "other"
    write_random_style(sticker_models.models.diffusion, other, seed=8, class_noun="dog")
    mine = make_sticker(sticker_models, style_dir, data, StickerOptions(**FAST))
    theirs = make_sticker(sticker_models, other, data, StickerOptions(**FAST))
    assert mine.webp[0] != theirs.webp[0]
    assert make_sticker(sticker_models, style_dir, data, StickerOptions(**FAST)).webp == mine.webp


def test_style_without_a_usable_adapter_is_a_style_error(sticker_models, style_dir, tmp_path) -> None:
    data = encode(photo(), "JPEG")
    broken = tmp_path / "brokenstyle"
    shutil.copytree(style_dir, broken)
    weights = broken / "pytorch_lora_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(StyleError, match="brokenstyle"):
        make_sticker(sticker_models, broken, data, StickerOptions(**FAST))
    weights.unlink()
    with pytest.raises(StyleError, match="brokenstyle"):
        make_sticker(sticker_models, broken, data, StickerOptions(**FAST))
    with pytest.raises(StyleError, match="user42"):
        make_sticker(sticker_models, StyleRef.open(broken, style_id="user42"), data)
    with pytest.raises(StyleError, match="nothere"):
        make_sticker(sticker_models, tmp_path / "nothere", data)


@pytest.mark.parametrize("kwargs, message", [
    ({"variants": 0}, "variants"),
    ({"variants": 9}, "variants"),
    ({"seed": -1}, "seed"),
    ({"strength": 1.5}, "strength"),
    ({"stroke": -2}, "stroke"),
    ({"prompt_template": "a {class_noun} sticker"}, "identifier"),
    ({"prompt_template": "a {identifier} {mood} sticker"}, "unknown"),
])
def test_bad_options_are_input_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        StickerOptions(**kwargs)


def test_cli_writes_stickers(sticker_models, style_dir, settings, tmp_path, monkeypatch, capsys) -> None:
    from pipeline.cli import main

    src = tmp_path / "me.jpg"
    src.write_bytes(encode(photo(seed=4), "JPEG"))
    monkeypatch.setenv("STICKERBOT_TINY_ZOO_DIR", str(settings.zoo_dir))
    monkeypatch.setenv("STICKERBOT_DEVICE", "cpu")
    monkeypatch.setenv("STICKERBOT_DTYPE", "float32")
    out = tmp_path / "out" / "s.webp"
    rc = main(["sticker", str(src), "--style", str(style_dir), "-o", str(out), "--variants", "2",
               "--seed", "3", "--steps", "4", "--strength", "0.5", "--preset", "tiny",
               "--data-dir", str(tmp_path / "data")])
    assert rc == 0
    for path in (out, tmp_path / "out" / "s-2.webp"):
        assert_telegram_sticker(path.read_bytes())
    assert "caption:" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["PHOTO_TEXT"], "not an image"),
    (["MISSING"], "cannot read"),
    (["PHOTO_OK", "--variants", "0"], "variants"),
    (["PHOTO_OK", "--style", "NOSTYLE"], "nostyle"),
])
def test_cli_bad_input_exits_2(args: list[str], message: str, style_dir, tiny_env, tmp_path) -> None:
    text = tmp_path / "notes.jpg"
    text.write_text("not a photo")
    ok = tmp_path / "ok.jpg"
    ok.write_bytes(encode(photo(), "JPEG"))
    subst = {"PHOTO_TEXT": str(text), "MISSING": str(tmp_path / "missing.jpg"), "PHOTO_OK": str(ok),
             "NOSTYLE": str(tmp_path / "nostyle")}
    argv = [subst.get(a, a) for a in args]
    if "--style" not in argv:
        argv += ["--style", str(style_dir)]
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "sticker", *argv, "-o",
                           str(tmp_path / "o.webp")], cwd=REPO, env=tiny_env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o.webp").exists()
