"""Segmentation: latency and throughput of a b0-sized SegFormer at 512 px on CPU (and on a GPU
when present), then the quality bar: a b0-sized SegFormer trained from random weights on
procedural stickers for ``STICKERBOT_BENCH_SEG_MINUTES`` (default 10) on CPU, evaluated on
held-out stickers over held-out backgrounds: IoU, boundary F, alpha MAE, and whether
IoU >= 0.95. The same model is measured with one view, mirrored, mirrored at two input sizes,
and also turned by quarters (test-time augmentation), each with the IoU of the remover's
refined matte beside it.

Two torch threads (the machine's two cores). Set ``STICKERBOT_BENCH_SEG_MINUTES=1`` for a quick
look; the bar is stated for 10.
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np
import torch
from PIL import Image

TRAIN_STICKERS = int(os.environ.get("STICKERBOT_BENCH_SEG_STICKERS", "600"))
HELDOUT_STICKERS = 60
SIZE = int(os.environ.get("STICKERBOT_BENCH_SEG_SIZE", "96"))
BATCH = int(os.environ.get("STICKERBOT_BENCH_SEG_BATCH", "8"))
STICKER_SIZE = 160


def _timing(device: str) -> None:
    """Latency at batch 1 and per image in batches of 8, with the factored decode head the product
    runs (``segmentation.head``) and, side by side in the same run, transformers' own head."""
    from pipeline.architectures import SD15
    from segmentation.removal import predict_alpha
    from segmentation.training import fresh_segmenter

    seg = fresh_segmenter(SD15.segformer, 512, device=device)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)) for _ in range(8)]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    head = seg.model.decode_head
    factored = head.forward

    def timed(batch_size: int, runs: int) -> float:
        batch = images[:batch_size]
        predict_alpha(seg, batch, batch_size=batch_size)
        sync()
        start = time.perf_counter()
        for _ in range(runs):
            predict_alpha(seg, batch, batch_size=batch_size)
        sync()
        return (time.perf_counter() - start) / runs / batch_size

    cpu = device == "cpu"
    results: dict[str, list[float]] = {"factored": [], "transformers": []}
    for _ in range(3):  # interleaved, so drift on a noisy machine hits both alike
        for name in results:
            if name == "factored":
                head.forward = factored
            else:
                del head.forward  # the class's own forward
            results[name].append(timed(1, 3 if cpu else 30))
            results[name].append(timed(8, 1 if cpu else 10))
    head.forward = factored
    for name, times in results.items():
        single, per_image = min(times[0::2]), min(times[1::2])
        print(
            f"{device}: b0-sized SegFormer, 512 px, {name} decode head (model forward + upsample + "
            f"sigmoid): {single * 1000:.1f} ms per image at batch 1; {per_image * 1000:.1f} ms per image "
            f"in batches of 8 ({1 / per_image:.1f} images/s)",
            flush=True,
        )
    (f1, f8), (t1, t8) = ((min(v[0::2]), min(v[1::2])) for v in results.values())
    print(f"{device}: the factored head is {t1 / f1:.2f}x as fast at batch 1, {t8 / f8:.2f}x in batches of 8",
          flush=True)


