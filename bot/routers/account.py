"""/status, /cancel and /delete_me (every row and file of the user, after confirmation)."""

from __future__ import annotations

from aiogram import Bot, F, Router
from aiogram.filters import Command
from aiogram.fsm.context import FSMContext
from aiogram.types import CallbackQuery, Message

from bot.context import BotContext
from bot.keyboards import confirm_delete_me_keyboard
from bot.notifier import progress_detail
from bot.routers.stickers import eta_text
from bot.routers.styles import remove_trees, remove_unreferenced
from bot.texts import t
from pipeline.errors import JobError
from pipeline.queue.base import JobKind, JobState

ACTIVE = [JobState.QUEUED, JobState.RUNNING]


async def on_status(message: Message, ctx: BotContext, lang: str, user_id: int) -> None:
    jobs = await ctx.queue.list_for_user(user_id, limit=10)
    if not jobs:
        await message.answer(t(lang, "status_none"))
        return
    lines = []
    for job in jobs:
        extra = ""
        if job.state == JobState.QUEUED:
            pos = await ctx.queue.position(job.id)
            extra = f" #{pos.position}{eta_text(lang, pos.eta_seconds)}"
        elif job.state == JobState.RUNNING:
            extra = f" {round(job.progress * 100)}%"
            detail = progress_detail(lang, job.progress_message) if job.kind == JobKind.TRAIN else ""
            if detail:  # e.g. still making the shared class-prior images
                extra += f" — {detail}"
        lines.append(t(lang, "status_line", kind=t(lang, f"kind_{job.kind.value}"),
                       state=t(lang, f"state_{job.state.value}"), extra=extra))
    await message.answer("\n".join(lines))


async def cancel_jobs(ctx: BotContext, user_id: int) -> int:
    n = 0
    for job in await ctx.queue.list_for_user(user_id, states=ACTIVE, limit=100):
        try:
            await ctx.queue.cancel(job.id, user_id=user_id)
            n += 1
        except JobError:
            continue  # finished meanwhile
    return n


async def on_cancel(message: Message, ctx: BotContext, lang: str, user_id: int,
                    state: FSMContext) -> None:
    await state.set_state(None)
    n = await cancel_jobs(ctx, user_id)
    await message.answer(t(lang, "cancelled", n=n) if n else t(lang, "cancel_nothing"))


async def on_delete_me(message: Message, lang: str) -> None:
    await message.answer(t(lang, "delete_me_ask"), reply_markup=confirm_delete_me_keyboard(lang))


async def on_forget(query: CallbackQuery, bot: Bot, ctx: BotContext, lang: str, user_id: int,
                    state: FSMContext) -> None:
    await query.answer()
    await forget_user(ctx, user_id)
    await state.clear()
    await ctx.repo.forget_dialogue(user_id)
    await bot.send_message(user_id, t(lang, "delete_me_done"))


async def forget_user(ctx: BotContext, user_id: int) -> None:
    """Cancel the user's jobs, delete every row, then every file only they used."""
    # 1. stop their work
    await cancel_jobs(ctx, user_id)
    # 2. collect their files before the rows that name them go
    paths: list[str] = []
    style_ids: list[str] = []
    for style in await ctx.repo.list_styles(user_id):
        style_ids.append(style.id)
        paths += [img.path for img in await ctx.repo.list_images(style.id)]
    paths += await ctx.repo.sticker_paths(user_id)
    jobs = await ctx.queue.list_for_user(user_id, limit=100_000)
    for job in jobs:
        photo = job.payload.get("photo")
        if isinstance(photo, str):
            paths.append(photo)
    # 3. the rows (styles, images, stickers cascade; jobs and FSM rows too)
    await ctx.repo.delete_user(user_id)
    # 4. the files
    await remove_unreferenced(ctx, paths)
    await remove_trees(*(ctx.data.path_for("styles", style_id) for style_id in style_ids),
                       *(ctx.data.path_for(area, job.id) for job in jobs
                         for area in ("results", "checkpoints")))
    for job in jobs:
        ctx.notifier.tracked.pop(job.id, None)


def create_router() -> Router:
    """A fresh router (aiogram attaches a router to one dispatcher only)."""
    router = Router(name="account")
    router.message.register(on_status, Command("status"))
    router.message.register(on_cancel, Command("cancel"))
    router.message.register(on_delete_me, Command("delete_me"))
    router.callback_query.register(on_forget, F.data == "forget:yes")
    return router
