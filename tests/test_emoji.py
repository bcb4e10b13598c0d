"""The emoji-set fetch: pinned tarball from a registry (here a local folder standing in for it),
integrity checked, SVGs rasterised to RGBA and cached. No network."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from segmentation.emoji import EmojiSet, EmojiUnavailable, fetch_tarball, integrity_of, load_emoji_stickers

SVG = (b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 36 36">'
       b'<circle cx="18" cy="18" r="12" fill="#%s"/></svg>')


def _registry(tmp_path: Path) -> tuple[str, EmojiSet]:
    """A registry folder holding one package tarball of three SVGs (one in a subfolder)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, colour in (("package/svg/1f600.svg", b"f80"), ("package/svg/1f601.svg", b"08f"),
                             ("package/svg/extra/skip.svg", b"000")):
            data = SVG % colour
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buffer.getvalue()
    spec = EmojiSet(name="demo", package="@demo/svg", version="1.0.0", integrity=integrity_of(data),
                    svg_dir="package/svg/", licence="CC0-1.0")
    folder = tmp_path / "registry" / "@demo" / "svg" / "-"
    folder.mkdir(parents=True)
    (folder / spec.tarball_name).write_bytes(data)
    return (tmp_path / "registry").as_uri(), spec


def test_fetch_checks_integrity_and_caches(tmp_path: Path) -> None:
    registry, spec = _registry(tmp_path)
    bad = EmojiSet(**{**spec.__dict__, "integrity": integrity_of(b"something else")})
    with pytest.raises(EmojiUnavailable, match="sha512"):
        fetch_tarball(bad, tmp_path / "cache-bad", registry=registry)
    assert not (tmp_path / "cache-bad" / spec.tarball_name).exists()  # a bad download is not kept
    path = fetch_tarball(spec, tmp_path / "cache", registry=registry)
    assert path.read_bytes() == (tmp_path / "registry/@demo/svg/-" / spec.tarball_name).read_bytes()
    # Cached: no registry needed any more; offline without a cache fails with the reason.
    assert fetch_tarball(spec, tmp_path / "cache", registry="file:///nonexistent") == path
    with pytest.raises(EmojiUnavailable, match="cannot download"):
        fetch_tarball(spec, tmp_path / "empty", registry="file:///nonexistent")


def test_rasterised_emoji_keep_their_alpha(tmp_path: Path) -> None:
    try:
        import cairosvg  # noqa: F401
    except (ImportError, OSError) as exc:  # OSError: the package is there, libcairo is not
        pytest.skip(f"rasterising needs the emoji extra and libcairo ({exc})")
    registry, spec = _registry(tmp_path)
    images = load_emoji_stickers(spec, tmp_path / "cache", size=64, registry=registry)
    assert len(images) == 2  # the subfolder's SVG is not part of the set
    alpha = np.asarray(images[0].getchannel("A"))
    assert images[0].size == (64, 64) and alpha[32, 32] == 255 and alpha[0, 0] == 0
    assert np.asarray(images[0])[32, 32, :3].tolist() == [255, 136, 0]
    assert len(list((tmp_path / "cache" / "demo-1.0.0" / "64").glob("*.png"))) == 2
