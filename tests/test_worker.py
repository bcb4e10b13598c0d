"""The worker as a real process (``stickerbot worker``) on a real SQLite file, tiny preset on CPU:
two workers sharing the queue, cancellation, out-of-memory retry, graceful stop and restart,
SIGKILL mid-training with resume on another worker, stickers preempting training."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.queue.base import Job, JobKind, JobState
from pipeline.queue.sqlite import SqliteJobQueue
from pipeline.settings import Settings
from pipeline.storage.files import DataDir
from pipeline.worker import parse_faults
from segmentation.synthetic import sticker_files

NOOP, TRAIN, STICKER = JobKind.NOOP, JobKind.TRAIN, JobKind.STICKER


@contextmanager
def worker_process(env: dict[str, str], log: Path, *, kinds: str = "noop", lease: float = 1.5,
                   fault: str | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """A real ``stickerbot worker`` subprocess; SIGKILLed on the way out if still running."""
    env = dict(env, STICKERBOT_LEASE_SECONDS=str(lease), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if fault:
        env["STICKERBOT_FAULT_INJECT"] = fault
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "worker", "--kinds", kinds],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def stop(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=timeout)


async def until(check: Callable[[], Awaitable[Any]], *, within: float, what: str,
                log: Path | None = None) -> Any:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        value = await check()
        if value:
            return value
        await asyncio.sleep(0.1)
    tail = log_tail(log) if log is not None else ""
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


def log_tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:] if log.exists() else ""


@pytest.fixture
async def queue(tiny_settings: Settings):
    q = await SqliteJobQueue.open(tiny_settings.db_path, max_queued_per_user=1000, stickers_per_day=1000)
    yield q
    await q.close()


async def state_of(q: SqliteJobQueue, job_id: str) -> Job:
    job = await q.get(job_id)
    assert job is not None
    return job


def test_fault_spec_is_parsed_strictly() -> None:
    assert parse_faults("oom:train:2, oom:sticker:1,oom:train:1") == {TRAIN: 3, STICKER: 1}
    assert parse_faults(None) == {}
    for bad in ("oom:train", "segv:train:1", "oom:train:x", "oom:paint:1"):
        with pytest.raises(ValueError):
            parse_faults(bad)


async def test_two_worker_processes_run_200_noop_jobs_exactly_once(
        queue: SqliteJobQueue, tiny_env: dict[str, str], tmp_path: Path) -> None:
    ids = [(await queue.submit(NOOP, 1, {})).id for _ in range(200)]
    logs = [tmp_path / "w1.log", tmp_path / "w2.log"]
    with worker_process(tiny_env, logs[0]) as w1, worker_process(tiny_env, logs[1]) as w2:

        async def all_done() -> bool:
            counts = await queue.counts()
            return counts.get("noop", {}).get("succeeded", 0) == 200

        await until(all_done, within=90, what="200 no-op jobs", log=logs[0])
        assert stop(w1) == 0 and stop(w2) == 0  # graceful stop exits 0
    jobs = [await state_of(queue, i) for i in ids]
    assert all(j.state == JobState.SUCCEEDED and j.attempts == 1 for j in jobs)
    # Each worker logs every run it starts: across both logs, every job ran exactly once.
    runs = [m for log in logs for m in re.findall(r"job ([0-9a-f]{32}) \(noop", log.read_text())]
    assert sorted(runs) == sorted(ids)
    per_worker = {j.worker_id for j in jobs}
    assert len(per_worker) == 2  # both processes took a share


async def test_cancel_queued_and_running_jobs_on_a_worker(
        queue: SqliteJobQueue, tiny_env: dict[str, str], tmp_path: Path) -> None:
    log = tmp_path / "w.log"
    long = await queue.submit(NOOP, 1, {"sleep": 60})
    queued = await queue.submit(NOOP, 1, {"sleep": 60})
    after = await queue.submit(NOOP, 2, {})
    with worker_process(tiny_env, log) as proc:
        async def running() -> bool:
            return (await state_of(queue, long.id)).state == JobState.RUNNING

        await until(running, within=60, what="the long job to start", log=log)
        cancelled = await queue.cancel(queued.id, user_id=1)
        assert cancelled.state == JobState.CANCELLED  # a queued job goes at once
        asked = time.monotonic()
        await queue.cancel(long.id, user_id=1)

        async def cancelled_long() -> bool:
            return (await state_of(queue, long.id)).state == JobState.CANCELLED

        await until(cancelled_long, within=15, what="the running job to stop", log=log)
        assert time.monotonic() - asked < 5  # next heartbeat, next step: not the 60 s sleep

        async def after_done() -> bool:
            return (await state_of(queue, after.id)).state == JobState.SUCCEEDED

        await until(after_done, within=15, what="the next job", log=log)
        assert stop(proc) == 0
    assert (await state_of(queue, queued.id)).started_at is None  # never ran


async def test_out_of_memory_retries_on_low_memory_profile_then_fails_and_worker_survives(
        queue: SqliteJobQueue, tiny_env: dict[str, str], tmp_path: Path) -> None:
    log = tmp_path / "w.log"
    doomed = await queue.submit(NOOP, 1, {"sleep": 0.1})  # OOM, then OOM on low memory: fails
    saved = await queue.submit(NOOP, 1, {"sleep": 0.1})  # OOM, then fine on low memory
    normal = await queue.submit(NOOP, 1, {"sleep": 0.1})
    with worker_process(tiny_env, log, fault="oom:noop:3") as proc:
        async def finished() -> bool:
            return (await state_of(queue, normal.id)).state.finished

        await until(finished, within=60, what="the three jobs", log=log)
        assert proc.poll() is None  # the worker survived
        assert stop(proc) == 0
    failed = await state_of(queue, doomed.id)
    assert failed.state == JobState.FAILED and failed.attempts == 1
    assert "out of accelerator memory, also on the low-memory profile" in (failed.error or "")
    retried = await state_of(queue, saved.id)
    assert retried.state == JobState.SUCCEEDED and retried.result == {"low_memory": True}
    plain = await state_of(queue, normal.id)
    assert plain.state == JobState.SUCCEEDED and plain.result == {}
    assert "retrying on the low-memory profile" in log.read_text()


async def test_sigterm_releases_the_job_and_a_restart_loses_nothing(
        tiny_settings: Settings, tiny_env: dict[str, str], tmp_path: Path) -> None:
    log = tmp_path / "w.log"
    q = await SqliteJobQueue.open(tiny_settings.db_path, max_queued_per_user=1000)
    first = await q.submit(NOOP, 1, {"sleep": 3})
    rest = [await q.submit(NOOP, 1, {"sleep": 0.05}) for _ in range(3)]
    with worker_process(tiny_env, log) as proc:
        async def running() -> bool:
            return (await state_of(q, first.id)).state == JobState.RUNNING

        await until(running, within=60, what="the first job", log=log)
        assert stop(proc, timeout=10) == 0
    back = await state_of(q, first.id)
    assert back.state == JobState.QUEUED and back.attempts == 0 and back.worker_id is None
    await q.close()  # the whole system is down: only the file remains

    q = await SqliteJobQueue.open(tiny_settings.db_path)
    try:
        assert [(await state_of(q, j.id)).state for j in rest] == [JobState.QUEUED] * 3
        with worker_process(tiny_env, log) as proc:
            async def all_done() -> bool:
                states = [(await state_of(q, j.id)).state for j in [first, *rest]]
                return states == [JobState.SUCCEEDED] * 4

            await until(all_done, within=60, what="every job after the restart", log=log)
            assert stop(proc) == 0
        assert (await state_of(q, first.id)).attempts == 1
    finally:
        await q.close()


# --- training and stickers ---------------------------------------------------------------------


def sticker_set(data: DataDir, n: int = 4, seed: int = 0) -> list[str]:
    return [data.put_blob(png, suffix=".png")[0] for _, png in sticker_files(n, seed=seed, size=80)]


def lora_tensors(style_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(style_dir / "pytorch_lora_weights.safetensors"))


async def test_sigkill_mid_training_resumes_on_another_worker(
        queue: SqliteJobQueue, tiny_settings: Settings, tiny_env: dict[str, str], tmp_path: Path) -> None:
    from pipeline.training.style import read_style

    data = DataDir(tiny_settings.data_dir)
    payload = {"style_id": "style1", "images": sticker_set(data), "class_noun": "cat", "steps": 14,
               "seed": 3}
    job = await queue.submit(TRAIN, 1, payload)
    ckpt = data.root / "checkpoints" / job.id / "checkpoint.pt"
    log1, log2 = tmp_path / "w1.log", tmp_path / "w2.log"
    with worker_process(tiny_env, log1, kinds="train,sticker", lease=3) as first:
        async def claimed() -> bool:
            return (await state_of(queue, job.id)).state == JobState.RUNNING

        await until(claimed, within=150, what="the first worker to claim the job", log=log1)
        # The second worker loads its models meanwhile; the first one's lease keeps the job.
        with worker_process(tiny_env, log2, kinds="train,sticker", lease=3) as second:
            async def mid_training() -> bool:
                current = await state_of(queue, job.id)
                return ckpt.is_file() and current.progress >= 4 / 14

            await until(mid_training, within=150, what="a checkpoint mid-training", log=log1)
            first.send_signal(signal.SIGKILL)
            first.wait()
            killed = await state_of(queue, job.id)
            assert killed.progress < 1.0 and killed.attempts == 1

            async def finished() -> bool:
                return (await state_of(queue, job.id)).state.finished

            await until(finished, within=150, what="the second worker to finish", log=log2)

            # Cancelling a running training job stops it at its next step: no style, no checkpoint.
            doomed = await queue.submit(TRAIN, 1, {**payload, "style_id": "style2", "steps": 500})

            async def checkpointed() -> bool:
                return (data.root / "checkpoints" / doomed.id / "checkpoint.pt").is_file()

            await until(checkpointed, within=60, what="the second job's checkpoint", log=log2)
            await queue.cancel(doomed.id, user_id=1)

            async def cancelled() -> bool:
                return (await state_of(queue, doomed.id)).state == JobState.CANCELLED

            await until(cancelled, within=30, what="the cancelled training to stop", log=log2)
            assert stop(second) == 0
        assert not (data.root / "checkpoints" / doomed.id).exists()
        assert not (data.root / "styles" / "style2").exists()
        assert "resuming training from step" in log2.read_text()
    done = await state_of(queue, job.id)
    assert done.state == JobState.SUCCEEDED, done.error
    assert done.attempts == 2
    assert done.result is not None and done.result["resumed_from"] >= 4  # from the checkpoint
    assert done.result["style_dir"] == "styles/style1" and done.result["steps"] == 14
    assert sorted(p.name for p in (data.root / "styles").iterdir()) == ["style1"]  # one, no temp dirs
    assert read_style(data.root / "styles" / "style1").steps == 14
    assert not (data.root / "checkpoints" / job.id).exists()


async def test_sticker_preempts_training_which_ends_as_if_uninterrupted(
        queue: SqliteJobQueue, tiny_settings: Settings, tiny_env: dict[str, str], tmp_path: Path,
        tiny_models: Any) -> None:
    from pipeline.stickers.generation import write_random_style
    from pipeline.stickers.postprocess import check_sticker

    data = DataDir(tiny_settings.data_dir)
    write_random_style(tiny_models.diffusion, data.root / "styles" / "ready", seed=1)
    photo = sticker_set(data, n=1, seed=9)[0]
    images = sticker_set(data)
    payload = {"images": images, "class_noun": "cat", "steps": 12, "seed": 5}
    log = tmp_path / "w.log"
    with worker_process(tiny_env, log, kinds="train,sticker", lease=3) as proc:
        train = await queue.submit(TRAIN, 1, {**payload, "style_id": "interrupted"})

        async def training() -> bool:
            current = await state_of(queue, train.id)
            return current.state == JobState.RUNNING and current.progress >= 3 / 12

        await until(training, within=150, what="training to be under way", log=log)
        sticker = await queue.submit(STICKER, 2, {"style_id": "ready", "style_dir": "styles/ready",
                                                  "photo": photo, "seed": 1, "variants": 1})
        reference = await queue.submit(TRAIN, 3, {**payload, "style_id": "reference"})

        async def all_done() -> bool:
            return all([(await state_of(queue, j.id)).state.finished for j in (train, sticker, reference)])

        await until(all_done, within=240, what="all three jobs", log=log)
        assert stop(proc) == 0
    t, s, r = [await state_of(queue, j.id) for j in (train, sticker, reference)]
    assert (t.state, s.state, r.state) == (JobState.SUCCEEDED,) * 3, (t.error, s.error, r.error)
    assert s.finished_at is not None and t.finished_at is not None and s.finished_at < t.finished_at
    assert t.attempts == 1  # a preemption is not an attempt
    assert t.result is not None and t.result["resumed_from"] >= 3
    assert r.result is not None and r.result["resumed_from"] == 0
    # the resumed slice read its latents and embeddings back: nothing re-encoded (counted)
    assert (t.result["encoded_images"], t.result["encoded_prompts"]) == (0, 0)
    assert r.result["encoded_images"] == 4 + 4 and r.result["encoded_prompts"] == 2
    assert "paused for a sticker" in log.read_text()
    # The interrupted run ends with exactly the weights of an uninterrupted one.
    a = lora_tensors(data.root / "styles" / "interrupted")
    b = lora_tensors(data.root / "styles" / "reference")
    assert a.keys() == b.keys() and a
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert s.result is not None
    sticker_file = data.resolve(s.result["stickers"][0]["path"])
    assert max(check_sticker(sticker_file.read_bytes())) == 512


def test_worker_command_rejects_bad_kinds_and_faults(tiny_env: dict[str, str]) -> None:
    bad_kind = subprocess.run([sys.executable, "-m", "pipeline.cli", "worker", "--kinds", "paint"],
                              env=tiny_env, capture_output=True, text=True, timeout=60)
    assert bad_kind.returncode == 2 and "--kinds" in bad_kind.stderr
    env = dict(tiny_env, STICKERBOT_FAULT_INJECT="oom:train")
    bad_fault = subprocess.run([sys.executable, "-m", "pipeline.cli", "worker", "--kinds", "noop"],
                               env=env, capture_output=True, text=True, timeout=60)
    assert bad_fault.returncode == 2 and "STICKERBOT_FAULT_INJECT" in bad_fault.stderr
    env = dict(tiny_env, STICKERBOT_QUEUE_BACKEND="celery")
    celery = subprocess.run([sys.executable, "-m", "pipeline.cli", "worker"], env=env, capture_output=True,
                            text=True, timeout=60)
    assert celery.returncode == 2 and "celery -A pipeline.celery_app worker" in celery.stderr
    assert os.environ.get("STICKERBOT_FAULT_INJECT") is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("how", ["prctl", "watching", "watching, stop hangs"])
def test_a_worker_ends_with_its_supervisor(how: str, tmp_path: Path) -> None:
    """The supervisor is SIGKILLed; the worker it started in a session of its own gets SIGTERM:
    from the kernel (prctl) or, where there is none, from the watching thread, which also ends
    a worker whose graceful stop hangs after the grace period."""
    hangs = how.endswith("hangs")
    child = (
        "import os, signal, sys, time\n"
        "import pipeline.supervision as s\n"
        + ("" if how == "prctl" else "s.set_parent_death_signal = lambda sig: False\n")
        + ("signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" if hangs else "")
        + f"s.follow_supervisor(os.getppid(), grace={1.0 if hangs else 30.0}, poll=0.05)\n"
        "print('following', flush=True)\n"
        "time.sleep(60)\n"
    )
    pid_file = tmp_path / "child.pid"
    # the supervisor: starts the child in a session of its own, writes its pid, waits to be killed
    supervisor = (
        "import subprocess, sys, time\n"
        f"p = subprocess.Popen([sys.executable, '-c', {child!r}], start_new_session=True,\n"
        "                      stdout=subprocess.PIPE)\n"
        "p.stdout.readline()\n"
        f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(60)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, "-c", supervisor], env=env)
    try:
        deadline = time.monotonic() + 30
        while not pid_file.is_file() or not pid_file.read_text():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        pid = int(pid_file.read_text())
        proc.kill()
        proc.wait()
        killed = time.monotonic()
        while os.path.exists(f"/proc/{pid}") and "Z" not in _proc_state(pid):
            assert time.monotonic() - killed < 10, "the child outlived its supervisor"
            time.sleep(0.05)
        took = time.monotonic() - killed
        # SIGTERM at once (long before the 30-s grace); a hanging stop cut after its 1-s grace
        assert took >= (1.0 if hangs else 0.0), took
    finally:
        if proc.poll() is None:
            proc.kill()


def _proc_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


# --- models that fail to load -------------------------------------------------------------------


def test_backoff_grows_to_its_cap_and_a_crash_series_restarts() -> None:
    from pipeline.commands.run import WORKER_RESTART_MAX_DELAY, restart_delay
    from pipeline.worker_health import backoff_delay

    assert [backoff_delay(n, initial=5, cap=60) for n in range(1, 7)] == [5, 10, 20, 40, 60, 60]
    assert backoff_delay(10_000, initial=5, cap=60) == 60  # no overflow after days of failures
    assert restart_delay(1) == 5.0 and restart_delay(2) == 10.0
    assert restart_delay(50) == WORKER_RESTART_MAX_DELAY


def test_loading_retries_until_it_works_and_the_health_file_follows(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import threading

    from pipeline.errors import ModelNotFoundError
    from pipeline.worker_health import load_with_backoff, read_health

    tries: list[float] = []
    seen: list[str] = []

    def load() -> str:
        tries.append(time.monotonic())
        seen.extend(h.state for h in read_health(tmp_path))
        if len(tries) < 3:
            raise ModelNotFoundError(f"no weights yet (try {len(tries)})")
        return "models"

    assert load_with_backoff(load, data_dir=tmp_path, device="cpu", initial=0.05, cap=0.08,
                             stop=threading.Event()) == "models"
    assert seen == ["loading", "loading", "loading"]  # the failure is replaced by the next try
    assert tries[1] - tries[0] >= 0.05 and tries[2] - tries[1] >= 0.08  # grown, capped
    [health] = read_health(tmp_path)
    assert health.state == "ready" and not health.failed
    messages = [r.getMessage() for r in caplog.records if "failed to load" in r.getMessage()]
    assert messages == ["models failed to load (attempt 1): no weights yet (try 1); trying again in 0.1 s",
                        "models failed to load (attempt 2): no weights yet (try 2); trying again in 0.1 s"]
    # A stop between attempts ends the wait at once.
    stop = threading.Event()
    stop.set()

    def broken() -> str:
        raise OSError("disk full")

    started = time.monotonic()
    assert load_with_backoff(broken, data_dir=tmp_path, device="cpu", initial=60, cap=60, stop=stop) is None
    assert time.monotonic() - started < 5
    [health] = read_health(tmp_path)
    assert health.failed and health.reason == "OSError: disk full" and health.retry_in == 60


async def test_a_worker_whose_models_fail_to_load_backs_off_and_says_why(
        tiny_settings: Settings, tiny_env: dict[str, str], tmp_path: Path) -> None:
    """The worker stays up, retrying with a growing delay; doctor and an admin's /stats show
    "models failed to load: <reason>"; SIGTERM ends it at once between attempts."""
    from bot_harness import bot_settings, running_bot
    from conftest import TEST_TOKEN
    from fake_bot_api import FakeBotAPI, user

    from pipeline.settings import load_settings

    missing = tmp_path / "no-such-model"
    env = dict(tiny_env, STICKERBOT_DIFFUSION_MODEL=str(missing), STICKERBOT_MODEL_LOAD_RETRY_SECONDS="0.3",
               STICKERBOT_MODEL_LOAD_RETRY_MAX_SECONDS="1")
    log = tmp_path / "w.log"
    pattern = re.compile(r"models failed to load \(attempt (\d+)\): (.*); trying again in ([\d.]+) s")
    with worker_process(env, log, kinds="train,sticker") as proc:
        async def four_attempts() -> bool:
            assert proc.poll() is None, log_tail(log)  # it did not exit to be restarted
            return len(pattern.findall(log.read_text())) >= 4

        await until(four_attempts, within=120, what="four attempts", log=log)
        attempts = pattern.findall(log.read_text())
        assert [(n, d) for n, _, d in attempts[:4]] == [("1", "0.3"), ("2", "0.6"), ("3", "1.0"),
                                                         ("4", "1.0")]
        assert all(str(missing) in reason for _, reason, _ in attempts)
        first, later = log.read_text().split("(attempt 2)", 1)
        assert "Traceback" in first and "Traceback" not in later  # with the first attempt only

        doctor = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "pipeline.cli", "doctor", "--skip-models"], env=env,
            capture_output=True, text=True, timeout=120)
        assert doctor.returncode == 1, doctor.stdout + doctor.stderr
        assert "models failed to load: " in doctor.stdout and str(missing) in doctor.stdout

        fake = FakeBotAPI(TEST_TOKEN)
        await fake.start()
        try:
            settings = bot_settings(load_settings(data_dir=tiny_settings.data_dir, admin_ids="1"), fake,
                                    TEST_TOKEN)
            async with running_bot(settings):
                fake.send_text(user(1), "/stats")
                stats = await fake.wait_text(1, "Queue depth")
            assert "⚠️ models failed to load: " in stats.text and str(missing) in stats.text, stats.text
        finally:
            await fake.close()
        started = time.monotonic()
        assert stop(proc, timeout=10) == 0
        assert time.monotonic() - started < 10
