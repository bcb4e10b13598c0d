"""aiogram FSM storage on the product's SQLite database (the ``fsm`` table), so a bot restart keeps
every conversation. State and data are stored as JSON text, never pickle: a row read back can only
ever be plain data.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import aiosqlite
from aiogram.fsm.state import State
from aiogram.fsm.storage.base import BaseStorage, StateType, StorageKey


def storage_key(key: StorageKey) -> str:
    """``bot:chat:user:thread:destiny``. The user id sits between colons, which is what
    ``Repository.delete_user`` matches (``%:<user id>:%``) to forget a user's conversations."""
    thread = "" if key.thread_id is None else str(key.thread_id)
    business = key.business_connection_id or ""
    return f"{key.bot_id}:{key.chat_id}:{key.user_id}:{thread}:{business}:{key.destiny}"


class SQLiteStorage(BaseStorage):
    """FSM storage on an open aiosqlite connection (shared with the repository, not closed here)."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self.conn = conn

    async def set_state(self, key: StorageKey, state: StateType = None) -> None:
        value = state.state if isinstance(state, State) else state
        await self.conn.execute(
            "INSERT INTO fsm (key, state, data) VALUES (?, ?, '{}') "
            "ON CONFLICT(key) DO UPDATE SET state = excluded.state",
            (storage_key(key), value),
        )

    async def get_state(self, key: StorageKey) -> str | None:
        async with self.conn.execute("SELECT state FROM fsm WHERE key = ?", (storage_key(key),)) as cur:
            row = await cur.fetchone()
        return None if row is None else row[0]

    async def set_data(self, key: StorageKey, data: Mapping[str, Any]) -> None:
        # json.dumps refuses anything that is not plain data, instead of pickling it silently.
        text = json.dumps(dict(data), ensure_ascii=False, separators=(",", ":"))
        await self.conn.execute(
            "INSERT INTO fsm (key, state, data) VALUES (?, NULL, ?) "
            "ON CONFLICT(key) DO UPDATE SET data = excluded.data",
            (storage_key(key), text),
        )

    async def get_data(self, key: StorageKey) -> dict[str, Any]:
        async with self.conn.execute("SELECT data FROM fsm WHERE key = ?", (storage_key(key),)) as cur:
            row = await cur.fetchone()
        if row is None or not row[0]:
            return {}
        try:
            data = json.loads(row[0])
        except json.JSONDecodeError:
            return {}  # a damaged row must not wedge the user's conversation
        return data if isinstance(data, dict) else {}

    async def close(self) -> None:
        """The connection belongs to the application, which closes it."""
