"""The real aiogram bot against the loopback fake Bot API: the conversation, bad input, forged
buttons, 429 handling. No worker here: where a job must finish, the test takes the worker's side
of the real SQLite queue (claim, progress, complete) itself."""

from __future__ import annotations

import asyncio
import io
import struct
import time
import zlib
from pathlib import Path

import pytest
from bot_harness import bot_settings, picture, running_bot, wait_delivered
from conftest import TEST_TOKEN
from fake_bot_api import FakeBotAPI, FakeUser, user
from PIL import Image

from bot.app import BotApp
from pipeline.queue.base import JobKind, JobState
from pipeline.queue.sqlite import SqliteJobQueue
from pipeline.settings import Settings, load_settings


@pytest.fixture
async def fake() -> FakeBotAPI:
    api = FakeBotAPI(TEST_TOKEN)
    await api.start()
    yield api
    await api.close()


@pytest.fixture
def settings(tmp_path: Path, fake: FakeBotAPI) -> Settings:
    return bot_settings(load_settings(data_dir=tmp_path / "data", admin_ids="1"), fake, TEST_TOKEN)


def blobs(settings: Settings) -> list[Path]:
    root = settings.data_dir / "blobs"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


async def draft_count(app: BotApp, user_id: int) -> int:
    drafts = await app.ctx.repo.list_styles(user_id, status="draft")
    return await app.ctx.repo.count_images(drafts[-1].id) if drafts else 0


async def send_stickers(fake: FakeBotAPI, u: FakeUser, n: int, *, first_seed: int = 0) -> None:
    for i in range(n):
        fid = fake.add_file(picture(first_seed + i, fmt="WEBP"), kind="stickers", suffix=".webp")
        fake.send_sticker(u, fid)
        await fake.wait_text(u.id, f"has {i + 1} usable")


def huge_png_header(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR claiming ``width`` x ``height`` (a decompression bomb)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + chunk(b"IEND", b""))


async def test_start_help_and_language(fake: FakeBotAPI, settings: Settings) -> None:
    async with running_bot(settings):
        ann, ivan = user(10), user(11, lang="ru")
        fake.send_text(ann, "/start")
        call = await fake.wait_text(10, "I learn the style")
        assert ("🏋️ Train", "train") in fake.buttons(call)
        fake.send_text(ivan, "/help")
        await fake.wait_text(11, "Привет!")
        # /lang switches, and the choice sticks
        fake.send_text(ann, "/lang")
        await fake.wait_text(10, "Choose a language")
        fake.press(ann, "lang:ru")
        await fake.wait_text(10, "Язык: русский")
        fake.send_text(ann, "/start")
        await fake.wait_text(10, "Привет!")
        fake.press(ann, "lang:xx")  # forged choice
        await fake.wait_for(lambda c: c.method == "answerCallbackQuery" and "show_alert" in c.params)


async def test_album_of_five_photos_is_acknowledged_once(fake: FakeBotAPI, settings: Settings) -> None:
    async with running_bot(settings) as app:
        ann = user(20)
        for i in range(5):
            fid = fake.add_file(picture(100 + i, fmt="JPEG"))
            fake.send_photo(ann, fid, media_group_id="album-1")
        await fake.wait_text(20, "Added 5 image(s)")
        await asyncio.sleep(1.0)  # nothing else may follow
        acks = [c for c in fake.calls_to("sendMessage", 20) if "Added" in c.text]
        assert len(acks) == 1, [c.text for c in acks]
        assert "has 5 usable" in acks[0].text
        assert await draft_count(app, 20) == 5


