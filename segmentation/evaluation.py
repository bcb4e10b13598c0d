"""How good is a segmenter: IoU, boundary F-score and alpha MAE on held-out data.

The data are held-out stickers composited over the held-out background families of
``segmentation.pairs`` (radial gradients, clouds, plaid, clutter, odd-index photos: none of them
used in training), with the same degradations as training.

- IoU: |predicted ∩ label| / |predicted ∪ label|, over all pixels of all images (pooled), with
  predicted = P(foreground) >= 0.5 and label = composited alpha >= 0.5.
- Boundary F-score (Perazzi et al., DAVIS 2016): the boundary pixels of the prediction and of
  the label are matched within ``tolerance`` px; precision and recall of the matching, F = their
  harmonic mean, averaged over images.
- Alpha MAE: mean |predicted alpha - composited alpha| (both in [0, 1]), where the predicted alpha
  is the remover's refined matte (edge snapped to the colour boundary, guided filter: as users
  get it) at the image's size.
- Matte IoU: the IoU of that matte (alpha >= 0.5), beside the segmenter's own IoU.

``evaluate`` returns a dict (also written as JSON) and draws a PNG contact sheet: one row per
image with the input, the predicted alpha and an error map (red: missed foreground, blue: false
foreground, grey: correct foreground).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
from PIL import Image

from segmentation.pairs import Pair, PairConfig, inner_edge, make_pair

if TYPE_CHECKING:
    from pipeline.models import Segmenter

BOUNDARY_TOLERANCE = 2  # px, at the evaluation size


def iou(pred: np.ndarray, label: np.ndarray) -> float:
    """IoU of two boolean masks (1.0 when both are empty)."""
    return pooled_iou([pred], [label])


def boundary_f(pred: np.ndarray, label: np.ndarray, *, tolerance: int = BOUNDARY_TOLERANCE) -> float:
    """Boundary F-score of two boolean masks with a matching tolerance in pixels."""
    bp, bl = inner_edge(pred), inner_edge(label)
    if not bp.any() and not bl.any():
        return 1.0
    if not bp.any() or not bl.any():
        return 0.0
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * tolerance + 1, 2 * tolerance + 1))
    near_l = cv2.dilate(bl.astype(np.uint8), kernel) > 0
    near_p = cv2.dilate(bp.astype(np.uint8), kernel) > 0
    precision = float((bp & near_l).sum() / bp.sum())
    recall = float((bl & near_p).sum() / bl.sum())
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def heldout_pairs(
    stickers: Sequence[Image.Image],
    count: int,
    *,
    size: int,
    seed: int = 1,
    photos: Sequence[np.ndarray] = (),
) -> list[Pair]:
    return [
        make_pair(stickers, i, split="heldout", seed=seed, config=PairConfig(size=size), photos=photos)
        for i in range(count)
    ]


def probabilities(
    segmenter: Segmenter,
    images: Sequence[np.ndarray],
    *,
    batch_size: int = 8,
    flip: bool = False,
    scales: Sequence[float] = (1.0,),
    rotate: bool = False,
) -> list[np.ndarray]:
    from segmentation.removal import predict_alpha

    pictures = [Image.fromarray(img) for img in images]
    return predict_alpha(segmenter, pictures, batch_size=batch_size, flip=flip, scales=scales, rotate=rotate)


def pooled_iou(preds: Sequence[np.ndarray], labels: Sequence[np.ndarray]) -> float:
    """IoU over all pixels of several images at once (boolean masks; 1.0 when all are empty)."""
    inter = sum(int(np.logical_and(p, t).sum()) for p, t in zip(preds, labels, strict=True))
    union = sum(int(np.logical_or(p, t).sum()) for p, t in zip(preds, labels, strict=True))
    return 1.0 if union == 0 else inter / union


def score(
    probs: Sequence[np.ndarray],
    pairs: Sequence[Pair],
    *,
    alphas: Sequence[np.ndarray] | None = None,
    tolerance: int = BOUNDARY_TOLERANCE,
) -> dict[str, float]:
    """Pooled IoU and mean boundary F of the probabilities (P >= 0.5), mean alpha MAE (of
    ``alphas`` if given, else of the probabilities themselves); with ``alphas``, also
    ``matte_iou``: the pooled IoU of the matte (alpha >= 0.5), what the remover's users get."""
    preds = [prob >= 0.5 for prob in probs]
    labels = [pair.mask for pair in pairs]
    mattes = probs if alphas is None else alphas
    metrics = {
        "iou": pooled_iou(preds, labels),
        "boundary_f": float(
            np.mean([boundary_f(p, t, tolerance=tolerance) for p, t in zip(preds, labels, strict=True)])
        ),
        "alpha_mae": float(np.mean([np.abs(a.astype(np.float32) - pair.alpha).mean()
                                    for a, pair in zip(mattes, pairs, strict=True)])),
    }
    if alphas is not None:
        metrics["matte_iou"] = pooled_iou([a >= 0.5 for a in alphas], labels)
    return metrics


