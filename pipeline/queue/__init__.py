"""Job queue backends behind one interface: ``base`` (the contract), ``sqlite`` (embedded,
the default), ``celery`` (scale-out on Redis).

:func:`open_queue` picks the backend named by ``settings.queue_backend``. Backends are imported
when chosen, so the bot never imports Celery unless it runs on it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.queue.base import JobQueue
    from pipeline.settings import Settings


async def open_queue(settings: Settings) -> JobQueue:
    """The configured job queue, connected and ready (``await queue.close()`` when done).

    ``sqlite``: :class:`pipeline.queue.sqlite.SqliteJobQueue` on ``settings.db_path``.
    ``celery``: ``pipeline.queue.celery.open_celery_queue(settings)``.
    """
    if settings.queue_backend == "celery":
        from pipeline.queue import celery

        return await celery.open_celery_queue(settings)
    from pipeline.queue.sqlite import SqliteJobQueue

    return await SqliteJobQueue.from_settings(settings)
