"""Photo -> sticker jobs, and the buttons under a sticker: another variant, add to my pack,
different style. Every button's id is looked up for the pressing user (forged data changes
nothing)."""

from __future__ import annotations

import logging
import secrets
import time

from aiogram import Bot, F, Router
from aiogram.exceptions import TelegramBadRequest
from aiogram.fsm.context import FSMContext
from aiogram.types import CallbackQuery, FSInputFile, InputSticker, Message

from bot.context import BotContext
from bot.downloads import DownloadError, fetch_image
from bot.drafts import reason_text
from bot.keyboards import style_pick_keyboard
from bot.texts import t
from pipeline.errors import ImageError, QueueUnavailableError, QuotaExceededError
from pipeline.queue.base import JobKind, QueuePosition
from pipeline.storage.repository import Sticker, Style

log = logging.getLogger(__name__)

DAY = 24 * 3600.0
PACK_LIMIT_ERRORS = ("STICKERS_TOO_MUCH", "STICKERSET_FULL", "too much")
PACK_GONE_ERRORS = ("STICKERSET_INVALID", "sticker set not found")
PACK_TAKEN_ERRORS = ("STICKERSET_NAME_OCCUPIED", "name is already occupied")


def eta_text(lang: str, seconds: float | None) -> str:
    if seconds is None or seconds <= 0:
        return ""
    return t(lang, "eta", minutes=max(1, round(seconds / 60)))


async def submit_sticker(bot: Bot, ctx: BotContext, lang: str, user_id: int, style: Style,
                         photo: str) -> bool:
    """Queue a sticker job for ``photo`` (a stored relative path) in ``style``; tells the user."""
    # 1. quotas
    made_today = await ctx.repo.count_stickers_since(user_id, time.time() - DAY)
    if made_today >= ctx.settings.stickers_per_day:
        await bot.send_message(user_id, t(lang, "sticker_quota", limit=ctx.settings.stickers_per_day))
        return False
    # 2. the "drawing" message first, so the notifier can always find it
    message = await bot.send_message(user_id, t(lang, "sticker_queued", name=style.name,
                                                position=1, eta=""))
    payload = {"style_id": style.id, "style_dir": style.style_dir or f"styles/{style.id}",
               "photo": photo, "seed": secrets.randbelow(2**31), "variants": 1}
    try:
        job = await ctx.queue.submit(JobKind.STICKER, user_id, payload)
    except QuotaExceededError as exc:
        await message.edit_text(str(exc))
        return False
    except QueueUnavailableError:
        await message.edit_text(t(lang, "queue_unavailable"))
        return False
    text = t(lang, "sticker_queued", name=style.name, position=1, eta="")

    def waiting(position: QueuePosition) -> str:
        if position.getting_ready:  # the background remover's bootstrap runs first
            return t(lang, "sticker_getting_ready", name=style.name, eta=eta_text(lang, position.eta_seconds))
        return t(lang, "sticker_queued", name=style.name, position=max(1, position.position),
                 eta=eta_text(lang, position.eta_seconds))

    ctx.notifier.track(job.id, user_id, message.message_id, text, queued=waiting)
    # 3. the real position and ETA now; the notifier refreshes them while the job waits
    await ctx.notifier.refresh_positions(job.id)
    return True


async def photo_to_sticker(message: Message, bot: Bot, ctx: BotContext, lang: str, user_id: int,
                           style: Style, *, file_id: str, name: str, size: int | None) -> None:
    try:
        upload = await fetch_image(bot, ctx.data, file_id, name=name, declared_size=size,
                                   max_pixels=ctx.settings.max_image_pixels)
    except (DownloadError, ImageError) as exc:
        await message.answer(t(lang, "image_rejected", reason=reason_text(lang, exc)))
        return
    await submit_sticker(bot, ctx, lang, user_id, style, upload.path)


async def _owned_sticker(query: CallbackQuery, ctx: BotContext, lang: str, user_id: int) -> Sticker | None:
    sticker_id = (query.data or "").partition(":")[2]
    sticker = await ctx.repo.get_user_sticker(user_id, sticker_id) if sticker_id else None
    if sticker is None:
        await query.answer(t(lang, "forged"), show_alert=True)
    return sticker


async def _photo_of(ctx: BotContext, sticker: Sticker) -> str | None:
    job = await ctx.queue.get(sticker.job_id) if sticker.job_id else None
    photo = job.payload.get("photo") if job is not None else None
    if not isinstance(photo, str):
        return None
    try:
        return photo if ctx.data.resolve(photo).exists() else None
    except ValueError:
        return None


