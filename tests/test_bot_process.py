"""The bot as a process: no model library imported, `stickerbot bot` against the fake Bot API,
`stickerbot run` without a token."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from bot_harness import bot_env, spawn
from conftest import TEST_TOKEN
from fake_bot_api import FakeBotAPI, user

from pipeline.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
MODEL_LIBRARIES = ("torch", "diffusers", "transformers", "peft", "accelerate")


def clean_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("STICKERBOT_") and k not in ("BOT_TOKEN", "TELEGRAM_API_BASE")}
    env.update(STICKERBOT_DATA_DIR=str(tmp_path / "data"), PYTHONPATH=str(ROOT))
    return env


def test_run_without_token_says_how_to_get_one(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "--preset", "tiny"],
                         capture_output=True, text=True, cwd=ROOT, env=clean_env(tmp_path), timeout=60)
    assert out.returncode == 2
    assert "BOT_TOKEN is not set" in out.stderr and "@BotFather" in out.stderr
    # the database was migrated before the token was checked
    assert (tmp_path / "data" / "stickerbot.sqlite3").exists()


async def test_bot_command_serves_stops_and_imports_no_model_library(tmp_path: Path) -> None:
    """`stickerbot bot` answers, stops on SIGTERM, never logs the token, and had no model library
    in sys.modules at exit (after handling updates, not just after importing)."""
    report = tmp_path / "modules.txt"
    code = (
        "import atexit, sys\n"
        "from pipeline.cli import main\n"
        f"atexit.register(lambda: open({str(report)!r}, 'w').write("
        f"','.join(m for m in {MODEL_LIBRARIES!r} if m in sys.modules)))\n"
        "sys.exit(main(['bot']))\n"
    )
    fake = FakeBotAPI(TEST_TOKEN)
    await fake.start()
    env = bot_env(clean_env(tmp_path), fake, TEST_TOKEN)
    proc = spawn(["-c", code], env, tmp_path / "bot.log")
    try:
        fake.send_text(user(5), "/start")
        await fake.wait_text(5, "I learn the style", timeout=60)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert TEST_TOKEN not in (tmp_path / "bot.log").read_text()
        assert report.read_text() == "", f"the bot imported {report.read_text()}"
    finally:
        if proc.poll() is None:
            proc.kill()
        await fake.close()


async def test_a_pack_import_cut_by_sigkill_goes_on_after_the_restart(tmp_path: Path) -> None:
    """The bot is SIGKILLed part-way through importing a pack (Telegram has already confirmed the
    link's update, so it will not come again). The restarted bot goes on from where the record
    says, and the draft ends with every sticker of the pack exactly once."""
    import asyncio
    import sqlite3

    from bot_harness import picture

    fake = FakeBotAPI(TEST_TOKEN)
    await fake.start()
    fake.download_delay = 0.3
    stickers = [fake.sticker_object(fake.add_file(picture(500 + i, fmt="WEBP"), kind="stickers",
                                                  suffix=".webp")) for i in range(12)]
    fake.add_sticker_set("LongPack", stickers, title="Long")
    env = bot_env(clean_env(tmp_path), fake, TEST_TOKEN)
    db = tmp_path / "data" / "stickerbot.sqlite3"

    def query(sql: str) -> list[tuple[int, ...]]:
        with sqlite3.connect(db) as conn:
            return conn.execute(sql).fetchall()

    proc = spawn(["-m", "pipeline.cli", "bot"], env, tmp_path / "bot.log")
    try:
        ann = user(61)
        fake.send_text(ann, "/start")
        await fake.wait_text(61, "I learn the style", timeout=60)
        fake.send_text(ann, "https://t.me/addstickers/LongPack")
        await fake.wait_text(61, "Importing «Long»: ", timeout=30)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        [(done, added)] = query("SELECT done, added FROM pack_imports")
        assert 0 < done < 12 and added <= done
        restart = len(fake.calls)
        await asyncio.sleep(0.5)  # the killed process's last getUpdates is over
        proc = spawn(["-m", "pipeline.cli", "bot"], env, tmp_path / "bot.log")
        await fake.wait_text(61, f"going on from {done}/12", timeout=60, start=restart)
        final = await fake.wait_text(61, "Imported ", timeout=60, start=restart)
        assert "has 12 usable" in final.text, final.text
        assert query("SELECT COUNT(*) FROM images") == [(12,)]
        for _ in range(50):  # the record goes right after the summary is sent
            if query("SELECT COUNT(*) FROM pack_imports") == [(0,)]:
                break
            await asyncio.sleep(0.1)
        assert query("SELECT COUNT(*) FROM pack_imports") == [(0,)]
        # The link was handled once: the restarted bot did not start the import over.
        assert len(fake.calls_to("getStickerSet")) == 2
        assert "Traceback" not in (tmp_path / "bot.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        await fake.close()


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but not yet reaped by init, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# Two model loads and a tiny training: about a minute on a busy 2-core box. The tie itself (prctl,
# the watching thread) is tested by default in test_worker.py::test_a_worker_ends_with_its_supervisor.
@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.timeout(600)
async def test_a_sigkilled_run_takes_its_worker_along_and_a_restart_finishes_the_job_once(
        tmp_path: Path, tiny_settings: Settings, tiny_env: dict[str, str]) -> None:
    """`stickerbot run` is SIGKILLed mid-training (its worker runs in a session of its own, so
    no signal reaches it from the terminal or the process group): the worker stops within
    seconds, releasing its job, and the restarted `run` finishes the job once."""
    import asyncio
    import time

    from pipeline.queue.base import JobKind, JobState
    from pipeline.queue.sqlite import SqliteJobQueue
    from pipeline.storage.files import DataDir
    from segmentation.synthetic import sticker_files

    fake = FakeBotAPI(TEST_TOKEN)
    await fake.start()
    env = bot_env({**tiny_env, "OMP_NUM_THREADS": "1", "STICKERBOT_LEASE_SECONDS": "30",
                   "PYTHONUNBUFFERED": "1"}, fake, TEST_TOKEN)
    data = DataDir(tiny_settings.data_dir)
    images = [data.put_blob(png, suffix=".png")[0] for _, png in sticker_files(4, seed=1, size=80)]
    queue = await SqliteJobQueue.open(tiny_settings.db_path)
    log = tmp_path / "run.log"

    async def until(check, what: str, within: float):
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if value := await check():
                return value
            await asyncio.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}\n{log.read_text(errors='replace')[-3000:]}")

    run = spawn(["-m", "pipeline.cli", "run"], env, log)
    worker_pid = 0
    try:
        job = await queue.submit(JobKind.TRAIN, 1, {"style_id": "s1", "images": images,
                                                    "class_noun": "cat", "steps": 40, "seed": 3})

        async def training():
            current = await queue.get(job.id)
            return current if current.state == JobState.RUNNING and current.progress > 0 else None

        running = await until(training, "training to be under way", within=300)
        worker_pid = int(str(running.worker_id).split(":")[1])
        assert worker_pid != run.pid and alive(worker_pid)
        run.send_signal(signal.SIGKILL)
        run.wait(timeout=10)

        async def worker_gone() -> bool:
            return not alive(worker_pid)

        await until(worker_gone, "the orphaned worker to stop", within=15)
        stopped = await queue.get(job.id)
        assert stopped.state == JobState.QUEUED and stopped.progress < 1.0, stopped  # released
        assert "released" in log.read_text()

        run = spawn(["-m", "pipeline.cli", "run"], env, log)

        async def finished():
            current = await queue.get(job.id)
            return current if current.state.finished else None

        done = await until(finished, "the restarted run to finish the job", within=300)
        assert done.state == JobState.SUCCEEDED and done.attempts == 1, done
        assert done.result["resumed_from"] > 0 and done.worker_id != running.worker_id
        assert sorted(p.name for p in (data.root / "styles").iterdir()) == ["s1"]
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=90) == 0
    finally:
        if run.poll() is None:
            run.kill()
        if worker_pid and alive(worker_pid):  # an orphan, the bug this test is about
            os.kill(worker_pid, signal.SIGKILL)
        await queue.close()
        await fake.close()
