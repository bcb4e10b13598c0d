"""Typed records and the queries that read and write them. Parameterized SQL only.

Jobs live in the same database but belong to :mod:`pipeline.queue.sqlite`.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import aiosqlite

STYLE_STATUSES = ("draft", "queued", "training", "ready", "failed")


def new_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class User:
    id: int
    language: str | None
    active_style_id: str | None
    pack_name: str | None
    created_at: float


@dataclass(frozen=True)
class Style:
    id: str
    user_id: int
    name: str
    status: str
    class_noun: str | None
    identifier: str | None
    style_dir: str | None
    error: str | None
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class StoredImage:
    id: int
    style_id: str
    sha256: str
    path: str
    width: int
    height: int
    source: str


@dataclass(frozen=True)
class Sticker:
    id: str
    user_id: int
    style_id: str | None
    job_id: str | None
    path: str
    emoji: str
    caption: str
    seed: int | None
    in_pack: bool
    telegram_file_id: str | None
    created_at: float


@dataclass(frozen=True)
class PackImport:
    """A sticker-pack import in progress (``pack_imports``)."""

    user_id: int
    pack: str
    title: str
    style_id: str
    chat_id: int
    message_id: int
    lang: str
    done: int
    added: int
    skipped: int
    started_at: float


def _row(cls: type, row: aiosqlite.Row | None) -> Any:
    if row is None:
        return None
    names = cls.__dataclass_fields__  # type: ignore[attr-defined]
    # sqlite3.Row iterates over values, so its keys() is needed here.
    values = {k: row[k] for k in row.keys() if k in names}  # noqa: SIM118
    if "in_pack" in values:
        values["in_pack"] = bool(values["in_pack"])
    return cls(**values)


class Repository:
    """Reads and writes users, styles, images and stickers on one connection."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self.conn = conn

    async def _one(self, cls: type, sql: str, args: tuple[Any, ...]) -> Any:
        async with self.conn.execute(sql, args) as cur:
            return _row(cls, await cur.fetchone())

    async def _all(self, cls: type, sql: str, args: tuple[Any, ...]) -> list[Any]:
        async with self.conn.execute(sql, args) as cur:
            return [_row(cls, r) for r in await cur.fetchall()]

    async def _scalar(self, sql: str, args: tuple[Any, ...] = ()) -> Any:
        """The first column of the first row (None without one)."""
        async with self.conn.execute(sql, args) as cur:
            row = await cur.fetchone()
        return None if row is None else row[0]

    # --- users ------------------------------------------------------------------------
    async def ensure_user(self, user_id: int, *, language: str | None = None) -> User:
        now = time.time()
        await self.conn.execute(
            "INSERT INTO users (id, language, created_at, updated_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(id) DO NOTHING",
            (user_id, language, now, now),
        )
        return await self.get_user(user_id)  # type: ignore[return-value]

    async def get_user(self, user_id: int) -> User | None:
        return await self._one(User, "SELECT * FROM users WHERE id = ?", (user_id,))

    async def update_user(self, user_id: int, **fields: Any) -> None:
        allowed = {"language", "active_style_id", "pack_name"}
        bad = set(fields) - allowed
        if bad:
            raise ValueError(f"cannot update user fields {sorted(bad)}")
        sets = ", ".join(f"{k} = ?" for k in fields)
        await self.conn.execute(
            f"UPDATE users SET {sets}, updated_at = ? WHERE id = ?",
            (*fields.values(), time.time(), user_id),
        )

    async def delete_user(self, user_id: int) -> None:
        """Every row of the user (styles, images and stickers cascade; jobs deleted here)."""
        await self.conn.execute("BEGIN IMMEDIATE")
        try:
            await self.conn.execute("DELETE FROM jobs WHERE user_id = ?", (user_id,))
            await self.conn.execute("DELETE FROM users WHERE id = ?", (user_id,))
            await self.conn.execute("DELETE FROM fsm WHERE key LIKE ?", (f"%:{user_id}:%",))
            await self.conn.execute("COMMIT")
        except BaseException:
            await self.conn.execute("ROLLBACK")
            raise

    # --- styles -----------------------------------------------------------------------
    async def create_style(self, user_id: int, name: str, *, status: str = "draft") -> Style:
        now = time.time()
        style_id = new_id()
        await self.conn.execute(
            "INSERT INTO styles (id, user_id, name, status, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (style_id, user_id, name, status, now, now),
        )
        return await self.get_style(style_id)  # type: ignore[return-value]

    async def get_style(self, style_id: str) -> Style | None:
        return await self._one(Style, "SELECT * FROM styles WHERE id = ?", (style_id,))

    async def get_user_style(self, user_id: int, style_id: str) -> Style | None:
        """The style only if ``user_id`` owns it: the check behind every callback."""
        return await self._one(
            Style, "SELECT * FROM styles WHERE id = ? AND user_id = ?", (style_id, user_id)
        )

    async def list_styles(self, user_id: int, *, status: str | None = None) -> list[Style]:
        if status is None:
            return await self._all(
                Style, "SELECT * FROM styles WHERE user_id = ? ORDER BY created_at", (user_id,)
            )
        return await self._all(
            Style,
            "SELECT * FROM styles WHERE user_id = ? AND status = ? ORDER BY created_at",
            (user_id, status),
        )

    async def update_style(self, style_id: str, **fields: Any) -> None:
        allowed = {"name", "status", "class_noun", "identifier", "style_dir", "error"}
        bad = set(fields) - allowed
        if bad:
            raise ValueError(f"cannot update style fields {sorted(bad)}")
        if "status" in fields and fields["status"] not in STYLE_STATUSES:
            raise ValueError(f"unknown style status {fields['status']!r}")
        sets = ", ".join(f"{k} = ?" for k in fields)
        await self.conn.execute(
            f"UPDATE styles SET {sets}, updated_at = ? WHERE id = ?",
            (*fields.values(), time.time(), style_id),
        )

    async def delete_style(self, style_id: str) -> None:
        await self.conn.execute("DELETE FROM styles WHERE id = ?", (style_id,))

    # --- images of a style's set ------------------------------------------------------
    async def add_image(self, style_id: str, *, sha256: str, path: str, width: int, height: int,
                        source: str) -> bool:
        """False when the same bytes are already in the set."""
        cur = await self.conn.execute(
            "INSERT INTO images (style_id, sha256, path, width, height, source, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(style_id, sha256) DO NOTHING",
            (style_id, sha256, path, width, height, source, time.time()),
        )
        return cur.rowcount == 1

    async def list_images(self, style_id: str) -> list[StoredImage]:
        return await self._all(
            StoredImage, "SELECT * FROM images WHERE style_id = ? ORDER BY id", (style_id,)
        )

    async def count_images(self, style_id: str) -> int:
        return int(await self._scalar("SELECT COUNT(*) FROM images WHERE style_id = ?", (style_id,)) or 0)

    async def references(self, path: str) -> int:
        """How many image and sticker rows name a stored file (0: nothing needs it any more)."""
        return int(await self._scalar(
            "SELECT (SELECT COUNT(*) FROM images WHERE path = ?) + "
            "(SELECT COUNT(*) FROM stickers WHERE path = ?)", (path, path)) or 0)

    # --- stickers ---------------------------------------------------------------------
    async def add_sticker(self, *, user_id: int, style_id: str | None, job_id: str | None,
                          path: str, emoji: str, caption: str, seed: int | None) -> Sticker:
        sticker_id = new_id()
        await self.conn.execute(
            "INSERT INTO stickers (id, user_id, style_id, job_id, path, emoji, caption, seed, "
            "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (sticker_id, user_id, style_id, job_id, path, emoji, caption, seed, time.time()),
        )
        return await self.get_sticker(sticker_id)  # type: ignore[return-value]

    async def get_sticker(self, sticker_id: str) -> Sticker | None:
        return await self._one(Sticker, "SELECT * FROM stickers WHERE id = ?", (sticker_id,))

    async def get_user_sticker(self, user_id: int, sticker_id: str) -> Sticker | None:
        return await self._one(
            Sticker, "SELECT * FROM stickers WHERE id = ? AND user_id = ?", (sticker_id, user_id)
        )

    async def mark_sticker(self, sticker_id: str, *, in_pack: bool | None = None,
                           telegram_file_id: str | None = None) -> None:
        if in_pack is not None:
            await self.conn.execute(
                "UPDATE stickers SET in_pack = ? WHERE id = ?", (int(in_pack), sticker_id)
            )
        if telegram_file_id is not None:
            await self.conn.execute(
                "UPDATE stickers SET telegram_file_id = ? WHERE id = ?",
                (telegram_file_id, sticker_id),
            )

    async def count_stickers_since(self, user_id: int, since: float) -> int:
        return int(await self._scalar(
            "SELECT COUNT(*) FROM stickers WHERE user_id = ? AND created_at >= ?", (user_id, since)) or 0)

    async def sticker_for_result(self, job_id: str, path: str) -> str | None:
        """The id of the sticker row already made from one file of a job's result, if any."""
        found = await self._scalar("SELECT id FROM stickers WHERE job_id = ? AND path = ?", (job_id, path))
        return None if found is None else str(found)

    async def sticker_paths(self, user_id: int) -> list[str]:
        async with self.conn.execute("SELECT path FROM stickers WHERE user_id = ?", (user_id,)) as cur:
            return [str(row[0]) for row in await cur.fetchall()]

    # --- the operator's view -----------------------------------------------------------
    async def totals(self) -> dict[str, int]:
        """Row counts of users, styles and stickers."""
        return {table: int(await self._scalar(f"SELECT COUNT(*) FROM {table}") or 0)
                for table in ("users", "styles", "stickers")}

    async def job_leases(self, now: float) -> tuple[int, int, float | None]:
        """(running jobs with a live lease, running jobs whose lease expired, when the last job
        finished): how the workers are doing, from the jobs table in the same database."""
        live = await self._scalar(
            "SELECT COUNT(*) FROM jobs WHERE state = 'running' AND lease_expires_at >= ?", (now,))
        stale = await self._scalar(
            "SELECT COUNT(*) FROM jobs WHERE state = 'running' AND lease_expires_at < ?", (now,))
        last = await self._scalar("SELECT MAX(finished_at) FROM jobs")
        return int(live or 0), int(stale or 0), None if last is None else float(last)

    # --- pack imports -----------------------------------------------------------------
    async def start_import(self, *, user_id: int, pack: str, title: str, style_id: str, chat_id: int,
                           message_id: int, lang: str) -> PackImport:
        """Record an import that starts now (replacing an earlier record of the same pack)."""
        await self.conn.execute(
            "INSERT OR REPLACE INTO pack_imports (user_id, pack, title, style_id, chat_id, message_id, "
            "lang, started_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (user_id, pack, title, style_id, chat_id, message_id, lang, time.time()))
        record = await self.get_import(user_id, pack)
        assert record is not None
        return record

    async def get_import(self, user_id: int, pack: str) -> PackImport | None:
        return await self._one(PackImport, "SELECT * FROM pack_imports WHERE user_id = ? AND pack = ?",
                               (user_id, pack))

    async def import_progress(self, user_id: int, pack: str, *, done: int, added: int, skipped: int) -> None:
        await self.conn.execute(
            "UPDATE pack_imports SET done = ?, added = ?, skipped = ? WHERE user_id = ? AND pack = ?",
            (done, added, skipped, user_id, pack))

    async def finish_import(self, user_id: int, pack: str) -> None:
        await self.conn.execute("DELETE FROM pack_imports WHERE user_id = ? AND pack = ?", (user_id, pack))

    async def pending_imports(self) -> list[PackImport]:
        """Imports a bot process started and did not finish, oldest first."""
        return await self._all(PackImport, "SELECT * FROM pack_imports ORDER BY started_at", ())

    async def forget_dialogue(self, user_id: int) -> None:
        """Drop the user's conversation state rows (aiogram's FSM storage)."""
        await self.conn.execute("DELETE FROM fsm WHERE key LIKE ?", (f"%:{user_id}:%",))
