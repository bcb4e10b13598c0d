"""/stats for the admins named in settings: users, jobs by state, queue depth, worker health."""

from __future__ import annotations

import asyncio
import time

from aiogram import Router
from aiogram.filters import Command
from aiogram.types import Message

from bot.context import BotContext
from bot.texts import t
from pipeline.worker_health import describe_failure, format_duration, read_health
from segmentation.versions import describe, pending_text


async def worker_health(ctx: BotContext, now: float) -> str:
    """From the jobs table: live leases mean a working worker; expired ones a dead one. Above
    it, every worker whose models failed to load (from the workers' health files)."""
    failures = [f"⚠️ {describe_failure(h, now)}"
                for h in await asyncio.to_thread(read_health, ctx.settings.data_dir) if h.failed]
    live, stale, last = await ctx.repo.job_leases(now)
    if stale:
        jobs = t("en", "worker_stale", n=stale)
    elif live:
        jobs = t("en", "worker_busy", n=live)
    else:
        jobs = (t("en", "worker_never") if last is None
                else t("en", "worker_idle", ago=format_duration(now - last)))
    return "\n".join([*failures, jobs])


async def on_stats(message: Message, ctx: BotContext, lang: str, user_id: int) -> None:
    if user_id not in ctx.settings.admin_ids:
        await message.answer(t(lang, "not_admin"))
        return
    counts = await ctx.queue.counts()
    jobs = "; ".join(
        f"{kind}: " + ", ".join(f"{state} {n}" for state, n in sorted(states.items()))
        for kind, states in sorted(counts.items())
    ) or "-"
    depth = sum(states.get("queued", 0) for states in counts.values())
    totals = await ctx.repo.totals()
    # It reads the versions' JSON files: in a thread, off the event loop.
    segmenter = await asyncio.to_thread(describe, ctx.settings.data_dir,
                                        pending=pending_text(counts.get("segmenter", {})))
    await message.answer(t(
        lang, "stats", users=totals["users"], styles=totals["styles"], stickers=totals["stickers"],
        jobs=jobs, depth=depth, worker=await worker_health(ctx, time.time()), segmenter=segmenter,
    ))


def create_router() -> Router:
    """A fresh router (aiogram attaches a router to one dispatcher only)."""
    router = Router(name="admin")
    router.message.register(on_stats, Command("stats"))
    return router
