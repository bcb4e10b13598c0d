"""The ``stickerbot`` command line.

Each sub-command lives in ``pipeline/commands/<name>.py`` and exposes ``HELP``,
``add_arguments(parser)`` and ``run(args, settings) -> int``. Command modules import model
libraries inside ``run`` only, so ``stickerbot --help`` and the bot stay light.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType

from pipeline.errors import StickerbotError
from pipeline.monitoring import configure_logging
from pipeline.settings import load_settings

COMMANDS = (
    "run", "bot", "worker", "train", "sticker", "segmenter", "evaluate", "sweep",
    "doctor", "migrate", "zoo",
)


def _command_modules() -> dict[str, ModuleType]:
    modules = {}
    for name in COMMANDS:
        try:
            modules[name] = importlib.import_module(f"pipeline.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"pipeline.commands.{name}":
                raise
    return modules


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, ModuleType]]:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--preset", choices=("sd15", "tiny"), default=None,
                        help="model preset (default: STICKERBOT_PRESET, else sd15)")
    common.add_argument("--data-dir", default=None,
                        help="data directory (default: STICKERBOT_DATA_DIR, else ./data)")
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser = argparse.ArgumentParser(
        prog="stickerbot",
        description="A Telegram bot that learns a sticker style and turns photos into stickers.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = _command_modules()
    for name, module in modules.items():
        p = sub.add_parser(name, help=module.HELP, description=module.HELP, parents=[common])
        module.add_arguments(p)
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    overrides = {}
    if args.preset:
        overrides["preset"] = args.preset
    if args.data_dir:
        overrides["data_dir"] = args.data_dir
    try:
        settings = load_settings(**overrides)
        # Token-shaped strings are scrubbed from every record, in both formats.
        configure_logging("DEBUG" if args.verbose else settings.log_level,
                          json_lines=settings.log_format == "json")
        return int(modules[args.command].run(args, settings) or 0)
    except StickerbotError as exc:
        print(f"stickerbot {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
