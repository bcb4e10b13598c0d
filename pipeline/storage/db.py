"""The product's SQLite database: connection setup (WAL) and forward-only migrations.

The schema version lives in ``PRAGMA user_version``. Each migration is a list of statements
applied in one transaction; running :func:`migrate` again changes nothing. Add a migration by
appending to ``MIGRATIONS``; never edit a released one.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import aiosqlite

MIGRATIONS: list[list[str]] = [
    # 1: users, styles (a draft style holds the uploaded set), images, jobs, stickers, FSM.
    [
        """CREATE TABLE users (
            id INTEGER PRIMARY KEY,              -- Telegram user id
            language TEXT,                       -- 'en' | 'ru'; NULL = from Telegram
            active_style_id TEXT,
            pack_name TEXT,                      -- the user's sticker pack, once created
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        )""",
        """CREATE TABLE styles (
            id TEXT PRIMARY KEY,
            user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            name TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('draft','queued','training','ready','failed')),
            class_noun TEXT,
            identifier TEXT,
            style_dir TEXT,                      -- relative to the data dir
            error TEXT,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        )""",
        "CREATE INDEX styles_user ON styles(user_id, created_at)",
        """CREATE TABLE images (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            style_id TEXT NOT NULL REFERENCES styles(id) ON DELETE CASCADE,
            sha256 TEXT NOT NULL,
            path TEXT NOT NULL,                  -- relative to the data dir, content-addressed
            width INTEGER NOT NULL,
            height INTEGER NOT NULL,
            source TEXT NOT NULL,                -- sticker | photo | document | pack
            created_at REAL NOT NULL,
            UNIQUE (style_id, sha256)
        )""",
        """CREATE TABLE jobs (
            id TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('queued','running','succeeded','failed','cancelled')),
            user_id INTEGER NOT NULL,
            priority INTEGER NOT NULL DEFAULT 0,  -- higher runs first
            payload TEXT NOT NULL DEFAULT '{}',   -- JSON
            attempts INTEGER NOT NULL DEFAULT 0,
            max_attempts INTEGER NOT NULL DEFAULT 3,
            worker_id TEXT,
            lease_expires_at REAL,
            cancel_requested INTEGER NOT NULL DEFAULT 0,
            progress REAL NOT NULL DEFAULT 0,
            progress_message TEXT NOT NULL DEFAULT '',
            result TEXT,                          -- JSON
            error TEXT,
            created_at REAL NOT NULL,
            started_at REAL,
            finished_at REAL,
            updated_at REAL NOT NULL
        )""",
        "CREATE INDEX jobs_claim ON jobs(state, priority DESC, created_at)",
        "CREATE INDEX jobs_user ON jobs(user_id, created_at)",
        """CREATE TABLE stickers (
            id TEXT PRIMARY KEY,
            user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            style_id TEXT,
            job_id TEXT,
            path TEXT NOT NULL,                  -- relative to the data dir
            emoji TEXT NOT NULL DEFAULT '🙂',
            caption TEXT NOT NULL DEFAULT '',
            seed INTEGER,
            in_pack INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL
        )""",
        "CREATE INDEX stickers_user ON stickers(user_id, created_at)",
        """CREATE TABLE fsm (
            key TEXT PRIMARY KEY,
            state TEXT,
            data TEXT NOT NULL DEFAULT '{}'       -- JSON, never pickle
        )""",
    ],
    # 2: Telegram's file_id of a sent sticker (to add it to a pack without re-uploading) and a
    #    per-job timing record for queue ETAs.
    [
        "ALTER TABLE stickers ADD COLUMN telegram_file_id TEXT",
        "ALTER TABLE jobs ADD COLUMN duration REAL",
        "CREATE INDEX jobs_kind_finished ON jobs(kind, state, finished_at)",
    ],
    # 3: when the bot delivered a finished job's outcome to its user. A finished job with no
    #    delivered_at is delivered after a bot restart, so no result is lost.
    [
        "ALTER TABLE jobs ADD COLUMN delivered_at REAL",
        "CREATE INDEX jobs_undelivered ON jobs(delivered_at, finished_at)",
    ],
    # 4: the job queue's change cursor. Every job write sets updated_at above the current
    #    maximum inside its write transaction, so updated_at orders commits and the bot's one
    #    event loop reads "jobs changed after the cursor" through this index.
    [
        "CREATE INDEX jobs_updated ON jobs(updated_at)",
    ],
    # 5: sticker-pack imports in progress. The bot writes one when an import starts, moves
    #    ``done`` on after each sticker and deletes it at the end; a row left by a bot that died
    #    is picked up at the next start and the import goes on from ``done``.
    [
        """CREATE TABLE pack_imports (
            user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            pack TEXT NOT NULL,                  -- the sticker set's name
            title TEXT NOT NULL,
            style_id TEXT NOT NULL REFERENCES styles(id) ON DELETE CASCADE,
            chat_id INTEGER NOT NULL,
            message_id INTEGER NOT NULL,         -- the progress message
            lang TEXT NOT NULL,
            done INTEGER NOT NULL DEFAULT 0,     -- stickers of the pack handled, in pack order
            added INTEGER NOT NULL DEFAULT 0,
            skipped INTEGER NOT NULL DEFAULT 0,
            started_at REAL NOT NULL,
            PRIMARY KEY (user_id, pack)
        )""",
    ],
]

LATEST_VERSION = len(MIGRATIONS)


async def connect(path: Path | str) -> aiosqlite.Connection:
    """Open the database with the settings every process uses (WAL, foreign keys, busy wait)."""
    path = Path(path)
    if str(path) != ":memory:":
        path.parent.mkdir(parents=True, exist_ok=True)
    conn = await aiosqlite.connect(str(path), timeout=30.0, isolation_level=None)
    conn.row_factory = aiosqlite.Row
    await conn.execute("PRAGMA journal_mode=WAL")
    await conn.execute("PRAGMA synchronous=NORMAL")
    await conn.execute("PRAGMA foreign_keys=ON")
    await conn.execute("PRAGMA busy_timeout=30000")
    return conn


async def schema_version(conn: aiosqlite.Connection) -> int:
    async with conn.execute("PRAGMA user_version") as cur:
        row = await cur.fetchone()
    return int(row[0]) if row else 0


async def migrate(conn: aiosqlite.Connection, *, target: int = LATEST_VERSION) -> int:
    """Apply the migrations above the current version, each in its own transaction.

    ``BEGIN IMMEDIATE`` takes the write lock before reading the version, so two processes
    starting together do not both apply the same migration.
    """
    if target > LATEST_VERSION:
        raise ValueError(f"no migration {target}: the latest is {LATEST_VERSION}")
    while True:
        await conn.execute("BEGIN IMMEDIATE")
        try:
            current = await schema_version(conn)
            if current >= target:
                await conn.execute("ROLLBACK")
                return current
            for statement in MIGRATIONS[current]:
                await conn.execute(statement)
            await conn.execute(f"PRAGMA user_version = {current + 1}")
            await conn.execute("COMMIT")
        except (sqlite3.Error, aiosqlite.Error):
            await conn.execute("ROLLBACK")
            raise


async def open_database(path: Path | str) -> aiosqlite.Connection:
    """Connect and bring the schema up to date."""
    conn = await connect(path)
    await migrate(conn)
    return conn
