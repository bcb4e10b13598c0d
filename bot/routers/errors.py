"""The one error handler: the user gets a friendly message with an id to quote, the log gets the
context (update id, user, event type, the traceback), never the token."""

from __future__ import annotations

import logging
import secrets
from typing import Any

from aiogram import Bot, Router
from aiogram.types import ErrorEvent

from bot.downloads import DownloadError
from bot.drafts import reason_text
from bot.texts import t
from pipeline.errors import InputError, QueueUnavailableError, QuotaExceededError

log = logging.getLogger("bot.errors")


def user_message(lang: str, exc: BaseException, error_id: str) -> str:
    if isinstance(exc, DownloadError | InputError):
        return t(lang, "image_rejected", reason=reason_text(lang, exc))
    if isinstance(exc, QuotaExceededError):
        return str(exc)
    if isinstance(exc, QueueUnavailableError):
        return t(lang, "queue_unavailable")
    return t(lang, "error", error_id=error_id)


async def on_error(event: ErrorEvent, bot: Bot, **data: Any) -> bool:
    error_id = secrets.token_hex(4)
    update = event.update
    user = data.get("event_from_user")
    lang = data.get("lang") or "en"
    exc = event.exception
    if not isinstance(exc, InputError | QueueUnavailableError):
        # The exception text of aiohttp errors may carry a URL with the token: log types and ids,
        # and the traceback through the logging formatter (which the bot's log filter redacts).
        log.error("error %s in update %s (%s) from user %s: %s", error_id, update.update_id,
                  update.event_type, user.id if user else None, type(exc).__name__,
                  exc_info=exc)
    text = user_message(lang, exc, error_id)
    chat_id = user.id if user else None
    try:
        if update.callback_query is not None:
            await update.callback_query.answer()
        if chat_id is not None:
            await bot.send_message(chat_id, text)
    except Exception:
        log.exception("could not tell user about error %s", error_id)
    return True


def create_router() -> Router:
    """A fresh router (aiogram attaches a router to one dispatcher only)."""
    router = Router(name="errors")
    router.errors.register(on_error)
    return router
