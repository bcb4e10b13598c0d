"""The user's draft style: the set of images being collected for the next training."""

from __future__ import annotations

from dataclasses import dataclass

from aiogram import Bot

from bot.context import BotContext
from bot.downloads import DownloadError, fetch_image
from bot.texts import t
from pipeline.errors import ImageError, UnsupportedStickerError
from pipeline.storage.repository import Style

MIN_IMAGES = 3


@dataclass(frozen=True)
class Outcome:
    """What happened to one offered image: ``added``, ``duplicate`` or ``skipped`` (with a reason
    already in the user's language)."""

    status: str
    reason: str = ""


async def current_draft(ctx: BotContext, user_id: int) -> Style | None:
    drafts = await ctx.repo.list_styles(user_id, status="draft")
    return drafts[-1] if drafts else None


async def new_draft(ctx: BotContext, user_id: int) -> Style | None:
    """A new empty draft, or None when the user is at the styles quota."""
    styles = await ctx.repo.list_styles(user_id)
    if len(styles) >= ctx.settings.styles_per_user:
        return None
    return await ctx.repo.create_style(user_id, f"Style {len(styles) + 1}")


async def draft_for_upload(ctx: BotContext, user_id: int) -> Style | None:
    async with ctx.user_lock(user_id):
        return await current_draft(ctx, user_id) or await new_draft(ctx, user_id)


def reason_text(lang: str, exc: Exception) -> str:
    if isinstance(exc, DownloadError):
        return t(lang, exc.reason_key, **exc.values)
    if isinstance(exc, UnsupportedStickerError):
        return t(lang, "reason_animated") if "TGS" in exc.reason else t(lang, "reason_video")
    if isinstance(exc, ImageError):
        return f"{exc.name}: {exc.reason}"
    return str(exc)


async def add_to_draft(ctx: BotContext, bot: Bot, draft: Style, lang: str, *, file_id: str,
                       name: str, declared_size: int | None, source: str) -> Outcome:
    """Download, check and add one image to ``draft``. Bad input gives a ``skipped`` outcome and
    stores nothing."""
    if await ctx.repo.count_images(draft.id) >= ctx.settings.max_images_per_set:
        return Outcome("skipped", t(lang, "draft_full", limit=ctx.settings.max_images_per_set))
    try:
        upload = await fetch_image(bot, ctx.data, file_id, name=name, declared_size=declared_size,
                                   max_pixels=ctx.settings.max_image_pixels)
    except (DownloadError, ImageError) as exc:
        return Outcome("skipped", reason_text(lang, exc))
    added = await ctx.repo.add_image(draft.id, sha256=upload.sha256, path=upload.path,
                                     width=upload.width, height=upload.height, source=source)
    return Outcome("added" if added else "duplicate")


def skipped_animated(lang: str, *, video: bool) -> Outcome:
    return Outcome("skipped", t(lang, "reason_video" if video else "reason_animated"))