async def on_again(query: CallbackQuery, bot: Bot, ctx: BotContext, lang: str, user_id: int) -> None:
    sticker = await _owned_sticker(query, ctx, lang, user_id)
    if sticker is None:
        return
    style = await ctx.repo.get_user_style(user_id, sticker.style_id or "")
    if style is None or style.status != "ready":
        await query.answer(t(lang, "forged"), show_alert=True)
        return
    photo = await _photo_of(ctx, sticker)
    await query.answer()
    if photo is None:
        await bot.send_message(user_id, t(lang, "photo_gone"))
        return
    await submit_sticker(bot, ctx, lang, user_id, style, photo)


async def on_other_style(query: CallbackQuery, bot: Bot, ctx: BotContext, lang: str, user_id: int,
                         state: FSMContext) -> None:
    sticker = await _owned_sticker(query, ctx, lang, user_id)
    if sticker is None:
        return
    await query.answer()
    ready = await ctx.repo.list_styles(user_id, status="ready")
    if not ready:
        await bot.send_message(user_id, t(lang, "sticker_no_style"))
        return
    await state.update_data(redo_sticker=sticker.id)
    await bot.send_message(user_id, t(lang, "style_pick"), reply_markup=style_pick_keyboard(ready))


async def on_redo(query: CallbackQuery, bot: Bot, ctx: BotContext, lang: str, user_id: int,
                  state: FSMContext) -> None:
    style = await ctx.repo.get_user_style(user_id, (query.data or "").partition(":")[2])
    if style is None or style.status != "ready":
        await query.answer(t(lang, "forged"), show_alert=True)
        return
    await query.answer()
    await ctx.repo.update_user(user_id, active_style_id=style.id)
    data = await state.get_data()
    sticker = await ctx.repo.get_user_sticker(user_id, str(data.get("redo_sticker", "")))
    photo = await _photo_of(ctx, sticker) if sticker is not None else None
    if photo is None:
        await bot.send_message(user_id, t(lang, "style_switched", name=style.name))
        return
    await submit_sticker(bot, ctx, lang, user_id, style, photo)


def pack_name_for(ctx: BotContext, user_id: int) -> str:
    return f"{ctx.settings.pack_prefix}_{user_id}_by_{ctx.bot_username}"


async def on_add_to_pack(query: CallbackQuery, bot: Bot, ctx: BotContext, lang: str,
                         user_id: int) -> None:
    sticker = await _owned_sticker(query, ctx, lang, user_id)
    if sticker is None:
        return
    await query.answer()
    user = await ctx.repo.get_user(user_id)
    name = (user.pack_name if user else None) or pack_name_for(ctx, user_id)
    link = f"https://t.me/addstickers/{name}"
    if sticker.in_pack:
        await bot.send_message(user_id, t(lang, "pack_already", link=link))
        return
    item = InputSticker(
        sticker=sticker.telegram_file_id or FSInputFile(ctx.data.resolve(sticker.path)),
        format="static", emoji_list=[sticker.emoji or "🙂"],
    )
    try:
        created = await add_to_pack(bot, user_id, name, item, exists=bool(user and user.pack_name),
                                    title=f"{query.from_user.first_name[:40]}'s stickers")
    except TelegramBadRequest as exc:
        if any(s.lower() in exc.message.lower() for s in PACK_LIMIT_ERRORS):
            await bot.send_message(user_id, t(lang, "pack_full"))
        else:
            await bot.send_message(user_id, t(lang, "pack_error", error=exc.message[:200]))
        return
    await ctx.repo.update_user(user_id, pack_name=name)
    await ctx.repo.mark_sticker(sticker.id, in_pack=True)
    await bot.send_message(user_id, t(lang, "pack_created" if created else "pack_added", link=link))


async def add_to_pack(bot: Bot, user_id: int, name: str, item: InputSticker, *, exists: bool,
                      title: str) -> bool:
    """Add ``item`` to the user's pack, creating the pack when needed; True when created.
    A pack deleted in @Stickers is created again; a name already taken is added to."""
    if exists:
        try:
            await bot.add_sticker_to_set(user_id=user_id, name=name, sticker=item)
            return False
        except TelegramBadRequest as exc:
            if not any(s.lower() in exc.message.lower() for s in PACK_GONE_ERRORS):
                raise
    try:
        await bot.create_new_sticker_set(user_id=user_id, name=name, title=title[:64],
                                         stickers=[item])
        return True
    except TelegramBadRequest as exc:
        if not any(s.lower() in exc.message.lower() for s in PACK_TAKEN_ERRORS):
            raise
    await bot.add_sticker_to_set(user_id=user_id, name=name, sticker=item)
    return False


def create_router() -> Router:
    """A fresh router (aiogram attaches a router to one dispatcher only)."""
    router = Router(name="stickers")
    router.callback_query.register(on_again, F.data.startswith("again:"))
    router.callback_query.register(on_other_style, F.data.startswith("other:"))
    router.callback_query.register(on_redo, F.data.startswith("redo:"))
    router.callback_query.register(on_add_to_pack, F.data.startswith("pack:"))
    return router
