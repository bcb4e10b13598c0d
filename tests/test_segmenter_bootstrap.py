"""The background remover's bootstrap and refresh: a worker whose configured segmenter is an
encoder with no head (a tiny SegformerForImageClassification, as ``nvidia/mit-b0`` is) trains its
own before it makes a sticker; crash resume, one bootstrap for two workers, the refresh rule.
Tiny models, 32-px pairs, procedural stickers only (no network)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.settings import Settings

CPU = torch.device("cpu")


def save_classification_encoder(out: Path) -> Path:
    """A tiny SegFormer ImageNet-style checkpoint: encoder + classifier, no segmentation head."""
    from transformers import SegformerConfig, SegformerForImageClassification, SegformerImageProcessor

    from pipeline.architectures import TINY

    if (out / "config.json").exists():
        return out
    torch.manual_seed(0)
    config = SegformerConfig(num_labels=3, id2label={0: "cat", 1: "dog", 2: "car"},  # type: ignore[call-arg]
                             label2id={"cat": 0, "dog": 1, "car": 2}, **TINY.segformer)
    SegformerForImageClassification(config).save_pretrained(out)
    SegformerImageProcessor(size={"height": 64, "width": 64}).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_classification_encoder(tmp_path_factory.mktemp("encoder") / "mit-tiny")


@pytest.fixture
def boot_settings(tiny_settings: Settings, encoder: Path) -> Settings:
    return tiny_settings.model_copy(update={"segmenter_model": str(encoder), "segmenter_emoji": False,
                                            "segmenter_bootstrap_minutes": 0.05})


def test_head_problem_names_encoders_and_many_class_heads(encoder: Path, tiny_zoo: Path,
                                                           tmp_path: Path) -> None:
    from pipeline.models import segmenter_config_problem as segmenter_head_problem

    assert "no trained segmentation head" in (segmenter_head_problem(encoder) or "")
    assert segmenter_head_problem(tiny_zoo / "segformer") is None
    ade = tmp_path / "ade"
    ade.mkdir()
    (ade / "config.json").write_text(json.dumps({"architectures": ["SegformerForSemanticSegmentation"],
                                                 "id2label": {"0": "wall", "1": "floor"}}))
    assert "none is a background class" in (segmenter_head_problem(ade) or "")
    assert segmenter_head_problem(tmp_path / "missing") is None  # loading it will say what is wrong


def test_bootstrap_writes_a_measured_version_and_switches_to_it(boot_settings: Settings) -> None:
    from pipeline.jobs import train_segmenter_version
    from pipeline.models import choose_segmenter, load_chosen_segmenter, resolve_sources
    from segmentation import versions

    sources = resolve_sources(boot_settings)
    before = choose_segmenter(boot_settings, sources)
    assert before.version is None and before.problem is not None
    messages: list[tuple[float, str]] = []
    run = train_segmenter_version(boot_settings, mode="bootstrap", name="bootstrap-test",
                                  work_dir=boot_settings.data_dir / "work", device=CPU, sources=sources,
                                  progress=lambda f, m: messages.append((f, m)))
    assert run.promoted and run.version == "bootstrap-test"
    info = json.loads((boot_settings.data_dir / "segmenter/bootstrap-test/segmenter.json").read_text())
    assert set(info["figures"]["procedural"]) >= {"iou", "boundary_f", "alpha_mae"}
    assert 0.0 <= info["figures"]["procedural"]["iou"] <= 1.0
    assert info["figures"]["uploads"] is None  # no uploads yet
    assert info["counts"]["procedural"] == 12 and info["counts"]["twemoji"] == 0
    assert info["base"] == str(boot_settings.segmenter_model) and info["mode"] == "bootstrap"
    assert messages and all(0.0 <= f <= 1.0 for f, _ in messages)
    after = choose_segmenter(boot_settings, sources)
    assert after.problem is None and after.version == "bootstrap-test"
    assert versions.current(boot_settings.data_dir).name == "bootstrap-test"
    segmenter = load_chosen_segmenter(boot_settings, after, sources, device=CPU)
    assert segmenter.model.config.num_labels == 1
    # doctor and /stats say which version serves, where it came from, its figures, what is pending.
    line = versions.describe(boot_settings.data_dir, pending=versions.pending_text({"queued": 1}))
    assert line.startswith("bootstrap-test (bootstrap from ") and "procedural IoU" in line
    assert "uploads: none held out" in line and "learned from 0 uploaded" in line
    assert line.endswith("pending: 1 queued")
    doctor = subprocess.run([sys.executable, "-m", "pipeline.cli", "doctor"], capture_output=True, text=True,
                            env=dict(os.environ, STICKERBOT_PRESET="tiny",
                                     STICKERBOT_DATA_DIR=str(boot_settings.data_dir),
                                     STICKERBOT_TINY_ZOO_DIR=str(boot_settings.zoo_dir),
                                     STICKERBOT_SEGMENTER_MODEL=str(boot_settings.segmenter_model)))
    assert "ok  segmenter      bootstrap-test (bootstrap from" in doctor.stdout, doctor.stdout + doctor.stderr
    # An operator who points the setting at another model is served that model, not this version.
    other = boot_settings.model_copy(update={"segmenter_model": str(sources.segmenter) + "-other"})
    assert choose_segmenter(other, resolve_sources(other)).version is None



def test_from_scratch_needs_no_pretrained_weights(boot_settings: Settings, tmp_path: Path) -> None:
    """The licence path: the configured encoder is never read (here it does not even exist)."""
    from pipeline.jobs import train_segmenter_version
    from pipeline.models import choose_segmenter, resolve_sources
    from segmentation import versions

    settings = boot_settings.model_copy(update={"segmenter_bootstrap_from": "scratch",
                                                "segmenter_model": str(tmp_path / "no-such-encoder")})
    sources = resolve_sources(settings)
    assert "from scratch" in (choose_segmenter(settings, sources).problem or "")
    run = train_segmenter_version(settings, mode="bootstrap", name="scratch-a", work_dir=tmp_path / "work",
                                  device=CPU, sources=sources)
    assert run.promoted and run.info["base"] == "scratch:tiny" and run.info["start"] == "scratch:tiny"
    choice = choose_segmenter(settings, sources)
    assert choice.problem is None and choice.version == "scratch-a"
    assert versions.current(settings.data_dir).info["training"]["plan"]["scratch"]


@pytest.mark.slow  # two worker processes / a CLI process: about a minute on 2 cores
def test_cli_bootstrap_trains_promotes_and_reports(boot_env: dict[str, str], tiny_settings: Settings) -> None:
    from segmentation import versions

    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "segmenter", "bootstrap",
                           "--minutes", "0.05", "--no-progress"],
                          env=boot_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout[done.stdout.index("{"):])
    assert report["promoted"] and set(report["figures"]["procedural"]) >= {"iou", "boundary_f", "alpha_mae"}
    assert versions.current(tiny_settings.data_dir).name == report["version"]
    assert not (tiny_settings.data_dir / "segmenter" / "work-cli").exists()
    bad = subprocess.run([sys.executable, "-m", "pipeline.cli", "segmenter", "bootstrap", "--minutes", "0"],
                         env=boot_env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--minutes must be above 0" in bad.stderr

# --- the worker: bootstrap before stickers, crash resume, one bootstrap for two workers -------------


from pipeline.queue.base import JobKind, JobState  # noqa: E402
from pipeline.queue.sqlite import SqliteJobQueue  # noqa: E402
from pipeline.storage.files import DataDir  # noqa: E402
from tests.test_worker import log_tail, sticker_set, until, worker_process  # noqa: E402


@pytest.fixture
def boot_env(tiny_env: dict[str, str], encoder: Path) -> dict[str, str]:
    return dict(tiny_env, STICKERBOT_SEGMENTER_MODEL=str(encoder), STICKERBOT_SEGMENTER_EMOJI="false")


@pytest.fixture
async def queue(tiny_settings: Settings):
    q = await SqliteJobQueue.open(tiny_settings.db_path, max_queued_per_user=1000, stickers_per_day=1000)
    yield q
    await q.close()


async def segmenter_jobs(q: SqliteJobQueue) -> list:
    rows = await q._read("SELECT id FROM jobs WHERE kind = 'segmenter'")
    return [await q.get(r[0]) for r in rows]


async def test_a_worker_without_a_head_bootstraps_then_serves_the_waiting_sticker(
        queue: SqliteJobQueue, tiny_settings: Settings, boot_env: dict[str, str], tmp_path: Path,
        tiny_models) -> None:
    from pipeline.stickers.generation import write_random_style
    from segmentation import versions

    data = DataDir(tiny_settings.data_dir)
    write_random_style(tiny_models.diffusion, data.root / "styles" / "ready", seed=1)
    photo = sticker_set(data, n=1, seed=9)[0]
    sticker = await queue.submit(JobKind.STICKER, 2, {"style_id": "ready", "style_dir": "styles/ready",
                                                      "photo": photo, "seed": 1, "variants": 1})
    log = tmp_path / "w.log"
    env = dict(boot_env, STICKERBOT_SEGMENTER_BOOTSTRAP_MINUTES="0.1")
    with worker_process(env, log, kinds="sticker,train", lease=3) as proc:
        async def bootstrap_queued() -> list:
            return await segmenter_jobs(queue)

        [boot] = await until(bootstrap_queued, within=120, what="the bootstrap job", log=log)
        assert boot.payload["mode"] == "bootstrap" and boot.priority > sticker.priority
        # The waiting sticker is told the remover is getting ready, with the time it needs.
        position = await queue.position(sticker.id)
        assert position.getting_ready and position.eta_seconds is not None and position.eta_seconds > 6

        async def sticker_done() -> bool:
            return (await queue.get(sticker.id)).state.finished

        await until(sticker_done, within=180, what="the sticker", log=log)
        assert proc.poll() is None
        proc.terminate()
        proc.wait(timeout=30)
    boot, done = await queue.get(boot.id), await queue.get(sticker.id)
    assert boot.state == JobState.SUCCEEDED, (boot.error, log_tail(log))
    assert done.state == JobState.SUCCEEDED, (done.error, log_tail(log))
    assert done.started_at >= boot.finished_at  # no sticker before the remover was trained
    assert boot.result["promoted"] and versions.current(data.root).name == boot.result["version"]
    assert not (data.root / "checkpoints" / boot.id).exists()
    with Image.open(data.resolve(done.result["stickers"][0]["path"])) as img:
        alpha = np.asarray(img.convert("RGBA").getchannel("A"))
    assert alpha.min() == 0 and alpha.max() == 255  # a cut-out with transparency


@pytest.mark.slow  # two worker processes / a CLI process: about a minute on 2 cores
async def test_sigkill_mid_bootstrap_resumes_on_the_other_worker_and_it_runs_once(
        queue: SqliteJobQueue, tiny_settings: Settings, boot_env: dict[str, str], tmp_path: Path) -> None:
    data = DataDir(tiny_settings.data_dir)
    env = dict(boot_env, STICKERBOT_SEGMENTER_BOOTSTRAP_MINUTES="0.25")
    logs = [tmp_path / "w1.log", tmp_path / "w2.log"]
    with worker_process(env, logs[0], kinds="sticker,train", lease=3) as w1, \
            worker_process(env, logs[1], kinds="sticker,train", lease=3) as w2:
        procs = {w1.pid: w1, w2.pid: w2}

        async def training_saved():
            jobs = await segmenter_jobs(queue)
            if len(jobs) == 1 and jobs[0].state == JobState.RUNNING and (
                    data.root / "checkpoints" / jobs[0].id / "training-state.pt").exists():
                return jobs[0]
            return None

        job = await until(training_saved, within=150, what="a bootstrap under way", log=logs[0])
        # Both workers asked for the bootstrap; there is one job. Kill the one running it.
        await until(lambda: asyncio.sleep(0, all("segmenter bootstrap: job" in p.read_text() for p in logs)),
                    within=60, what="both workers to ask for the bootstrap", log=logs[1])
        runner = procs[int(job.worker_id.split(":")[1])]
        runner.send_signal(signal.SIGKILL)
        runner.wait()
        survivor = w2 if runner is w1 else w1

        async def finished() -> bool:
            return (await queue.get(job.id)).state.finished

        await until(finished, within=150, what="the other worker to finish the bootstrap", log=logs[1])
        assert survivor.poll() is None
        survivor.terminate()
        survivor.wait(timeout=30)
    jobs = await segmenter_jobs(queue)
    assert len(jobs) == 1
    done = jobs[0]
    assert done.state == JobState.SUCCEEDED, (done.error, log_tail(logs[0]), log_tail(logs[1]))
    assert done.attempts == 2 and done.result["training"]["resumed_from_step"] > 0
    names = [p.name for p in (data.root / "segmenter").iterdir() if p.is_dir() and p.name.startswith("boot")]
    assert names == [done.result["version"]]


# --- uploads as training data, the refresh and its rule ----------------------------------------------


async def add_uploads(settings: Settings, per_user: dict[int, list[bytes]]) -> None:
    """Sticker sets in the product's database, as the bot stores uploads (content-addressed)."""
    from pipeline.storage.db import open_database
    from pipeline.storage.repository import Repository

    data = DataDir(settings.data_dir)
    conn = await open_database(settings.db_path)
    repo = Repository(conn)
    try:
        for user_id, files in per_user.items():
            await repo.ensure_user(user_id)
            style = await repo.create_style(user_id, f"set {user_id}")
            for blob in files:
                rel, sha = data.put_blob(blob, suffix=".png")
                await repo.add_image(style.id, sha256=sha, path=rel, width=80, height=80, source="sticker")
        await conn.commit()
    finally:
        await conn.close()


