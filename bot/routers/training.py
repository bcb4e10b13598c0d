"""/train: check the draft, get the class noun, submit the training job, show queue position and
ETA in the message the notifier then keeps updated."""

from __future__ import annotations

import secrets

from aiogram import Bot, F, Router
from aiogram.filters import Command, CommandObject
from aiogram.fsm.context import FSMContext
from aiogram.types import CallbackQuery, Message

from bot.context import BotContext
from bot.drafts import MIN_IMAGES, current_draft
from bot.keyboards import noun_keyboard
from bot.nouns import SUBJECTS, to_english
from bot.routers.stickers import eta_text
from bot.states import Train
from bot.texts import t
from pipeline.errors import QueueUnavailableError, QuotaExceededError
from pipeline.queue.base import JobKind, QueuePosition

MAX_ECHO = 40  # characters of a not-understood word quoted back


async def start_training(bot: Bot, ctx: BotContext, lang: str, user_id: int, state: FSMContext,
                         noun: str | None) -> None:
    # 1. the draft must have enough usable images
    draft = await current_draft(ctx, user_id)
    if draft is None:
        await bot.send_message(user_id, t(lang, "train_no_draft"))
        return
    images = await ctx.repo.list_images(draft.id)
    if len(images) < MIN_IMAGES:
        await bot.send_message(user_id, t(lang, "train_too_few", name=draft.name, count=len(images),
                                          min=MIN_IMAGES))
        return
    # 2. the class noun, in English (see bot/nouns.py): asked for with buttons when not given
    if noun is None:
        await state.set_state(Train.noun)
        await bot.send_message(user_id, t(lang, "train_ask_noun"), reply_markup=noun_keyboard(lang))
        return
    # 3. submit; the message goes first so the notifier always has it to edit
    queued = t(lang, "train_queued", name=draft.name, noun=noun, count=len(images), position=1, eta="")
    message = await bot.send_message(user_id, queued)
    payload = {"style_id": draft.id, "images": [img.path for img in images], "class_noun": noun,
               "steps": None, "seed": secrets.randbelow(2**31)}
    try:
        job = await ctx.queue.submit(JobKind.TRAIN, user_id, payload)
    except QuotaExceededError as exc:
        await message.edit_text(str(exc))
        return
    except QueueUnavailableError:
        await message.edit_text(t(lang, "queue_unavailable"))
        return
    await ctx.repo.update_style(draft.id, status="queued", class_noun=noun)
    await state.clear()

    def waiting(position: QueuePosition) -> str:
        return t(lang, "train_queued", name=draft.name, noun=noun, count=len(images),
                 position=max(1, position.position), eta=eta_text(lang, position.eta_seconds))

    ctx.notifier.track(job.id, user_id, message.message_id, queued, queued=waiting)
    # 4. the real position and ETA now; the notifier refreshes them while the job waits
    await ctx.notifier.refresh_positions(job.id)


async def ask_again(message: Message, lang: str, state: FSMContext, typed: str) -> None:
    """A noun that was not understood: say so and offer the buttons."""
    word = " ".join(typed.split())
    word = word if len(word) <= MAX_ECHO else word[: MAX_ECHO - 1] + "…"
    await state.set_state(Train.noun)
    await message.answer(t(lang, "train_unknown_noun", word=word), reply_markup=noun_keyboard(lang))


async def on_train(message: Message, command: CommandObject, bot: Bot, ctx: BotContext, lang: str,
                   user_id: int, state: FSMContext) -> None:
    noun = None
    if command.args:
        noun = to_english(command.args)
        if noun is None:
            await ask_again(message, lang, state, command.args)
            return
    await start_training(bot, ctx, lang, user_id, state, noun)


async def on_train_button(query: CallbackQuery, bot: Bot, ctx: BotContext, lang: str,
                          user_id: int, state: FSMContext) -> None:
    await query.answer()
    await start_training(bot, ctx, lang, user_id, state, None)


async def on_noun_button(query: CallbackQuery, bot: Bot, ctx: BotContext, lang: str,
                         user_id: int, state: FSMContext) -> None:
    noun = (query.data or "").partition(":")[2]
    if noun not in SUBJECTS:  # callback data can be forged: only the offered nouns
        await query.answer(t(lang, "forged"), show_alert=True)
        return
    await query.answer()
    await start_training(bot, ctx, lang, user_id, state, noun)


async def on_noun_text(message: Message, bot: Bot, ctx: BotContext, lang: str, user_id: int,
                       state: FSMContext) -> None:
    noun = to_english(message.text or "")
    if noun is None:
        await ask_again(message, lang, state, message.text or "")
        return
    await start_training(bot, ctx, lang, user_id, state, noun)


def create_router() -> Router:
    """A fresh router (aiogram attaches a router to one dispatcher only)."""
    router = Router(name="training")
    router.message.register(on_train, Command("train"))
    router.callback_query.register(on_train_button, F.data == "train")
    router.callback_query.register(on_noun_button, F.data.startswith("noun:"))
    router.message.register(on_noun_text, Train.noun, F.text, ~F.text.startswith("/"))
    return router
