"""Fine-tuning a SegFormer on (image, mask) pairs made from stickers.

Start points:

- the preset's segmenter (``pipeline.models.load_segmenter(SD15_SOURCES["segmenter"], num_labels=1)``:
  ``nvidia/mit-b0``, an ImageNet-pretrained encoder with a fresh one-label head),
- a checkpoint written by this module (``--init DIR``),
- a fresh config of random weights (``fresh_segmenter(TINY.segformer or SD15.segformer, size)``).

Loss: BCE with logits + soft Dice on the foreground logit upsampled to the label size. AdamW,
linear warm-up then cosine decay, where the schedule's progress is the larger of steps done /
steps planned and time spent / time budget, so a time-budgeted run still anneals. Each epoch
draws fresh pairs (the epoch shifts the pair indices), then validates on held-out stickers over
held-out backgrounds; the best validation IoU is kept in ``out_dir`` (``save_pretrained`` of
model and image processor, so ``load_segmenter(out_dir)`` reads it). ``out_dir/training-state.pt``
holds the last state (weights, optimizer, epoch, elapsed time, history): calling again with the
same ``out_dir`` resumes from it.

On a GPU, far better results come from the pretrained encoder (the issue's reference figure is
IoU 0.98 on real stickers). The sd15 preset's segmenter is ``nvidia/mit-b0`` (ImageNet-1k
encoder, no segmentation head): ``load_segmenter(..., num_labels=1)`` adds a fresh one-label
head, which must be trained before the remover is any good::

    STICKERBOT_DEVICE=cuda stickerbot segmenter train --preset sd15 \
        --stickers my_stickers/ other_pack/ --procedural 5000 --photos backgrounds/ \
        --out segmenter-ft/ --size 512 --epochs 30 --batch-size 16 --lr 6e-5 --pairs-per-epoch 4000
    stickerbot segmenter eval --preset sd15 --model segmenter-ft/ --stickers held_out_stickers/ \
        --out segmenter-eval/
    export STICKERBOT_SEGMENTER_MODEL=segmenter-ft/

(``--init`` defaults to the preset's segmenter; ``--size 512`` matches the size the remover
runs at; 6e-5 is SegFormer's own fine-tuning learning rate; real sticker packs with their alpha
matter more than more procedural ones; a photo folder makes backgrounds realistic.)
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from segmentation.pairs import PairConfig, PairSet

if TYPE_CHECKING:
    import torch

    from pipeline.models import Segmenter

STATE_FILE = "training-state.pt"
WHITEN_IMAGES = 256  # training pairs whose patches set the whitening initialisation
WORKER_TIMEOUT = 300.0  # seconds a pair-making worker may take for one batch before the run fails


@dataclass
class SegTrainConfig:
    size: int = 128  # pair and model input size, px
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.01
    epochs: int = 10
    pairs_per_epoch: int = 512
    val_pairs: int = 64
    minutes: float | None = None  # time budget; stops after the epoch that crosses it
    warmup_steps: int = 50
    decay_share: float | None = None  # None: cosine decay; a share: hold, then fall over that last share
    dice_weight: float = 1.0
    hard_share: float = 1.0  # < 1: half the BCE from this share of the hardest pixels (OHEM)
    max_grad_norm: float | None = None  # clip the gradient norm (None: no clipping)
    ema_decay: float | None = None  # validate and keep an exponential moving average of weights
    warm_size: int | None = None  # progressive resizing: train at this smaller size first ...
    warm_share: float = 0.5  # ... for this share of the planned steps (or of the time budget)
    heldout_share: float = 0.1  # stickers kept out of training, for validation
    seed: int = 0
    dropout: bool = True  # False: no dropout or stochastic depth in this run (a short run underfits)
    degrade: bool = True  # blur, noise, JPEG and lighting on training images
    val_degrade: bool = True  # ... and on validation images (as ``evaluate`` does)
    fresh_each_epoch: bool = True  # new placements/backgrounds each epoch (False: the same pairs)
    workers: int = 0  # processes making pairs ahead of the step (0: in this process, between steps)
    whiten: bool = False  # a fresh run starts its first patch embedding as a patch-whitening layer

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise ValueError(f"workers must be 0 or more, not {self.workers}")
        if self.decay_share is not None and not 0 < self.decay_share <= 1:
            raise ValueError(f"decay_share must be in (0, 1], not {self.decay_share}")


# What trained a b0-sized SegFormer from random weights best in 10 CPU minutes, side by side
# (docs/segmentation.md): BCE alone at lr 1.5e-3 after 150 warm-up steps, held until the last
# 30 % of the run and then decayed linearly (two seeds: +0.002 and +0.020 over a cosine),
# clipped gradients, no dropout or stochastic depth (the run underfits), half the BCE from the
# hardest quarter of the pixels, clean training images (validation keeps the degradations), and
# the first patch embedding started as a patch-whitening layer (``whiten_patch_embedding``).
# Fine-tuning a pretrained encoder keeps the defaults.
SCRATCH_RECIPE: dict[str, Any] = {
    "lr": 1.5e-3,
    "warmup_steps": 150,
    "decay_share": 0.3,
    "dice_weight": 0.0,
    "max_grad_norm": 1.0,
    "dropout": False,
    "hard_share": 0.25,
    "degrade": False,
    "whiten": True,
}


def scratch_recipe(size: int) -> dict[str, Any]:
    """``SCRATCH_RECIPE`` plus progressive resizing: the first half of the budget at two thirds
    of ``size`` (64 px for 96), where a step costs about half, then ``size``. Side by side in 10
    CPU minutes it scored 0.885 against 0.849 and 0.871 against 0.850 (docs/segmentation.md):
    from random weights, more steps beat bigger images early on."""
    warm = max(32, (size * 2 // 3) // 16 * 16)
    extra: dict[str, Any] = {"warm_size": warm, "warm_share": 0.5} if warm < size else {}
    return {**SCRATCH_RECIPE, **extra}


@dataclass
class SegTrainProgress:
    epoch: int
    step: int
    loss: float
    elapsed: float
    val_iou: float | None = None  # set after an epoch's validation


@dataclass
class SegTrainResult:
    out_dir: Path
    best_iou: float
    epochs: int
    steps: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int = 0  # the step a saved state held when this call began


def mit_init(model: torch.nn.Module) -> None:
    """SegFormer's own initialisation (Xie et al., 2021, the authors' ``mix_transformer.py``):
    linear layers truncated-normal with std 0.02, convolutions He-normal over their fan-out
    (``k * k * out_channels / groups``), norms at one and zero, the classifier normal with std
    0.01 (mmsegmentation's decode heads).

    transformers initialises every convolution with std 0.02 instead, which is harmless for
    checkpoints that overwrite it but cripples training from random weights: the Mix-FFN's 3x3
    depthwise convolutions (fan-out 9, He std 0.47) start about 24 times too weak, so the
    encoder's only local spatial mixing is nearly off, and the model learns blobs first and
    edges late."""
    import torch
    from torch import nn

    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Conv2d):
                if name.endswith("classifier"):
                    nn.init.normal_(module.weight, std=0.01)
                else:
                    fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                    nn.init.normal_(module.weight, std=math.sqrt(2.0 / (fan_out // module.groups)))
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
                module.weight.fill_(1.0)
                module.bias.zero_()


def fresh_segmenter(
    architecture: dict[str, Any], size: int, *, device: Any = "cpu", seed: int = 0
) -> Segmenter:
    """A one-label SegFormer of random weights with a given config (e.g. ``SD15.segformer``),
    initialised as SegFormer's authors do (``mit_init``), with the factored decode head
    (``segmentation.head``)."""
    import torch
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor

    from pipeline.models import Segmenter
    from segmentation.head import factor_decode_head

    torch.manual_seed(seed)
    config = SegformerConfig(  # type: ignore[call-arg]
        num_labels=1, id2label={0: "foreground"}, label2id={"foreground": 0}, **architecture
    )
    model = SegformerForSemanticSegmentation(config)
    mit_init(model)
    factor_decode_head(model)
    model = model.to(device)
    processor = SegformerImageProcessor(size={"height": size, "width": size}, do_reduce_labels=False)
    return Segmenter(model=model.eval(), processor=processor, source=f"fresh:{size}")


def whiten_patch_embedding(segmenter: Segmenter, images: np.ndarray, *, eps: float = 1e-2) -> None:
    """Patch-whitening initialisation of the first patch embedding (in place), as the fastest
    CIFAR-10 trainings start their first convolution (hlb-CIFAR10, Keller Jordan's airbench).

    The embedding is a convolution over ``k x k`` patches (7 x 7, stride 4, 3 -> 32 channels for
    b0). Its filters become the top eigenvectors ``v_j`` of the covariance of the patches of
    ``images`` (uint8 (N, H, W, 3), as the model sees them after normalisation), divided by
    ``sqrt(lambda_j + eps)``, in pairs of opposite sign (``v_j`` and ``-v_j``), bias zero. Each
    output channel then starts as a decorrelated, unit-variance component of the image's local
    structure (colour, then gradients, then finer detail) instead of a random mix; the filters
    stay trainable. From random weights, in four seed-paired 10-minute CPU runs, it raised IoU by
    0.005 to 0.017 (docs/segmentation.md)."""
    import torch
    import torch.nn.functional as F

    from segmentation.removal import normalize_batch

    conv = segmenter.model.segformer.stages[0].patch_embeddings.proj
    channels, kernel = conv.out_channels, conv.kernel_size
    x = normalize_batch(segmenter, images).to(conv.weight.device)
    patches = F.unfold(x, kernel, padding=conv.padding, stride=conv.stride)  # (N, 3 k k, L)
    flat = patches.transpose(1, 2).reshape(-1, patches.shape[1]).double()
    flat = flat - flat.mean(dim=0)
    eigenvalues, eigenvectors = torch.linalg.eigh(flat.T @ flat / flat.shape[0])  # ascending
    top = channels // 2
    filters = eigenvectors[:, -top:].flip(1).T / torch.sqrt(eigenvalues[-top:].flip(0)[:, None] + eps)
    filters = torch.cat([filters, -filters] + ([filters[:1]] if channels % 2 else []))
    with torch.no_grad():
        conv.weight.copy_(filters.reshape(conv.weight.shape).to(conv.weight.dtype))
        if conv.bias is not None:
            conv.bias.zero_()


def switch_off_dropout(model: torch.nn.Module) -> None:
    """Dropout and stochastic depth (SegFormer's drop path) off, in place. From random weights
    a 10-minute run underfits, so regularisation only slows it; and the classifier's dropout
    mask alone cost about 5 % of a CPU step. Saved checkpoints are unaffected (neither runs at
    inference)."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        elif hasattr(module, "drop_prob"):
            setattr(module, "drop_prob", 0.0)  # noqa: B010 (transformers' SegformerDropPath, untyped here)


def set_input_size(segmenter: Segmenter, size: int) -> None:
    segmenter.processor.size = {"height": size, "width": size}


def split_stickers(
    stickers: Sequence[Image.Image], share: float
) -> tuple[list[Image.Image], list[Image.Image]]:
    """(train, held-out): every k-th sticker is held out (at least one, when there are two)."""
    items = list(stickers)
    if len(items) < 2:
        return items, items
    k = max(2, round(1 / max(share, 1e-6)))
    held = items[k - 1 :: k] or items[-1:]
    train = [s for i, s in enumerate(items) if (i % k) != k - 1] if items[k - 1 :: k] else items[:-1]
    return train, held


def segmentation_loss(
    logits: torch.Tensor, masks: torch.Tensor, *, dice_weight: float = 1.0, hard_share: float = 1.0
) -> torch.Tensor:
    """BCE + soft Dice. ``logits`` (N, h, w) foreground logits at any size; ``masks`` (N, H, W)
    float {0, 1}; logits are upsampled to the mask size first. ``hard_share`` < 1: BCE is the
    mean over that share of the pixels with the largest loss (online hard example mining), half
    and half with the mean over all pixels."""
    import torch
    import torch.nn.functional as F

    if logits.shape[-2:] != masks.shape[-2:]:
        logits = F.interpolate(logits[:, None], size=masks.shape[-2:], mode="bilinear", align_corners=False)[
            :, 0
        ]
    if hard_share < 1.0:
        pixels = F.binary_cross_entropy_with_logits(logits, masks, reduction="none").flatten()
        hardest = torch.topk(pixels, max(1, int(pixels.numel() * hard_share)), sorted=False).values
        loss = 0.5 * (pixels.mean() + hardest.mean())
    else:
        loss = F.binary_cross_entropy_with_logits(logits, masks)
    if dice_weight:  # the sigmoid and sums cost a little on every step: skip them when unused
        prob = torch.sigmoid(logits)
        inter = (prob * masks).sum(dim=(1, 2))
        dice = 1 - (2 * inter + 1) / (prob.sum(dim=(1, 2)) + masks.sum(dim=(1, 2)) + 1)
        loss = loss + dice_weight * dice.mean()
    return loss


class WeightAverage:
    """An exponential moving average of a model's floating-point weights and buffers (Polyak
    averaging): ``update()`` after each step, ``swapped()`` to run with the averaged weights."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.model = model
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    def update(self) -> None:
        import torch

        with torch.no_grad():
            state = self.model.state_dict()
            keys = list(self.shadow)
            torch._foreach_lerp_([self.shadow[k] for k in keys], [state[k].detach() for k in keys],
                                 1.0 - self.decay)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Run the block with the averaged weights; the live ones come back after it."""
        state = self.model.state_dict()
        saved = {k: state[k].detach().clone() for k in self.shadow}
        self.model.load_state_dict(self.shadow, strict=False)
        try:
            yield
        finally:
            self.model.load_state_dict(saved, strict=False)


class _PairSource:
    """Pairs by key ``(stage, epoch, index)`` as ``(image, mask)`` arrays: a map-style dataset for
    ``torch.utils.data.DataLoader``. The epoch travels with each key, so a persistent worker
    process (which holds its own copy of the pair sets) makes the same pairs as this process."""

    def __init__(self, sets: dict[str, PairSet]) -> None:
        self.sets = sets

    def __len__(self) -> int:
        return sum(len(s) for s in self.sets.values())

    def __getitem__(self, key: tuple[str, int, int]) -> tuple[np.ndarray, np.ndarray]:
        stage, epoch, index = key
        pairs = self.sets[stage]
        pairs.epoch = epoch
        pair = pairs[index]
        return pair.image, pair.mask


class _EpochPlan:
    """A batch sampler whose batches the training loop sets before each epoch."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[str, int, int]]] = []

    def __iter__(self) -> Iterator[list[tuple[str, int, int]]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _stack(items: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    return np.stack([image for image, _ in items]), np.stack([mask for _, mask in items])


def _quiet_worker(worker_id: int) -> None:
    """A pair-making worker uses one OpenCV thread (torch's DataLoader already gives it one torch
    thread): the cores belong to the training step."""
    import cv2

    cv2.setNumThreads(1)


def _pair_loader(source: _PairSource, plan: _EpochPlan, workers: int) -> Any:
    """Batches of ``plan`` from ``source``; with ``workers`` > 0, made ahead in that many
    persistent processes (two batches each in flight) while the model trains on the last one.
    The loader draws its seeds from a generator of its own, never from the global one that
    dropout uses: a run is the same with or without workers. Workers are spawned, not forked:
    a fork inherits OpenCV's and OpenMP's thread pools mid-use and can hang on its first pair."""
    import torch
    from torch.utils.data import DataLoader

    ahead: dict[str, Any] = {}
    if workers > 0:
        ahead = dict(
            num_workers=workers,
            persistent_workers=True,
            prefetch_factor=2,
            worker_init_fn=_quiet_worker,
            multiprocessing_context="spawn",
            timeout=WORKER_TIMEOUT,
        )
    return DataLoader(
        source,  # type: ignore[arg-type]
        batch_sampler=plan,
        collate_fn=_stack,
        generator=torch.Generator().manual_seed(0),
        **ahead,
    )


def default_workers(device: Any) -> int:
    """Pair-making processes for a run on ``device``: none on a CPU (on 2 cores a worker only
    took time from the step: 9.01 against 9.19 steps/s), up to 4 beside a GPU, whose step is
    far shorter than the ~1.5 ms a 96-px pair takes to make."""
    import os

    if getattr(device, "type", str(device)) == "cpu":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(4, cores - 1))


def _adamw(model: torch.nn.Module, config: SegTrainConfig) -> torch.optim.Optimizer:
    """AdamW, fused into one kernel per step where torch has one for the device (CPU and CUDA)."""
    import torch

    fused = next(model.parameters()).device.type in ("cpu", "cuda")
    return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=fused)


def _lr_factor(
    step: int,
    planned: int,
    elapsed: float,
    budget: float | None,
    warmup: int,
    decay_share: float | None = None,
) -> float:
    """The learning rate's multiplier: linear warm-up, then a cosine down to 0.02 or, with
    ``decay_share``, a plateau and a straight fall to 0.02 over that last share of the run."""
    if step < warmup:
        return (step + 1) / warmup
    frac = step / max(1, planned)
    if budget:
        frac = max(frac, elapsed / budget)
    frac = min(1.0, frac)
    if decay_share is not None:
        return 1.0 if frac <= 1 - decay_share else 0.02 + 0.98 * (1 - frac) / decay_share
    return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * frac))


def validate(segmenter: Segmenter, val: PairSet, *, batch_size: int = 16) -> float:
    """Pooled IoU of the segmenter on the validation pairs (P >= 0.5 vs label)."""
    import torch
    import torch.nn.functional as F

    from segmentation.evaluation import pooled_iou
    from segmentation.removal import foreground_logit, normalize_batch

    model = segmenter.model
    model.eval()
    preds: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    with torch.inference_mode():
        for start in range(0, len(val), batch_size):
            pairs = [val[i] for i in range(start, min(len(val), start + batch_size))]
            x = normalize_batch(segmenter, np.stack([p.image for p in pairs]))
            fg = foreground_logit(segmenter, model(pixel_values=x).logits)
            fg = F.interpolate(fg[:, None], size=pairs[0].mask.shape, mode="bilinear", align_corners=False)[
                :, 0
            ]
            preds.extend((fg >= 0).cpu().numpy())
            masks.extend(p.mask for p in pairs)
    return pooled_iou(preds, masks)


def save_segmenter(segmenter: Segmenter, out_dir: Path, *, meta: dict[str, Any] | None = None) -> None:
    """``save_pretrained`` of model and processor (what ``load_segmenter`` reads)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    segmenter.model.save_pretrained(out_dir)
    segmenter.processor.save_pretrained(out_dir)
    if meta is not None:
        (out_dir / "segmenter-training.json").write_text(json.dumps(meta, indent=2) + "\n")


def load_training_state(path: Path, *, device: Any) -> dict[str, Any]:
    """A ``training-state.pt`` for a model on ``device``. Every tensor is read onto the CPU, where
    the random-generator state must stay (``torch.set_rng_state`` takes a CPU byte tensor only;
    a ``map_location`` of a CUDA model's device moved it to the GPU and resuming raised). The
    model's and optimizer's ``load_state_dict`` copy their tensors to the parameters' device; the
    weight average's shadow, which is used as is, is moved here."""
    import torch

    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("ema"):
        state["ema"] = {k: v.to(device) for k, v in state["ema"].items()}
    return state


def train_segmenter(
    segmenter: Segmenter,
    stickers: Sequence[Image.Image],
    out_dir: str | Path,
    config: SegTrainConfig | None = None,
    *,
    photos: Sequence[np.ndarray] = (),
    val_stickers: Sequence[Image.Image] | None = None,
    progress: Callable[[SegTrainProgress], None] | None = None,
    should_stop: Callable[[], str | None] | None = None,
) -> SegTrainResult:
    """Train ``segmenter`` in place; keep the best validation checkpoint in ``out_dir``; resume
    from ``out_dir/training-state.pt`` when it exists (same config expected). ``should_stop`` is
    asked after each epoch's state is saved: ``"yield"`` raises TrainingPreempted (call again
    to resume), ``"cancel"`` raises CancelledError."""
    import torch

    from segmentation.removal import foreground_logit, normalize_batch

    config = config or SegTrainConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if val_stickers is None:
        train_st, val_st = split_stickers(stickers, config.heldout_share)
    else:
        train_st, val_st = list(stickers), list(val_stickers)
    set_input_size(segmenter, config.size)
    pair_cfg = PairConfig(size=config.size, degrade=config.degrade)
    train_set = PairSet(
        train_st,
        length=config.pairs_per_epoch,
        split="train",
        seed=config.seed,
        config=pair_cfg,
        photos=photos,
    )
    warm_set = None
    if config.warm_size and config.warm_size != config.size:
        warm_set = PairSet(
            train_st,
            length=config.pairs_per_epoch,
            split="train",
            seed=config.seed,
            config=PairConfig(size=config.warm_size, degrade=config.degrade),
            photos=photos,
            share_stickers=train_set,
        )
    val_set = PairSet(
        val_st,
        length=config.val_pairs,
        split="heldout",
        seed=config.seed + 1,
        config=PairConfig(size=config.size, degrade=config.val_degrade),
        photos=photos,
        cache=True,
    )
    model = segmenter.model
    model.requires_grad_(True)
    if not config.dropout:
        switch_off_dropout(model)
    optimizer = _adamw(model, config)
    steps_per_epoch = math.ceil(config.pairs_per_epoch / config.batch_size)
    planned = steps_per_epoch * config.epochs
    budget = config.minutes * 60 if config.minutes else None

    epoch = step = resumed_from = 0
    elapsed = 0.0
    began = time.monotonic()
    best = -1.0
    history: list[dict[str, float]] = []
    state_path = out / STATE_FILE
    if state_path.exists():
        state = load_training_state(state_path, device=next(model.parameters()).device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        epoch, step, elapsed = state["epoch"], state["step"], state["elapsed"]
        resumed_from = step
        best, history = state["best_iou"], state["history"]
        torch.set_rng_state(state["torch_rng"])
    else:
        # Dropout and drop-path draw from the global generator: seed it, so a run does not depend
        # on whatever the process did before.
        torch.manual_seed(config.seed)
        if config.whiten:  # counted in the time budget
            count = min(WHITEN_IMAGES, len(train_set))
            whiten_patch_embedding(segmenter, np.stack([train_set[i].image for i in range(count)]))
            elapsed = time.monotonic() - began

    ema = WeightAverage(model, config.ema_decay) if config.ema_decay else None
    if ema is not None and state_path.exists():
        ema.shadow = state.get("ema") or ema.shadow
    gen = torch.Generator().manual_seed(config.seed)
    sets = {"train": train_set} if warm_set is None else {"train": train_set, "warm": warm_set}
    plan = _EpochPlan()
    loader = _pair_loader(_PairSource(sets), plan, config.workers)
    try:
        while epoch < config.epochs and not (budget and elapsed >= budget):
            started = time.monotonic() - elapsed
            progress_share = max(step / max(1, planned), elapsed / budget if budget else 0.0)
            stage = "warm" if warm_set is not None and progress_share < config.warm_share else "train"
            epoch_key = epoch if config.fresh_each_epoch else 0
            order = torch.randperm(len(sets[stage]), generator=gen.manual_seed(config.seed * 1000 + epoch))
            keys = [(stage, epoch_key, i) for i in order.tolist()]
            plan.batches = [keys[b : b + config.batch_size] for b in range(0, len(keys), config.batch_size)]
            model.train()
            losses = []
            for images, labels in loader:
                x = normalize_batch(segmenter, images)
                masks = torch.from_numpy(labels.astype(np.float32)).to(x.device)
                for group in optimizer.param_groups:
                    group["lr"] = config.lr * _lr_factor(
                        step, planned, elapsed, budget, config.warmup_steps, config.decay_share
                    )
                logits = foreground_logit(segmenter, model(pixel_values=x).logits)
                loss = segmentation_loss(
                    logits, masks, dice_weight=config.dice_weight, hard_share=config.hard_share
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                if ema is not None:
                    ema.update()
                step += 1
                losses.append(float(loss.detach()))
                elapsed = time.monotonic() - started
                if progress is not None:
                    progress(SegTrainProgress(epoch=epoch, step=step, loss=losses[-1], elapsed=elapsed))
                if budget and elapsed >= budget:
                    break
            averaged = ema.swapped() if ema is not None else contextlib.nullcontext()
            with averaged:  # validate (and keep) the averaged weights when there are any
                val_iou = validate(segmenter, val_set, batch_size=config.batch_size)
            model.train()
            elapsed = time.monotonic() - started
            epoch += 1
            history.append(
                {
                    "epoch": epoch,
                    "step": step,
                    "loss": float(np.mean(losses)) if losses else 0.0,
                    "val_iou": val_iou,
                    "elapsed": elapsed,
                }
            )
            if val_iou > best:
                best = val_iou
                meta = {"config": asdict(config), "val_iou": val_iou, "epoch": epoch, "step": step}
                with ema.swapped() if ema is not None else contextlib.nullcontext():
                    save_segmenter(segmenter, out, meta=meta)
            torch.save(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "epoch": epoch,
                    "step": step,
                    "elapsed": elapsed,
                    "best_iou": best,
                    "history": history,
                    "torch_rng": torch.get_rng_state(),
                    "ema": ema.shadow if ema is not None else None,
                    "config": asdict(config),
                },
                state_path.with_suffix(".tmp"),
            )
            state_path.with_suffix(".tmp").replace(state_path)
            if progress is not None:
                progress(
                    SegTrainProgress(
                        epoch=epoch, step=step, loss=history[-1]["loss"], elapsed=elapsed, val_iou=val_iou
                    )
                )
            request = should_stop() if should_stop is not None else None
            if request == "cancel":
                from pipeline.errors import CancelledError

                raise CancelledError("segmenter training was cancelled")
            if request == "yield":
                from pipeline.errors import TrainingPreempted

                raise TrainingPreempted(step, planned)
    finally:
        del loader  # stops its worker processes, also when the step raises
    if ema is not None:  # the model leaves with the averaged weights it was validated with
        model.load_state_dict(ema.shadow, strict=False)
    model.eval()
    return SegTrainResult(
        out_dir=out, best_iou=best, epochs=epoch, steps=step, seconds=elapsed, history=history,
        resumed_from=resumed_from,
    )