def opaque_png(seed: int) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (80, 80), (seed, 100, 50)).save(buffer, format="PNG")
    return buffer.getvalue()


async def test_uploads_with_alpha_are_collected_once_and_held_out_by_user(tiny_settings: Settings) -> None:
    from segmentation.bootstrap import collect_uploads, heldout_groups, split_uploads
    from segmentation.synthetic import sticker_files

    files = [png for _, png in sticker_files(12, seed=40, size=80)]
    # Ten users; user 2 uploads user 1's third sticker again; user 1 also an opaque picture.
    await add_uploads(tiny_settings, {1: [*files[:3], opaque_png(1)], 2: [files[2], files[3]],
                                      **{u: [files[u + 1]] for u in range(3, 11)}})
    items = collect_uploads(tiny_settings.data_dir, tiny_settings.db_path, max_pixels=10**7)
    assert len(items) == 12  # 14 uploads: one twice, the opaque one has no label
    assert [i.group for i in items if i.sha256 == items[2].sha256] == ["1"]  # the first owner keeps it
    assert sorted({i.group for i in items}) == sorted(str(u) for u in range(1, 11))
    train, held = split_uploads(items)
    held_users = {i.group for i in held}
    assert len(held_users) == 2 and not held_users & {i.group for i in train}  # a user is all in or out
    assert heldout_groups([str(u) for u in range(1, 11)]) == held_users  # stable for the same users
    assert heldout_groups(["1"]) == set()