async def test_pack_link_imports_all_static_stickers(fake: FakeBotAPI, settings: Settings) -> None:
    stickers = [fake.sticker_object(fake.add_file(picture(200 + i, fmt="WEBP"), kind="stickers",
                                                  suffix=".webp")) for i in range(4)]
    tgs = fake.add_file(b"\x1f\x8b" + b"\x00" * 50, kind="stickers", suffix=".tgs")
    stickers.append(fake.sticker_object(tgs, is_animated=True))
    webm = fake.add_file(b"\x1a\x45\xdf\xa3" + b"\x00" * 50, kind="stickers", suffix=".webm")
    stickers.append(fake.sticker_object(webm, is_video=True))
    fake.add_sticker_set("CatsPack", stickers, title="Cats")
    async with running_bot(settings) as app:
        ann = user(30)
        fake.send_text(ann, "look https://t.me/addstickers/CatsPack")
        done = await fake.wait_text(30, "Imported 4 image(s)")
        assert "Skipped 2" in done.text and "animated" in done.text and "video" in done.text
        assert await draft_count(app, 30) == 4
        # The animated/video files were never downloaded: only the static ones were asked for.
        asked = {c.params["file_id"] for c in fake.calls_to("getFile")}
        assert tgs not in asked and webm not in asked
        fake.send_text(ann, "/import NoSuchPack")
        await fake.wait_text(30, "can't find a sticker pack named «NoSuchPack»")
        fake.send_text(ann, "/import ../etc")
        await fake.wait_text(30, "is not a sticker pack name")


async def test_bad_input_gets_a_clear_reply_and_changes_nothing(fake: FakeBotAPI,
                                                                settings: Settings) -> None:
    async with running_bot(settings) as app:
        ann = user(40)
        await send_stickers(fake, ann, 1)
        before = blobs(settings)
        start = len(fake.calls)
        # a text file
        fid = fake.add_file(b"just some notes\n", kind="documents", suffix=".txt")
        fake.send_document(ann, fid, file_name="notes.txt", mime_type="text/plain")
        await fake.wait_text(40, "«notes.txt» is not an image", start=start)
        # a corrupt WEBP
        fid = fake.add_file(b"RIFF\x10\x00\x00\x00WEBPVP8 garbage", kind="documents", suffix=".webp")
        fake.send_document(ann, fid, file_name="broken.webp", mime_type="image/webp")
        call = await fake.wait_text(40, "broken.webp", start=start)
        assert "can't use this image" in call.text
        # a PNG claiming 50000 x 50000
        fid = fake.add_file(huge_png_header(50000, 50000), kind="documents", suffix=".png")
        fake.send_document(ann, fid, file_name="bomb.png", mime_type="image/png")
        call = await fake.wait_text(40, "bomb.png", start=start)
        assert "too large" in call.text
        # an animated sticker
        fid = fake.add_file(b"\x1f\x8b" + b"\x00" * 40, kind="stickers", suffix=".tgs")
        fake.send_sticker(ann, fid, is_animated=True)
        await fake.wait_text(40, "animated sticker", start=start)
        # a huge photo (over the 20 MB bots may download): refused before any download
        fid = fake.add_file(picture(1, fmt="JPEG"), size=25 * 1024 * 1024)
        fake.send_photo(ann, fid)
        await fake.wait_text(40, "over 20 MB", start=start)
        assert all(c.params.get("file_id") != fid for c in fake.calls_to("getFile"))
        # an API file_path that tries to climb out
        fid = fake.add_file(picture(2), file_path="../../../etc/passwd")
        fake.send_photo(ann, fid)
        await fake.wait_text(40, "unusable file path", start=start)
        await asyncio.sleep(0.3)
        assert await draft_count(app, 40) == 1
        assert blobs(settings) == before
        assert not any("error id" in c.text for c in fake.calls[start:])


async def test_forged_callbacks_change_nothing(fake: FakeBotAPI, settings: Settings) -> None:
    async with running_bot(settings) as app:
        repo = app.ctx.repo
        await repo.ensure_user(50)
        owned = await repo.create_style(50, "Ann's", status="ready")
        await repo.update_user(50, active_style_id=owned.id)
        sticker = await repo.add_sticker(user_id=50, style_id=owned.id, job_id=None,
                                         path="results/x/0.webp", emoji="🙂", caption="", seed=1)
        mallory = user(51)
        start = len(fake.calls)
        for data in (f"use:{owned.id}", f"rename:{owned.id}", f"del:{owned.id}",
                     f"delyes:{owned.id}", f"pack:{sticker.id}", f"again:{sticker.id}",
                     f"redo:{owned.id}", f"style:{owned.id}", "noun:../../x", "nonsense"):
            fake.press(mallory, data)
        index = start
        for _ in range(10):  # each press is answered; wait for the tenth answer
            answer = await fake.wait_for(lambda c: c.method == "answerCallbackQuery", start=index)
            index = fake.calls.index(answer) + 1
        alerts = [c for c in fake.calls[start:] if c.method == "answerCallbackQuery"]
        assert len(alerts) == 10
        assert all("doesn't belong to you" in str(c.params.get("text")) for c in alerts)
        assert await repo.get_style(owned.id) == owned
        assert (await repo.get_user(51)).active_style_id is None
        assert (await repo.get_sticker(sticker.id)).in_pack is False
        assert not fake.calls_to("createNewStickerSet") and not fake.calls_to("addStickerToSet")
        assert not await app.ctx.queue.list_for_user(51)


