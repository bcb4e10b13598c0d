"""Getting a user's file from Telegram into the data dir, safely.

``getFile`` gives a ``file_path`` that is untrusted text: it is checked against a strict pattern
and only ever used inside the download URL, never joined into a local path. Files are capped at
Telegram's 20 MB bot limit (checked before the download, from the declared size, and again while
streaming), decoded with :func:`pipeline.images.decode_image` in a thread (CPU work), and stored
content-addressed with :meth:`DataDir.put_blob`.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass

from aiogram import Bot

from pipeline.errors import ImageError, InputError, NotAnImageError
from pipeline.images import decode_image
from pipeline.storage.files import DataDir

MAX_DOWNLOAD_BYTES = 20 * 1024 * 1024  # what the public Bot API lets bots download
# Telegram's paths look like "photos/file_12.jpg" or "stickers/file_3.webp".
_FILE_PATH = re.compile(r"^[A-Za-z0-9_\-]+(?:/[A-Za-z0-9_\-][A-Za-z0-9_.\-]*)*$")
_SUFFIX = {"PNG": ".png", "JPEG": ".jpg", "MPO": ".jpg", "WEBP": ".webp", "GIF": ".gif",
           "BMP": ".bmp", "TIFF": ".tif"}


class DownloadError(InputError):
    """A file could not be fetched from Telegram; ``reason_key`` names a text in bot.texts."""

    def __init__(self, reason_key: str, **values: object) -> None:
        self.reason_key = reason_key
        self.values = values
        super().__init__(reason_key)


@dataclass(frozen=True)
class StoredUpload:
    path: str  # relative to the data dir
    sha256: str
    width: int
    height: int


def check_file_path(file_path: str | None) -> str:
    """The API's ``file_path`` if it is a plain relative path; DownloadError otherwise."""
    if not file_path or len(file_path) > 256 or not _FILE_PATH.match(file_path):
        raise DownloadError("reason_bad_path")
    if any(part in ("", ".", "..") for part in file_path.split("/")):
        raise DownloadError("reason_bad_path")
    return file_path


async def download_bytes(bot: Bot, file_id: str, *, declared_size: int | None = None,
                         limit: int = MAX_DOWNLOAD_BYTES) -> bytes:
    """``getFile`` + a capped streaming download. Never logs the URL (it holds the token)."""
    if declared_size is not None and declared_size > limit:
        raise DownloadError("reason_too_big_file", mb=limit // (1024 * 1024))
    info = await bot.get_file(file_id)
    if info.file_size is not None and info.file_size > limit:
        raise DownloadError("reason_too_big_file", mb=limit // (1024 * 1024))
    path = check_file_path(info.file_path)
    url = bot.session.api.file_url(bot.token, path)
    chunks: list[bytes] = []
    total = 0
    try:
        async for chunk in bot.session.stream_content(url, timeout=60, raise_for_status=True):
            total += len(chunk)
            if total > limit:
                raise DownloadError("reason_too_big_file", mb=limit // (1024 * 1024))
            chunks.append(chunk)
    except DownloadError:
        raise
    except Exception as exc:  # aiohttp errors carry the URL, and with it the token: drop them
        raise DownloadError("reason_download", detail=type(exc).__name__) from None
    return b"".join(chunks)


def store_image(data_dir: DataDir, data: bytes, *, name: str, max_pixels: int) -> StoredUpload:
    """Decode (refusing bad images with an ImageError naming ``name``) and store the original
    bytes. Blocking: call it through ``asyncio.to_thread``."""
    decoded = decode_image(data, name=name, max_pixels=max_pixels)
    suffix = _SUFFIX.get(decoded.format)
    if suffix is None:
        raise NotAnImageError(name, f"unsupported image format {decoded.format}")
    rel, digest = data_dir.put_blob(data, suffix=suffix)
    width, height = decoded.image.size
    return StoredUpload(path=rel, sha256=digest, width=width, height=height)


async def fetch_image(bot: Bot, data_dir: DataDir, file_id: str, *, name: str,
                      declared_size: int | None, max_pixels: int) -> StoredUpload:
    """Download, check and store one image. Raises DownloadError or ImageError."""
    data = await download_bytes(bot, file_id, declared_size=declared_size)
    return await asyncio.to_thread(store_image, data_dir, data, name=name, max_pixels=max_pixels)


__all__ = [
    "MAX_DOWNLOAD_BYTES", "DownloadError", "ImageError", "StoredUpload", "check_file_path",
    "download_bytes", "fetch_image", "store_image",
]
