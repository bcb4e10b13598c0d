"""The bot under load: 200 simulated users send /start to a ``stickerbot bot`` process through the
loopback fake Bot API while a training job runs in a ``stickerbot worker`` (tiny preset).

Prints p50/p99/max latency from an update becoming available to the bot's reply, how many
updates were lost, and the bot process's RSS (current and peak). Goals: p99 < 200 ms, nothing
lost, RSS < 200 MB.

    python -m benchmarks bot            # BENCH_BOT_USERS=200 BENCH_BOT_SECONDS=4 to change the load
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "123456:BENCH-token-that-is-long-enough-0123456789"
USERS = int(os.environ.get("BENCH_BOT_USERS", "200"))
SPREAD_SECONDS = float(os.environ.get("BENCH_BOT_SECONDS", "4"))


def rss_mb(pid: int) -> tuple[float, float]:
    """(current, peak) resident set size of a process, from /proc."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values.get("VmRSS", float("nan")), values.get("VmHWM", float("nan"))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def queue_training_job(data_dir: Path) -> str | None:
    """A draft style with 4 pictures and a queued training job, as the bot would submit it."""
    sys.path.insert(0, str(ROOT / "tests"))
    from bot_harness import picture

    from pipeline.queue.base import JobKind
    from pipeline.settings import load_settings
    from pipeline.storage.db import open_database
    from pipeline.storage.files import DataDir
    from pipeline.storage.repository import Repository

    settings = load_settings(data_dir=data_dir, preset="tiny")
    conn = await open_database(settings.db_path)
    repo, data = Repository(conn), DataDir(data_dir)
    await repo.ensure_user(1)
    style = await repo.create_style(1, "bench")
    paths = []
    for seed in range(4):
        rel, digest = data.put_blob(picture(seed, size=64), suffix=".png")
        await repo.add_image(style.id, sha256=digest, path=rel, width=64, height=64, source="photo")
        paths.append(rel)
    await conn.close()
    from pipeline.queue import open_queue

    queue = await open_queue(settings)
    job = await queue.submit(JobKind.TRAIN, 1, {"style_id": style.id, "images": paths,
                                                "class_noun": "cat", "steps": 200, "seed": 0})
    await queue.close()
    return job.id


def has_worker_command() -> bool:
    return (ROOT / "pipeline" / "commands" / "worker.py").exists()