async def test_429_retry_after_waits_and_delivers(fake: FakeBotAPI, settings: Settings) -> None:
    async with running_bot(settings):
        ann = user(60)
        fake.fail_next("sendMessage", retry_after=1)
        t0 = time.monotonic()
        fake.send_text(ann, "/start")
        first = await fake.wait_text(60, "I learn the style")
        await fake.wait_text(60, "I learn the style", start=fake.calls.index(first) + 1)
        elapsed = time.monotonic() - t0
        tries = fake.calls_to("sendMessage", 60)
        assert len(tries) == 2  # refused once, then sent
        assert tries[1].at - tries[0].at >= 0.95
        assert elapsed >= 1.0


class QueueWorker:
    """The worker's side of the real queue, driven by the test (the bot never runs models)."""

    def __init__(self, queue: SqliteJobQueue, data_dir: Path) -> None:
        self.queue = queue
        self.data_dir = data_dir

    async def claim(self, kind: JobKind) -> str:
        for _ in range(100):
            job = await self.queue.claim("test-worker", kinds=[kind])
            if job is not None:
                return job.id
            await asyncio.sleep(0.05)
        raise TimeoutError(f"no {kind} job was queued")

    async def train(self, job_id: str, steps: int = 4) -> None:
        job = await self.queue.get(job_id)
        for step in range(1, steps + 1):
            await self.queue.report_progress(job_id, "test-worker", step / steps, f"step {step}/{steps}")
            await asyncio.sleep(0.3)
        await self.queue.complete(job_id, "test-worker", {
            "style_dir": f"styles/{job.payload['style_id']}", "identifier": "zwx",
            "class_noun": job.payload["class_noun"], "steps": steps, "seconds": 1.0})

    async def sticker(self, job_id: str) -> None:
        rel = f"results/{job_id}/0.webp"
        out = self.data_dir / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.open(io.BytesIO(picture(7, size=512, alpha=True))).save(out, format="WEBP")
        await self.queue.complete(job_id, "test-worker", {
            "stickers": [{"path": rel, "emoji": "😺", "seed": 3}], "caption": "a cat",
            "prompt": "p", "timings": {}})


async def test_training_progress_ready_sticker_and_pack(fake: FakeBotAPI, settings: Settings) -> None:
    queue = await SqliteJobQueue.from_settings(settings)
    worker = QueueWorker(queue, settings.data_dir)
    try:
        async with running_bot(settings) as app:
            ann = user(70)
            await send_stickers(fake, ann, 3)
            fake.send_text(ann, "/train")
            await fake.wait_text(70, "What do your stickers show?")
            fake.send_text(ann, "cat")
            await fake.wait_text(70, "is queued: position 1")
            job_id = await worker.claim(JobKind.TRAIN)
            await worker.train(job_id)
            await fake.wait_text(70, "is ready and active")
            edits = [c.text for c in fake.calls_to("editMessageText", 70)]
            assert any("step 2/4" in e for e in edits)
            assert len(edits) == len(set(edits))  # only changed texts are sent
            style = (await app.ctx.repo.list_styles(70, status="ready"))[0]
            assert style.class_noun == "cat" and style.identifier == "zwx"
            # a photo becomes a sticker job, the sticker comes back with its buttons
            fake.send_photo(ann, fake.add_file(picture(9, fmt="JPEG")))
            await fake.wait_text(70, "Drawing your sticker")
            sticker_job = await worker.claim(JobKind.STICKER)
            job = await queue.get(sticker_job)
            assert job.payload["style_id"] == style.id and job.payload["photo"].startswith("blobs/")
            await worker.sticker(sticker_job)
            sent = await fake.wait_for(lambda c: c.method == "sendSticker")
            buttons = dict((d.split(":")[0], d) for _, d in fake.buttons(sent))
            assert set(buttons) == {"again", "pack", "other"}
            # add to pack: created on first use with the user's name scheme
            fake.press(ann, buttons["pack"])
            await fake.wait_text(70, "Created your pack")
            name = f"style_70_by_{fake.username}"
            assert len(fake.sticker_sets[name]["stickers"]) == 1
            assert (await queue.get(sticker_job)).state == JobState.SUCCEEDED
            fake.press(ann, buttons["pack"])
            await fake.wait_text(70, "already in your pack")
    finally:
        await queue.close()