def _biased(segmenter, bias: float):
    """The same network answering 'foreground everywhere' (bias > 0) or 'nowhere' (< 0)."""
    with torch.no_grad():
        segmenter.model.decode_head.classifier.bias.fill_(bias)
    return segmenter


def test_a_refresh_that_scores_worse_is_kept_aside_and_the_serving_version_stays(
        boot_settings: Settings) -> None:
    from pipeline.jobs import train_segmenter_version
    from pipeline.models import load_segmenter, resolve_sources
    from segmentation import versions
    from segmentation.bootstrap import gather_data, plan_for, run_segmenter_training, should_promote

    assert should_promote(0.80, 0.80) and should_promote(0.81, None) and not should_promote(0.79, 0.80)
    sources = resolve_sources(boot_settings)
    boot = train_segmenter_version(boot_settings, mode="bootstrap", name="bootstrap-a",
                                   work_dir=boot_settings.data_dir / "work-a", device=CPU, sources=sources)
    data_root = boot_settings.data_dir
    serving = _biased(load_segmenter(versions.current(data_root).path, device=CPU), 30.0)
    candidate = _biased(load_segmenter(versions.current(data_root).path, device=CPU), -30.0)
    plan = plan_for("tiny", size=32, minutes=0.01, scratch=False)
    data = gather_data(plan, data_root=data_root, db_path=boot_settings.db_path, max_pixels=10**7,
                       emoji=False, emoji_registry="file:///nonexistent")
    run = run_segmenter_training(candidate, mode="refresh", name="refresh-b", base=boot.info["base"],
                                 start=str(versions.current(data_root).path), plan=plan, data=data,
                                 data_root=data_root, work_dir=data_root / "work-b", device=CPU,
                                 load_trained=lambda path: load_segmenter(path, device=CPU), serving=serving)
    assert not run.promoted
    assert versions.current(data_root).name == "bootstrap-a"  # still serving the old one
    kept = versions.version(data_root, "refresh-b")
    assert kept is not None and not kept.info["promoted"] and "below the serving" in kept.info["kept_aside"]
    assert kept.info["figures"]["procedural"]["iou"] < kept.info["serving_figures"]["procedural"]["iou"]


