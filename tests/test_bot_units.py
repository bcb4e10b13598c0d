"""The bot's pure pieces: throttling, file-path checks, language choice, class nouns, progress
text, and the SQLite FSM storage (JSON, never pickle)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from aiogram.fsm.state import State, StatesGroup
from aiogram.fsm.storage.base import StorageKey

from bot.downloads import DownloadError, check_file_path
from bot.fsm_storage import SQLiteStorage, storage_key
from bot.keyboards import noun_keyboard
from bot.middlewares import ThrottlingMiddleware
from bot.notifier import progress_text
from bot.nouns import SUBJECTS, to_english
from bot.texts import TEXTS, pick_language, t
from pipeline.queue.base import Job, JobKind, JobState
from pipeline.storage.db import open_database
from pipeline.storage.repository import Repository


def test_throttling_allows_a_burst_then_refills() -> None:
    limiter = ThrottlingMiddleware(rate=2.0, burst=3.0)
    now = 100.0
    assert [limiter.allow(1, now)[0] for _ in range(3)] == [True, True, True]
    assert limiter.allow(1, now) == (False, True)  # refused, and told once
    assert limiter.allow(1, now) == (False, False)
    assert limiter.allow(2, now) == (True, False)  # other users are not affected
    assert limiter.allow(1, now + 0.5)[0] is True  # 0.5 s * 2/s = one token back


@pytest.mark.parametrize("path", ["photos/file_1.jpg", "stickers/file_22.webp", "documents/a-b_c.png"])
def test_plain_file_paths_pass(path: str) -> None:
    assert check_file_path(path) == path


@pytest.mark.parametrize("path", [None, "", "../etc/passwd", "photos/../../x", "/etc/passwd",
                                  "photos//x", "photos/./x", "photos/x?y=1", "a" * 300,
                                  "photos/x y.jpg", "C:\\x", "photos/%2e%2e/x"])
def test_suspicious_file_paths_are_refused(path: str | None) -> None:
    with pytest.raises(DownloadError):
        check_file_path(path)


def test_language_choice() -> None:
    assert pick_language(None, "ru", "en") == "ru"
    assert pick_language(None, "ru-RU", "en") == "ru"
    assert pick_language(None, "de", "en") == "en"
    assert pick_language(None, None, "ru") == "ru"
    assert pick_language("en", "ru", "ru") == "en"  # the user's /lang choice wins


def test_every_russian_text_fills_like_the_english_one() -> None:
    import string

    for key, ru in TEXTS["ru"].items():
        fields = {f for _, f, _, _ in string.Formatter().parse(TEXTS["en"][key]) if f}
        assert {f for _, f, _, _ in string.Formatter().parse(ru) if f} == fields, key
    assert t("ru", "stats", users=1, styles=2, stickers=3, jobs="-", depth=0, worker="idle", segmenter="-")


@pytest.mark.parametrize(("text", "noun"), [
    ("Cat", "cat"), ("  cartoon   girl ", "cartoon girl"), ("axolotl", "axolotl"),  # English passes
    ("кот", "cat"), ("Котёнок", "cat"), ("котенок", "cat"), ("ПЁС", "dog"),  # the dictionary
    ("мультяшная девушка", "cartoon girl"), ("рыжий кот", "ginger cat"),
    ("пушистый кот", "cat"),  # an unknown adjective is dropped, the noun kept
    ("кракозябра", None), ("кот Барсик", None), ("кот cat", None),  # not understood
    ("a", None), ("cat1", None), ("three word noun", None), ("<b>", None), ("", None),
])
def test_class_nouns_are_english(text: str, noun: str | None) -> None:
    assert to_english(text) == noun


def test_noun_buttons_speak_the_users_language_and_carry_english() -> None:
    for lang in ("en", "ru"):
        buttons = [b for row in noun_keyboard(lang).inline_keyboard for b in row]
        assert len(buttons) == len(SUBJECTS) >= 8
        for button, noun in zip(buttons, SUBJECTS, strict=True):
            assert button.callback_data == f"noun:{noun}" and noun.isascii()
            assert len(button.callback_data.encode()) <= 64
            assert to_english(button.text) == noun  # typing a label gives what pressing it does
    assert [b.text for b in noun_keyboard("ru").inline_keyboard[0]][:2] == ["кот", "собака"]


def make_job(progress: float, message: str) -> Job:
    now = time.time()
    return Job(id="j", kind=JobKind.TRAIN, state=JobState.RUNNING, user_id=1, priority=0, payload={},
               attempts=1, max_attempts=3, worker_id="w", lease_expires_at=now + 30,
               cancel_requested=False, progress=progress, progress_message=message, result=None,
               error=None, created_at=now, started_at=now, finished_at=None, updated_at=now)


def test_progress_text_changes_only_with_progress() -> None:
    a = progress_text("en", make_job(0.5, "step 15/30"), "Cats")
    assert a == progress_text("en", make_job(0.5, "step 15/30"), "Cats")
    assert a == "🏋️ Training «Cats»: 50% — step 15/30"
    assert progress_text("en", make_job(0.53, "step 16/30"), "Cats") != a


class Form(StatesGroup):
    name = State()


async def test_sqlite_fsm_storage_round_trip_and_restart(tmp_path: Path) -> None:
    key = StorageKey(bot_id=7, chat_id=42, user_id=42)
    conn = await open_database(tmp_path / "db.sqlite3")
    storage = SQLiteStorage(conn)
    assert await storage.get_state(key) is None and await storage.get_data(key) == {}
    await storage.set_state(key, Form.name)
    await storage.set_data(key, {"style_id": "abc", "n": 3, "nested": {"ok": [1, "два"]}})
    with pytest.raises(TypeError):
        await storage.set_data(key, {"obj": object()})  # never pickled
    await conn.close()
    # a new connection (a restarted bot) sees the same conversation
    conn = await open_database(tmp_path / "db.sqlite3")
    storage = SQLiteStorage(conn)
    assert await storage.get_state(key) == "Form:name"
    assert await storage.get_data(key) == {"style_id": "abc", "n": 3, "nested": {"ok": [1, "два"]}}
    async with conn.execute("SELECT data FROM fsm WHERE key = ?", (storage_key(key),)) as cur:
        assert (await cur.fetchone())[0].startswith("{")  # plain JSON text on disk
    await storage.set_state(key, None)
    assert await storage.get_state(key) is None
    assert (await storage.get_data(key))["n"] == 3
    # delete_user forgets the conversation through the key layout
    repo = Repository(conn)
    await repo.ensure_user(42)
    other = StorageKey(bot_id=7, chat_id=420, user_id=420)
    await storage.set_data(other, {"keep": True})
    await repo.delete_user(42)
    assert await storage.get_data(key) == {}
    assert await storage.get_data(other) == {"keep": True}
    await conn.close()
