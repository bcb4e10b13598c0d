"""Training the product's own background remover: the one-off bootstrap and the refreshes.

The default segmenter (``nvidia/mit-b0``) is an ImageNet encoder with no foreground head, so the
product trains one (the worker runs this as a ``segmenter`` job, ``stickerbot segmenter
bootstrap`` from the command line):

1. data: procedural stickers (``segmentation.synthetic``), Twemoji (``segmentation.emoji``;
   a setting turns it off), the operator's own folders, and every uploaded sticker image with
   alpha in the data dir (content-addressed, so de-duplicated by bytes; pixel-identical copies
   are dropped too). Held out: procedural stickers of other seeds, and the uploads of every
   fifth user (by a hash of the user id: a user's stickers are all in or all out).
2. train (``segmentation.training.train_segmenter``; resumes from its state after a crash or a
   pause) for a time budget, validating on the held-out procedural stickers;
3. measure IoU, boundary F and alpha MAE on held-out procedural and held-out uploaded stickers
   over held-out backgrounds;
4. write ``<data dir>/segmenter/<version>/`` (``save_pretrained`` + ``segmenter.json``) whole,
   then promote it (bootstrap), or promote it only when its held-out IoU is not worse than the
   serving version's on the same held-out pairs (refresh); otherwise keep it aside.

Model loading stays in ``pipeline.models``: the caller passes the segmenter to train, and, for a
refresh, the serving one to compare against.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from segmentation import versions

if TYPE_CHECKING:
    from pipeline.models import Segmenter
    from segmentation.training import SegTrainProgress

log = logging.getLogger(__name__)

HELDOUT_GROUP_EVERY = 5  # one user in five is held out (at least one when there are two)
PROCEDURAL_HELDOUT_SEED = 1_000_000  # held-out procedural stickers: seeds no training run uses
MODEL_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")


@dataclass(frozen=True)
class BootstrapPlan:
    """How much data and training one run gets (``plan_for`` picks it per preset)."""

    size: int  # px of pairs and model input
    procedural: int  # training procedural stickers
    heldout_procedural: int
    emoji_limit: int | None  # Twemoji taken (a seeded sample; None: all)
    batch_size: int
    pairs_per_epoch: int
    val_pairs: int
    eval_pairs: int  # held-out composites per figure
    epochs: int  # an upper bound: the time budget usually ends the run first
    minutes: float
    scratch: bool  # random weights (the from-scratch recipe) instead of a pretrained encoder


def plan_for(preset: str, *, size: int, minutes: float, scratch: bool) -> BootstrapPlan:
    if preset == "tiny":  # random tiny models (tests, CPU smoke runs): small epochs, the budget ends it
        return BootstrapPlan(size=32, procedural=12, heldout_procedural=4, emoji_limit=24, batch_size=4,
                             pairs_per_epoch=8, val_pairs=4, eval_pairs=6, epochs=10_000, minutes=minutes,
                             scratch=scratch)
    return BootstrapPlan(size=size, procedural=600, heldout_procedural=60, emoji_limit=800, batch_size=16,
                         pairs_per_epoch=320, val_pairs=48, eval_pairs=120, epochs=10_000, minutes=minutes,
                         scratch=scratch)


@dataclass
class UploadedSticker:
    group: str  # the user who uploaded it: the held-out split keeps a user's stickers together
    sha256: str
    image: Image.Image


@dataclass
class TrainingData:
    train: list[Image.Image]
    heldout_procedural: list[Image.Image]
    heldout_uploads: list[Image.Image]
    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what was left out, and why


def _uploaded_paths(data_root: Path, db_path: Path | None) -> list[tuple[str, str, str]]:
    """(relative path, sha256, user id) of every image of every sticker set in the database;
    without a database, every blob under ``blobs/`` (one group)."""
    if db_path is not None and db_path.exists():
        try:
            conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
            try:
                rows = conn.execute(
                    "SELECT i.path, i.sha256, s.user_id FROM images i JOIN styles s ON s.id = i.style_id "
                    "ORDER BY s.user_id, i.id").fetchall()
            finally:
                conn.close()
            return [(str(p), str(h), str(u)) for p, h, u in rows]
        except sqlite3.Error as exc:
            log.warning("segmenter data: cannot read the sticker sets from %s (%s)", db_path, exc)
    blobs = data_root / "blobs"
    if not blobs.is_dir():
        return []
    files = [p for p in sorted(blobs.rglob("*")) if p.is_file()]
    return [(str(p.relative_to(data_root)), p.stem, "unknown") for p in files]


def _read_upload(path: Path, *, max_pixels: int) -> tuple[Image.Image, bool] | None:
    """An uploaded file decoded to RGBA, and whether its alpha is useful for training (some
    pixels transparent, some opaque); None when it does not decode."""
    from pipeline.errors import ImageError
    from pipeline.images import decode_image

    try:
        decoded = decode_image(path.read_bytes(), name=path.name, max_pixels=max_pixels)
    except (OSError, ImageError):
        return None
    alpha = np.asarray(decoded.image.getchannel("A"))
    return decoded.image, bool((alpha < 128).any() and (alpha >= 128).any())


def collect_uploads(data_root: Path, db_path: Path | None, *, max_pixels: int) -> list[UploadedSticker]:
    """Every uploaded sticker image with alpha (some pixels transparent, some opaque), once: a
    file kept by several users belongs to the first; pixel-identical files count once. The
    alpha check is cached in ``segmenter/uploads-index.json`` by content hash."""
    index_path = versions.root_of(data_root) / "uploads-index.json"
    index: dict[str, Any] = versions.read_json(index_path) or {}
    seen_files: set[str] = set()
    seen_pixels: set[str] = set()
    out: list[UploadedSticker] = []
    changed = False
    for rel, sha, group in _uploaded_paths(data_root, db_path):
        if sha in seen_files or index.get(sha) is False:
            continue
        seen_files.add(sha)
        read = _read_upload(data_root / rel, max_pixels=max_pixels)
        if read is None:
            continue
        image, useful = read
        if index.get(sha) != useful:
            index[sha] = useful
            changed = True
        if not useful:
            continue
        pixels = hashlib.sha256(np.asarray(image).tobytes()).hexdigest()
        if pixels in seen_pixels:
            continue
        seen_pixels.add(pixels)
        out.append(UploadedSticker(group=group, sha256=sha, image=image))
    if changed:
        versions.write_json_atomic(index_path, index)
    return out


def count_alpha_uploads(data_root: Path, db_path: Path | None, *, max_pixels: int) -> int:
    """How many distinct uploaded files carry alpha: only files not yet in the index are decoded
    (the refresh trigger asks after every training job)."""
    index_path = versions.root_of(data_root) / "uploads-index.json"
    index: dict[str, Any] = versions.read_json(index_path) or {}
    useful: set[str] = set()
    changed = False
    for rel, sha, _group in _uploaded_paths(data_root, db_path):
        if sha not in index:
            read = _read_upload(data_root / rel, max_pixels=max_pixels)
            if read is None:
                continue
            index[sha] = read[1]
            changed = True
        if index[sha]:
            useful.add(sha)
    if changed:
        versions.write_json_atomic(index_path, index)
    return len(useful)


def heldout_groups(groups: Sequence[str]) -> set[str]:
    """Every ``HELDOUT_GROUP_EVERY``-th group in the order of a hash of its name (stable as
    groups come and go), at least one when there are two or more."""
    unique = sorted(set(groups), key=lambda g: hashlib.sha256(g.encode()).hexdigest())
    if len(unique) < 2:
        return set()
    return set(unique[::HELDOUT_GROUP_EVERY])


def split_uploads(items: Sequence[UploadedSticker]) -> tuple[list[UploadedSticker], list[UploadedSticker]]:
    held = heldout_groups([i.group for i in items])
    return [i for i in items if i.group not in held], [i for i in items if i.group in held]


def _fit(image: Image.Image, size: int) -> Image.Image:
    """At most ``size`` px on the longer side (what a pair places anyway; saves memory)."""
    if max(image.size) <= size:
        return image
    copy = image.copy()
    copy.thumbnail((size, size), Image.Resampling.LANCZOS)
    return copy


def gather_data(plan: BootstrapPlan, *, data_root: Path, db_path: Path | None, max_pixels: int,
                emoji: bool, emoji_registry: str, extra_dirs: Sequence[Path] = ()) -> TrainingData:
    """Every source of training data, each failing soft (a note and a log line, no data)."""
    from segmentation.pairs import load_stickers
    from segmentation.synthetic import make_stickers

    sticker_size = max(plan.size, 64)
    notes: list[str] = []
    procedural = make_stickers(plan.procedural, seed=0, size=sticker_size)
    heldout_procedural = make_stickers(plan.heldout_procedural, seed=PROCEDURAL_HELDOUT_SEED,
                                       size=sticker_size)
    twemoji: list[Image.Image] = []
    if emoji:
        from segmentation.emoji import TWEMOJI, EmojiUnavailable, load_emoji_stickers

        try:
            twemoji = load_emoji_stickers(TWEMOJI, versions.root_of(data_root) / "emoji", size=512,
                                          limit=plan.emoji_limit, registry=emoji_registry)
        except EmojiUnavailable as exc:
            notes.append(f"Twemoji left out: {exc}")
            log.warning("segmenter data: Twemoji left out (%s); training without it", exc)
    extra: list[Image.Image] = []
    for folder in extra_dirs:
        try:
            extra += load_stickers([folder], max_pixels=max_pixels)
        except Exception as exc:  # an operator's folder that is gone must not stop the bootstrap
            notes.append(f"{folder} left out: {exc}")
            log.warning("segmenter data: %s left out (%s)", folder, exc)
    uploads = collect_uploads(data_root, db_path, max_pixels=max_pixels)
    train_up, held_up = split_uploads(uploads)
    train = procedural + [_fit(i, sticker_size) for i in twemoji + extra] + [
        _fit(u.image, sticker_size) for u in train_up]
    counts = {
        "procedural": len(procedural), "twemoji": len(twemoji), "operator": len(extra),
        "uploads": len(uploads), "uploads_train": len(train_up), "uploads_heldout": len(held_up),
        "upload_users": len({u.group for u in uploads}), "heldout_procedural": len(heldout_procedural),
        # what the refresh trigger counts (distinct files with alpha; the index is warm by now)
        "upload_files": count_alpha_uploads(data_root, db_path, max_pixels=max_pixels),
    }
    return TrainingData(train=train, heldout_procedural=heldout_procedural,
                        heldout_uploads=[_fit(u.image, sticker_size) for u in held_up], counts=counts,
                        notes=notes)


def train_config(plan: BootstrapPlan, *, device: Any) -> Any:
    from segmentation.training import SegTrainConfig, default_workers, scratch_recipe

    recipe: dict[str, Any] = scratch_recipe(plan.size) if plan.scratch else {"lr": 2e-4, "warmup_steps": 20}
    return SegTrainConfig(size=plan.size, batch_size=plan.batch_size, epochs=plan.epochs,
                          pairs_per_epoch=plan.pairs_per_epoch, val_pairs=plan.val_pairs,
                          minutes=plan.minutes,
                          workers=default_workers(device), **recipe)


def figures(segmenter: Segmenter, data: TrainingData, plan: BootstrapPlan) -> dict[str, Any]:
    """IoU, boundary F and alpha MAE (of the remover's matte) on held-out procedural and held-out
    uploaded stickers over held-out backgrounds; None for a set that is empty."""
    from segmentation.evaluation import evaluate

    out: dict[str, Any] = {}
    for name, stickers in (("procedural", data.heldout_procedural), ("uploads", data.heldout_uploads)):
        if not stickers:
            out[name] = None
            continue
        metrics = evaluate(segmenter, stickers, count=plan.eval_pairs, size=plan.size, seed=1)
        out[name] = {"iou": round(metrics["iou"], 4), "boundary_f": round(metrics["boundary_f"], 4),
                     "alpha_mae": round(metrics["alpha_mae"], 4), "matte_iou": round(metrics["matte_iou"], 4),
                     "images": metrics["images"], "stickers": len(stickers)}
    return out


def should_promote(candidate_iou: float, serving_iou: float | None) -> bool:
    """The refresh rule: promote when held-out IoU, measured on the same pairs, is not worse."""
    return serving_iou is None or candidate_iou >= serving_iou


def write_version(data_root: Path, name: str, best_dir: Path,
                  info: dict[str, Any]) -> versions.SegmenterVersion:
    """``<data dir>/segmenter/<name>/``: the best checkpoint's model files and ``segmenter.json``,
    appearing whole."""
    from pipeline.storage.files import atomic_directory

    final = versions.root_of(data_root) / name
    with atomic_directory(final) as tmp:
        for file in MODEL_FILES:
            if (best_dir / file).exists():
                shutil.copy2(best_dir / file, tmp / file)
        versions.write_json_atomic(tmp / versions.INFO, info)
    found = versions.version(data_root, name)
    if found is None:
        raise RuntimeError(f"the segmenter version {final} was not written whole")
    return found


@dataclass
class SegmenterRun:
    """What a bootstrap or refresh produced."""

    version: str
    promoted: bool
    info: dict[str, Any]


def run_segmenter_training(
    segmenter: Segmenter,
    *,
    mode: str,
    name: str,
    base: str,
    start: str,
    plan: BootstrapPlan,
    data: TrainingData,
    data_root: Path,
    work_dir: Path,
    device: Any,
    load_trained: Callable[[Path], Segmenter],
    serving: Segmenter | None = None,
    progress: Callable[[float, str], None] | None = None,
    should_stop: Callable[[], str | None] | None = None,
) -> SegmenterRun:
    """Steps 2-4 of the module docstring. ``segmenter`` is trained in place from ``start``;
    ``load_trained(dir)`` loads a checkpoint (``pipeline.models.load_segmenter``); ``serving``,
    for a refresh, is measured on the same held-out pairs as the candidate."""
    from segmentation.training import train_segmenter

    # 1. train (or resume) for the budget, keeping the best held-out checkpoint in work_dir
    config = train_config(plan, device=device)
    budget = plan.minutes * 60

    def on_progress(p: SegTrainProgress) -> None:
        if progress is not None:
            share = min(0.95, p.elapsed / budget) if budget else 0.0
            detail = f", held-out IoU {p.val_iou:.3f}" if p.val_iou is not None else ""
            progress(share, f"learning backgrounds: {round(share * 100)}%{detail}")

    result = train_segmenter(segmenter, data.train, work_dir, config, val_stickers=data.heldout_procedural,
                             progress=on_progress, should_stop=should_stop)
    # 2. measure the best checkpoint (and, for a refresh, the serving version on the same pairs)
    if progress is not None:
        progress(0.96, "measuring on held-out stickers")
    best = load_trained(work_dir)
    found = figures(best, data, plan)
    serving_figures = figures(serving, data, plan) if serving is not None else None
    candidate_iou = found["procedural"]["iou"]
    serving_iou = serving_figures["procedural"]["iou"] if serving_figures else None
    promote = mode == "bootstrap" or should_promote(candidate_iou, serving_iou)
    # 3. write the version whole, then switch
    info = {
        "version": name, "mode": mode, "base": base, "start": start,
        "source": f"{mode} from {start}", "created_at": time.time(), "figures": found,
        "serving_figures": serving_figures,
        "promoted": promote, "counts": data.counts, "notes": data.notes,
        "learned_from_uploads": data.counts.get("uploads_train", 0),
        "uploads_seen": data.counts.get("upload_files", 0),
        "training": {"steps": result.steps, "epochs": result.epochs, "seconds": round(result.seconds, 1),
                     "resumed_from_step": result.resumed_from,
                     "best_val_iou": round(result.best_iou, 4), "plan": asdict(plan)},
    }
    if not promote:
        info["kept_aside"] = (f"held-out IoU {candidate_iou:.4f} is below the serving version's "
                              f"{serving_iou:.4f} on the same pairs")
    version = write_version(data_root, name, work_dir, info)
    if promote:
        versions.promote(data_root, name, at=time.time())
    return SegmenterRun(version=version.name, promoted=promote, info=info)

