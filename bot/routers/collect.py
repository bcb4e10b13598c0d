"""Collecting a draft style: stickers, photos, image documents, albums and whole sticker packs.

A photo (or image document) is routed here into the draft while the user is collecting, or when
they have no ready style yet; otherwise it becomes a sticker job (:mod:`bot.routers.stickers`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time

from aiogram import Bot, F, Router
from aiogram.exceptions import TelegramBadRequest
from aiogram.filters import Command, CommandObject
from aiogram.fsm.context import FSMContext
from aiogram.types import CallbackQuery, Message
from aiogram.types import Sticker as TgSticker

from bot.albums import Album
from bot.context import BotContext
from bot.drafts import (
    MIN_IMAGES,
    Outcome,
    add_to_draft,
    current_draft,
    draft_for_upload,
    new_draft,
    skipped_animated,
)
from bot.keyboards import train_keyboard
from bot.routers.stickers import photo_to_sticker
from bot.states import Collect
from bot.texts import t
from pipeline.storage.repository import PackImport, Style

PACK_LINK = re.compile(r"(?:https?://)?(?:t|telegram)\.me/addstickers/([A-Za-z0-9_]{1,64})\b")
PACK_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")
IMPORT_EDIT_INTERVAL = 1.0  # seconds between progress edits of a pack import

log = logging.getLogger(__name__)


def is_image_document(message: Message) -> bool:
    doc = message.document
    if doc is None:
        return False
    mime = (doc.mime_type or "").lower()
    name = (doc.file_name or "").lower()
    return mime.startswith("image/") or name.endswith(IMAGE_EXTENSIONS)


async def summary_text(ctx: BotContext, lang: str, draft: Style, outcomes: list[Outcome]) -> str:
    count = await ctx.repo.count_images(draft.id)
    added = sum(o.status == "added" for o in outcomes)
    skipped = [o for o in outcomes if o.status == "skipped"]
    if len(outcomes) == 1 and outcomes[0].status == "duplicate":
        text = t(lang, "draft_duplicate", name=draft.name, count=count)
    elif len(outcomes) == 1 and skipped:
        return t(lang, "image_rejected", reason=skipped[0].reason)
    elif len(outcomes) == 1:
        text = t(lang, "draft_added", name=draft.name, count=count)
    else:
        text = t(lang, "draft_added_many", added=added, name=draft.name, count=count)
    if skipped and len(outcomes) > 1:
        reasons = "\n".join(f"• {o.reason}" for o in skipped[:10])
        text += "\n" + t(lang, "draft_skipped", skipped=len(skipped), reasons=reasons)
    if count >= MIN_IMAGES and added:
        text += "\n" + t(lang, "draft_ready_hint")
    return text


async def acknowledge(ctx: BotContext, bot: Bot, chat_id: int, lang: str, draft: Style,
                      outcomes: list[Outcome]) -> None:
    text = await summary_text(ctx, lang, draft, outcomes)
    count = await ctx.repo.count_images(draft.id)
    markup = train_keyboard(lang) if count >= MIN_IMAGES else None
    await bot.send_message(chat_id, text, reply_markup=markup)


async def finish_album(album: Album) -> None:
    meta = album.meta
    outcomes = [o if isinstance(o, Outcome) else Outcome("skipped", "internal error")
                for o in album.outcomes]
    await acknowledge(meta["ctx"], meta["bot"], meta["chat_id"], meta["lang"], meta["draft"], outcomes)


async def _take(message: Message, bot: Bot, ctx: BotContext, lang: str, user_id: int,
                state: FSMContext, *, file_id: str, name: str, size: int | None, source: str,
                outcome: Outcome | None = None) -> None:
    """One offered image: into the draft, acknowledged now or with its album."""
    draft = await draft_for_upload(ctx, user_id)
    if draft is None:
        await message.answer(t(lang, "too_many_styles", limit=ctx.settings.styles_per_user))
        return
    await state.set_state(Collect.images)
    work = _resolved(outcome) if outcome is not None else add_to_draft(
        ctx, bot, draft, lang, file_id=file_id, name=name, declared_size=size, source=source)
    if message.media_group_id:
        meta = {"ctx": ctx, "bot": bot, "chat_id": message.chat.id, "lang": lang, "draft": draft}
        await ctx.albums.add((user_id, message.media_group_id), meta, work)
        return
    await acknowledge(ctx, bot, message.chat.id, lang, draft, [await work])


async def _resolved(outcome: Outcome) -> Outcome:
    return outcome


async def on_sticker(message: Message, bot: Bot, ctx: BotContext, lang: str, user_id: int,
                     state: FSMContext) -> None:
    sticker = message.sticker
    assert sticker is not None  # guaranteed by the filter
    outcome = None
    if sticker.is_animated or sticker.is_video:
        outcome = skipped_animated(lang, video=sticker.is_video)
    await _take(message, bot, ctx, lang, user_id, state, file_id=sticker.file_id,
                name="sticker", size=sticker.file_size, source="sticker", outcome=outcome)


async def on_picture(message: Message, bot: Bot, ctx: BotContext, lang: str, user_id: int,
                     state: FSMContext) -> None:
    if message.document is not None and not is_image_document(message):
        name = (message.document.file_name or "file")[:60]
        await message.answer(t(lang, "unsupported_document", name=name))
        return
    if message.photo:
        best = message.photo[-1]
        file_id, size, name, source = best.file_id, best.file_size, "photo", "photo"
    else:
        doc = message.document
        assert doc is not None
        file_id, size, source = doc.file_id, doc.file_size, "document"
        name = (doc.file_name or "image")[:60]
    collecting = await state.get_state() == Collect.images.state
    if not collecting and not message.media_group_id:
        user = await ctx.repo.get_user(user_id)
        active = (await ctx.repo.get_user_style(user_id, user.active_style_id)
                  if user and user.active_style_id else None)
        if active is not None and active.status == "ready":
            await photo_to_sticker(message, bot, ctx, lang, user_id, active, file_id=file_id,
                                   name=name, size=size)
            return
    await _take(message, bot, ctx, lang, user_id, state, file_id=file_id, name=name, size=size,
                source=source)


async def on_new_style(query: CallbackQuery, ctx: BotContext, lang: str, user_id: int,
                       state: FSMContext) -> None:
    await query.answer()
    draft = await current_draft(ctx, user_id)
    if draft is None or await ctx.repo.count_images(draft.id) > 0:
        draft = await new_draft(ctx, user_id)
    if draft is None:
        await query.message.answer(t(lang, "too_many_styles", limit=ctx.settings.styles_per_user))  # type: ignore[union-attr]
        return
    await state.set_state(Collect.images)
    await query.message.answer(t(lang, "new_style_started", name=draft.name))  # type: ignore[union-attr]


async def on_new_command(message: Message, ctx: BotContext, lang: str, user_id: int,
                         state: FSMContext) -> None:
    draft = await current_draft(ctx, user_id)
    if draft is None or await ctx.repo.count_images(draft.id) > 0:
        draft = await new_draft(ctx, user_id)
    if draft is None:
        await message.answer(t(lang, "too_many_styles", limit=ctx.settings.styles_per_user))
        return
    await state.set_state(Collect.images)
    await message.answer(t(lang, "new_style_started", name=draft.name))


async def on_import_command(message: Message, command: CommandObject, bot: Bot, ctx: BotContext,
                            lang: str, user_id: int, state: FSMContext) -> None:
    name = (command.args or "").strip()
    match = PACK_LINK.search(name)
    if match:
        name = match.group(1)
    if not name:
        await message.answer(t(lang, "import_usage"))
        return
    await import_pack(message, bot, ctx, lang, user_id, state, name)


async def on_pack_link(message: Message, bot: Bot, ctx: BotContext, lang: str, user_id: int,
                       state: FSMContext) -> None:
    match = PACK_LINK.search(message.text or "")
    assert match is not None
    await import_pack(message, bot, ctx, lang, user_id, state, match.group(1))


async def import_pack(message: Message, bot: Bot, ctx: BotContext, lang: str, user_id: int,
                      state: FSMContext, name: str) -> None:
    """getStickerSet, then each static sticker into the draft, with one progress message. The
    import is recorded (``pack_imports``) as it goes, so a bot that dies part-way goes on with it
    at its next start (:func:`resume_imports`)."""
    # 1. check the name and fetch the pack
    if not PACK_NAME.match(name):
        await message.answer(t(lang, "import_bad_name", name=name[:64]))
        return
    try:
        pack = await bot.get_sticker_set(name=name)
    except TelegramBadRequest:
        await message.answer(t(lang, "import_not_found", name=name))
        return
    draft = await draft_for_upload(ctx, user_id)
    if draft is None:
        await message.answer(t(lang, "too_many_styles", limit=ctx.settings.styles_per_user))
        return
    await state.set_state(Collect.images)
    progress = await message.answer(t(lang, "import_started", name=pack.title, total=len(pack.stickers)))
    record = await ctx.repo.start_import(user_id=user_id, pack=pack.name, title=pack.title,
                                         style_id=draft.id, chat_id=progress.chat.id,
                                         message_id=progress.message_id, lang=lang)
    await run_import(bot, ctx, record, pack.stickers, draft)


async def run_import(bot: Bot, ctx: BotContext, record: PackImport, stickers: list[TgSticker],
                     draft: Style) -> None:
    """Import ``stickers[record.done:]`` into ``draft``, recording progress after each, then
    replace the progress message with the summary and drop the record. An error ends the import
    (and its record) and goes on up to the error handler; a cancellation (the bot stopping)
    leaves the record for the next start."""
    lang, title, total = record.lang, record.title, len(stickers)
    outcomes: list[Outcome] = []
    added, skipped = record.added, record.skipped
    shown, last_edit = "", time.monotonic()
    try:
        # 2. import sticker by sticker, editing one progress message at a sensible rate
        for n in range(record.done + 1, total + 1):
            sticker = stickers[n - 1]
            if sticker.is_animated or sticker.is_video:
                outcome = skipped_animated(lang, video=sticker.is_video)
            else:
                outcome = await add_to_draft(ctx, bot, draft, lang, file_id=sticker.file_id,
                                             name=f"sticker {n}", declared_size=sticker.file_size,
                                             source="pack")
            outcomes.append(outcome)
            added += outcome.status == "added"
            skipped += outcome.status == "skipped"
            await ctx.repo.import_progress(record.user_id, record.pack, done=n, added=added, skipped=skipped)
            text = t(lang, "import_progress", name=title, done=n, total=total)
            if n < total and time.monotonic() - last_edit >= IMPORT_EDIT_INTERVAL and text != shown:
                await bot.edit_message_text(text, chat_id=record.chat_id, message_id=record.message_id)
                shown, last_edit = text, time.monotonic()
        # 3. the result: how many were added, what was skipped and why
        count = await ctx.repo.count_images(draft.id)
        text = t(lang, "import_done", added=added, name=title, draft=draft.name, count=count)
        if skipped:  # the reasons of this process's share (a resumed import lost the earlier ones)
            reasons = [f"• {o.reason}" for o in outcomes if o.status == "skipped"][:10]
            text += "\n" + t(lang, "draft_skipped", skipped=skipped, reasons="\n".join(reasons) or "…")
        if count >= MIN_IMAGES:
            text += "\n" + t(lang, "draft_ready_hint")
        markup = train_keyboard(lang) if count >= MIN_IMAGES else None
        try:
            await bot.edit_message_text(text, chat_id=record.chat_id, message_id=record.message_id,
                                        reply_markup=markup)
        except TelegramBadRequest:  # the progress message is gone (deleted by the user)
            await bot.send_message(record.chat_id, text, reply_markup=markup)
    except asyncio.CancelledError:
        raise  # the bot is stopping: the record stays, and the next start goes on with it
    except BaseException:
        await ctx.repo.finish_import(record.user_id, record.pack)
        raise
    await ctx.repo.finish_import(record.user_id, record.pack)


async def resume_imports(bot: Bot, ctx: BotContext) -> int:
    """At bot start: go on with every pack import that a previous bot process did not finish
    (killed, restarted mid-import). Returns how many went on."""
    resumed = 0
    for record in await ctx.repo.pending_imports():
        try:
            draft = await ctx.repo.get_style(record.style_id)
            if draft is None or draft.status != "draft":  # trained or deleted meanwhile
                await ctx.repo.finish_import(record.user_id, record.pack)
                continue
            pack = await bot.get_sticker_set(name=record.pack)
            await bot.send_message(record.chat_id, t(record.lang, "import_resumed", name=record.title,
                                                     done=record.done, total=len(pack.stickers)))
            await run_import(bot, ctx, record, pack.stickers, draft)
            resumed += 1
        except Exception as exc:  # one user's import must not stop the others, nor the bot
            log.warning("could not go on with the import of pack %s for user %s: %s", record.pack,
                        record.user_id, type(exc).__name__)
            await ctx.repo.finish_import(record.user_id, record.pack)
            with contextlib.suppress(Exception):
                await bot.send_message(record.chat_id, t(record.lang, "import_interrupted",
                                                         name=record.title))
    return resumed


def create_router() -> Router:
    """A fresh router (aiogram attaches a router to one dispatcher only)."""
    router = Router(name="collect")
    router.message.register(on_sticker, F.sticker)
    router.message.register(on_picture, F.photo | F.document)
    router.callback_query.register(on_new_style, F.data == "new")
    router.message.register(on_new_command, Command("new"))
    router.message.register(on_import_command, Command("import"))
    router.message.register(on_pack_link, F.text.regexp(PACK_LINK, mode="search"))
    return router
