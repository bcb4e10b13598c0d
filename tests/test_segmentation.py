"""Segmentation: pair generator, fine-tuning (a learning signal), remover output, bad input,
metrics and the ``stickerbot segmenter`` CLI. Tiny SegFormer, 64 px, one thread."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from pipeline.errors import ImageTooLargeError, ImageTooSmallError, NotAnImageError
from segmentation.evaluation import boundary_f, iou
from segmentation.pairs import (
    HELDOUT_BACKGROUNDS,
    TRAIN_BACKGROUNDS,
    Pair,
    PairConfig,
    PairSet,
    compose,
    edge_visibility,
    label_of,
    make_pair,
)
from segmentation.synthetic import make_sticker, make_stickers

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def stickers() -> list[Image.Image]:
    return make_stickers(6, seed=0, size=64)


# --- pairs ----------------------------------------------------------------------------------------


def test_identity_placement_keeps_the_sticker_alpha_exactly() -> None:
    sticker = make_sticker(3, 64)
    bg = np.full((64, 64, 3), 200, np.uint8)
    image, alpha = compose(sticker, bg, scale=1.0, angle=0.0, centre=(31.5, 31.5))
    own = np.asarray(sticker.getchannel("A"))
    assert np.array_equal(np.round(alpha * 255).astype(np.uint8), own)
    assert np.array_equal(label_of(alpha), label_of(own))
    assert np.array_equal(image[own == 0], bg[own == 0])
    opaque = own == 255
    assert np.array_equal(image[opaque], np.asarray(sticker.convert("RGB"))[opaque])


def test_masks_match_the_composited_alpha(stickers: list[Image.Image]) -> None:
    for split in ("train", "heldout"):
        for i in range(12):
            pair = make_pair(stickers, i, split=split, seed=5, config=PairConfig(size=64))
            assert pair.mask.dtype == bool and pair.mask.shape == (64, 64)
            assert np.array_equal(pair.mask, pair.alpha >= 0.5)
            assert 0.02 < pair.mask.mean() < 0.98  # the sticker is there, and not everywhere
            clear = pair.alpha == 0
            assert np.array_equal(pair.clean[clear], pair.background[clear])
            # The composite is alpha * F + (1 - alpha) * B: a fully opaque pixel owes nothing to B.
            full = pair.alpha >= 1.0
            if full.any():
                other = make_pair(stickers, i, split=split, seed=5, config=PairConfig(size=64))
                assert np.array_equal(other.clean[full], pair.clean[full])


def test_degradations_change_the_image_not_the_label(stickers: list[Image.Image]) -> None:
    for i in range(6):
        rough = make_pair(stickers, i, seed=2, config=PairConfig(size=64, degrade=True, jpeg_p=1.0))
        clean = make_pair(stickers, i, seed=2, config=PairConfig(size=64, degrade=False))
        assert np.array_equal(rough.mask, clean.mask)
        assert np.array_equal(rough.clean, clean.clean)
        assert not np.array_equal(rough.image, rough.clean)


def test_same_seed_same_data_and_splits_differ(stickers: list[Image.Image]) -> None:
    a = [make_pair(stickers, i, seed=9, config=PairConfig(size=64)) for i in range(5)]
    b = [make_pair(stickers, i, seed=9, config=PairConfig(size=64)) for i in range(5)]
    c = [make_pair(stickers, i, seed=10, config=PairConfig(size=64)) for i in range(5)]
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x.image, y.image) and np.array_equal(x.mask, y.mask)
    assert any(not np.array_equal(x.image, z.image) for x, z in zip(a, c, strict=True))
    assert set(TRAIN_BACKGROUNDS) - {"white", "flat", "photo"}
    assert not (set(TRAIN_BACKGROUNDS) & set(HELDOUT_BACKGROUNDS)) - {"white", "flat", "photo"}
    families = {
        make_pair(stickers, i, split="heldout", seed=0, config=PairConfig(size=32)).family for i in range(60)
    }
    assert families <= set(HELDOUT_BACKGROUNDS) and len(families) >= 4
    ps = PairSet(stickers, length=4, seed=9, config=PairConfig(size=64))
    first = ps[0].image.copy()
    ps.epoch = 1
    assert not np.array_equal(first, ps[0].image)


def _white_outlined_disc(size: int = 64) -> Image.Image:
    rgba = np.zeros((size, size, 4), np.uint8)
    yy, xx = np.mgrid[0:size, 0:size]
    r = np.hypot(yy - size / 2, xx - size / 2)
    rgba[r < size * 0.4] = (255, 255, 255, 255)  # the white outline ring ...
    rgba[r < size * 0.3] = (200, 30, 30, 255)  # ... around a red body
    return Image.fromarray(rgba, "RGBA")


def test_labels_stay_observable_a_white_outline_is_never_put_on_white() -> None:
    disc = _white_outlined_disc()
    white = np.full((64, 64, 3), 255, np.uint8)
    image, alpha = compose(disc, white, scale=1.0, angle=0.0, centre=(31.5, 31.5))
    assert edge_visibility(image, white, label_of(alpha)) < 0.05  # the ring is invisible there
    dark = np.full((64, 64, 3), 40, np.uint8)
    image, alpha = compose(disc, dark, scale=1.0, angle=0.0, centre=(31.5, 31.5))
    assert edge_visibility(image, dark, label_of(alpha)) > 0.95
    # Every pair of the white-outlined sticker gets a background its edge shows against, although
    # a plain white background is drawn for about a third of them.
    config = PairConfig(size=64, white_share=0.5, degrade=False)
    pairs = [make_pair([disc], i, seed=3, config=config) for i in range(30)]
    assert all(edge_visibility(p.clean, p.background, p.mask) >= config.min_visible for p in pairs)
    assert "white" not in {p.family for p in pairs}
    # A red-outlined sticker is welcome on white.
    red = np.asarray(disc).copy()
    red[(red[..., 3] > 0) & (red[..., 0] == 255) & (red[..., 1] == 255)] = (200, 30, 30, 255)
    red_pairs = [make_pair([Image.fromarray(red, "RGBA")], i, seed=3, config=config) for i in range(30)]
    assert "white" in {p.family for p in red_pairs}


# --- metrics --------------------------------------------------------------------------------------


def test_metrics_see_errors() -> None:
    mask = np.zeros((64, 64), bool)
    mask[16:48, 16:48] = True
    assert iou(mask, mask) == 1.0 and boundary_f(mask, mask) == 1.0
    moved = np.roll(mask, 1, axis=1)
    assert boundary_f(moved, mask, tolerance=2) == 1.0
    far = np.roll(mask, 6, axis=1)
    assert boundary_f(far, mask, tolerance=2) < 0.6
    assert iou(far, mask) == pytest.approx(26 / 38)
    assert iou(mask.T[::-1], mask) == 1.0 and iou(np.zeros_like(mask), mask) == 0.0
    # Per background family: pooled within each family, families kept apart.
    from segmentation.evaluation import iou_by_family, score

    blank = np.zeros((64, 64, 3), np.uint8)
    pairs = [Pair(image=blank, mask=mask, alpha=mask.astype(np.float32), clean=blank, background=blank,
                  family=family) for family in ("white", "plaid", "plaid")]
    probs = [mask.astype(np.float32), far.astype(np.float32), np.zeros((64, 64), np.float32)]
    by_family = iou_by_family(probs, pairs)
    assert by_family == {"plaid": pytest.approx(26 * 32 / (38 * 32 + 32 * 32)), "white": 1.0}
    assert score(probs, pairs)["iou"] == pytest.approx((32 + 26) * 32 / ((32 + 38 + 32) * 32))
    # The remover's matte is scored on its own: here perfect where the segmenter was not.
    mattes = [mask.astype(np.float32), mask.astype(np.float32) * 0.6, np.zeros((64, 64), np.float32)]
    scored = score(probs, pairs, alphas=mattes)
    assert scored["matte_iou"] == pytest.approx(2 / 3) and scored["iou"] == score(probs, pairs)["iou"]
    assert scored["alpha_mae"] == pytest.approx((0 + 0.4 * 32 * 32 + 32 * 32) / (3 * 64 * 64))
    assert "matte_iou" not in score(probs, pairs)


# --- training: a learning signal ------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tiny_zoo: Path, stickers: list[Image.Image], tmp_path_factory: pytest.TempPathFactory):
    """A tiny SegFormer trained on four fixed pairs, and where it was saved."""
    from pipeline.models import load_segmenter
    from segmentation.training import SegTrainConfig, train_segmenter

    segmenter = load_segmenter(tiny_zoo / "segformer", device=CPU)
    out = tmp_path_factory.mktemp("seg-overfit")
    config = SegTrainConfig(
        size=64,
        batch_size=4,
        lr=5e-3,
        epochs=100,
        pairs_per_epoch=4,
        val_pairs=4,
        degrade=False,
        val_degrade=False,
        warmup_steps=3,
        fresh_each_epoch=False,
    )
    calls = []
    result = train_segmenter(
        segmenter, stickers[:4], out, config, val_stickers=stickers[:4], progress=calls.append
    )
    return segmenter, out, result, calls, config


def test_tiny_segmenter_overfits_a_handful_of_pairs(trained, stickers: list[Image.Image]) -> None:
    from pipeline.models import load_segmenter
    from segmentation.training import validate

    segmenter, out, result, calls, config = trained
    train_pairs = PairSet(stickers[:4], length=4, seed=0, config=PairConfig(size=64, degrade=False))
    before = result.history[0]["val_iou"]
    assert validate(segmenter, train_pairs) > 0.9
    # Transposed labels would not be learnt by the same model: it must see the real mask.
    transposed = [np.ascontiguousarray(train_pairs[i].mask.T) for i in range(4)]
    from segmentation.removal import predict_alpha

    pred = predict_alpha(segmenter, [Image.fromarray(train_pairs[i].image) for i in range(4)])
    assert np.mean([iou(p >= 0.5, t) for p, t in zip(pred, transposed, strict=True)]) < 0.85
    assert len(result.history) == config.epochs and result.steps == config.epochs
    assert any(c.val_iou is not None for c in calls) and calls[-1].step == result.steps
    assert result.best_iou >= before
    best = load_segmenter(out, device=CPU)  # the best checkpoint: model + processor
    assert best.model.config.num_labels == 1
    assert validate(
        best,
        PairSet(stickers[:4], length=4, split="heldout", seed=1, config=PairConfig(size=64, degrade=False)),
    ) == pytest.approx(result.best_iou)


def test_training_resumes_from_its_last_state(
    tiny_zoo: Path, stickers: list[Image.Image], tmp_path: Path
) -> None:
    from pipeline.models import load_segmenter
    from segmentation.training import SegTrainConfig, train_segmenter

    config = SegTrainConfig(size=32, batch_size=4, epochs=2, pairs_per_epoch=8, val_pairs=4)
    first = train_segmenter(load_segmenter(tiny_zoo / "segformer", device=CPU), stickers, tmp_path, config)
    assert (first.epochs, first.steps) == (2, 4)
    config.epochs = 3
    again = train_segmenter(load_segmenter(tiny_zoo / "segformer", device=CPU), stickers, tmp_path, config)
    assert (again.epochs, again.steps, len(again.history)) == (3, 6, 3)
    assert again.history[:2] == first.history


def _save_as_if_on_cuda(obj: object, path: Path) -> None:
    """``torch.save`` with every storage tagged ``cuda:0``, as a state saved on a GPU is."""
    registry = torch.serialization._package_registry
    saved = list(registry)
    torch.serialization.register_package(0, lambda storage: "cuda:0", lambda obj, location: None)
    try:
        torch.save(obj, path)
    finally:
        registry[:] = saved


def test_a_state_saved_on_another_device_resumes_with_the_generator_state_on_the_cpu(
    tiny_zoo: Path, stickers: list[Image.Image], tmp_path: Path
) -> None:
    from pipeline.models import load_segmenter
    from segmentation.training import STATE_FILE, SegTrainConfig, load_training_state, train_segmenter

    config = SegTrainConfig(size=32, batch_size=4, epochs=1, pairs_per_epoch=4, val_pairs=4, ema_decay=0.9)
    train_segmenter(load_segmenter(tiny_zoo / "segformer", device=CPU), stickers, tmp_path, config)
    path = tmp_path / STATE_FILE
    _save_as_if_on_cuda(torch.load(path, weights_only=False), path)
    if not torch.cuda.is_available():  # the file really names the GPU: a plain load fails here
        with pytest.raises(RuntimeError):
            torch.load(path, weights_only=False)
    # A model on another device (meta stands in for a GPU on this CPU machine): the generator
    # state stays a CPU byte tensor that torch.set_rng_state takes; the average follows the model.
    state = load_training_state(path, device=torch.device("meta"))
    assert state["torch_rng"].device.type == "cpu"
    torch.set_rng_state(state["torch_rng"])
    assert all(v.device.type == "meta" for v in state["ema"].values())
    config.epochs = 2
    again = train_segmenter(load_segmenter(tiny_zoo / "segformer", device=CPU), stickers, tmp_path, config)
    assert (again.epochs, again.steps) == (2, 2)


def test_weight_average_resume_and_progressive_resizing(
    tiny_zoo: Path, stickers: list[Image.Image], tmp_path: Path
) -> None:
    from pipeline.models import load_segmenter
    from segmentation.training import SegTrainConfig, WeightAverage, train_segmenter

    # The average: w <- decay * w + (1 - decay) * new, and swapped() puts the live weights back.
    layer = torch.nn.Linear(1, 1, bias=False)
    layer.weight.data.fill_(0.0)
    ema = WeightAverage(layer, decay=0.75)
    layer.weight.data.fill_(4.0)
    ema.update()
    assert ema.shadow["weight"].item() == pytest.approx(1.0)
    with ema.swapped():
        assert layer.weight.item() == pytest.approx(1.0)
    assert layer.weight.item() == pytest.approx(4.0)

    sizes: list[int] = []
    segmenter = load_segmenter(tiny_zoo / "segformer", device=CPU)
    forward = segmenter.model.forward
    segmenter.model.forward = lambda pixel_values, **kw: (sizes.append(pixel_values.shape[-1]),  # type: ignore[method-assign]
                                                          forward(pixel_values=pixel_values, **kw))[1]
    config = SegTrainConfig(size=48, batch_size=4, epochs=4, pairs_per_epoch=8, val_pairs=4, ema_decay=0.9,
                            warm_size=32, warm_share=0.5)
    first = train_segmenter(segmenter, stickers, tmp_path, config)
    # Training ran at 32 px for the first half, then at 48; validation always at 48.
    assert sizes[:2] == [32, 32] and 32 in sizes and sizes[-1] == 48 and sizes.count(32) == 4
    state = torch.load(tmp_path / "training-state.pt", weights_only=False)
    # The model leaves training with the averaged weights, which are what was saved.
    live = segmenter.model.state_dict()
    assert all(torch.equal(live[k], v) for k, v in state["ema"].items())
    config.epochs = 5
    again = train_segmenter(load_segmenter(tiny_zoo / "segformer", device=CPU), stickers, tmp_path, config)
    assert (again.steps, again.history[:4]) == (10, first.history)


def test_scratch_recipe_starts_at_two_thirds_of_the_size_for_half_the_budget() -> None:
    from segmentation.training import SCRATCH_RECIPE, SegTrainConfig, scratch_recipe

    recipe = scratch_recipe(96)
    assert (recipe["warm_size"], recipe["warm_share"]) == (64, 0.5)
    assert {k: recipe[k] for k in SCRATCH_RECIPE} == SCRATCH_RECIPE
    assert scratch_recipe(512)["warm_size"] == 336
    assert "warm_size" not in scratch_recipe(32)  # nothing smaller to start at
    SegTrainConfig(size=96, **recipe)  # every key is a training option


def test_fresh_segformer_uses_the_authors_initialisation() -> None:
    from pipeline.architectures import SD15
    from segmentation.training import fresh_segmenter

    model = fresh_segmenter(SD15.segformer, 64).model
    modules = dict(model.named_modules())
    dw = modules["segformer.stages.0.blocks.0.mlp.dwconv.dwconv"].weight
    assert float(dw.detach().std()) == pytest.approx((2 / 9) ** 0.5, rel=0.15)  # He over fan-out 3*3*C/C
    assert float(modules["decode_head.classifier"].weight.detach().std()) == pytest.approx(0.01, rel=0.5)


def test_bilinear_upsampling_as_matrix_products_is_exactly_interpolate() -> None:
    import torch.nn.functional as F

    from segmentation.head import upsample_bilinear

    shapes = [(3, 3, 24, 24), (12, 12, 24, 24), (7, 5, 30, 19), (1, 1, 4, 4), (17, 9, 8, 4)]
    for h, w, height, width in shapes:
        x = torch.randn(2, 3, h, w, dtype=torch.float64)
        want = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
        assert torch.allclose(upsample_bilinear(x, (height, width)), want, atol=1e-12)
    # The matrices are cached: one first made under inference_mode (validation) must still serve
    # training's autograd afterwards.
    with torch.inference_mode():
        upsample_bilinear(torch.randn(1, 1, 5, 7), (11, 13))
    x = torch.randn(1, 1, 5, 7, requires_grad=True)
    upsample_bilinear(x, (11, 13)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_factored_decode_head_computes_transformers_head() -> None:
    """Same weights, same logits, same gradients as SegformerDecodeHead.forward, in train and eval
    mode; the state dict (the checkpoint format) is untouched."""
    import copy

    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    from segmentation.head import factor_decode_head

    torch.manual_seed(0)
    config = SegformerConfig(
        depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 24, 32], num_attention_heads=[1, 1, 2, 4],
        decoder_hidden_size=16, num_labels=2, classifier_dropout_prob=0.0, drop_path_rate=0.0,
    )
    reference = SegformerForSemanticSegmentation(config)
    with torch.no_grad():  # make the head's biases matter
        for p in reference.decode_head.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    factored = factor_decode_head(copy.deepcopy(reference))
    assert factored.decode_head.forward.__func__ is not type(reference.decode_head).forward
    assert factored.state_dict().keys() == reference.state_dict().keys()
    x = torch.randn(3, 3, 52, 40)
    for mode in ("train", "eval"):
        getattr(reference, mode)()
        getattr(factored, mode)()
        reference.zero_grad()
        factored.zero_grad()
        want, got = reference(pixel_values=x).logits, factored(pixel_values=x).logits
        assert got.shape == want.shape == (3, 2, 13, 10)
        assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())
        (want * torch.linspace(-1, 1, want.numel()).reshape(want.shape)).sum().backward()
        (got * torch.linspace(-1, 1, got.numel()).reshape(got.shape)).sum().backward()
        for (name, p), q in zip(reference.named_parameters(), factored.parameters(), strict=True):
            assert torch.allclose(q.grad, p.grad, atol=1e-5, rtol=1e-3), name


# --- remover --------------------------------------------------------------------------------------


def test_remover_output(trained, stickers: list[Image.Image]) -> None:
    from segmentation.removal import predict_alpha, remove_background

    segmenter = trained[0]
    pairs = [make_pair(stickers[:4], i, seed=0, config=PairConfig(size=64, degrade=False)) for i in range(4)]
    inputs = [Image.fromarray(p.image) for p in pairs] + [Image.fromarray(pairs[0].image).resize((97, 41))]
    outs = remove_background(segmenter, inputs)
    single = remove_background(segmenter, inputs[-1])
    assert isinstance(single, Image.Image) and single.size == (97, 41) and single.mode == "RGBA"
    probs = predict_alpha(segmenter, inputs)
    certain = []
    for img, out, prob in zip(inputs, outs, probs, strict=True):
        assert out.mode == "RGBA" and out.size == img.size
        alpha = np.asarray(out.getchannel("A"))
        assert alpha.dtype == np.uint8 and alpha.min() >= 0 and alpha.max() <= 255
        assert (alpha[prob <= 0.05] == 0).all()
        # Certain foreground well inside the sticker is fully opaque.
        sure = Image.fromarray((prob >= 0.95).astype(np.uint8) * 255)
        inner = np.asarray(sure.filter(ImageFilter.MinFilter(7))) > 0
        assert (alpha[inner] == 255).all()
        assert (alpha == 0).any()
        certain.append(int(inner.sum()))
    assert min(certain[:4]) > 0  # the trained model is sure somewhere on each training pair


def test_mirror_augmentation_makes_the_prediction_mirror_exactly(
    trained, stickers: list[Image.Image]
) -> None:
    from segmentation.removal import predict_alpha, remove_background

    segmenter = trained[0]
    pair = make_pair(stickers[:4], 1, seed=0, config=PairConfig(size=64, degrade=False))
    image = Image.fromarray(pair.image)
    mirror = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    plain, plain_m = predict_alpha(segmenter, [image, mirror])
    flipped, flipped_m = predict_alpha(segmenter, [image, mirror], flip=True)
    # A model on its own is not mirror-symmetric; the averaged prediction is, by construction.
    assert np.abs(plain - plain_m[:, ::-1]).max() > 1e-3
    assert np.abs(flipped - flipped_m[:, ::-1]).max() < 1e-5
    # ... and it is the mean of the two logit maps, not of either alone.
    assert 0 < np.abs(flipped - plain).max() < np.abs(plain - plain_m[:, ::-1]).max()
    cut = remove_background(segmenter, image, flip=True)
    assert cut.size == image.size and cut.mode == "RGBA"


def test_remover_rejects_bad_input(trained) -> None:
    from segmentation.removal import remove_background

    segmenter = trained[0]
    good = Image.new("RGB", (32, 32), "white")
    with pytest.raises(ImageTooSmallError, match="too small"):
        remove_background(segmenter, Image.new("RGB", (0, 10)))
    with pytest.raises(ImageTooLargeError, match="over the limit"):
        remove_background(segmenter, Image.new("RGB", (300, 300)), max_pixels=10_000)
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buf, "PNG")
    corrupt = Image.open(io.BytesIO(buf.getvalue()[:60]))  # header fine, pixel data cut
    with pytest.raises(NotAnImageError, match="corrupt"):
        remove_background(segmenter, [good, corrupt])
    with pytest.raises(NotAnImageError, match="image 1"):
        remove_background(segmenter, [good, b"not an image"])  # type: ignore[list-item]


# --- CLI ------------------------------------------------------------------------------------------


def test_cli_train_and_eval(
    tiny_zoo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline.cli import main
    from segmentation.synthetic import write_stickers

    monkeypatch.setenv("STICKERBOT_TINY_ZOO_DIR", str(tiny_zoo))
    monkeypatch.setenv("STICKERBOT_DEVICE", "cpu")
    folder = tmp_path / "stickers"
    write_stickers(folder, 3, seed=0, size=64)
    Image.new("RGB", (64, 64), "blue").save(folder / "opaque.png")
    (folder / "broken.png").write_bytes(b"\x89PNG nope")
    out = tmp_path / "model"
    args = [
        "segmenter",
        "train",
        "--preset",
        "tiny",
        "--data-dir",
        str(tmp_path / "data"),
        "--stickers",
        str(folder),
        "--procedural",
        "3",
        "--out",
        str(out),
        "--epochs",
        "2",
        "--size",
        "32",
        "--pairs-per-epoch",
        "8",
        "--val-pairs",
        "4",
        "--batch-size",
        "4",
        "--no-progress",
    ]
    # --from-scratch: random weights and the from-scratch recipe, written into the checkpoint's record.
    scratch = tmp_path / "scratch"
    scratch_args = [*args[: args.index("--out")], "--out", str(scratch), "--epochs", "1", "--size", "32",
                    "--pairs-per-epoch", "4", "--val-pairs", "4", "--batch-size", "4", "--no-progress",
                    "--from-scratch"]
    assert main(scratch_args) == 0
    record = json.loads((scratch / "segmenter-training.json").read_text())["config"]
    keys = ("lr", "dice_weight", "max_grad_norm", "degrade", "dropout", "hard_share", "warmup_steps",
            "decay_share", "whiten")
    recipe = tuple(record[k] for k in keys)
    assert recipe == (1.5e-3, 0.0, 1.0, False, False, 0.25, 150, 0.3, True) and record["val_degrade"] is True
    capsys.readouterr()
    assert main(args) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["steps"] == 4 and summary["stickers"] == 6
    assert "opaque.png" in captured.err and "broken.png" in captured.err
    assert (out / "config.json").exists() and (out / "preprocessor_config.json").exists()
    report = tmp_path / "report"
    assert (
        main(
            [
                "segmenter",
                "eval",
                "--preset",
                "tiny",
                "--data-dir",
                str(tmp_path / "data"),
                "--model",
                str(out),
                "--stickers",
                str(folder),
                "--out",
                str(report),
                "--count",
                "4",
                "--flip",
                "--rotate",
                "--scales",
                "1",
                "1.5",
            ]
        )
        == 0
    )
    metrics = json.loads((report / "metrics.json").read_text())
    assert set(metrics) >= {"iou", "matte_iou", "boundary_f", "alpha_mae", "iou_by_background"}
    assert metrics["images"] == 4
    assert metrics["flip"] is True and metrics["rotate"] is True and metrics["scales"] == [1.0, 1.5]
    assert 0.0 <= metrics["iou"] <= 1.0 and 0.0 <= metrics["alpha_mae"] <= 1.0
    with Image.open(report / "contact-sheet.png") as sheet:
        assert sheet.size == (3 * 32, 4 * 32)
    assert (
        main(
            [
                "segmenter",
                "eval",
                "--preset",
                "tiny",
                "--model",
                str(out),
                "--stickers",
                str(tmp_path / "missing"),
                "--out",
                str(report),
            ]
        )
        == 2
    )
    assert "missing" in capsys.readouterr().err
    bad_scales = ["segmenter", "eval", "--preset", "tiny", "--model", str(out), "--stickers", str(folder),
                  "--out", str(report), "--scales", "1", "9"]
    assert main(bad_scales) == 2
    assert "--scales must be between 0.25 and 4" in capsys.readouterr().err
    import pipeline.models

    def no_loading(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a bad option must be refused before any model is loaded")

    monkeypatch.setattr(pipeline.models, "load_segmenter", no_loading)
    assert main([*args[: args.index("--out")], "--out", str(tmp_path / "w"), "--workers", "-1"]) == 2
    assert "workers must be 0 or more, not -1" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
