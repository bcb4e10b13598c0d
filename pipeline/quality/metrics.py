"""Style-quality metrics, as the DreamBooth paper defines them.

    CLIP-I     mean cosine similarity of CLIP image embeddings over every (generated, reference)
               pair: does the output look like the user's stickers?
    DINO       the same with DINO ViT-S/16 CLS embeddings (more sensitive to the subject's
               look than CLIP, which was trained to match captions)
    CLIP-T     mean cosine similarity of each generated image with its own prompt, the
               identifier replaced by the class noun: does the output follow the prompt?
    diversity  mean pairwise LPIPS distance between generations of one prompt. LPIPS needs
               ImageNet backbone weights that only come from a download (torchvision); when they
               are not on this machine the value is ``None`` with the reason, never a stand-in.

The scores are pure functions of embeddings (tested on hand-made vectors); the encoders are a
thin shell over the CLIP and DINO models that :func:`pipeline.models.load_image_encoder` loads.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from pipeline.images import composite_on

# Transparent stickers are judged on white, as Telegram shows them in a light theme.
BACKGROUND = (255, 255, 255)
# torchvision's AlexNet checkpoint: the LPIPS backbone ("alex", the paper's default).
_LPIPS_BACKBONE_FILE = "alexnet-owt-7be5be79.pth"


# --- Pure scores on embeddings ----------------------------------------------------------------


def _as_matrix(x: Any, name: str) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.float64)
    if t.ndim == 1:
        t = t.unsqueeze(0)
    if t.ndim != 2 or t.shape[0] == 0:
        raise ValueError(f"{name}: expected a non-empty (N, D) matrix of embeddings, got shape "
                         f"{tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name}: embeddings contain NaN or infinity")
    norms = t.norm(dim=1)
    if (norms == 0).any():
        raise ValueError(f"{name}: an embedding is all zeros (cosine similarity is undefined)")
    return t / norms.unsqueeze(1)


def cosine_matrix(a: Any, b: Any) -> torch.Tensor:
    """Cosine similarity of every row of ``a`` with every row of ``b``: an (N, M) matrix."""
    na, nb = _as_matrix(a, "a"), _as_matrix(b, "b")
    if na.shape[1] != nb.shape[1]:
        raise ValueError(f"embedding sizes differ: {na.shape[1]} vs {nb.shape[1]}")
    return na @ nb.T


def mean_pairwise_cosine(generated: Any, reference: Any) -> float:
    """Mean cosine similarity over all N x M (generated, reference) pairs: CLIP-I and DINO."""
    return float(cosine_matrix(generated, reference).mean())


def clip_i_score(generated: Any, reference: Any) -> float:
    """CLIP-I from CLIP image embeddings of generated (N, D) and reference (M, D) images."""
    return mean_pairwise_cosine(generated, reference)


def dino_score(generated: Any, reference: Any) -> float:
    """DINO from DINO CLS embeddings of generated (N, D) and reference (M, D) images."""
    return mean_pairwise_cosine(generated, reference)


def clip_t_score(image_embeddings: Any, text_embeddings: Any) -> float:
    """CLIP-T: mean cosine similarity of image i with prompt i (matched rows, not all pairs)."""
    sim = cosine_matrix(image_embeddings, text_embeddings)
    if sim.shape[0] != sim.shape[1]:
        raise ValueError(f"CLIP-T pairs each image with its prompt: got {sim.shape[0]} images "
                         f"and {sim.shape[1]} prompts")
    return float(sim.diagonal().mean())


def mean_pairwise_distance(distances: Any) -> float:
    """Mean of a symmetric (N, N) distance matrix over its N(N-1)/2 distinct pairs (i < j)."""
    d = torch.as_tensor(distances, dtype=torch.float64)
    if d.ndim != 2 or d.shape[0] != d.shape[1]:
        raise ValueError(f"expected a square distance matrix, got shape {tuple(d.shape)}")
    n = d.shape[0]
    if n < 2:
        raise ValueError("diversity needs at least two generations of one prompt")
    i, j = torch.triu_indices(n, n, offset=1)
    return float(d[i, j].mean())


def neutral_prompt(prompt: str, *, identifier: str, class_noun: str) -> str:
    """The prompt CLIP-T compares against: the identifier replaced by the class noun.

    "a zqv cat sticker" names the class right after the identifier, so the identifier just goes
    ("a cat sticker", not "a cat cat sticker"); anywhere else it becomes the class noun.
    """
    if not identifier.strip():
        raise ValueError("the identifier is empty")
    ident = re.escape(identifier.strip())
    noun = class_noun.strip()
    text = re.sub(rf"\b{ident}\s+(?={re.escape(noun)}\b)", "", prompt) if noun else prompt
    text = re.sub(rf"\b{ident}\b", noun, text)
    return re.sub(r"\s+", " ", text).strip()


# --- Result containers ------------------------------------------------------------------------


@dataclass(frozen=True)
class StyleScores:
    """The metrics of one evaluation. ``diversity`` is None when LPIPS cannot run here; then
    ``diversity_note`` says why."""

    clip_i: float
    clip_t: float
    dino: float
    diversity: float | None
    diversity_note: str | None = None
    num_generated: int = 0
    num_references: int = 0

    def get(self, metric: str) -> float | None:
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}: choose one of {', '.join(METRICS)}")
        value: float | None = getattr(self, metric)
        return value


# The metrics a sweep table shows and a checkpoint can be chosen by; higher is better for all.
METRICS = ("clip_i", "dino", "clip_t", "diversity")
METRIC_LABELS = {"clip_i": "CLIP-I", "dino": "DINO", "clip_t": "CLIP-T", "diversity": "LPIPS div."}


# --- Encoders: a thin shell over pipeline.models.ImageEncoder ---------------------------------


def _rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        return composite_on(image.convert("RGBA"), BACKGROUND)
    return image.convert("RGB")


def _features(output: Any) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output holds the projected features;
    # older versions return the tensor itself.
    if isinstance(output, torch.Tensor):
        return output
    return output.pooler_output


@torch.no_grad()
def encode_images(encoder: Any, images: Sequence[Image.Image], *, batch_size: int = 16) -> torch.Tensor:
    """(N, D) float32 embeddings on the CPU: CLIP image features or DINO CLS tokens."""
    if not images:
        raise ValueError("no images to encode")
    device = next(encoder.model.parameters()).device
    chunks = []
    for start in range(0, len(images), batch_size):
        batch = [_rgb(im) for im in images[start:start + batch_size]]
        if encoder.kind == "clip":
            pixels = encoder.processor(images=batch, return_tensors="pt")["pixel_values"]
            feats = _features(encoder.model.get_image_features(pixel_values=pixels.to(device)))
        elif encoder.kind == "dino":
            pixels = encoder.processor(images=batch, return_tensors="pt")["pixel_values"]
            feats = encoder.model(pixel_values=pixels.to(device)).last_hidden_state[:, 0]
        else:
            raise ValueError(f"unknown image encoder kind {encoder.kind!r}")
        chunks.append(feats.float().cpu())
    return torch.cat(chunks)


@torch.no_grad()
def encode_texts(encoder: Any, texts: Sequence[str]) -> torch.Tensor:
    """(N, D) CLIP text embeddings (prompts longer than CLIP's 77 tokens are cut)."""
    if encoder.kind != "clip":
        raise ValueError(f"text embeddings need the CLIP encoder, not {encoder.kind!r}")
    if not texts:
        raise ValueError("no texts to encode")
    device = next(encoder.model.parameters()).device
    tok = encoder.processor.tokenizer
    inputs = tok(list(texts), padding=True, truncation=True, max_length=tok.model_max_length,
                 return_tensors="pt")
    out = encoder.model.get_text_features(input_ids=inputs["input_ids"].to(device),
                                          attention_mask=inputs["attention_mask"].to(device))
    return _features(out).float().cpu()


# --- LPIPS (optional: needs downloaded backbone weights) --------------------------------------


@dataclass
class Lpips:
    """A loaded LPIPS network, or the reason it could not be loaded (``model`` None)."""

    model: Any
    reason: str | None = None

    @property
    def available(self) -> bool:
        return self.model is not None


def load_lpips(*, device: torch.device | str = "cpu") -> Lpips:
    """LPIPS (AlexNet, v0.1) when the ``lpips`` package, torchvision and the AlexNet checkpoint
    in the torch hub cache are all on this machine; otherwise an unavailable Lpips saying which
    piece is missing. Never downloads: the ``lpips`` wheel ships only its small linear heads,
    the backbone comes from torchvision's download."""
    try:
        import lpips  # optional: not a declared dependency
        import torchvision  # noqa: F401  # lpips builds its backbone with it
    except ImportError as exc:
        return Lpips(None, "LPIPS unavailable: the 'lpips' and 'torchvision' packages are not "
                           f"installed ({exc.name} missing); diversity is not measured")
    checkpoint = Path(torch.hub.get_dir()) / "checkpoints" / _LPIPS_BACKBONE_FILE
    if not checkpoint.is_file():
        return Lpips(None, f"LPIPS unavailable: its AlexNet backbone weights ({checkpoint}) are "
                           "not on this machine and are only available as a download; diversity "
                           "is not measured")
    try:
        model = lpips.LPIPS(net="alex", verbose=False).to(device).eval()
    except Exception as exc:  # a damaged checkpoint or an incompatible package version
        return Lpips(None, f"LPIPS unavailable: loading it failed ({exc.__class__.__name__}: {exc})")
    return Lpips(model)


@torch.no_grad()
def lpips_distances(lp: Lpips, images: Sequence[Image.Image]) -> torch.Tensor:
    """(N, N) LPIPS distances between images (resized to the first one's size)."""
    if lp.model is None:
        raise RuntimeError(lp.reason or "LPIPS unavailable")
    import numpy as np

    device = next(lp.model.parameters()).device
    size = images[0].size
    arr = [np.asarray(_rgb(im).resize(size), dtype=np.float32) / 127.5 - 1.0 for im in images]
    x = torch.from_numpy(np.stack(arr)).permute(0, 3, 1, 2).to(device)
    n = len(images)
    d = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(i + 1, n):
            d[i, j] = d[j, i] = float(lp.model(x[i:i + 1], x[j:j + 1]).flatten()[0])
    return d


def diversity_score(lp: Lpips, groups: Sequence[Sequence[Image.Image]]) -> float | None:
    """Mean over prompts of the mean pairwise LPIPS between that prompt's generations;
    None when LPIPS is unavailable (``lp.reason`` says why)."""
    if not lp.available:
        return None
    per_prompt = [mean_pairwise_distance(lpips_distances(lp, g)) for g in groups if len(g) >= 2]
    if not per_prompt:
        raise ValueError("diversity needs at least two generations of one prompt")
    return sum(per_prompt) / len(per_prompt)
