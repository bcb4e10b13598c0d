"""The background remover's bootstrap and refresh: a worker whose configured segmenter is an
encoder with no head (a tiny SegformerForImageClassification, as ``nvidia/mit-b0`` is) trains its
own before it makes a sticker; crash resume, one bootstrap for two workers, the refresh rule.
Tiny models, 32-px pairs, procedural stickers only (no network)."""

from __future__ import annotations

import asyncio
import json
import signal
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
    from pipeline.models import segmenter_head_problem

    assert "no segmentation head" in (segmenter_head_problem(encoder) or "")
    assert segmenter_head_problem(tiny_zoo / "segformer") is None
    ade = tmp_path / "ade"
    ade.mkdir()
    (ade / "config.json").write_text(json.dumps({"architectures": ["SegformerForSemanticSegmentation"],
                                                 "id2label": {"0": "wall", "1": "floor"}}))
    assert "none of them is the background" in (segmenter_head_problem(ade) or "")
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
    # An operator who points the setting at another model is served that model, not this version.
    other = boot_settings.model_copy(update={"segmenter_model": str(sources.segmenter) + "-other"})
    assert choose_segmenter(other, resolve_sources(other)).version is None


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