async def test_a_worker_queues_a_refresh_after_enough_new_alpha_stickers_and_serves_it_when_promoted(
        tiny_settings: Settings, boot_settings: Settings) -> None:
    from pipeline.jobs import Resident, train_segmenter_version
    from pipeline.models import resolve_sources
    from pipeline.queue.base import REFRESH_PRIORITY
    from pipeline.worker import Worker
    from segmentation import versions
    from segmentation.synthetic import sticker_files

    settings = boot_settings.model_copy(update={"segmenter_refresh_every": 3,
                                                "segmenter_refresh_minutes": 0.02})
    train_segmenter_version(settings, mode="bootstrap", name="bootstrap-a", work_dir=settings.data_dir / "w",
                            device=CPU, sources=resolve_sources(settings))
    resident = Resident.load(settings)
    assert resident.models.segmenter_choice.version == "bootstrap-a"
    q = await SqliteJobQueue.open(settings.db_path)
    try:
        worker = Worker(q, resident, data=DataDir(settings.data_dir), kinds=list(JobKind), lease_seconds=5)
        await add_uploads(settings, {5: [png for _, png in sticker_files(2, seed=70, size=80)]})
        await worker.maybe_refresh_segmenter()
        assert await segmenter_jobs(q) == []  # 2 new alpha stickers: not yet
        await add_uploads(settings, {6: [png for _, png in sticker_files(1, seed=80, size=80)]})
        await worker.maybe_refresh_segmenter()
        await worker.maybe_refresh_segmenter()  # asked twice: still one job
        [job] = await segmenter_jobs(q)
        assert job.payload["mode"] == "refresh" and job.priority == REFRESH_PRIORITY
        outcomes = await worker.run(max_jobs=1)
        assert outcomes[0].state == "succeeded", outcomes
        done = await q.get(job.id)
        promoted = done.result["promoted"]
        current = versions.current(settings.data_dir)
        assert current.name == (done.result["version"] if promoted else "bootstrap-a")
        assert resident.models.segmenter_choice.version == current.name  # served without a restart
        assert done.result["counts"]["uploads"] == 3
        # Promoted or kept aside, the same stickers do not queue another refresh.
        await worker.maybe_refresh_segmenter()
        assert len(await segmenter_jobs(q)) == 1
    finally:
        await q.close()


async def test_training_on_a_worker_waiting_for_its_remover_does_not_yield_to_stickers(
        boot_settings: Settings) -> None:
    """That worker takes no sticker: yielding would only hand it its training job straight back."""
    from pipeline.jobs import Resident
    from pipeline.worker import Worker

    resident = Resident.load(boot_settings)
    assert resident.models.segmenter_choice.problem is not None
    data = DataDir(boot_settings.data_dir)
    q = await SqliteJobQueue.open(boot_settings.db_path)
    try:
        train = await q.submit(JobKind.TRAIN, 1, {"style_id": "s1", "images": sticker_set(data),
                                                  "class_noun": "cat", "steps": 4, "seed": 1})
        await q.submit(JobKind.STICKER, 2, {"style_id": "s0", "style_dir": "styles/s0", "photo": "x.png"})
        worker = Worker(q, resident, data=data, kinds=[JobKind.TRAIN, JobKind.STICKER], lease_seconds=5)
        outcomes = await worker.run(max_jobs=1)
        assert [o.job_id for o in outcomes] == [train.id] and outcomes[0].state == "succeeded", outcomes
        [boot] = await segmenter_jobs(q)  # asked for, for a worker that runs it
        assert boot.state == JobState.QUEUED
    finally:
        await q.close()
