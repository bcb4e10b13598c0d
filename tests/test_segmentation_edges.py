"""Segmentation: what sharpens the remover's edge. Snapping the contour to the colour boundary,
and multi-scale test-time augmentation. Tiny SegFormer, one thread."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segmentation.evaluation import iou

CPU = torch.device("cpu")


# --- edge snapping --------------------------------------------------------------------------------


def _two_colour_image(size: int = 64, edge: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """Two flat halves: columns left of ``edge`` are the foreground (red), the rest blue."""
    image = np.zeros((size, size, 3), np.float32)
    image[:, :edge] = (0.9, 0.1, 0.1)
    image[:, edge:] = (0.1, 0.2, 0.8)
    truth = np.zeros((size, size), bool)
    truth[:, :edge] = True
    return image, truth


def test_snap_edge_moves_a_contour_a_pixel_off_onto_the_colour_edge() -> None:
    from segmentation.removal import RefineConfig, refine_alpha, snap_edge

    image, truth = _two_colour_image()
    cols = np.arange(64, dtype=np.float32)
    for offset in (-1.0, 1.0):  # the model's edge a pixel inside or outside the real one
        coarse = 1 / (1 + np.exp(cols - (30 + offset - 0.5)))  # P = 0.5 half a pixel past column 29+offset
        coarse = np.broadcast_to(coarse, (64, 64)).astype(np.float32)
        assert iou(coarse >= 0.5, truth) < 0.97
        snapped = snap_edge(image, coarse)
        assert np.array_equal(snapped >= 0.5, truth)
        # The remover's matte keeps it, and without snapping it keeps the model's error.
        assert np.array_equal(refine_alpha(image, coarse) >= 0.5, truth)
        assert not np.array_equal(refine_alpha(image, coarse, RefineConfig(snap=False)) >= 0.5, truth)


def test_snap_edge_keeps_the_model_where_colours_do_not_tell() -> None:
    from segmentation.removal import snap_edge

    image = np.full((64, 64, 3), 0.5, np.float32)  # one flat colour: nothing to snap to
    image[:, :30] += 0.01
    coarse = np.zeros((64, 64), np.float32)
    coarse[:, :32] = 0.9
    assert np.array_equal(snap_edge(image, coarse), coarse)
    assert np.array_equal(snap_edge(image, np.zeros_like(coarse)), np.zeros_like(coarse))  # no edge at all


# --- multi-scale test-time augmentation -----------------------------------------------------------


@pytest.fixture(scope="module")
def segmenter(tiny_zoo: Path):
    from pipeline.models import load_segmenter

    return load_segmenter(tiny_zoo / "segformer", device=CPU)


def test_multi_scale_averages_the_logits_of_each_scale(segmenter) -> None:
    from segmentation.removal import model_input_size, predict_alpha
    from segmentation.training import set_input_size

    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)) for _ in range(2)]
    side = model_input_size(segmenter)[0]
    try:
        both = predict_alpha(segmenter, images, scales=(1.0, 1.5), flip=True)
        one = predict_alpha(segmenter, images, flip=True)
        set_input_size(segmenter, round(side * 1.5))
        larger = predict_alpha(segmenter, images, flip=True)
    finally:
        set_input_size(segmenter, side)

    def logit(p: np.ndarray) -> np.ndarray:
        return np.log(p) - np.log1p(-p)

    for b, o, g, img in zip(both, one, larger, images, strict=True):
        assert b.shape == (img.height, img.width)
        np.testing.assert_allclose(logit(b), (logit(o) + logit(g)) / 2, atol=1e-3)
        assert np.abs(logit(o) - logit(g)).max() > 1e-3  # the two scales really differ


def test_scales_out_of_range_are_refused(segmenter) -> None:
    from segmentation.removal import predict_alpha

    image = Image.new("RGB", (40, 40), "white")
    for scales in ((), (0.1,), (1.0, 5.0)):
        with pytest.raises(ValueError, match="scales must be"):
            predict_alpha(segmenter, [image], scales=scales)


# --- the from-scratch recipe's training options ---------------------------------------------------


def test_training_without_dropout(tiny_zoo: Path, tmp_path: Path) -> None:
    from pipeline.models import load_segmenter
    from segmentation.synthetic import make_stickers
    from segmentation.training import SegTrainConfig, train_segmenter

    segmenter = load_segmenter(tiny_zoo / "segformer", device=CPU)
    model = segmenter.model
    x = torch.randn(2, 3, 32, 32)

    def two_training_passes() -> tuple[torch.Tensor, torch.Tensor]:
        model.train()
        with torch.no_grad():
            return model(pixel_values=x).logits, model(pixel_values=x).logits

    first, second = two_training_passes()
    assert not torch.equal(first, second)  # dropout and drop path draw new masks each pass
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = SegTrainConfig(size=32, batch_size=4, epochs=2, pairs_per_epoch=4, val_pairs=4, warmup_steps=1,
                            dropout=False)
    train_segmenter(segmenter, make_stickers(4, seed=0, size=64), tmp_path, config)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # it trained
    first, second = two_training_passes()
    assert torch.equal(first, second)  # ... and now nothing random is left in a training pass


def test_hard_pixel_mining_weighs_the_worst_pixels() -> None:
    from segmentation.training import segmentation_loss

    masks = torch.zeros(1, 4, 4)
    logits = torch.full((1, 4, 4), -5.0)
    logits[0, 0, :2] = 5.0  # two very wrong pixels among sixteen
    plain = segmentation_loss(logits, masks, dice_weight=0.0)
    mined = segmentation_loss(logits, masks, dice_weight=0.0, hard_share=0.125)
    per_pixel = torch.nn.functional.binary_cross_entropy_with_logits(logits, masks, reduction="none")
    expected = 0.5 * (per_pixel.mean() + per_pixel[0, 0, :2].mean())
    assert mined.item() == pytest.approx(expected.item(), rel=1e-6)
    assert mined > 3 * plain