async def test_class_nouns_reach_training_in_english_in_both_languages(fake: FakeBotAPI,
                                                                      settings: Settings) -> None:
    """SD 1.5's text encoder reads English: the buttons speak the user's language and carry
    English nouns, typed words go through the dictionary, and a word that is not understood is
    asked again with the buttons."""
    queue = await SqliteJobQueue.from_settings(settings)

    async def trained_noun(user_id: int) -> str:
        for _ in range(100):  # the "queued" message goes out just before the job is submitted
            jobs = [j for j in await queue.list_for_user(user_id) if j.kind == JobKind.TRAIN]
            if jobs:
                [job] = jobs
                return job.payload["class_noun"]
            await asyncio.sleep(0.05)
        raise AssertionError(f"no training job for user {user_id}")

    try:
        async with running_bot(settings):
            ivan, ann, bob = user(110, lang="ru"), user(111), user(112)
            # Russian: the buttons are labelled in Russian; an unknown word is asked again
            for i in range(3):
                fid = fake.add_file(picture(i, fmt="WEBP"), kind="stickers", suffix=".webp")
                fake.send_sticker(ivan, fid)
                await fake.wait_text(110, f"{i + 1} подходящих")
            fake.send_text(ivan, "/train")
            ask = await fake.wait_text(110, "Что изображено на стикерах?")
            assert ("кот", "noun:cat") in fake.buttons(ask) and ("робот", "noun:robot") in fake.buttons(ask)
            fake.send_text(ivan, "кракозябра")
            again = await fake.wait_text(110, "Я не знаю слова «кракозябра»")
            assert fake.buttons(again) == fake.buttons(ask)
            fake.send_text(ivan, "Мультяшная девушка")
            await fake.wait_text(110, "(cartoon girl, 3 изобр.) в очереди")
            assert await trained_noun(110) == "cartoon girl"
            # English: a button; a typed English word; a typed unknown one asked again
            await send_stickers(fake, ann, 3, first_seed=10)
            fake.send_text(ann, "/train")
            ask = await fake.wait_text(111, "What do your stickers show?")
            assert ("cat", "noun:cat") in fake.buttons(ask)
            fake.press(ann, "noun:robot")
            await fake.wait_text(111, "(robot, 3 images) is queued")
            assert await trained_noun(111) == "robot"
            await send_stickers(fake, bob, 3, first_seed=20)
            fake.send_text(bob, "/train жабоид")
            again = await fake.wait_text(112, "I don't know «жабоид»")
            assert ("dog", "noun:dog") in fake.buttons(again)
            fake.press(bob, "noun:кот")  # forged: only the offered English nouns are accepted
            await fake.wait_for(lambda c: c.method == "answerCallbackQuery"
                                and "doesn't belong to you" in str(c.params.get("text")))
            fake.send_text(bob, "котик")  # the dictionary works whatever the language
            await fake.wait_text(112, "(cat, 3 images) is queued")
            assert await trained_noun(112) == "cat"
    finally:
        await queue.close()