def _quality(minutes: float) -> None:
    from pipeline.architectures import SD15
    from segmentation.evaluation import IOU_BAR, evaluate
    from segmentation.synthetic import make_stickers
    from segmentation.training import SegTrainConfig, fresh_segmenter, scratch_recipe, train_segmenter

    start = time.perf_counter()
    train = make_stickers(TRAIN_STICKERS, seed=0, size=STICKER_SIZE)
    held = make_stickers(HELDOUT_STICKERS, seed=1_000_000, size=STICKER_SIZE)  # seeds never trained on
    print(
        f"{TRAIN_STICKERS} training + {HELDOUT_STICKERS} held-out procedural stickers in "
        f"{time.perf_counter() - start:.1f} s",
        flush=True,
    )
    seg = fresh_segmenter(SD15.segformer, SIZE)
    recipe = scratch_recipe(SIZE)
    if os.environ.get("STICKERBOT_BENCH_SEG_LR"):
        recipe["lr"] = float(os.environ["STICKERBOT_BENCH_SEG_LR"])
    config = SegTrainConfig(
        size=SIZE,
        batch_size=BATCH,
        epochs=1000,
        pairs_per_epoch=1600,  # an epoch (validation + checkpoint) every 200 steps
        val_pairs=48,
        minutes=minutes,
        seed=0,
        ema_decay=float(os.environ.get("STICKERBOT_BENCH_SEG_EMA", "0")) or None,
        **recipe,
    )
    warm = f"{config.warm_size} px until {config.warm_share:.0%}" if config.warm_size else ""
    share = config.decay_share
    decay = f"held, then a linear decay over the last {share:.0%}" if share else "cosine decay"
    whiten = " with a patch-whitening first embedding" if config.whiten else ""
    print(
        f"training: {SIZE} px, batch {BATCH}, lr {config.lr:g} "
        f"(warm-up {config.warmup_steps} steps, {decay}), "
        f"BCE + {config.dice_weight:g} Dice, clip {config.max_grad_norm}, "
        f"degradations {'on' if config.degrade else 'off'}, dropout {'on' if config.dropout else 'off'}, "
        f"SegFormer init{whiten}, weight average {config.ema_decay or 'off'}, progressive resizing "
        f"{warm or 'off'}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        result = train_segmenter(seg, train, tmp, config, val_stickers=held[:20])
        for h in result.history:
            print(
                f"  epoch {h['epoch']:3d} step {h['step']:5d} loss {h['loss']:.3f} "
                f"val IoU {h['val_iou']:.4f} ({h['elapsed']:.0f} s)",
                flush=True,
            )
        from pipeline.models import load_segmenter

        best = load_segmenter(tmp, device=torch.device("cpu"))
        out = os.environ.get("STICKERBOT_BENCH_SEG_OUT")
        views = {  # test-time augmentation: (flip, scales, rotate), each row on the same model
            "one view": (False, (1.0,), False),
            "mirrored (2 views)": (True, (1.0,), False),
            "mirrored, at 1x and 4/3x the input size (4 views)": (True, (1.0, 4 / 3), False),
            "mirrored and turned by quarters, at 1x and 4/3x (16 views)": (True, (1.0, 4 / 3), True),
        }
        rows = {name: evaluate(best, held[20:], count=120, size=SIZE, seed=7, flip=flip, scales=scales,
                               rotate=rotate, out_dir=out if name == "one view" else None)
                for name, (flip, scales, rotate) in views.items()}
    print(
        f"trained from random weights for {result.seconds / 60:.1f} min on CPU ({result.steps} steps of "
        f"{config.batch_size} at {SIZE} px{f', {warm}' if warm else ''}; "
        f"best of {result.epochs} epochs by validation on other held-out stickers)",
        flush=True,
    )
    images = rows["one view"]["images"]
    print(f"held-out stickers over held-out backgrounds ({images} images, {SIZE} px); IoU >= {IOU_BAR}?",
          flush=True)
    for name, metrics in rows.items():
        print(
            f"  {name}: segmenter IoU {metrics['iou']:.4f} "
            f"({'PASS' if metrics['iou'] >= IOU_BAR else 'NOT REACHED'}), boundary F "
            f"({metrics['tolerance_px']} px) {metrics['boundary_f']:.4f}; remover's matte (edge snapped, "
            f"guided filter) IoU {metrics['matte_iou']:.4f}, alpha MAE {metrics['alpha_mae']:.4f}",
            flush=True,
        )
    for name, metrics in rows.items():
        print(
            f"  IoU by held-out background, {name}: "
            + "  ".join(f"{family} {value:.3f}" for family, value in metrics["iou_by_background"].items()),
            flush=True,
        )


def main() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _timing("cpu")
        if torch.cuda.is_available():
            _timing("cuda")
        else:
            print("cuda: not available here (the goal there is under 10 ms per 512-px image)")
        _quality(float(os.environ.get("STICKERBOT_BENCH_SEG_MINUTES", "10")))
    finally:
        torch.set_num_threads(before)


if __name__ == "__main__":
    main()
