"""The hub mirror holds what the real repositories hold, where huggingface_hub looks for it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.models import SD15_SOURCES
from tests.hub_mirror import LCM_LORA, REPOS, SD15, SEGFORMER, commit_of, repo_dir, snapshot_dir


def test_every_sd15_id_is_mirrored():
    assert set(SD15_SOURCES.values()) | {LCM_LORA} == set(REPOS)


@pytest.mark.parametrize("repo_id", REPOS)
def test_the_hub_client_finds_each_repo_offline(hub_cache: Path, repo_id: str):
    from huggingface_hub import snapshot_download

    assert (repo_dir(hub_cache, repo_id) / "refs" / "main").read_text() == commit_of(repo_id)
    path = snapshot_download(repo_id, cache_dir=hub_cache, local_files_only=True)
    assert Path(path) == snapshot_dir(hub_cache, repo_id)
    files = [p for p in Path(path).rglob("*") if p.is_file()]
    assert files and all(p.is_symlink() and "blobs" in str(p.resolve()) for p in files)


def test_sd15_repo_layout_and_metadata(hub_cache: Path):
    snap = snapshot_dir(hub_cache, SD15)
    index = json.loads((snap / "model_index.json").read_text())
    assert index["safety_checker"] == ["stable_diffusion", "StableDiffusionSafetyChecker"]
    assert index["feature_extractor"] == ["transformers", "CLIPImageProcessor"]
    assert index["scheduler"] == ["diffusers", "PNDMScheduler"]
    for sub, weights in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                         ("text_encoder", "model"), ("safety_checker", "model")):
        assert (snap / sub / f"{weights}.safetensors").is_file()
        assert (snap / sub / f"{weights}.fp16.safetensors").is_file()
    scheduler = json.loads((snap / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "PNDMScheduler" and scheduler["steps_offset"] == 1
    assert (scheduler["beta_start"], scheduler["beta_end"]) == (0.00085, 0.012)
    assert not (snap / "tokenizer" / "tokenizer.json").exists()  # slow-tokenizer files only
    tok = json.loads((snap / "tokenizer" / "tokenizer_config.json").read_text())
    assert tok["model_max_length"] == 77 and tok["bos_token"]["content"] == "<|startoftext|>"


def test_mit_b0_is_a_classification_checkpoint(hub_cache: Path):
    import torch

    snap = snapshot_dir(hub_cache, SEGFORMER)
    config = json.loads((snap / "config.json").read_text())
    assert config["architectures"] == ["SegformerForImageClassification"]
    assert len(config["id2label"]) == 1000 and config["id2label"]["0"] == "tench"
    state = torch.load(snap / "pytorch_model.bin", weights_only=True)
    assert "classifier.weight" in state and not any(k.startswith("decode_head.") for k in state)


def test_lcm_lora_uses_the_kohya_key_naming(hub_cache: Path):
    from safetensors import safe_open

    path = snapshot_dir(hub_cache, LCM_LORA) / "pytorch_lora_weights.safetensors"
    with safe_open(str(path), "pt") as fh:
        keys = list(fh.keys())
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert {k.rsplit(".", 2)[-2] if k.endswith("weight") else "alpha" for k in keys} == {
        "lora_down", "lora_up", "alpha"}
