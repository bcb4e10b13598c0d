"""Persistent state: the SQLite database (aiosqlite, WAL) and files under the data dir."""
