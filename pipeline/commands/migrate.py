"""``stickerbot migrate``: bring the database schema up to date."""

from __future__ import annotations

import argparse
import asyncio

from pipeline.settings import Settings

HELP = "create or upgrade the database schema"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser


def run(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.storage.db import open_database, schema_version

    async def go() -> int:
        conn = await open_database(settings.db_path)
        try:
            return await schema_version(conn)
        finally:
            await conn.close()

    version = asyncio.run(go())
    print(f"database {settings.db_path} at schema version {version}")
    return 0