async def run() -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from fake_bot_api import FakeBotAPI, user

    with tempfile.TemporaryDirectory(prefix="bench-bot-") as tmp:
        data_dir = Path(tmp) / "data"
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("STICKERBOT_") and k not in ("BOT_TOKEN", "TELEGRAM_API_BASE")}
        fake = FakeBotAPI(TOKEN)
        await fake.start()
        env.update(BOT_TOKEN=TOKEN, TELEGRAM_API_BASE=fake.base_url, STICKERBOT_DATA_DIR=str(data_dir),
                   STICKERBOT_PRESET="tiny", STICKERBOT_DEVICE="cpu", STICKERBOT_DTYPE="float32",
                   HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), STICKERBOT_LOG_LEVEL="WARNING")
        log = open(Path(tmp) / "processes.log", "ab")  # noqa: SIM115, ASYNC230 - children write to it
        # Starting processes blocks the loop for a moment; nothing is being measured yet.
        # 1. the background load: a training job on a real worker (or a busy CPU without one)
        job_id = await queue_training_job(data_dir)
        if has_worker_command():
            # Started as `stickerbot run` starts it (at a lower CPU priority than the bot).
            from pipeline.commands.run import start_worker
            from pipeline.settings import load_settings

            background = start_worker(load_settings(data_dir=data_dir, preset="tiny"), env=env,
                                      cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            load = "a training job on `stickerbot worker` (tiny preset, started as `stickerbot run` does)"
        else:
            background = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # noqa: ASYNC220
            load = "a busy CPU (no `stickerbot worker` command yet)"
        # 2. the bot, warmed up by one user
        bot = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "bot"], env=env, cwd=ROOT,  # noqa: ASYNC220
                               stdout=log, stderr=subprocess.STDOUT)
        try:
            fake.send_text(user(10**9), "/start")
            await fake.wait_text(10**9, "I learn the style", timeout=120)
            training_running = False
            if job_id and has_worker_command():
                from pipeline.queue.sqlite import SqliteJobQueue

                queue = await SqliteJobQueue.open(data_dir / "stickerbot.sqlite3")
                for _ in range(600):
                    job = await queue.get(job_id)
                    if job is not None and job.state.value == "running":
                        training_running = True
                        break
                    await asyncio.sleep(0.1)
                await queue.close()
            # 3. the users: USERS distinct users, each /start once, spread over SPREAD_SECONDS
            idle_cpu = cpu_seconds(bot.pid)
            await asyncio.sleep(2.0)
            idle_cpu = (cpu_seconds(bot.pid) - idle_cpu) / 2.0
            busy_cpu = cpu_seconds(bot.pid)
            rng = random.Random(0)
            offsets = sorted(rng.uniform(0, SPREAD_SECONDS) for _ in range(USERS))
            first_call = len(fake.calls)
            t0 = time.monotonic()
            for n, offset in enumerate(offsets):
                delay = t0 + offset - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                fake.send_text(user(1000 + n, lang="ru" if n % 3 == 0 else "en"), "/start")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                answered = {c.chat_id for c in fake.calls[first_call:] if c.method == "sendMessage"}
                if len(answered & set(range(1000, 1000 + USERS))) == USERS:
                    break
                await asyncio.sleep(0.1)
            # 4. latencies: injection -> the first reply to that user
            replies: dict[int, float] = {}
            for c in fake.calls[first_call:]:
                if c.method == "sendMessage" and c.chat_id is not None and c.chat_id not in replies:
                    replies[c.chat_id] = c.at
            latencies = [(replies[i.user_id] - i.at) * 1000 for i in fake.injected
                         if 1000 <= i.user_id < 1000 + USERS and i.user_id in replies]
            lost = USERS - len(latencies)
            busy_cpu = cpu_seconds(bot.pid) - busy_cpu
            current, peak = rss_mb(bot.pid)
            job_state = "?"
            if job_id:
                from pipeline.queue.sqlite import SqliteJobQueue

                queue = await SqliteJobQueue.open(data_dir / "stickerbot.sqlite3")
                job = await queue.get(job_id)
                job_state = f"{job.state.value} at {job.progress:.0%}" if job else "gone"
                await queue.close()
        finally:
            for proc in (bot, background):
                proc.send_signal(signal.SIGTERM)
            for proc in (bot, background):
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            log.close()
            await fake.close()
    print(f"background load: {load}; training running when users came: {training_running}; "
          f"training job afterwards: {job_state}")
    print(f"{USERS} users, /start each, spread over {SPREAD_SECONDS:.0f} s "
          f"({USERS / SPREAD_SECONDS:.0f} updates/s)")
    if latencies:
        print(f"update -> reply latency: p50 {percentile(latencies, 50):.1f} ms, "
              f"p99 {percentile(latencies, 99):.1f} ms, max {max(latencies):.1f} ms "
              f"(goal p99 < 200 ms: {'met' if percentile(latencies, 99) < 200 else 'NOT met'})")
        slow = sorted(latencies)[-5:]
        print(f"replies over 100 ms: {sum(v > 100 for v in latencies)}; slowest: "
              + ", ".join(f"{v:.0f}" for v in slow))
    print(f"bot CPU: {idle_cpu * 100:.1f}% of a core when idle; {busy_cpu * 1000 / USERS:.1f} ms per "
          f"/start under load (including its idle share)")
    print(f"updates lost: {lost} of {USERS} (goal 0: {'met' if lost == 0 else 'NOT met'})")
    print(f"bot RSS: {current:.0f} MB now, {peak:.0f} MB peak "
          f"(goal < 200 MB: {'met' if peak < 200 else 'NOT met'})")


def main() -> None:
    asyncio.run(run())


if __name__ == "__main__":
    main()
