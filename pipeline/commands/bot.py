"""``stickerbot bot``: run the Telegram bot alone (workers run as ``stickerbot worker``)."""

from __future__ import annotations

import argparse
import asyncio

from pipeline.settings import Settings

HELP = "run the Telegram bot (long polling); jobs are done by `stickerbot worker`"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser


def run(args: argparse.Namespace, settings: Settings) -> int:
    del args
    settings.require_token()  # a ConfigError that says how to get one
    from bot.app import run_bot

    asyncio.run(run_bot(settings))
    return 0
