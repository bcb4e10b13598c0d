"""The trainer on the tiny preset: learning signal, save/load round trip, resident models left
untouched, yield/resume/cancel, the shared class-image cache, and crash recovery with a real
subprocess killed by SIGKILL."""

from __future__ import annotations

import dataclasses
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from pipeline.errors import CancelledError, TrainingPreempted
from pipeline.models import DiffusionModels, load_models
from pipeline.settings import Settings
from pipeline.training.sticker_set import PreparedSet, prepare_sticker_set
from pipeline.training.style import LORA_FILE, read_style
from pipeline.training.trainer import (
    ADAPTER_NAME,
    CHECKPOINT_FILE,
    COMPILED_SERVING_ATTR,
    UNET_LORA_TARGETS_EXTENDED,
    TrainingConfig,
    TrainingProgress,
    default_steps,
    evaluate_denoising_loss,
    train_style,
    warmup_factor,
)

REPO = Path(__file__).resolve().parents[1]


def sticker_files(n: int, *, seed: int = 0, size: tuple[int, int] = (80, 60)) -> list[tuple[str, bytes]]:
    """Distinct transparent PNG stickers: random coloured polygons."""
    rng = np.random.default_rng(seed)
    files = []
    for i in range(n):
        img = Image.new("RGBA", size, (0, 0, 0, 0))
        draw = ImageDraw.Draw(img)
        for _ in range(4):
            pts = [tuple(int(v) for v in rng.integers(0, max(size), 2)) for _ in range(4)]
            draw.polygon(pts, fill=(*(int(v) for v in rng.integers(0, 255, 3)), 255))
        buf = io.BytesIO()
        img.save(buf, "PNG")
        files.append((f"sticker{i}.png", buf.getvalue()))
    return files


