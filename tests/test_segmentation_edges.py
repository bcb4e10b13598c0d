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


def test_quarter_turns_make_the_prediction_turn_exactly(segmenter) -> None:
    from segmentation.removal import model_input_size, predict_alpha, remove_background

    side = model_input_size(segmenter)[0]
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
    turned = image.transpose(Image.Transpose.ROTATE_90)  # a quarter turn anticlockwise
    plain, plain_t = predict_alpha(segmenter, [image, turned])
    both, both_t = predict_alpha(segmenter, [image, turned], rotate=True, flip=True)
    # The model alone does not turn with its input; the average over the 8 looks does.
    assert np.abs(np.rot90(plain) - plain_t).max() > 1e-4
    assert np.abs(np.rot90(both) - both_t).max() < 1e-5
    assert remove_background(segmenter, image, rotate=True).size == image.size


# --- training throughput: the same run, made faster -----------------------------------------------


def test_kept_premultiplied_stickers_make_the_same_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    import segmentation.pairs as pairs
    from segmentation.synthetic import make_stickers

    stickers = make_stickers(3, seed=0, size=64)
    config = pairs.PairConfig(size=48)

    def all_pairs(pair_set: pairs.PairSet) -> list[pairs.Pair]:
        made = []
        for epoch in (0, 1):
            pair_set.epoch = epoch
            made += [pair_set[i] for i in range(6)]
        return made

    kept = pairs.PairSet(stickers, length=6, seed=2, config=config)
    with_kept = all_pairs(kept)
    monkeypatch.setattr(pairs, "PREMUL_CACHE_BYTES", 0)  # nothing kept: converted for every pair
    fresh = pairs.PairSet(stickers, length=6, seed=2, config=config)
    for number, (a, b) in enumerate(zip(with_kept, all_pairs(fresh), strict=True)):
        direct = pairs.make_pair(stickers, number, seed=2, config=config)
        assert np.array_equal(a.image, b.image) and np.array_equal(a.image, direct.image)
        assert np.array_equal(a.alpha, direct.alpha) and np.array_equal(a.mask, b.mask)
    assert len(kept._kept.arrays) == 3 and not fresh._kept.arrays
    assert not next(iter(kept._kept.arrays.values())).flags.writeable
    # A set of the same stickers at another size shares what is kept; other stickers may not.
    monkeypatch.setattr(pairs, "PREMUL_CACHE_BYTES", 512 << 20)
    smaller = pairs.PairSet(stickers, length=6, seed=2, config=pairs.PairConfig(size=32), share_stickers=kept)
    assert smaller[0].image.shape == (32, 32, 3) and smaller._kept is kept._kept
    with pytest.raises(ValueError, match="same stickers"):
        pairs.PairSet(make_stickers(3, seed=1, size=64), length=6, share_stickers=kept)


def test_a_pair_making_worker_process_trains_the_same_model(tiny_zoo: Path, tmp_path: Path) -> None:
    from pipeline.models import load_segmenter
    from segmentation.synthetic import make_stickers
    from segmentation.training import SegTrainConfig, train_segmenter

    stickers = make_stickers(6, seed=0, size=64)
    runs = []
    for workers in (0, 1):  # dropout stays on: the loader must not move the global generator
        segmenter = load_segmenter(tiny_zoo / "segformer", device=CPU)
        config = SegTrainConfig(size=48, batch_size=4, epochs=3, pairs_per_epoch=8, val_pairs=4,
                                warm_size=32, warm_share=0.4, workers=workers)
        result = train_segmenter(segmenter, stickers, tmp_path / f"workers-{workers}", config)
        runs.append((segmenter.model.state_dict(), result.history))
    (alone, history), (helped, history_helped) = runs
    assert [h["loss"] for h in history] == [h["loss"] for h in history_helped]
    assert all(torch.equal(alone[k], helped[k]) for k in alone)


