"""The default ``sd15`` preset, offline, against a hub cache of tiny models under the real ids and
layouts (tests/hub_mirror.py): what an operator's first start does, except the download.

In-process tests pass the cache as ``model_cache_dir``; subprocess tests point ``HF_HUB_CACHE`` at
it, as an operator's environment does after the first download.
"""

from __future__ import annotations

import io
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.errors import ModelNotFoundError, UntrainedSegmenterError
from pipeline.models import load_models, segmenter_head_problem
from pipeline.settings import Settings
from tests.hub_mirror import LCM_LORA, SD15, SEGFORMER, blob_of, copy_hub, snapshot_dir

ROOT = Path(__file__).resolve().parents[1]


def photo(seed: int = 0, size: tuple[int, int] = (300, 220)) -> bytes:
    rng = np.random.default_rng(seed)
    arr = np.full((size[1], size[0], 3), rng.integers(0, 255, 3), dtype=np.uint8)
    arr[size[1] // 4: 3 * size[1] // 4, size[0] // 4: 3 * size[0] // 4] = rng.integers(0, 255, 3)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def cli(args: list[str], env: dict[str, str], *, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env=dict(env, PYTHONPATH=str(ROOT)),
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def sd15_models(hub_cache: Path, tmp_path_factory: pytest.TempPathFactory):  # -> Models
    """The sd15 preset's models as the worker loads them (shared: tests must not change them)."""
    from pipeline.settings import load_settings

    settings = load_settings(preset="sd15", data_dir=tmp_path_factory.mktemp("sd15"),
                             model_cache_dir=hub_cache, device="cpu")
    return load_models(settings)


def alpha_of(webp: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(webp)).convert("RGBA"))[..., 3]


# --- loading -------------------------------------------------------------------------------------


def test_models_load_on_the_real_path(sd15_models: Any) -> None:
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPTokenizer

    d = sd15_models.diffusion
    assert d.source == SD15 and d.resolution == 512 and d.dtype == torch.float32
    assert isinstance(d.tokenizer, CLIPTokenizer) and d.tokenizer.model_max_length == 77
    assert (d.tokenizer.bos_token, d.tokenizer.pad_token) == ("<|startoftext|>", "<|endoftext|>")
    assert d.scheduler_config["steps_offset"] == 1 and d.scheduler_config["beta_schedule"] == "scaled_linear"
    assert d.vae_scale_factor == 8
    assert isinstance(sd15_models.safety.model, StableDiffusionSafetyChecker)  # on by default
    assert sd15_models.captioner.processor.image_processor.size == {"height": 384, "width": 384}
    # mit-b0 loads, and is known to be unusable for cut-outs
    assert sd15_models.segmenter.source == SEGFORMER
    assert "SegformerForImageClassification" in (sd15_models.segmenter.head_problem or "")


def test_fp16_loads_the_fp16_variant_files(hub_cache: Path, tmp_path: Path) -> None:
    """dtype float16 reads the *.fp16.safetensors files (half the download); float32 the others."""
    from pipeline.models import load_diffusion, resolve_sources
    from pipeline.settings import load_settings

    sources = resolve_sources(load_settings(preset="sd15", data_dir=tmp_path, model_cache_dir=hub_cache))
    half = load_diffusion(sources, device=torch.device("cpu"), dtype=torch.float16)
    assert next(half.unet.parameters()).dtype == torch.float16
    # The fp16 file is the one read: damage the fp32 one and fp16 still loads.
    hub = copy_hub(hub_cache, tmp_path / "hub")
    blob_of(hub, SD15, "unet/diffusion_pytorch_model.safetensors").write_bytes(b"")
    sources = resolve_sources(load_settings(preset="sd15", data_dir=tmp_path, model_cache_dir=hub))
    load_diffusion(sources, device=torch.device("cpu"), dtype=torch.float16)
    with pytest.raises(ModelNotFoundError, match=r"diffusion_pytorch_model\.safetensors"):
        load_diffusion(sources, device=torch.device("cpu"), dtype=torch.float32)