def _pipe(models: DiffusionModels):  # -> StableDiffusionPipeline sharing the resident components
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer, unet=models.unet,
        scheduler=DDIMScheduler.from_config(models.scheduler_config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(models: DiffusionModels, prompt: str) -> np.ndarray:
    with torch.no_grad():
        out = _pipe(models)(prompt, num_inference_steps=3, guidance_scale=3.0, height=64, width=64,
                            generator=torch.Generator("cpu").manual_seed(7), output_type="np")
    return out.images[0]


def _unet_probe(models: DiffusionModels) -> torch.Tensor:
    gen = torch.Generator("cpu").manual_seed(3)
    sample = torch.randn(1, 4, 32, 32, generator=gen)
    hidden = torch.randn(1, 77, models.unet.config.cross_attention_dim, generator=gen)
    with torch.no_grad():
        return models.unet(sample, torch.tensor([500]), encoder_hidden_states=hidden).sample


def _text_probe(models: DiffusionModels) -> torch.Tensor:
    ids = models.tokenizer(["a cat sticker"], padding="max_length", max_length=77,
                           return_tensors="pt").input_ids
    with torch.no_grad():
        return models.text_encoder(ids)[0]




@pytest.fixture
def models(tiny_settings: Settings) -> DiffusionModels:
    """Own models: training adds (and removes) adapters."""
    return load_models(tiny_settings).diffusion


@pytest.fixture
def prepared() -> PreparedSet:
    return prepare_sticker_set(sticker_files(4), resolution=64)


def test_step_rule_and_warmup() -> None:
    assert default_steps(3) == 400 and default_steps(10) == 1000 and default_steps(120) == 1500
    assert [warmup_factor(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0
    with pytest.raises(ValueError, match="rank"):
        TrainingConfig(rank=0)
    low = TrainingConfig(batch_size=4).low_memory()
    assert low.gradient_checkpointing and low.batch_size == 1


def test_learning_signal_round_trip_and_models_left_as_found(
        models: DiffusionModels, prepared: PreparedSet, tmp_path: Path) -> None:
    """One run checks three things: the loss on the instance images (fixed noise and timesteps)
    falls far below the base model's while the class images' loss does not get worse; images
    from the saved file (plain diffusers load_lora_weights, alpha != rank, text-encoder LoRA)
    equal those of the in-memory trained model; the resident models come back unchanged."""
    config = TrainingConfig(steps=20, lr=1e-2, rank=4, lora_alpha=8, batch_size=2,
                            lora_targets=UNET_LORA_TARGETS_EXTENDED, train_text_encoder=True,
                            num_class_images=4, class_image_steps=2, warmup_steps=2, seed=1)
    from pipeline.training.class_images import ensure_class_images

    inst_prompt, cls_prompt = "a zwx character sticker", "a character sticker"
    class_imgs = ensure_class_images(models, prompt=cls_prompt, count=4, cache_dir=tmp_path / "cls",
                                     resolution=64, steps=2).images
    base_inst = evaluate_denoising_loss(models, prepared.images, inst_prompt)
    base_cls = evaluate_denoising_loss(models, class_imgs, cls_prompt)
    unet_before, text_before = _unet_probe(models), _text_probe(models)
    image_before = _generate(models, inst_prompt)

    seen: list[TrainingProgress] = []
    in_memory: dict[str, np.ndarray] = {}

    def progress(p: TrainingProgress) -> None:
        seen.append(p)
        if p.step == p.total:  # the trained adapter is still active here
            in_memory["image"] = _generate(models, inst_prompt)

    result = train_style(models, prepared, config, out_dir=tmp_path / "style",
                         work_dir=tmp_path / "work", class_cache_dir=tmp_path / "cls", progress=progress)

    # progress: every step, images/s and ETA
    assert [p.step for p in seen] == list(range(1, 21)) and seen[-1].eta_s == 0
    assert all(p.images_per_s > 0 and np.isfinite(p.loss) for p in seen)
    assert result.info.instance_prompt == inst_prompt and result.class_images_generated == 0

    # the resident models are exactly as found
    assert torch.equal(_unet_probe(models), unet_before)
    assert torch.equal(_text_probe(models), text_before)
    for module in (models.unet, models.vae, models.text_encoder):
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())
        assert not getattr(module, "peft_config", None)
    assert np.array_equal(_generate(models, inst_prompt), image_before)

    # the style directory
    info = read_style(tmp_path / "style")
    assert info.kind == "lora" and info.rank == 4 and info.lora_alpha == 8 and info.text_encoder_trained
    assert info.train_set_sha256 == prepared.sha256 and info.steps == 20
    assert not (tmp_path / "work" / CHECKPOINT_FILE).exists()

    # plain diffusers loads it at the trained strength: same images as in memory
    pipe = _pipe(models)
    pipe.load_lora_weights(tmp_path / "style", adapter_name="style")
    loaded = _generate(models, inst_prompt)
    assert not np.allclose(in_memory["image"], image_before, atol=1e-3)
    np.testing.assert_allclose(loaded, in_memory["image"], atol=1e-5)

    # learning signal, measured with the saved adapter loaded
    inst = evaluate_denoising_loss(models, prepared.images, inst_prompt)
    cls = evaluate_denoising_loss(models, class_imgs, cls_prompt)
    assert inst < 0.6 * base_inst, (base_inst, inst)
    assert cls < 1.05 * base_cls, (base_cls, cls)
    pipe.delete_adapters("style")


def test_yield_resumes_to_identical_weights_and_cancel_leaves_nothing(
        models: DiffusionModels, prepared: PreparedSet, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    config = TrainingConfig(steps=6, lr=1e-3, rank=4, batch_size=1, num_class_images=2,
                            class_image_steps=2, checkpoint_every=2, warmup_steps=2, seed=5,
                            save_intermediate_every=2)
    cache = tmp_path / "class-images"
    kwargs = {"class_cache_dir": cache}

    # an uninterrupted run: the first style of this class generates the class images
    full = train_style(models, prepared, config, out_dir=tmp_path / "a", work_dir=tmp_path / "wa", **kwargs)
    assert full.class_images_generated == 2 and full.resumed_from == 0
    assert (full.encoded_images, full.encoded_prompts) == (4 + 2, 2)

    # "yield" at step 3: a checkpoint, no style; a later call resumes from step 3
    steps_seen: list[int] = []
    with pytest.raises(TrainingPreempted) as err:
        train_style(models, prepared, config, out_dir=tmp_path / "b", work_dir=tmp_path / "wb",
                    progress=lambda p: steps_seen.append(p.step),
                    should_stop=lambda: "yield" if len(steps_seen) == 3 else None, **kwargs)
    assert err.value.step == 3
    assert (tmp_path / "wb" / CHECKPOINT_FILE).is_file() and not (tmp_path / "b").exists()
    resumed = train_style(models, prepared, config, out_dir=tmp_path / "b", work_dir=tmp_path / "wb",
                          **kwargs)
    assert resumed.resumed_from == 3 and len(resumed.losses) == 3
    assert resumed.class_images_generated == 0  # the second style reused the cache
    # the resumed slice read its latents and embeddings back from the job's work dir
    assert (resumed.encoded_images, resumed.encoded_prompts) == (0, 0)
    a, b = load_file(tmp_path / "a" / LORA_FILE), load_file(tmp_path / "b" / LORA_FILE)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    np.testing.assert_allclose(resumed.losses, full.losses[3:], rtol=0, atol=0)
    # intermediate adapters from both slices of the interrupted run, each a loadable style
    for step in (2, 4):
        assert read_style(tmp_path / "b" / "intermediate" / f"step-{step}").steps == step
    assert not (tmp_path / "wb" / "intermediate").exists()

    # "cancel" after a checkpoint: CancelledError, checkpoint removed, no style
    count: list[int] = []
    with pytest.raises(CancelledError):
        train_style(models, prepared, config, out_dir=tmp_path / "c", work_dir=tmp_path / "wc",
                    progress=lambda p: count.append(p.step),
                    should_stop=lambda: "cancel" if len(count) == 3 else None, **kwargs)
    assert not (tmp_path / "c").exists()
    assert not (tmp_path / "wc" / CHECKPOINT_FILE).exists()
    assert not any(p.name.startswith(".c.") for p in tmp_path.iterdir())
    assert not getattr(models.unet, "peft_config", None)


def test_a_slice_leaves_no_adapter_on_a_unet_the_compiled_path_serves(
        models: DiffusionModels, prepared: PreparedSet, tmp_path: Path) -> None:
    """A preempted slice keeps its adapter (switched off) for the next slice, except on a UNet
    under the compiled serving path, whose graph an extra adapter would change; the next slice
    then resumes from the checkpoint all the same."""
    config = TrainingConfig(steps=4, lr=1e-3, rank=4, batch_size=1, with_prior_preservation=False,
                            checkpoint_every=1, warmup_steps=1, seed=5)

    def preempted_slice(work: Path) -> None:
        seen: list[int] = []
        with pytest.raises(TrainingPreempted):
            train_style(models, prepared, config, out_dir=tmp_path / "out", work_dir=work,
                        class_cache_dir=tmp_path / "cls", progress=lambda p: seen.append(p.step),
                        should_stop=lambda: "yield" if len(seen) == 2 else None)

    preempted_slice(tmp_path / "kept")
    assert ADAPTER_NAME in models.unet.peft_config  # kept, switched off, for the next slice
    train_style(models, prepared, config, out_dir=tmp_path / "kept-out", work_dir=tmp_path / "kept",
                class_cache_dir=tmp_path / "cls")
    setattr(models.unet, COMPILED_SERVING_ATTR, True)
    preempted_slice(tmp_path / "compiled")
    assert ADAPTER_NAME not in (getattr(models.unet, "peft_config", None) or {})
    resumed = train_style(models, prepared, config, out_dir=tmp_path / "c-out",
                          work_dir=tmp_path / "compiled", class_cache_dir=tmp_path / "cls")
    assert resumed.resumed_from == 2


def test_full_finetune_writes_a_unet_directory(models: DiffusionModels, prepared: PreparedSet,
                                               tmp_path: Path) -> None:
    from pipeline.models import load_unet

    before = _unet_probe(models)
    config = TrainingConfig(steps=2, lr=1e-4, batch_size=1, full_finetune=True,
                            with_prior_preservation=False, seed=0)
    result = train_style(models, prepared, config, out_dir=tmp_path / "full", work_dir=tmp_path / "w",
                         class_cache_dir=tmp_path / "cls")
    info = read_style(result.style_dir)
    assert info.kind == "full" and info.rank is None
    tuned = load_unet(tmp_path / "full" / "unet", device=torch.device("cpu"), dtype=torch.float32)
    assert torch.equal(_unet_probe(models), before)  # the resident UNet was not trained
    changed = [n for (n, p), q in zip(tuned.named_parameters(), models.unet.parameters(), strict=True)
               if not torch.equal(p, q)]
    assert changed


def _write_set(directory: Path, files: list[tuple[str, bytes]]) -> None:
    directory.mkdir(parents=True)
    for name, data in files:
        (directory / name).write_bytes(data)


def test_resume_after_sigkill_matches_uninterrupted_run(
        models: DiffusionModels, tiny_env: dict[str, str], tiny_settings: Settings, tmp_path: Path) -> None:
    """A CLI training run is SIGKILLed once a checkpoint exists; rerunning the same command resumes
    from it and ends with the same weights as an uninterrupted run with the same seed."""
    from safetensors.torch import load_file

    files = sticker_files(3, seed=11)
    stickers = tmp_path / "stickers"
    _write_set(stickers, files)
    out = tmp_path / "killed-style"
    work = tmp_path / "killed-work"
    steps, every = 24, 3
    cmd = [sys.executable, "-m", "pipeline.cli", "train", str(stickers), "--out", str(out),
           "--work-dir", str(work), "--class-noun", "cat", "--steps", str(steps), "--seed", "3",
           "--rank", "4", "--lr", "1e-3", "--class-images", "2", "--class-image-steps", "2",
           "--checkpoint-every", str(every), "--no-progress"]
    env = {**tiny_env, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (work / CHECKPOINT_FILE).exists():
            assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()

    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (work / CHECKPOINT_FILE).exists()

    # the uninterrupted reference, in this process with the same configuration
    reference = train_style(
        models, prepare_sticker_set(files, resolution=64),
        TrainingConfig(steps=steps, seed=3, rank=4, lr=1e-3, num_class_images=2,
                       class_image_steps=2, checkpoint_every=1000, class_noun="cat"),
        out_dir=tmp_path / "reference", work_dir=tmp_path / "ref-work",
        class_cache_dir=tiny_settings.data_dir / "class-images")
    assert reference.class_images_generated == 0  # the CLI runs filled the shared cache
    a, b = load_file(out / LORA_FILE), load_file(tmp_path / "reference" / LORA_FILE)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_adapters_loaded_by_the_worker_survive_training(
        models: DiffusionModels, prepared: PreparedSet, tmp_path: Path) -> None:
    """The worker keeps served styles loaded on the same UNet: training must neither train them
    nor leave them switched off, and must not leave its own adapter behind."""
    config = TrainingConfig(steps=2, rank=4, batch_size=1, with_prior_preservation=False, seed=2)
    train_style(models, prepared, config, out_dir=tmp_path / "served", work_dir=tmp_path / "w1",
                class_cache_dir=tmp_path / "cls")
    # give the served adapter a visible effect, as a trained style has
    pipe = _pipe(models)
    pipe.load_lora_weights(tmp_path / "served", adapter_name="served")
    with torch.no_grad():
        for name, p in models.unet.named_parameters():
            if "lora_B" in name:
                p.add_(0.01)
    served_before = _unet_probe(models)
    served_params = {n: (p.clone(), p.requires_grad) for n, p in models.unet.named_parameters()
                     if "served" in n}
    result = train_style(models, prepared, dataclasses.replace(config, seed=3),
                         out_dir=tmp_path / "new", work_dir=tmp_path / "w2", class_cache_dir=tmp_path / "cls")
    assert result.steps == 2
    assert set(models.unet.peft_config) == {"served"}
    assert models.unet.active_adapters() == ["served"]
    assert torch.equal(_unet_probe(models), served_before)
    for name, p in models.unet.named_parameters():
        if "served" in name:
            value, requires_grad = served_params[name]
            assert torch.equal(p, value) and p.requires_grad == requires_grad
    pipe.delete_adapters("served")