def iou_by_family(probs: Sequence[np.ndarray], pairs: Sequence[Pair]) -> dict[str, float]:
    """Pooled IoU per background family (where a segmenter fails, it usually fails on one)."""
    preds: dict[str, list[np.ndarray]] = {}
    labels: dict[str, list[np.ndarray]] = {}
    for prob, pair in zip(probs, pairs, strict=True):
        preds.setdefault(pair.family, []).append(prob >= 0.5)
        labels.setdefault(pair.family, []).append(pair.mask)
    return {family: pooled_iou(preds[family], labels[family]) for family in sorted(preds)}


def contact_sheet(
    pairs: Sequence[Pair],
    probs: Sequence[np.ndarray],
    path: str | Path,
    *,
    alphas: Sequence[np.ndarray] | None = None,
    rows: int = 16,
) -> Path:
    """PNG: per row the input, the predicted alpha, the error map."""
    tiles = []
    for i, (pair, prob) in enumerate(list(zip(pairs, probs, strict=True))[:rows]):
        alpha = prob if alphas is None else alphas[i]
        pred = prob >= 0.5
        a = np.repeat((np.clip(alpha, 0, 1) * 255 + 0.5).astype(np.uint8)[..., None], 3, axis=2)
        err = np.zeros_like(pair.image)
        err[pred & pair.mask] = (110, 110, 110)
        err[~pred & pair.mask] = (230, 30, 30)
        err[pred & ~pair.mask] = (40, 90, 240)
        tiles.append(np.concatenate([pair.image, a, err], axis=1))
    sheet = np.concatenate(tiles, axis=0) if tiles else np.zeros((1, 1, 3), np.uint8)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet).save(out)
    return out


def evaluate(
    segmenter: Segmenter,
    stickers: Sequence[Image.Image],
    *,
    count: int = 64,
    size: int | None = None,
    seed: int = 1,
    photos: Sequence[np.ndarray] = (),
    out_dir: str | Path | None = None,
    tolerance: int = BOUNDARY_TOLERANCE,
    refine: bool = True,
    flip: bool = False,
    scales: Sequence[float] = (1.0,),
    rotate: bool = False,
) -> dict[str, Any]:
    """Metrics on ``count`` held-out pairs (stickers cycled) at ``size`` px (default: the
    model's input size), with test-time augmentation when ``flip``, ``rotate`` or several
    ``scales`` (``predict_alpha``). Writes ``metrics.json`` and ``contact-sheet.png`` into ``out_dir``."""
    from segmentation.removal import cut_out, model_input_size

    side = size or model_input_size(segmenter)[0]
    pairs = heldout_pairs(stickers, count, size=side, seed=seed, photos=photos)
    probs = probabilities(segmenter, [p.image for p in pairs], flip=flip, scales=scales, rotate=rotate)
    alphas = None
    if refine:  # the remover's matte from the same probabilities (no second forward pass)
        cut = [cut_out(Image.fromarray(p.image), prob) for p, prob in zip(pairs, probs, strict=True)]
        alphas = [np.asarray(c.getchannel("A"), dtype=np.float32) / 255.0 for c in cut]
    metrics: dict[str, Any] = score(probs, pairs, alphas=alphas, tolerance=tolerance)
    metrics["iou_by_background"] = iou_by_family(probs, pairs)
    metrics.update(
        images=len(pairs),
        size=side,
        tolerance_px=tolerance,
        stickers=len(stickers),
        flip=flip,
        rotate=rotate,
        scales=list(scales),
        source=str(segmenter.source),
    )
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        contact_sheet(pairs, probs, out / "contact-sheet.png", alphas=alphas)
    return metrics
