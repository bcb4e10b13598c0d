"""The Telegram bot process: builds the aiogram Bot and Dispatcher, the services, the notifier
loop, and runs long polling until stopped.

    app = await BotApp.create(settings)
    await app.run()            # until app.stop() or, with handle_signals, SIGINT/SIGTERM

The bot never runs model code: training and stickers are jobs in the queue, done by
``stickerbot worker``. Nothing here imports torch or another model library.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from aiogram import Bot, Dispatcher
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.client.telegram import TelegramAPIServer
from aiogram.types import BotCommand

from bot.albums import AlbumCollector
from bot.context import BotContext
from bot.fsm_storage import SQLiteStorage
from bot.middlewares import ContextMiddleware, RetryAfterMiddleware, ThrottlingMiddleware
from bot.notifier import Notifier
from bot.routers import account, admin, collect, errors, start, stickers, styles, training
from pipeline.monitoring import default_metrics, poll_queue_depth, start_metrics_server
from pipeline.queue import open_queue
from pipeline.settings import Settings
from pipeline.storage.db import open_database
from pipeline.storage.files import DataDir
from pipeline.storage.repository import Repository

log = logging.getLogger(__name__)

COMMANDS = {
    "en": [("start", "What I do"), ("train", "Train the collected style"), ("styles", "Your styles"),
           ("status", "Your jobs"), ("import", "Import a sticker pack"), ("new", "Start a new style"),
           ("cancel", "Cancel your jobs"), ("lang", "Language"), ("delete_me", "Delete all my data")],
    "ru": [("start", "Что я умею"), ("train", "Обучить собранный стиль"), ("styles", "Твои стили"),
           ("status", "Твои задачи"), ("import", "Импорт стикерпака"), ("new", "Новый стиль"),
           ("cancel", "Отменить задачи"), ("lang", "Язык"), ("delete_me", "Удалить мои данные")],
}


@dataclass(frozen=True)
class BotOptions:
    """Timings of the conversation; tests shorten them."""

    album_delay: float = 1.0  # seconds without a new album item before acknowledging it
    min_edit_interval: float = 2.0  # at most one edit of a progress message per this many seconds
    sweep_interval: float = 5.0  # how often undelivered results are looked for besides events
    polling_timeout: int = 10  # getUpdates long-polling timeout
    throttle_rate: float = 3.0  # updates per second per user, sustained
    throttle_burst: float = 20.0
    queue_poll_interval: float = 0.1  # seconds between looks for the worker's job updates


class TokenFilter(logging.Filter):
    """Replaces the bot token in every log record: URLs of the Bot API carry it."""

    def __init__(self, token: str) -> None:
        super().__init__()
        self.token = token

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.token:
            return True
        message = record.getMessage()
        if self.token in message:
            record.msg, record.args = message.replace(self.token, "<token>"), None
        if record.exc_info and record.exc_info[1] is not None and self.token in str(record.exc_info[1]):
            record.exc_info = None
            record.msg = f"{record.msg} (traceback hidden: it held the token)"
        return True


def install_token_filter(token: str) -> TokenFilter:
    token_filter = TokenFilter(token)
    for handler in logging.getLogger().handlers:
        handler.addFilter(token_filter)
    return token_filter


def create_bot(settings: Settings) -> Bot:
    token = settings.require_token().get_secret_value()
    if settings.telegram_api_base:
        session = AiohttpSession(api=TelegramAPIServer.from_base(settings.telegram_api_base))
    else:
        session = AiohttpSession()
    session.middleware(RetryAfterMiddleware())
    return Bot(token=token, session=session)


def build_dispatcher(ctx: BotContext, storage: SQLiteStorage, options: BotOptions) -> Dispatcher:
    dp = Dispatcher(storage=storage)
    dp.update.outer_middleware(ContextMiddleware(ctx))
    dp.update.outer_middleware(ThrottlingMiddleware(rate=options.throttle_rate,
                                                    burst=options.throttle_burst))
    dp.include_routers(
        errors.create_router(), start.create_router(), admin.create_router(),
        account.create_router(), styles.create_router(), training.create_router(),
        stickers.create_router(), collect.create_router(), start.create_fallback_router(),
    )
    return dp


class BotApp:
    def __init__(self, *, settings: Settings, bot: Bot, dispatcher: Dispatcher, ctx: BotContext,
                 options: BotOptions) -> None:
        self.settings = settings
        self.bot = bot
        self.dp = dispatcher
        self.ctx = ctx
        self.options = options
        self._notifier_task: asyncio.Task[None] | None = None
        self._polling: asyncio.Task[None] | None = None
        self._metrics_task: asyncio.Task[None] | None = None
        self._imports_task: asyncio.Task[int] | None = None

    @classmethod
    async def create(cls, settings: Settings, options: BotOptions | None = None) -> BotApp:
        options = options or BotOptions()
        bot = create_bot(settings)
        conn = await open_database(settings.db_path)
        repo = Repository(conn)
        queue = await open_queue(settings)
        if hasattr(queue, "poll_interval"):
            # The SQLite queue looks for other processes' commits this often. Progress messages
            # need no 10 ms reaction; the bot's CPU goes to answering users instead.
            queue.poll_interval = options.queue_poll_interval
        data = DataDir(settings.data_dir)
        notifier = Notifier(bot, queue=queue, repo=repo, data=data, settings=settings,
                            min_edit_interval=options.min_edit_interval,
                            sweep_interval=options.sweep_interval)
        albums = AlbumCollector(collect.finish_album, delay=options.album_delay)
        ctx = BotContext(settings=settings, repo=repo, queue=queue, data=data, notifier=notifier,
                         albums=albums)
        dispatcher = build_dispatcher(ctx, SQLiteStorage(conn), options)
        return cls(settings=settings, bot=bot, dispatcher=dispatcher, ctx=ctx, options=options)

    async def run(self, *, handle_signals: bool = False) -> None:
        """Poll until :meth:`stop` (or a signal, with ``handle_signals``); then shut down cleanly."""
        install_token_filter(self.bot.token)
        # One INFO line per update is noise at any real volume; errors still show.
        logging.getLogger("aiogram.event").setLevel(max(logging.WARNING, logging.getLogger().level))
        try:
            me = await self.bot.get_me()
            self.ctx.bot_username = me.username or ""
            await self._set_commands()
            self._notifier_task = asyncio.create_task(self.ctx.notifier.run(), name="notifier")
            # Pack imports a previous process left part-way go on beside polling.
            self._imports_task = asyncio.create_task(collect.resume_imports(self.bot, self.ctx),
                                                     name="resume-imports")
            if self.settings.metrics_port:
                start_metrics_server(self.settings.metrics_port)
                self._metrics_task = asyncio.create_task(
                    poll_queue_depth(self.ctx.queue, default_metrics()), name="queue-depth")
            log.info("bot @%s polling", self.ctx.bot_username)
            await self.dp.start_polling(self.bot, handle_signals=handle_signals,
                                        polling_timeout=self.options.polling_timeout,
                                        allowed_updates=["message", "callback_query"])
        finally:
            await self.close()

    async def _set_commands(self) -> None:
        for lang, commands in COMMANDS.items():
            try:
                await self.bot.set_my_commands(
                    [BotCommand(command=c, description=d) for c, d in commands],
                    language_code=None if lang == "en" else lang,
                )
            except Exception as exc:  # a cosmetic call must not stop the bot
                log.warning("setMyCommands failed: %s", type(exc).__name__)

    async def stop(self) -> None:
        with contextlib.suppress(RuntimeError):  # not polling (yet)
            await self.dp.stop_polling()

    async def close(self) -> None:
        if self._metrics_task is not None:
            self._metrics_task.cancel()
        if self._imports_task is not None and not self._imports_task.done():
            # Cancelled mid-import, the record stays: the next start goes on with it.
            self._imports_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._imports_task
        self.ctx.notifier.stop()
        if self._notifier_task is not None:
            try:
                await asyncio.wait_for(self._notifier_task, timeout=5)
            except (TimeoutError, asyncio.CancelledError):
                self._notifier_task.cancel()
        await self.ctx.albums.close()
        await self.ctx.queue.close()
        await self.ctx.repo.conn.close()
        await self.bot.session.close()


async def run_bot(settings: Settings, options: BotOptions | None = None) -> None:
    """Run the bot until SIGINT/SIGTERM."""
    app = await BotApp.create(settings, options)
    await app.run(handle_signals=True)
