"""Segmentation: latency and throughput of a b0-sized SegFormer at 512 px on CPU (and on a GPU
when present), then real sticker art against procedural stickers: at an equal budget
(``STICKERBOT_BENCH_SEG_STEPS`` steps of 8 each, default 400: about a minute each on
the idle 2-core machine), b0-sized from random weights, (a) trained on
procedural stickers only and (b) on the same plus Twemoji, both measured on OpenMoji (another
artist's emoji, never trained on) and on held-out procedural stickers over held-out backgrounds,
with the refresh rule's decision between them. The emoji sets come from the npm registry
(``python -m benchmarks.emoji_art``, cached in ``~/.cache/stickerbot/emoji``); offline, that part
says so and is skipped.

Two torch threads (the machine's two cores; ``STICKERBOT_BENCH_SEG_THREADS=1`` on a busy machine).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

TRAIN_STICKERS = int(os.environ.get("STICKERBOT_BENCH_SEG_STICKERS", "400"))
HELDOUT_STICKERS = 60
EMOJI_TRAIN = 400  # Twemoji in (b)
EMOJI_HELDOUT = 120  # OpenMoji, never trained on
EVAL_IMAGES = 120
STEPS_PER_EPOCH = 100  # validation and a checkpoint every 100 steps
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


def _train_from_scratch(stickers: list[Image.Image], val: list[Image.Image], steps: int, out: str) -> Any:
    """A b0-sized SegFormer from random weights, the from-scratch recipe, for ``steps`` steps (an
    equal budget that a busy machine cannot tilt, as a time budget would)."""
    from pipeline.architectures import SD15
    from pipeline.models import load_segmenter
    from segmentation.training import SegTrainConfig, fresh_segmenter, scratch_recipe, train_segmenter

    config = SegTrainConfig(size=SIZE, batch_size=BATCH, epochs=max(1, steps // STEPS_PER_EPOCH),
                            pairs_per_epoch=STEPS_PER_EPOCH * BATCH, val_pairs=48, seed=0,
                            **scratch_recipe(SIZE))
    result = train_segmenter(fresh_segmenter(SD15.segformer, SIZE), stickers, out, config, val_stickers=val)
    print(f"  {result.steps} steps of {BATCH} at {SIZE} px in {result.seconds / 60:.1f} min, "
          f"best of {result.epochs} epochs by validation on held-out procedural stickers", flush=True)
    return load_segmenter(out, device=torch.device("cpu"))


def _real_art(steps: int) -> None:
    """Does real sticker art in training help on unseen real art? Side by side at equal budget,
    from random weights: (a) procedural stickers only, (b) the same plus Twemoji; both measured on
    OpenMoji (another artist's set, never trained on) and on held-out procedural stickers, over
    held-out backgrounds. Then the refresh rule's decision with (a) serving and (b) the candidate."""
    from benchmarks.emoji_art import default_cache
    from segmentation.bootstrap import should_promote
    from segmentation.emoji import OPENMOJI, TWEMOJI, EmojiUnavailable, load_emoji_stickers
    from segmentation.evaluation import evaluate
    from segmentation.synthetic import make_stickers

    start = time.perf_counter()
    try:
        twemoji = [_fit(i) for i in load_emoji_stickers(TWEMOJI, default_cache(), limit=EMOJI_TRAIN)]
        openmoji = [_fit(i) for i in load_emoji_stickers(OPENMOJI, default_cache(), limit=EMOJI_HELDOUT,
                                                         seed=1)]
    except EmojiUnavailable as exc:
        print(f"real-art comparison skipped: {exc}", flush=True)
        return
    procedural = make_stickers(TRAIN_STICKERS, seed=0, size=STICKER_SIZE)
    held = make_stickers(HELDOUT_STICKERS, seed=1_000_000, size=STICKER_SIZE)  # seeds never trained on
    print(f"{len(procedural)} procedural + {len(twemoji)} Twemoji training stickers, {len(held)} held-out "
          f"procedural, {len(openmoji)} OpenMoji held out, ready in {time.perf_counter() - start:.1f} s",
          flush=True)
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    sides = (("(a) procedural only", procedural), ("(b) procedural + Twemoji", procedural + twemoji))
    for name, train in sides:
        print(f"{name}: {len(train)} stickers, {steps} steps", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            model = _train_from_scratch(train, held[:20], steps, tmp)
            rows[name] = {
                "OpenMoji": evaluate(model, openmoji, count=EVAL_IMAGES, size=SIZE, seed=7),
                "procedural": evaluate(model, held[20:], count=EVAL_IMAGES, size=SIZE, seed=7),
            }
    print(f"held-out IoU over held-out backgrounds ({EVAL_IMAGES} images each, {SIZE} px, one view):",
          flush=True)
    for name, sets in rows.items():
        print("  " + name + ": " + "; ".join(
            f"{s} IoU {m['iou']:.4f}, boundary F {m['boundary_f']:.4f}, matte IoU {m['matte_iou']:.4f}, "
            f"alpha MAE {m['alpha_mae']:.4f}" for s, m in sets.items()), flush=True)
    (a, b) = rows.values()
    for held_set in ("procedural", "OpenMoji"):
        promote = should_promote(b[held_set]["iou"], a[held_set]["iou"])
        print(f"refresh rule on held-out {held_set} (serving (a) {a[held_set]['iou']:.4f}, candidate (b) "
              f"{b[held_set]['iou']:.4f}): {'promote (b)' if promote else 'keep (a), (b) kept aside'}",
              flush=True)


def _bootstrap_wall_time(device: str, *, preset: str = "sd15", minutes: float = 5.0) -> None:
    """On a GPU: the product's bootstrap (its data plan, Twemoji included when at hand) from
    b0-shaped weights (random: no pretrained weights here), wall time from start to a written,
    measured version."""
    from pipeline.architectures import ARCHITECTURES
    from pipeline.models import load_segmenter
    from segmentation.bootstrap import gather_data, plan_for, run_segmenter_training
    from segmentation.training import fresh_segmenter

    plan = plan_for(preset, size=384, minutes=minutes, scratch=False)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = gather_data(plan, data_root=root, db_path=None, max_pixels=40_000_000, emoji=True,
                           emoji_registry="https://registry.npmjs.org")
        prepared = time.perf_counter() - started
        segmenter = fresh_segmenter(ARCHITECTURES[preset].segformer, plan.size, device=device)
        run = run_segmenter_training(
            segmenter, mode="bootstrap", name="bench", base="bench", start="random b0-shaped weights",
            plan=plan, data=data, data_root=root, work_dir=root / "work", device=device,
            load_trained=lambda path: load_segmenter(path, device=torch.device(device)))
    wall = time.perf_counter() - started
    print(f"{device}: bootstrap wall time {wall / 60:.1f} min ({prepared:.0f} s data preparation, "
          f"{run.info['training']['steps']} steps, budget {minutes:g} min), counts {run.info['counts']}, "
          f"held-out procedural {run.info['figures']['procedural']}", flush=True)


def _fit(image: Image.Image) -> Image.Image:
    image = image.copy()
    image.thumbnail((STICKER_SIZE, STICKER_SIZE), Image.Resampling.LANCZOS)
    return image


def main() -> None:
    before = torch.get_num_threads()
    # Two threads on an idle 2-core machine; on a busy one a second spinning OpenMP thread made
    # training steps 4 times slower (20 steps: 11.3 s with one thread, 44.3 s with two).
    torch.set_num_threads(int(os.environ.get("STICKERBOT_BENCH_SEG_THREADS", "2")))
    try:
        _timing("cpu")
        if torch.cuda.is_available():
            _timing("cuda")
            minutes = float(os.environ.get("STICKERBOT_BENCH_BOOTSTRAP_MINUTES", "5"))
            _bootstrap_wall_time("cuda", minutes=minutes)
        else:
            print("cuda: not available here (the goal there is under 10 ms per 512-px image)")
        _real_art(int(os.environ.get("STICKERBOT_BENCH_SEG_STEPS", "400")))
    finally:
        torch.set_num_threads(before)


if __name__ == "__main__":
    main()
