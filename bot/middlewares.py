"""Middlewares: the services and the user's language for every update, per-user throttling, and
a request middleware that waits out Telegram's 429 ``retry_after`` and sends again."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiogram import BaseMiddleware, Bot
from aiogram.client.session.middlewares.base import BaseRequestMiddleware, NextRequestMiddlewareType
from aiogram.exceptions import TelegramRetryAfter
from aiogram.methods import GetUpdates, TelegramMethod
from aiogram.methods.base import Response, TelegramType
from aiogram.types import CallbackQuery, Chat, Message, TelegramObject, User

from bot.context import BotContext
from bot.texts import pick_language, t

log = logging.getLogger(__name__)

Handler = Callable[[TelegramObject, dict[str, Any]], Awaitable[Any]]


class ContextMiddleware(BaseMiddleware):
    """Outer update middleware: puts ``ctx`` (services), ``user_id`` and ``lang`` into the handler
    data and makes sure the user has a row."""

    def __init__(self, ctx: BotContext) -> None:
        self.ctx = ctx

    async def __call__(self, handler: Handler, event: TelegramObject, data: dict[str, Any]) -> Any:
        data["ctx"] = self.ctx
        chat: Chat | None = data.get("event_chat")
        if chat is not None and chat.type != "private":
            return None  # a personal bot: replies go to the user's private chat only
        user: User | None = data.get("event_from_user")
        if user is None or user.is_bot:
            data["lang"] = self.ctx.settings.default_language
            data["user_id"] = None
            return await handler(event, data)
        # A read for known users; a write only the first time (the language Telegram reports
        # then is kept, so replies sent later by the notifier speak it too; /lang changes it).
        record = await self.ctx.repo.get_user(user.id)
        if record is None:
            first = pick_language(None, user.language_code, self.ctx.settings.default_language)
            record = await self.ctx.repo.ensure_user(user.id, language=first)
        data["user_id"] = user.id
        data["lang"] = pick_language(record.language, user.language_code,
                                     self.ctx.settings.default_language)
        return await handler(event, data)


class ThrottlingMiddleware(BaseMiddleware):
    """A token bucket per user: ``burst`` updates at once, refilled at ``rate`` per second. Over
    the limit an update is dropped, and the user is told once per empty bucket.

    Albums arrive as several updates in the same instant, so ``burst`` is well above an album's
    10 items."""

    def __init__(self, *, rate: float = 3.0, burst: float = 20.0, max_users: int = 100_000) -> None:
        self.rate = rate
        self.burst = burst
        self.max_users = max_users
        self._buckets: dict[int, tuple[float, float, bool]] = {}  # user -> (tokens, at, warned)

    def allow(self, user_id: int, now: float) -> tuple[bool, bool]:
        """(allowed, warn now). Pure bookkeeping, tested directly."""
        tokens, at, warned = self._buckets.get(user_id, (self.burst, now, False))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens >= 1.0:
            self._buckets[user_id] = (tokens - 1.0, now, False)
            return True, False
        self._buckets[user_id] = (tokens, now, True)
        if len(self._buckets) > self.max_users:
            self._buckets.clear()  # a bounded memory beats a perfect limiter
        return False, not warned

    async def __call__(self, handler: Handler, event: TelegramObject, data: dict[str, Any]) -> Any:
        user: User | None = data.get("event_from_user")
        if user is None:
            return await handler(event, data)
        allowed, warn = self.allow(user.id, time.monotonic())
        if allowed:
            return await handler(event, data)
        log.info("throttled an update of user %s", user.id)
        lang = data.get("lang")
        if isinstance(event, CallbackQuery) or (isinstance(event, Message) and warn):
            await event.answer(t(lang, "slow_down"))
        return None


class RetryAfterMiddleware(BaseRequestMiddleware):
    """Every request the bot makes (sends, edits, uploads): on 429 wait ``retry_after`` seconds
    and try again, up to ``attempts`` times. aiogram itself raises and gives up."""

    def __init__(self, *, attempts: int = 5, max_wait: float = 120.0) -> None:
        self.attempts = attempts
        self.max_wait = max_wait

    async def __call__(
        self,
        make_request: NextRequestMiddlewareType[TelegramType],
        bot: Bot,
        method: TelegramMethod[TelegramType],
    ) -> Response[TelegramType]:
        attempt = 0
        while True:
            try:
                return await make_request(bot, method)
            except TelegramRetryAfter as exc:
                attempt += 1
                if attempt >= self.attempts or exc.retry_after > self.max_wait:
                    raise
                if not isinstance(method, GetUpdates):
                    log.warning("Telegram asked to wait %ss before %s (attempt %d)",
                                exc.retry_after, type(method).__name__, attempt)
                await asyncio.sleep(exc.retry_after + 0.05 * attempt)
