"""/start, /help, /lang, and the fallback for text the bot does not understand."""

from __future__ import annotations

from aiogram import F, Router
from aiogram.filters import Command, CommandStart
from aiogram.types import CallbackQuery, Message

from bot.context import BotContext
from bot.keyboards import language_keyboard, start_keyboard
from bot.texts import LANGUAGES, t


async def on_start(message: Message, lang: str) -> None:
    await message.answer(t(lang, "start"), reply_markup=start_keyboard(lang))


async def on_help_button(query: CallbackQuery, lang: str) -> None:
    await query.answer()
    if query.message is not None:
        await query.message.answer(t(lang, "start"), reply_markup=start_keyboard(lang))


async def on_lang(message: Message, lang: str) -> None:
    await message.answer(t(lang, "lang_pick"), reply_markup=language_keyboard())


async def on_lang_pick(query: CallbackQuery, ctx: BotContext, lang: str, user_id: int) -> None:
    choice = (query.data or "").partition(":")[2]
    if choice not in LANGUAGES:
        await query.answer(t(lang, "forged"), show_alert=True)
        return
    await ctx.repo.update_user(user_id, language=choice)
    await query.answer()
    if query.message is not None:
        await query.message.answer(t(choice, "lang_set"), reply_markup=start_keyboard(choice))


async def on_anything_else(message: Message, lang: str) -> None:
    await message.answer(t(lang, "unknown_text"))


async def on_unknown_button(query: CallbackQuery, lang: str) -> None:
    await query.answer(t(lang, "forged"), show_alert=True)


def create_router() -> Router:
    """A fresh router (aiogram attaches a router to one dispatcher only)."""
    router = Router(name="start")
    router.message.register(on_start, CommandStart())
    router.message.register(on_start, Command("help"))
    router.callback_query.register(on_help_button, F.data == "help")
    router.message.register(on_lang, Command("lang"))
    router.callback_query.register(on_lang_pick, F.data.startswith("lang:"))
    return router


def create_fallback_router() -> Router:
    """A fresh router (aiogram attaches a router to one dispatcher only)."""
    router = Router(name="fallback")
    router.message.register(on_anything_else)
    router.callback_query.register(on_unknown_button)
    return router
