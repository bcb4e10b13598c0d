"""Real sticker art with exact alpha on day one: emoji sets from the npm registry.

Twemoji (npm ``@twemoji/svg``, graphics CC-BY 4.0, © Twitter and other contributors) and
OpenMoji (npm ``openmoji``, ``color/svg/``, CC-BY-SA 4.0, © the OpenMoji contributors) are
vector artwork published as package tarballs. Each set here is pinned to one version and its
tarball is checked against the registry's ``sha512`` integrity hash before use; the tarball and
the rasterised PNGs are cached in a folder of the caller's choice (the data dir for the
product, a cache dir for benchmarks), never in the repository.

Rasterising needs ``cairosvg`` (the ``emoji`` extra; it loads the system's libcairo). Without it,
or without network on a first fetch, :func:`load_emoji_stickers` raises :class:`EmojiUnavailable`
with the reason; the bootstrap job logs it and trains without the set.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import os
import tarfile
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

DEFAULT_REGISTRY = "https://registry.npmjs.org"
FETCH_TIMEOUT = 60.0  # seconds for one tarball (1.5 MB and 4.3 MB)


class EmojiUnavailable(RuntimeError):
    """The emoji set could not be fetched, checked or rasterised (the message says why)."""


@dataclass(frozen=True)
class EmojiSet:
    name: str  # short name, used for cache folders
    package: str  # npm package
    version: str  # pinned
    integrity: str  # the registry's dist.integrity of that version
    svg_dir: str  # folder of the SVGs inside the tarball
    licence: str

    @property
    def tarball_name(self) -> str:
        return f"{self.package.rsplit('/', 1)[-1]}-{self.version}.tgz"

    def tarball_url(self, registry: str = DEFAULT_REGISTRY) -> str:
        return f"{registry.rstrip('/')}/{self.package}/-/{self.tarball_name}"


TWEMOJI = EmojiSet(
    name="twemoji",
    package="@twemoji/svg",
    version="15.0.0",
    integrity="sha512-ZSPef2B6nBaYnfgdTbAy4jgW95o7pi2xPGwGCU+WMTxo7J6B1lMPTWwSq/wTuiMq+N0khQ90CcvYp1wFoQpo/w==",
    svg_dir="package/",
    licence="CC-BY-4.0",
)
OPENMOJI = EmojiSet(
    name="openmoji",
    package="openmoji",
    version="17.0.0",
    integrity="sha512-EBnYrNGdcdw+OSXmENeNE1yBNRu6tOraTmoOyUbJkTmvT/+XETp8RZLSJFzD3lrPc5N9CzsyPnRTk0Vp4UaI9w==",
    svg_dir="package/color/svg/",
    licence="CC-BY-SA-4.0",
)
EMOJI_SETS = {s.name: s for s in (TWEMOJI, OPENMOJI)}


def integrity_of(data: bytes) -> str:
    """The npm ``dist.integrity`` string of ``data`` (Subresource Integrity, sha512)."""
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def check_integrity(data: bytes, expected: str) -> None:
    if integrity_of(data) != expected:
        raise EmojiUnavailable(f"the tarball's sha512 does not match the pinned integrity {expected[:20]}...")


def fetch_tarball(spec: EmojiSet, cache_dir: str | Path, *, registry: str = DEFAULT_REGISTRY,
                  timeout: float = FETCH_TIMEOUT) -> Path:
    """The set's tarball in ``cache_dir``, downloaded from the registry on first use. A cached
    copy is checked again; a download is checked before it is kept (written atomically)."""
    path = Path(cache_dir) / spec.tarball_name
    if path.exists():
        check_integrity(path.read_bytes(), spec.integrity)
        return path
    url = spec.tarball_url(registry)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = response.read()
    except OSError as exc:
        raise EmojiUnavailable(f"cannot download {url} ({exc.__class__.__name__}: {exc})") from exc
    check_integrity(data, spec.integrity)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path


def iter_svgs(tarball: Path, spec: EmojiSet) -> Iterator[tuple[str, bytes]]:
    """(stem, SVG bytes) of every SVG directly in the set's folder, sorted by name."""
    with tarfile.open(tarball, "r:gz") as tar:
        members = sorted(
            (m for m in tar.getmembers()
             if m.isfile() and m.name.startswith(spec.svg_dir) and m.name.endswith(".svg")
             and "/" not in m.name[len(spec.svg_dir):]),
            key=lambda m: m.name,
        )
        for member in members:
            handle = tar.extractfile(member)
            if handle is not None:
                yield Path(member.name).stem, handle.read()


def rasterise(svg: bytes, size: int = 512) -> Image.Image:
    """An SVG drawn into a ``size`` x ``size`` RGBA image (its aspect kept, centred)."""
    try:
        import cairosvg
    except (ImportError, OSError) as exc:  # OSError: the package is there, libcairo is not
        raise EmojiUnavailable(f"rasterising SVG needs cairosvg and libcairo ({exc})") from exc
    png = cairosvg.svg2png(bytestring=svg, output_width=size, output_height=size)
    image = Image.open(io.BytesIO(png)).convert("RGBA")
    if image.size != (size, size):
        canvas = Image.new("RGBA", (size, size), (0, 0, 0, 0))
        image.thumbnail((size, size))
        canvas.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
        image = canvas
    return image


def _pick(names: Sequence[str], limit: int | None, seed: int) -> list[int]:
    if limit is None or limit >= len(names):
        return list(range(len(names)))
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(len(names), size=limit, replace=False).tolist())


def load_emoji_stickers(spec: EmojiSet, cache_dir: str | Path, *, size: int = 512, limit: int | None = None,
                        seed: int = 0, registry: str = DEFAULT_REGISTRY) -> list[Image.Image]:
    """Up to ``limit`` emoji of the set (a seeded sample; all when None) as ``size``-px RGBA
    stickers. The rasterised PNGs are cached beside the tarball, so later calls read PNGs only.
    Emoji that draw nothing (fully transparent) are left out."""
    cache = Path(cache_dir)
    tarball = fetch_tarball(spec, cache, registry=registry)
    svgs = list(iter_svgs(tarball, spec))
    if not svgs:
        raise EmojiUnavailable(f"no SVG under {spec.svg_dir} in {tarball.name}")
    png_dir = cache / f"{spec.name}-{spec.version}" / str(size)
    png_dir.mkdir(parents=True, exist_ok=True)
    out: list[Image.Image] = []
    for index in _pick([stem for stem, _ in svgs], limit, seed):
        stem, svg = svgs[index]
        png = png_dir / f"{stem}.png"
        if png.exists():
            with Image.open(png) as img:
                image = img.convert("RGBA")
        else:
            image = rasterise(svg, size)
            tmp = png.with_name(f".{png.name}.{os.getpid()}.tmp")
            image.save(tmp, format="PNG")
            tmp.replace(png)
        if np.asarray(image.getchannel("A")).max() > 0:
            out.append(image)
    return out
