"""Albums arrive as separate updates sharing a ``media_group_id``, with no count and no end
signal. The collector processes each item as it comes and, once no new item arrived for
``delay`` seconds and none is still being processed, calls ``finish`` once with every outcome:
the user gets one acknowledgement per album."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

AlbumKey = tuple[int, str]  # (user id, media_group_id)


@dataclass
class Album:
    meta: dict[str, Any]  # what finish needs (chat, language), from the first item
    outcomes: list[Any] = field(default_factory=list)
    pending: int = 0
    last_seen: float = 0.0
    timer: asyncio.Task[None] | None = None


class AlbumCollector:
    def __init__(self, finish: Callable[[Album], Awaitable[None]], *, delay: float = 1.0) -> None:
        self.finish = finish
        self.delay = delay
        self._albums: dict[AlbumKey, Album] = {}

    def __len__(self) -> int:
        return len(self._albums)

    async def add(self, key: AlbumKey, meta: dict[str, Any], work: Awaitable[Any]) -> None:
        """Run ``work`` (one item's processing) and count its outcome towards the album."""
        album = self._albums.get(key)
        if album is None:
            album = self._albums[key] = Album(meta=meta)
        album.pending += 1
        album.last_seen = time.monotonic()
        try:
            outcome = await work
        except Exception as exc:  # one bad item must not lose the others' acknowledgement
            log.exception("album item failed")
            outcome = exc
        finally:
            album.pending -= 1
        album.outcomes.append(outcome)
        album.last_seen = time.monotonic()
        if album.timer is None or album.timer.done():
            album.timer = asyncio.create_task(self._wait_and_finish(key, album))

    async def _wait_and_finish(self, key: AlbumKey, album: Album) -> None:
        while True:
            quiet_for = time.monotonic() - album.last_seen
            if quiet_for >= self.delay and album.pending == 0:
                break
            await asyncio.sleep(max(0.05, self.delay - quiet_for))
        if self._albums.get(key) is album:
            del self._albums[key]
        try:
            await self.finish(album)
        except Exception:
            log.exception("acknowledging an album failed")

    async def close(self) -> None:
        """Flush albums still waiting (shutdown): their users still get the acknowledgement."""
        for album in list(self._albums.values()):
            if album.timer is not None:
                try:
                    await asyncio.wait_for(asyncio.shield(album.timer), timeout=self.delay + 5)
                except (TimeoutError, asyncio.CancelledError):
                    album.timer.cancel()