def test_warmup_stable_decay_schedule() -> None:
    from segmentation.training import SegTrainConfig, _lr_factor

    def wsd(step: int, elapsed: float = 0.0, budget: float | None = None) -> float:
        return _lr_factor(step, 1000, elapsed, budget, 100, 0.3)

    assert wsd(0) == pytest.approx(0.01) and wsd(99) == pytest.approx(1.0)  # warm-up
    assert wsd(100) == wsd(500) == wsd(700) == 1.0  # held
    assert wsd(850) == pytest.approx(0.02 + 0.98 * 0.5) and wsd(1000) == pytest.approx(0.02)  # falls
    assert wsd(5000) == pytest.approx(0.02)  # and stays at the floor past the plan
    assert wsd(200, elapsed=85.0, budget=100.0) == pytest.approx(0.51)  # time counts as progress
    cosine = _lr_factor(500, 1000, 0.0, None, 100)
    assert cosine == pytest.approx(0.02 + 0.98 * 0.5) and _lr_factor(300, 1000, 0.0, None, 100) < 1.0
    with pytest.raises(ValueError, match="decay_share must be in"):
        SegTrainConfig(decay_share=0.0)


def test_patch_whitening_decorrelates_the_first_embedding(tiny_zoo: Path, tmp_path: Path) -> None:
    import torch.nn.functional as F

    from pipeline.models import load_segmenter
    from segmentation.pairs import PairConfig, PairSet
    from segmentation.removal import normalize_batch
    from segmentation.synthetic import make_stickers
    from segmentation.training import SegTrainConfig, train_segmenter, whiten_patch_embedding

    segmenter = load_segmenter(tiny_zoo / "segformer", device=CPU)
    stickers = make_stickers(6, seed=0, size=64)
    pairs = PairSet(stickers, length=24, config=PairConfig(size=48))
    images = np.stack([pairs[i].image for i in range(len(pairs))])
    conv = segmenter.model.segformer.stages[0].patch_embeddings.proj
    whiten_patch_embedding(segmenter, images, eps=1e-6)
    with torch.no_grad():
        out = F.conv2d(normalize_batch(segmenter, images), conv.weight, conv.bias, conv.stride, conv.padding)
    half = conv.out_channels // 2
    assert torch.equal(out[:, half : 2 * half], -out[:, :half])  # pairs of opposite sign
    features = out[:, :half].permute(0, 2, 3, 1).reshape(-1, half).double()
    covariance = torch.cov(features.T)
    # Unit variance and no correlation between the channels: the patches' covariance whitened.
    torch.testing.assert_close(covariance, torch.eye(half, dtype=torch.float64), atol=1e-3, rtol=0)
    assert torch.count_nonzero(conv.bias) == 0

    # In a fresh run the option whitens before the first step.
    fresh = load_segmenter(tiny_zoo / "segformer", device=CPU)
    before = fresh.model.segformer.stages[0].patch_embeddings.proj.weight.clone()
    config = SegTrainConfig(size=32, batch_size=4, epochs=1, pairs_per_epoch=4, val_pairs=4, whiten=True,
                            lr=1e-9)
    train_segmenter(fresh, stickers, tmp_path, config)
    after = fresh.model.segformer.stages[0].patch_embeddings.proj.weight
    half = after.shape[0] // 2
    assert not torch.allclose(before, after, atol=1e-3)
    torch.testing.assert_close(after[half : 2 * half], -after[:half], atol=1e-6, rtol=0)

    # A resumed run keeps the weights of its state: it does not whiten them again.
    state_path = tmp_path / "training-state.pt"
    state = torch.load(state_path, weights_only=False)
    key = "segformer.stages.0.patch_embeddings.proj.weight"
    state["model"][key] = torch.full_like(state["model"][key], 0.25)
    torch.save(state, state_path)
    config = SegTrainConfig(size=32, batch_size=4, epochs=2, pairs_per_epoch=4, val_pairs=4, whiten=True,
                            lr=1e-9)
    train_segmenter(fresh, stickers, tmp_path, config)
    resumed = fresh.model.segformer.stages[0].patch_embeddings.proj.weight
    torch.testing.assert_close(resumed, torch.full_like(resumed, 0.25), atol=1e-6, rtol=0)