def test_segmenter_head_problem_cases() -> None:
    from transformers import SegformerConfig

    classification = SegformerConfig(num_labels=1000, architectures=["SegformerForImageClassification"])
    assert "no trained segmentation head" in segmenter_head_problem(classification, source="x") or ""
    one = SegformerConfig(num_labels=1, architectures=["SegformerForSemanticSegmentation"])
    assert segmenter_head_problem(one) is None
    missing = segmenter_head_problem(one, missing_keys=["decode_head.classifier.weight"])
    assert missing is not None and "decode-head" in missing and "segmenter train" in missing
    ade = SegformerConfig(id2label={0: "wall", 1: "person", 2: "sky"},
                          label2id={"wall": 0, "person": 1, "sky": 2},
                          architectures=["SegformerForSemanticSegmentation"])
    assert "none is a background class" in (segmenter_head_problem(ade) or "")
    with_bg = SegformerConfig(id2label={0: "background", 1: "sticker"},
                              label2id={"background": 0, "sticker": 1})
    assert segmenter_head_problem(with_bg) is None


# --- stickers ------------------------------------------------------------------------------------


def test_default_preset_never_returns_an_opaque_rectangle(sd15_models: Any, tmp_path: Path) -> None:
    """mit-b0 has no foreground head: P(foreground) ~ 0.999 everywhere, the matte is solid, and the
    old pipeline returned the whole image as an opaque rectangle. It must refuse instead."""
    from pipeline.stickers.generation import write_random_style
    from pipeline.stickers.sticker_pipeline import StickerModels, StickerOptions, make_sticker

    write_random_style(sd15_models.diffusion, tmp_path / "style", rank=4)
    models = StickerModels.create(sd15_models)
    try:
        result = make_sticker(models, tmp_path / "style", photo(), StickerOptions(steps=2, strength=0.5,
                                                                                  variants=2))
    except UntrainedSegmenterError as exc:
        assert "segmenter train" in str(exc) and SEGFORMER in str(exc)
        return
    for webp in result.webp:  # whatever comes back must have a transparent background
        assert (alpha_of(webp) < 255).mean() > 0.2, "an opaque rectangle came back as a sticker"


@pytest.fixture
def trained_segmenter_models(sd15_models: Any, tiny_zoo: Path):  # -> Models
    """The sd15 models with a segmenter that has a foreground head (the tiny zoo's)."""
    import dataclasses

    from pipeline.models import load_segmenter

    return dataclasses.replace(sd15_models, segmenter=load_segmenter(tiny_zoo / "segformer",
                                                                     device=torch.device("cpu")))


