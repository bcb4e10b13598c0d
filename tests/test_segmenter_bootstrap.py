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
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.settings import Settings, load_settings

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


def test_head_problem_names_encoders_and_many_class_heads(encoder: Path, tiny_zoo: Path, tmp_path: Path) -> None:
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
    from pipeline.models import choose_segmenter, load_chosen_segmenter, resolve_sources
    from pipeline.jobs import train_segmenter_version
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
