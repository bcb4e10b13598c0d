"""/styles: list, switch, rename, delete. Each button's style id is looked up for the pressing
user; a forged or stale id gets a clear answer and changes nothing."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from aiogram import Bot, F, Router
from aiogram.filters import Command
from aiogram.fsm.context import FSMContext
from aiogram.types import CallbackQuery, Message

from bot.context import BotContext
from bot.keyboards import confirm_delete_style_keyboard, style_card_keyboard, styles_keyboard
from bot.states import Styles
from bot.texts import t
from pipeline.queue.base import JobKind, JobState
from pipeline.storage.repository import Style


async def _owned(query: CallbackQuery, ctx: BotContext, lang: str, user_id: int) -> Style | None:
    style_id = (query.data or "").partition(":")[2]
    style = await ctx.repo.get_user_style(user_id, style_id) if style_id else None
    if style is None:
        await query.answer(t(lang, "forged"), show_alert=True)
    return style


async def send_styles(bot: Bot, ctx: BotContext, lang: str, user_id: int) -> None:
    styles = await ctx.repo.list_styles(user_id)
    if not styles:
        await bot.send_message(user_id, t(lang, "styles_none"))
        return
    user = await ctx.repo.get_user(user_id)
    await bot.send_message(user_id, t(lang, "styles_list"),
                           reply_markup=styles_keyboard(styles, user.active_style_id if user else None))


async def on_styles(message: Message, bot: Bot, ctx: BotContext, lang: str, user_id: int) -> None:
    del message
    await send_styles(bot, ctx, lang, user_id)


async def on_styles_button(query: CallbackQuery, bot: Bot, ctx: BotContext, lang: str,
                           user_id: int) -> None:
    await query.answer()
    await send_styles(bot, ctx, lang, user_id)


async def on_style_card(query: CallbackQuery, bot: Bot, ctx: BotContext, lang: str, user_id: int) -> None:
    style = await _owned(query, ctx, lang, user_id)
    if style is None:
        return
    await query.answer()
    count = await ctx.repo.count_images(style.id)
    noun = f" ({style.class_noun})" if style.class_noun else ""
    await bot.send_message(
        user_id,
        t(lang, "style_card", name=style.name, status=t(lang, f"status_{style.status}"), noun=noun,
          count=count),
        reply_markup=style_card_keyboard(lang, style),
    )


async def on_use(query: CallbackQuery, bot: Bot, ctx: BotContext, lang: str, user_id: int) -> None:
    style = await _owned(query, ctx, lang, user_id)
    if style is None:
        return
    await query.answer()
    if style.status != "ready":
        await bot.send_message(user_id, t(lang, "style_not_ready", name=style.name,
                                          status=t(lang, f"status_{style.status}")))
        return
    await ctx.repo.update_user(user_id, active_style_id=style.id)
    await bot.send_message(user_id, t(lang, "style_switched", name=style.name))


async def on_rename(query: CallbackQuery, bot: Bot, ctx: BotContext, lang: str, user_id: int,
                    state: FSMContext) -> None:
    style = await _owned(query, ctx, lang, user_id)
    if style is None:
        return
    await query.answer()
    await state.set_state(Styles.rename)
    await state.update_data(rename_style=style.id)
    await bot.send_message(user_id, t(lang, "style_rename_ask", name=style.name))


async def on_new_name(message: Message, ctx: BotContext, lang: str, user_id: int,
                      state: FSMContext) -> None:
    name = " ".join((message.text or "").split())
    if not 1 <= len(name) <= 40:
        await message.answer(t(lang, "style_bad_name"))
        return
    data = await state.get_data()
    style = await ctx.repo.get_user_style(user_id, str(data.get("rename_style", "")))
    await state.set_state(None)
    if style is None:
        await message.answer(t(lang, "forged"))
        return
    await ctx.repo.update_style(style.id, name=name)
    await message.answer(t(lang, "style_renamed", name=name))


async def on_delete(query: CallbackQuery, bot: Bot, ctx: BotContext, lang: str, user_id: int) -> None:
    style = await _owned(query, ctx, lang, user_id)
    if style is None:
        return
    await query.answer()
    await bot.send_message(user_id, t(lang, "style_delete_ask", name=style.name),
                           reply_markup=confirm_delete_style_keyboard(lang, style.id))


async def on_delete_confirmed(query: CallbackQuery, bot: Bot, ctx: BotContext, lang: str,
                              user_id: int) -> None:
    style = await _owned(query, ctx, lang, user_id)
    if style is None:
        return
    await query.answer()
    await delete_style(ctx, style)
    await bot.send_message(user_id, t(lang, "style_deleted", name=style.name))


async def delete_style(ctx: BotContext, style: Style) -> None:
    """Cancel its training, drop its rows, then its files (blobs only when no other row uses them)."""
    for job in await ctx.queue.list_for_user(style.user_id, states=[JobState.QUEUED, JobState.RUNNING],
                                             limit=100):
        if job.kind == JobKind.TRAIN and job.payload.get("style_id") == style.id:
            await ctx.queue.cancel(job.id, user_id=style.user_id)
    images = await ctx.repo.list_images(style.id)
    user = await ctx.repo.get_user(style.user_id)
    if user is not None and user.active_style_id == style.id:
        await ctx.repo.update_user(style.user_id, active_style_id=None)
    await ctx.repo.delete_style(style.id)
    await remove_unreferenced(ctx, [img.path for img in images])
    await remove_trees(ctx.data.path_for("styles", style.id))


async def remove_trees(*paths: Path) -> None:
    """Delete directories in a thread: the data dir may be a network volume, and the event
    loop serves every user."""

    def remove() -> None:
        for path in paths:
            shutil.rmtree(path, ignore_errors=True)

    await asyncio.to_thread(remove)


async def remove_unreferenced(ctx: BotContext, paths: list[str]) -> None:
    """Delete stored files no image or sticker row refers to any more (blobs are shared by content)."""
    orphans: list[Path] = []
    for path in set(paths):
        if await ctx.repo.references(path) == 0:
            try:
                orphans.append(ctx.data.resolve(path))
            except ValueError:
                continue

    def unlink() -> None:
        for orphan in orphans:
            orphan.unlink(missing_ok=True)

    await asyncio.to_thread(unlink)


async def on_keep(query: CallbackQuery, lang: str) -> None:
    await query.answer(t(lang, "kept"))


def create_router() -> Router:
    """A fresh router (aiogram attaches a router to one dispatcher only)."""
    router = Router(name="styles")
    router.message.register(on_styles, Command("styles"))
    router.callback_query.register(on_styles_button, F.data == "styles")
    router.callback_query.register(on_style_card, F.data.startswith("style:"))
    router.callback_query.register(on_use, F.data.startswith("use:"))
    router.callback_query.register(on_rename, F.data.startswith("rename:"))
    router.message.register(on_new_name, Styles.rename, F.text, ~F.text.startswith("/"))
    router.callback_query.register(on_delete, F.data.startswith("del:"))
    router.callback_query.register(on_delete_confirmed, F.data.startswith("delyes:"))
    router.callback_query.register(on_keep, F.data == "keep")
    return router