def test_sd15_sticker_with_a_trained_segmenter(trained_segmenter_models: Any, tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """A sticker on the sd15 path, with a template long enough that the caption no longer fits in
    77 tokens: it is shortened before CLIP sees it, and nothing warns about a cut prompt."""
    from pipeline.stickers.generation import write_random_style
    from pipeline.stickers.postprocess import check_sticker
    from pipeline.stickers.sticker_pipeline import STAGES, StickerModels, StickerOptions, make_sticker

    write_random_style(trained_segmenter_models.diffusion, tmp_path / "style", rank=4)
    models = StickerModels.create(trained_segmenter_models)
    template = "a {identifier} {class_noun} sticker, " + "cute " * 64 + "{caption}"
    options = StickerOptions(steps=2, strength=0.5, prompt_template=template)
    result = make_sticker(models, tmp_path / "style", photo(1), options)
    assert len(result.webp) == 1 and result.withheld == 0
    assert max(check_sticker(result.webp[0])) == 512
    assert set(STAGES) <= set(result.timings)
    tokenizer = trained_segmenter_models.diffusion.tokenizer
    assert result.prompt.startswith("a zqv cat sticker, ")
    for text in (result.prompt, result.negative_prompt):
        assert len(tokenizer(text, verbose=False).input_ids) <= 77
    assert "cute" in result.prompt and result.caption and result.caption not in result.prompt
    assert "longer than the specified maximum sequence length" not in caplog.text
    assert "truncated" not in caplog.text


def test_a_flagged_sticker_is_withheld(trained_segmenter_models: Any, tmp_path: Path) -> None:
    """A tiny StableDiffusionSafetyChecker built from a CLIPConfig that flags everything: no
    sticker is encoded or stored, and the job's result says how many were withheld."""
    import dataclasses

    from pipeline.jobs import Resident, run_sticker
    from pipeline.models import SafetyChecker
    from pipeline.queue.base import Job, JobKind, JobState
    from pipeline.settings import load_settings
    from pipeline.stickers.generation import write_random_style
    from pipeline.stickers.safety import flag_unsafe
    from pipeline.stickers.sticker_pipeline import StickerModels
    from pipeline.storage.files import DataDir
    from pipeline.zoo import build_safety_checker
    from tests.hub_mirror import SAFETY_VISION

    safety = trained_segmenter_models.safety
    images = [Image.new("RGB", (64, 64), (200, 10, 10)), Image.new("RGB", (64, 48), (0, 0, 0))]
    assert flag_unsafe(safety, images) == [False, False]  # the mirror's checker never flags
    flagging = SafetyChecker(model=build_safety_checker(SAFETY_VISION, flags=True),
                             feature_extractor=safety.feature_extractor, source="test")
    assert flag_unsafe(flagging, images) == [True, True]

    models = dataclasses.replace(trained_segmenter_models, safety=flagging)
    data = DataDir(tmp_path / "data")
    write_random_style(models.diffusion, data.root / "styles" / "s1", rank=4)
    (data.root / "photos").mkdir(parents=True)
    (data.root / "photos" / "p.png").write_bytes(photo(2, size=(400, 200)))  # 512x256: half the work
    settings = load_settings(preset="sd15", data_dir=data.root, device="cpu")
    resident = Resident(settings=settings, data=data, models=models, stickers=StickerModels.create(models))
    job = Job(id="j1", kind=JobKind.STICKER, state=JobState.RUNNING, user_id=1, priority=0,
              payload={"style_id": "s1", "style_dir": "styles/s1", "photo": "photos/p.png", "variants": 2},
              attempts=1, max_attempts=3, worker_id="w", lease_expires_at=None, cancel_requested=False,
              progress=0.0, progress_message="", result=None, error=None, created_at=0.0, started_at=0.0,
              finished_at=None, updated_at=0.0)
    result = run_sticker(job, resident, should_stop=lambda: None, progress=lambda f, m: None)
    assert result["stickers"] == [] and result["withheld"] == 2
    assert not (data.root / "results" / "j1").exists()


def test_bot_texts_explain_a_withheld_sticker() -> None:
    from bot.texts import t

    for lang in ("en", "ru"):
        text = t(lang, "sticker_withheld", count=2)
        assert "2" in text and "{" not in text
    assert "safety filter" in t("en", "sticker_withheld", count=1)


# --- bad caches: one line naming the model, the file and the fix --------------------------------


@pytest.mark.parametrize("damage", ["missing", "truncated", "wrong_class", "tokenizer"])
def test_a_damaged_cache_names_model_file_and_fix(hub_cache: Path, tmp_path: Path, damage: str,
                                                  sd15_settings: Settings) -> None:
    hub = copy_hub(hub_cache, tmp_path / "hub")
    snap = snapshot_dir(hub, SD15)
    if damage == "missing":
        (snap / "unet" / "diffusion_pytorch_model.safetensors").unlink()
        file = "diffusion_pytorch_model.safetensors"
    elif damage == "truncated":
        blob = blob_of(hub, SD15, "text_encoder/model.safetensors")
        blob.write_bytes(blob.read_bytes()[:-1000])
        file = "text_encoder/model.safetensors"
    elif damage == "tokenizer":
        (snap / "tokenizer" / "vocab.json").unlink()
        file = "tokenizer/vocab.json"
    else:
        vae_config = snap / "vae" / "config.json"
        vae_config.unlink()
        vae_config.write_text((snap / "unet" / "config.json").read_text())
        file = "vae/config.json"
    settings = sd15_settings.model_copy(update={"model_cache_dir": hub})
    with pytest.raises(ModelNotFoundError) as err:
        load_models(settings)
    message = str(err.value)
    assert "\n" not in message and SD15 in message and file in message and "fix:" in message


# --- the commands, as processes ------------------------------------------------------------------


def test_doctor_names_the_untrained_segmenter(sd15_env: dict[str, str]) -> None:
    out = cli(["doctor"], sd15_env, timeout=120)
    assert out.returncode == 1, out.stdout + out.stderr
    bad = [line for line in out.stdout.splitlines() if line.startswith("BAD")]
    assert len(bad) == 1 and "segmenter" in bad[0] and SEGFORMER in bad[0]
    assert "stickerbot segmenter train" in bad[0] and "STICKERBOT_SEGMENTER_MODEL" in bad[0]
    for role in ("diffusion", "captioner", "clip", "dino"):
        assert any(line.startswith("ok") and f"model:{role}" in line for line in out.stdout.splitlines())


def test_worker_refuses_to_start_on_a_truncated_file(hub_cache: Path, tmp_path: Path,
                                                     sd15_env: dict[str, str]) -> None:
    """The worker never serves from a damaged cache: it names model, file and fix once per
    attempt and waits (backing off) for the operator to repair the files; nothing half-loads."""
    hub = copy_hub(hub_cache, tmp_path / "hub")
    blob = blob_of(hub, SD15, "unet/diffusion_pytorch_model.safetensors")
    blob.write_bytes(blob.read_bytes()[: blob.stat().st_size // 2])
    env = dict(sd15_env, HF_HUB_CACHE=str(hub), PYTHONPATH=str(ROOT),
               STICKERBOT_DATA_DIR=str(tmp_path / "data"),
               STICKERBOT_MODEL_LOAD_RETRY_SECONDS="0.5", STICKERBOT_MODEL_LOAD_RETRY_MAX_SECONDS="1")
    log = tmp_path / "worker.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "worker"], env=env, cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while "(attempt 2)" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.2)
        text = log.read_text()
        failures = [line for line in text.splitlines() if "models failed to load (attempt" in line]
        assert len(failures) >= 2, text
        assert all(SD15 in f and "unet" in f and "truncated" in f and "fix:" in f for f in failures), text
        # Checked before anything loads: the text encoder (loaded before the UNet) never was.
        assert "Loading weights" not in text and "models loaded" not in text
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0, log.read_text()


@pytest.mark.slow
def test_cli_train_sticker_evaluate_on_sd15(sd15_env: dict[str, str], tiny_zoo: Path, tmp_path: Path) -> None:
    """train (2 steps, class noun from BLIP captions), sticker (refused with mit-b0; made with a
    trained segmenter, in the LCM fast mode too), evaluate: every command an operator runs."""
    from pipeline.stickers.postprocess import check_sticker
    from segmentation.synthetic import write_stickers

    stickers = tmp_path / "stickers"
    write_stickers(stickers, 3, size=96)
    style = tmp_path / "style"
    out = cli(["train", str(stickers), "--out", str(style), "--steps", "2", "--no-prior", "--rank", "4",
               "--no-progress"], sd15_env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "class noun:" in out.stderr and (style / "style.json").is_file()
    (tmp_path / "photo.png").write_bytes(photo(3))
    refused = cli(["sticker", str(tmp_path / "photo.png"), "--style", str(style), "--steps", "2"], sd15_env)
    assert refused.returncode == 2 and "segmenter train" in refused.stderr
    env = dict(sd15_env, STICKERBOT_SEGMENTER_MODEL=str(tiny_zoo / "segformer"), STICKERBOT_LCM_LORA=LCM_LORA)
    made = cli(["sticker", str(tmp_path / "photo.png"), "--style", str(style), "--fast", "--strength", "0.5",
                "-o", str(tmp_path / "s.webp")], env)
    assert made.returncode == 0, made.stderr[-3000:]
    assert max(check_sticker((tmp_path / "s.webp").read_bytes())) == 512
    scored = cli(["evaluate", "--style", str(style), "--references", str(stickers), "--max-prompts", "1",
                  "--images-per-prompt", "1", "--steps", "2", "--resolution", "64",
                  "--out", str(tmp_path / "eval")], sd15_env)
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert (tmp_path / "eval" / "metrics.json").is_file()


async def test_worker_process_bootstraps_the_untrained_segmenter_before_stickers(
        sd15_settings: Settings, sd15_env: dict[str, str], sd15_models: Any, tmp_path: Path) -> None:
    """The worker starts on sd15 (models from the cache), says at start that stickers wait for the
    segmenter bootstrap, trains one from the cached mit-b0 encoder (a few seconds here), and only
    then makes the sticker: never an opaque rectangle from a random head."""
    from test_worker import state_of, stop, until, worker_process

    from pipeline.queue.base import JobKind, JobState
    from pipeline.queue.sqlite import SqliteJobQueue
    from pipeline.stickers.generation import write_random_style
    from pipeline.storage.files import DataDir

    data = DataDir(sd15_settings.data_dir)
    write_random_style(sd15_models.diffusion, data.root / "styles" / "s1", rank=4)
    (data.root / "uploads").mkdir(parents=True, exist_ok=True)
    (data.root / "uploads" / "p.png").write_bytes(photo(4))
    queue = await SqliteJobQueue.open(sd15_settings.db_path, max_queued_per_user=10, stickers_per_day=10)
    log = tmp_path / "worker.log"
    env = dict(sd15_env, STICKERBOT_SEGMENTER_BOOTSTRAP_MINUTES="0.05", STICKERBOT_SEGMENTER_EMOJI="false",
               STICKERBOT_SEGMENTER_TRAIN_SIZE="64")
    try:
        with worker_process(env, log, kinds="sticker") as proc:
            job = await queue.submit(JobKind.STICKER, 1, {"style_id": "s1", "style_dir": "styles/s1",
                                                          "photo": "uploads/p.png", "seed": 0, "variants": 1})

            async def finished() -> bool:
                return (await state_of(queue, job.id)).state.finished

            await until(finished, within=300, what="the sticker job", log=log)
            assert stop(proc) == 0
        done = await state_of(queue, job.id)
        assert done.state == JobState.SUCCEEDED, done.error
        rows = await queue._read("SELECT id FROM jobs WHERE kind = 'segmenter'")
        [boot] = [await state_of(queue, r[0]) for r in rows]
        assert boot.state == JobState.SUCCEEDED and boot.finished_at <= done.started_at
        assert boot.result is not None and boot.result["promoted"]
        text = log.read_text()
        assert "sticker jobs wait for the segmenter bootstrap" in text and SEGFORMER in text
        assert "LOAD REPORT" not in text and "Could not reach the Hub" not in text
    finally:
        await queue.close()


@pytest.mark.slow
async def test_run_starts_bot_and_worker_on_sd15(sd15_env: dict[str, str], tmp_path: Path) -> None:
    """`stickerbot run` on the default preset: migrates, starts the worker (which loads every
    model from the cache) and the bot, answers /start, stops cleanly on SIGTERM."""
    import asyncio
    import signal
    import time

    from bot_harness import bot_env, start_process
    from conftest import TEST_TOKEN
    from fake_bot_api import FakeBotAPI, user

    fake = FakeBotAPI(TEST_TOKEN)
    await fake.start()
    log = tmp_path / "run.log"
    proc = start_process("run", bot_env(sd15_env, fake, TEST_TOKEN), log)
    try:
        fake.send_text(user(7), "/start")
        await fake.wait_text(7, "I learn the style", timeout=120)
        deadline = time.monotonic() + 180
        while "ready: sticker,train" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            await asyncio.sleep(0.5)
        text = log.read_text()
        assert "ready: sticker,train" in text, text[-3000:]
        assert "models loaded" in text and "preset sd15" in text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0
        assert "Traceback" not in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        await fake.close()


@pytest.mark.gpu
def test_sd15_on_cuda_runs_in_fp16_from_the_fp16_files(hub_cache: Path, tiny_zoo: Path,
                                                        tmp_path: Path) -> None:
    """On a GPU, dtype auto is fp16: the *.fp16.safetensors variants load, the safety checker and
    the captioner run in fp16, the segmenter in fp32, and a sticker comes out."""
    import dataclasses

    from pipeline.models import load_segmenter
    from pipeline.settings import load_settings
    from pipeline.stickers.generation import write_random_style
    from pipeline.stickers.postprocess import check_sticker
    from pipeline.stickers.sticker_pipeline import StickerModels, StickerOptions, make_sticker

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    models = load_models(load_settings(preset="sd15", data_dir=tmp_path, model_cache_dir=hub_cache))
    assert models.dtype == torch.float16 and next(models.diffusion.unet.parameters()).dtype == torch.float16
    assert next(models.safety.model.parameters()).dtype == torch.float16
    segmenter = load_segmenter(tiny_zoo / "segformer", device=models.device)
    models = dataclasses.replace(models, segmenter=segmenter)
    write_random_style(models.diffusion, tmp_path / "style", rank=4)
    result = make_sticker(StickerModels.create(models), tmp_path / "style", photo(5),
                          StickerOptions(steps=4, strength=0.5, variants=2))
    assert len(result.webp) + result.withheld == 2
    for webp in result.webp:
        assert max(check_sticker(webp)) == 512


def test_a_damaged_fp16_file_is_an_error_not_a_switch_to_fp32(hub_cache: Path, tmp_path: Path) -> None:
    from pipeline.models import load_diffusion, resolve_sources
    from pipeline.settings import load_settings

    hub = copy_hub(hub_cache, tmp_path / "hub")
    blob = blob_of(hub, SD15, "vae/diffusion_pytorch_model.fp16.safetensors")
    blob.write_bytes(blob.read_bytes()[:-10])
    sources = resolve_sources(load_settings(preset="sd15", data_dir=tmp_path, model_cache_dir=hub))
    damaged = r"vae/diffusion_pytorch_model\.fp16\.safetensors is truncated"
    with pytest.raises(ModelNotFoundError, match=damaged):
        load_diffusion(sources, device=torch.device("cpu"), dtype=torch.float16)
    load_diffusion(sources, device=torch.device("cpu"), dtype=torch.float32)  # fp32 files are whole
    # A repository without the variant (a local fine-tune, say) loads its plain files in fp16.
    (snapshot_dir(hub, SD15) / "vae" / "diffusion_pytorch_model.fp16.safetensors").unlink()
    half = load_diffusion(sources, device=torch.device("cpu"), dtype=torch.float16)
    assert next(half.vae.parameters()).dtype == torch.float16


def test_the_doctors_fix_works_from_mit_b0(sd15_settings: Settings, hub_cache: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str],
                                           caplog: pytest.LogCaptureFixture) -> None:
    """`stickerbot segmenter train` from the preset's mit-b0 (its encoder, a new one-label head),
    then STICKERBOT_SEGMENTER_MODEL=<out>: doctor has no problem left."""
    from pipeline.cli import main

    monkeypatch.setenv("STICKERBOT_PRESET", "sd15")
    monkeypatch.setenv("STICKERBOT_DATA_DIR", str(sd15_settings.data_dir))
    monkeypatch.setenv("STICKERBOT_MODEL_CACHE_DIR", str(hub_cache))
    monkeypatch.setenv("STICKERBOT_DEVICE", "cpu")
    out = tmp_path / "segmenter"
    assert main(["segmenter", "train", "--procedural", "8", "--epochs", "1", "--pairs-per-epoch", "4",
                 "--val-pairs", "2", "--size", "64", "--batch-size", "4", "--no-progress",
                 "--out", str(out)]) == 0
    assert "incompatible" not in caplog.text
    capsys.readouterr()
    monkeypatch.setenv("STICKERBOT_SEGMENTER_MODEL", str(out))
    assert main(["doctor"]) == 0
    printed = capsys.readouterr().out
    assert "ok  segmenter      has a trained foreground head" in printed and "ready" in printed


def test_dtype_per_device() -> None:
    from pipeline.devices import resolve_dtype
    from pipeline.errors import ConfigError

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype("auto", cpu) == torch.float32 and resolve_dtype("auto", cuda) == torch.float16
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    with pytest.raises(ConfigError, match="STICKERBOT_DTYPE=float16 on the CPU"):
        resolve_dtype("float16", cpu)