async def test_a_withheld_sticker_is_explained_not_sent(fake: FakeBotAPI, settings: Settings) -> None:
    """The worker's NSFW filter withheld the only variant: the user reads why, and no sticker
    (nor an empty one) is sent."""
    queue = await SqliteJobQueue.from_settings(settings)
    worker = QueueWorker(queue, settings.data_dir)
    try:
        async with running_bot(settings):
            ann = user(71)
            await send_stickers(fake, ann, 3)
            fake.send_text(ann, "/train")
            await fake.wait_text(71, "What do your stickers show?")
            fake.send_text(ann, "cat")
            await worker.train(await worker.claim(JobKind.TRAIN))
            await fake.wait_text(71, "is ready and active")
            fake.send_photo(ann, fake.add_file(picture(9, fmt="JPEG")))
            job_id = await worker.claim(JobKind.STICKER)
            await queue.complete(job_id, "test-worker", {"stickers": [], "caption": "", "prompt": "p",
                                                         "timings": {}, "withheld": 1})
            await fake.wait_text(71, "the safety filter flagged")
            assert not fake.calls_to("sendSticker", 71)
            assert await wait_delivered(queue)
    finally:
        await queue.close()


async def test_bot_restart_mid_training_still_delivers(fake: FakeBotAPI, settings: Settings) -> None:
    queue = await SqliteJobQueue.from_settings(settings)
    worker = QueueWorker(queue, settings.data_dir)
    try:
        ann = user(80)
        async with running_bot(settings):
            await send_stickers(fake, ann, 3)
            fake.send_text(ann, "/train robot")
            await fake.wait_text(80, "is queued")
            job_id = await worker.claim(JobKind.TRAIN)
            await queue.report_progress(job_id, "test-worker", 0.25, "step 1/4")
        # the bot is down while training goes on and finishes
        await worker.train(job_id)
        start = len(fake.calls)
        async with running_bot(settings) as app:
            await fake.wait_text(80, "is ready and active", start=start)
            assert (await app.ctx.repo.list_styles(80, status="ready"))[0].class_noun == "robot"
            assert await wait_delivered(queue)
    finally:
        await queue.close()


async def test_fsm_state_survives_restart(fake: FakeBotAPI, settings: Settings) -> None:
    ann = user(90)
    async with running_bot(settings):
        await send_stickers(fake, ann, 3)
        fake.send_text(ann, "/train")
        await fake.wait_text(90, "What do your stickers show?")
    start = len(fake.calls)
    async with running_bot(settings):
        fake.send_text(ann, "dragon")  # the answer to the question asked before the restart
        await fake.wait_text(90, "(dragon, 3 images) is queued", start=start)


async def test_styles_rename_delete_and_delete_me(fake: FakeBotAPI, settings: Settings) -> None:
    async with running_bot(settings) as app:
        ann = user(95)
        await send_stickers(fake, ann, 2)
        style = (await app.ctx.repo.list_styles(95))[0]
        fake.send_text(ann, "/styles")
        listing = await fake.wait_text(95, "Your styles")
        assert (f"{style.name} · draft", f"style:{style.id}") in fake.buttons(listing)
        fake.press(ann, f"rename:{style.id}")
        await fake.wait_text(95, "Send a new name")
        fake.send_text(ann, "Cats forever")
        await fake.wait_text(95, "Renamed to «Cats forever»")
        assert (await app.ctx.repo.get_style(style.id)).name == "Cats forever"
        assert len(blobs(settings)) == 2
        fake.send_text(ann, "/delete_me")
        await fake.wait_text(95, "Continue?")
        fake.press(ann, "forget:yes")
        await fake.wait_text(95, "Everything of yours is deleted")
        assert await app.ctx.repo.get_style(style.id) is None
        assert blobs(settings) == []
        async with app.ctx.repo.conn.execute("SELECT COUNT(*) FROM fsm WHERE key LIKE '%:95:%'") as cur:
            assert (await cur.fetchone())[0] == 0


async def test_admin_stats(fake: FakeBotAPI, settings: Settings) -> None:
    async with running_bot(settings):
        fake.send_text(user(2), "/stats")
        await fake.wait_text(2, "for the bot's admins")
        fake.send_text(user(1), "/stats")
        call = await fake.wait_text(1, "Queue depth: 0")
        assert "Users: 2" in call.text and "Worker: no job finished yet" in call.text
        assert "Background remover: no trained version yet" in call.text


