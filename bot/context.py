"""What every handler gets besides the update: one object holding the bot's services."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pipeline.queue.base import JobQueue
from pipeline.settings import Settings
from pipeline.storage.files import DataDir
from pipeline.storage.repository import Repository

if TYPE_CHECKING:
    from bot.albums import AlbumCollector
    from bot.notifier import Notifier


@dataclass
class BotContext:
    settings: Settings
    repo: Repository
    queue: JobQueue
    data: DataDir
    notifier: Notifier
    albums: AlbumCollector
    bot_username: str = ""
    # Background tasks started by handlers (pack imports), awaited or cancelled on shutdown.
    tasks: set = field(default_factory=set)  # set[asyncio.Task[None]]
    _locks: dict[int, asyncio.Lock] = field(default_factory=dict)

    def user_lock(self, user_id: int) -> asyncio.Lock:
        """Serialises one user's draft bookkeeping (album items arrive concurrently)."""
        if len(self._locks) > 10_000:
            self._locks = {k: v for k, v in self._locks.items() if v.locked()}
        return self._locks.setdefault(user_id, asyncio.Lock())
