"""The one loop that turns job changes into messages.

It reads ``queue.events_since(cursor)`` and fans out:
  * a running job's progress edits its progress message, only when the text changes and at most
    once per ``min_edit_interval`` per message (a newer text waits and is flushed later);
  * a finished job is *delivered*: its result is applied to the database (style ready/failed,
    sticker rows), the user gets the style announcement or the sticker, then
    ``queue.mark_delivered``. Finished jobs are always taken from ``queue.undelivered()``, the
    durable list, so a bot that restarts (or crashed mid-delivery) delivers what it missed.
Applying a result twice changes nothing (sticker rows are keyed by job and path).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiogram import Bot
from aiogram.exceptions import TelegramBadRequest, TelegramForbiddenError, TelegramNotFound
from aiogram.types import FSInputFile

from bot.keyboards import sticker_keyboard
from bot.texts import t
from pipeline.queue.base import Job, JobKind, JobQueue, JobState, QueuePosition
from pipeline.settings import Settings
from pipeline.storage.files import DataDir
from pipeline.storage.repository import Repository

log = logging.getLogger(__name__)

MAX_DELIVERY_TRIES = 5


@dataclass
class Tracked:
    """A progress message the bot keeps updated for one job."""

    chat_id: int
    message_id: int
    text: str
    edited_at: float
    pending: str | None = None  # a newer text waiting for the rate limit
    # While the job waits: its text for a queue position (position, ETA seconds); None once it runs.
    queued: Callable[[QueuePosition], str] | None = None


def progress_text(lang: str, job: Job, style_name: str) -> str:
    """The progress line of a job: a pure function of its state, so unchanged progress gives the
    same text and causes no edit."""
    percent = round(max(0.0, min(1.0, job.progress)) * 100)
    if job.kind == JobKind.TRAIN:
        detail = f" — {job.progress_message}" if job.progress_message else ""
        return t(lang, "train_running", name=style_name, percent=percent, detail=detail)
    return t(lang, "sticker_running", name=style_name, percent=percent)


def short_error(error: str | None) -> str:
    text = (error or "unknown error").strip().splitlines()[-1] if error else "unknown error"
    return text[:300]


class Notifier:
    def __init__(self, bot: Bot, *, queue: JobQueue, repo: Repository, data: DataDir,
                 settings: Settings, min_edit_interval: float = 2.0,
                 sweep_interval: float = 5.0) -> None:
        self.bot = bot
        self.queue = queue
        self.repo = repo
        self.data = data
        self.settings = settings
        self.min_edit_interval = min_edit_interval
        self.sweep_interval = sweep_interval
        self.tracked: dict[str, Tracked] = {}
        self._tries: dict[str, int] = {}
        self._stopping = asyncio.Event()
        self._last_sweep = 0.0
        self._lock = asyncio.Lock()  # one delivery pass at a time
        self.delivered = 0

    # --- called by handlers ---------------------------------------------------------------
    def track(self, job_id: str, chat_id: int, message_id: int, text: str, *,
              queued: Callable[[QueuePosition], str] | None = None) -> None:
        """Keep ``message_id`` updated for ``job_id``; ``queued`` renders the waiting text for a
        queue position, refreshed as the queue moves."""
        self.tracked[job_id] = Tracked(chat_id, message_id, text, time.monotonic(), queued=queued)

    async def refresh_positions(self, only: str | None = None) -> None:
        """Queue position and ETA of waiting jobs (or just ``only``), into their messages when
        the text changes."""
        for job_id, tracked in list(self.tracked.items()):
            if tracked.queued is None or (only is not None and job_id != only):
                continue
            job = await self.queue.get(job_id)
            if job is None or job.state != JobState.QUEUED:
                tracked.queued = None
                continue
            text = tracked.queued(await self.queue.position(job_id))
            if text != tracked.text:
                tracked.pending = text
                await self._edit_if_due(tracked)

    async def lang_of(self, user_id: int) -> str:
        user = await self.repo.get_user(user_id)
        if user is not None and user.language in ("en", "ru"):
            return user.language
        return self.settings.default_language

    # --- the loop ---------------------------------------------------------------------------
    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        # Changes after "now" come as events; anything finished before is in undelivered().
        latest = getattr(self.queue, "latest_cursor", None)
        cursor = await latest() if latest is not None else time.time() - 2.0
        await self._guard(self.sweep())
        while not self._stopping.is_set():
            try:
                events, cursor = await self.queue.events_since(cursor, wait=1.0)
            except Exception:
                log.exception("reading job events failed; retrying")
                await self._sleep(1.0)
                continue
            finished = False
            for event in events:
                job = event.job
                if job.state.finished:
                    finished = True
                elif job.state == JobState.RUNNING:
                    await self._guard(self.on_running(job))
            await self._guard(self.flush_edits())
            if finished or time.monotonic() - self._last_sweep >= self.sweep_interval:
                await self._guard(self.sweep())
                await self._guard(self.refresh_positions())

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)

    async def _guard(self, work: object) -> None:
        try:
            await work  # type: ignore[misc]
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("notifier step failed")

    # --- progress ---------------------------------------------------------------------------
    async def on_running(self, job: Job) -> None:
        style_id = str(job.payload.get("style_id", ""))
        style = await self.repo.get_style(style_id) if style_id else None
        if style is None:
            return
        if job.kind == JobKind.TRAIN and style.status == "queued":
            await self.repo.update_style(style.id, status="training")
        lang = await self.lang_of(job.user_id)
        text = progress_text(lang, job, style.name)
        tracked = self.tracked.get(job.id)
        if tracked is not None:
            tracked.queued = None
        if tracked is None:
            if job.kind != JobKind.TRAIN:
                return  # sticker jobs are short; their "drawing" message is enough
            # A bot restart lost the message id: start a new progress message.
            message = await self.bot.send_message(job.user_id, text)
            self.track(job.id, job.user_id, message.message_id, text)
            return
        if text == tracked.text:
            tracked.pending = None
            return
        tracked.pending = text
        await self._edit_if_due(tracked)

    async def flush_edits(self) -> None:
        for tracked in list(self.tracked.values()):
            if tracked.pending is not None:
                await self._edit_if_due(tracked)

    async def _edit_if_due(self, tracked: Tracked) -> None:
        if tracked.pending is None or time.monotonic() - tracked.edited_at < self.min_edit_interval:
            return
        text, tracked.pending = tracked.pending, None
        await self._edit(tracked, text)

    async def _edit(self, tracked: Tracked, text: str) -> None:
        if text == tracked.text:
            return
        tracked.text = text
        tracked.edited_at = time.monotonic()
        try:
            await self.bot.edit_message_text(text=text, chat_id=tracked.chat_id,
                                             message_id=tracked.message_id)
        except TelegramBadRequest as exc:
            if "not modified" not in str(exc):
                log.info("could not edit a progress message: %s", exc.message)

    # --- delivery ---------------------------------------------------------------------------
    async def sweep(self) -> None:
        """Deliver every finished, undelivered job."""
        async with self._lock:
            self._last_sweep = time.monotonic()
            for job in await self.queue.undelivered(limit=100):
                await self.deliver(job)

    async def deliver(self, job: Job) -> None:
        try:
            if await self.repo.get_user(job.user_id) is None:
                pass  # the user deleted their data: nothing to tell anyone
            elif job.kind == JobKind.TRAIN:
                await self._deliver_train(job)
            elif job.kind == JobKind.STICKER:
                await self._deliver_sticker(job)
        except (TelegramForbiddenError, TelegramNotFound):
            log.info("user %s cannot be reached; job %s marked delivered", job.user_id, job.id)
        except TelegramBadRequest as exc:
            log.warning("Telegram refused the outcome of job %s: %s", job.id, exc.message)
        except Exception:
            tries = self._tries[job.id] = self._tries.get(job.id, 0) + 1
            log.exception("delivering job %s failed (try %d)", job.id, tries)
            if tries < MAX_DELIVERY_TRIES:
                return  # the next sweep tries again
        self._tries.pop(job.id, None)
        await self.queue.mark_delivered(job.id)
        self.tracked.pop(job.id, None)
        self.delivered += 1

    async def _finish_progress(self, job: Job, text: str | None) -> None:
        tracked = self.tracked.get(job.id)
        if tracked is None:
            return
        if text is None:
            with contextlib.suppress(TelegramBadRequest):
                await self.bot.delete_message(chat_id=tracked.chat_id, message_id=tracked.message_id)
        else:
            tracked.pending = None
            await self._edit(tracked, text)

    async def _deliver_train(self, job: Job) -> None:
        style = await self.repo.get_style(str(job.payload.get("style_id", "")))
        if style is None or style.user_id != job.user_id:
            return  # deleted meanwhile
        lang = await self.lang_of(job.user_id)
        result = job.result or {}
        if job.state == JobState.SUCCEEDED:
            await self.repo.update_style(
                style.id, status="ready", error=None,
                identifier=str(result.get("identifier") or ""),
                class_noun=str(result.get("class_noun") or style.class_noun or ""),
                style_dir=str(result.get("style_dir") or f"styles/{style.id}"),
            )
            await self.repo.update_user(job.user_id, active_style_id=style.id)
            await self._finish_progress(job, t(lang, "train_progress_done", name=style.name))
            await self.bot.send_message(job.user_id, t(lang, "train_ready", name=style.name))
        elif job.state == JobState.CANCELLED:
            await self.repo.update_style(style.id, status="draft")
            await self._finish_progress(job, t(lang, "train_cancelled", name=style.name))
            if job.id not in self.tracked:
                await self.bot.send_message(job.user_id, t(lang, "train_cancelled", name=style.name))
        else:
            error = short_error(job.error)
            await self.repo.update_style(style.id, status="failed", error=error)
            await self._finish_progress(job, None)
            await self.bot.send_message(job.user_id, t(lang, "train_failed", name=style.name,
                                                       error=error))

    async def _deliver_sticker(self, job: Job) -> None:
        lang = await self.lang_of(job.user_id)
        if job.state != JobState.SUCCEEDED:
            await self._finish_progress(job, None)
            key = "sticker_cancelled" if job.state == JobState.CANCELLED else "sticker_failed"
            await self.bot.send_message(job.user_id, t(lang, key, error=short_error(job.error)))
            return
        result = job.result or {}
        style_id = str(job.payload.get("style_id", "")) or None
        caption = str(result.get("caption", ""))
        await self._finish_progress(job, None)
        for item in result.get("stickers", []):
            path = str(item["path"])
            sticker_id = await self._sticker_row(job, style_id, item, caption)
            sticker = await self.repo.get_sticker(sticker_id)
            if sticker is not None and sticker.telegram_file_id:
                continue  # sent before a restart
            file = FSInputFile(self.data.resolve(path), filename="sticker.webp")
            message = await self.bot.send_sticker(
                job.user_id, file, emoji=str(item.get("emoji") or "🙂"),
                reply_markup=sticker_keyboard(lang, sticker_id),
            )
            file_id = message.sticker.file_id if message.sticker else None
            await self.repo.mark_sticker(sticker_id, telegram_file_id=file_id)
        withheld = int(result.get("withheld") or 0)
        if withheld:
            await self.bot.send_message(job.user_id, t(lang, "sticker_withheld", count=withheld))

    async def _sticker_row(self, job: Job, style_id: str | None, item: dict, caption: str) -> str:
        existing = await self.repo.sticker_for_result(job.id, str(item["path"]))
        if existing is not None:
            return existing
        seed = item.get("seed")
        sticker = await self.repo.add_sticker(
            user_id=job.user_id, style_id=style_id, job_id=job.id, path=str(item["path"]),
            emoji=str(item.get("emoji") or "🙂"), caption=caption,
            seed=int(seed) if seed is not None else None,
        )
        return sticker.id