async def test_unexpected_error_answers_with_an_id_and_logs_context(
        fake: FakeBotAPI, settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    async with running_bot(settings):
        fake.fail_next("sendMessage", code=500, description="Internal Server Error", retry_after=None)
        fake.send_text(user(99), "/start")
        call = await fake.wait_text(99, "error id")
        error_id = call.text.split("error id ")[1].split(")")[0]
        assert len(error_id) == 8
    records = [r for r in caplog.records if error_id in r.getMessage()]
    assert records and "from user 99" in records[0].getMessage()
    assert records[0].exc_info is not None
    assert all(TEST_TOKEN not in r.getMessage() for r in caplog.records)


async def test_waiting_job_shows_its_queue_position_and_moves_up(fake: FakeBotAPI,
                                                                 settings: Settings) -> None:
    queue = await SqliteJobQueue.from_settings(settings)
    worker = QueueWorker(queue, settings.data_dir)
    try:
        # someone else's two training jobs are ahead
        for other in (501, 502):
            await queue.submit(JobKind.TRAIN, other, {"style_id": "x", "images": [], "class_noun": "cat",
                                                      "steps": None, "seed": 0})
        async with running_bot(settings):
            ann = user(71)
            await send_stickers(fake, ann, 3)
            fake.send_text(ann, "/train cat")
            await fake.wait_text(71, "is queued: position 3")
            first = await worker.claim(JobKind.TRAIN)
            await queue.fail(first, "test-worker", "gone")
            await fake.wait_text(71, "is queued: position 2")
    finally:
        await queue.close()


async def test_quotas_from_settings(fake: FakeBotAPI, tmp_path: Path) -> None:
    settings = bot_settings(load_settings(data_dir=tmp_path / "q", stickers_per_day=0, styles_per_user=1),
                            fake, TEST_TOKEN)
    async with running_bot(settings) as app:
        repo = app.ctx.repo
        await repo.ensure_user(73, language="en")
        ready = await repo.create_style(73, "Mine", status="ready")
        await repo.update_user(73, active_style_id=ready.id)
        ann = user(73)
        fake.send_photo(ann, fake.add_file(picture(5, fmt="JPEG")))
        await fake.wait_text(73, "the daily limit")
        assert not await app.ctx.queue.list_for_user(73)
        # one style allowed, and it exists: a new set cannot start
        fake.send_sticker(ann, fake.add_file(picture(6, fmt="WEBP"), kind="stickers", suffix=".webp"))
        await fake.wait_text(73, "the limit of 1 style(s)")
        assert len(await repo.list_styles(73)) == 1


async def test_a_sticker_asked_for_during_the_segmenter_bootstrap_is_told_getting_ready_then_comes(
        fake: FakeBotAPI, settings: Settings) -> None:
    queue = await SqliteJobQueue.from_settings(settings)
    worker = QueueWorker(queue, settings.data_dir)
    try:
        async with running_bot(settings):
            ann = user(72)
            await send_stickers(fake, ann, 3)
            fake.send_text(ann, "/train cat")
            await fake.wait_text(72, "is queued")
            await worker.train(await worker.claim(JobKind.TRAIN))
            await fake.wait_text(72, "is ready and active")
            # A worker found no trained background remover: its bootstrap (2 minutes) is queued.
            await queue.ensure_job(JobKind.SEGMENTER, {"mode": "bootstrap", "minutes": 2},
                                   key="segmenter-bootstrap")
            start = len(fake.calls)
            fake.send_photo(ann, fake.add_file(picture(9, fmt="JPEG")))
            await fake.wait_text(72, "Getting ready", start=start)
            await fake.wait_text(72, "about 3 min", start=start)  # 2 min of training + data preparation
            boot = await worker.claim(JobKind.SEGMENTER)
            await queue.report_progress(boot, "test-worker", 0.5, "learning backgrounds: 50%")
            await fake.wait_text(72, "about 2 min", start=start)  # the edit follows the bootstrap
            await queue.complete(boot, "test-worker", {"mode": "bootstrap", "version": "v1",
                                                       "promoted": True})
            await fake.wait_text(72, "Drawing your sticker", start=start)  # back to the queue position
            await worker.sticker(await worker.claim(JobKind.STICKER))
            await fake.wait_for(lambda c: c.method == "sendSticker" and c.chat_id == 72)
            assert await wait_delivered(queue)  # the bootstrap's own outcome is no one's message
            assert not [c for c in fake.calls[start:] if c.chat_id == 0]
    finally:
        await queue.close()
