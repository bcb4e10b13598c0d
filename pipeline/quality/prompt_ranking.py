"""Rank candidate prompt templates by CLIP score against good and bad example images.

The public report this product follows picked "a telegram sticker" this way: a template is good
when CLIP finds its text close to images we want (good examples) and far from images we do not
(bad ones: photos, cluttered backgrounds). The score of a template is

    margin = mean cos(text, good images) - mean cos(text, bad images)

and the ranking sorts by it, best first. Without bad examples the margin is the good score.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from pipeline.quality.metrics import cosine_matrix, encode_images, encode_texts


@dataclass(frozen=True)
class PromptRank:
    template: str
    prompt: str  # the template filled with the class noun (no identifier: the base model judges)
    good: float  # mean CLIP cosine with the good examples
    bad: float | None  # mean CLIP cosine with the bad examples (None without any)
    margin: float  # good - bad: what the ranking sorts by


def fill_template(template: str, *, class_noun: str) -> str:
    """A candidate template may name ``{class_noun}``; ``{identifier}`` and ``{caption}`` are
    dropped (they mean nothing to an untuned CLIP)."""
    try:
        text = template.format(class_noun=class_noun, identifier="", caption="")
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"prompt template {template!r} is malformed or uses an unknown field "
                         f"({exc}); allowed: {{class_noun}}, {{identifier}}, {{caption}}") from exc
    return " ".join(text.replace(" ,", ",").split()).strip(" ,")


def rank_scores(text_embeddings: Any, good_embeddings: Any, bad_embeddings: Any | None,
                templates: Sequence[str], prompts: Sequence[str]) -> list[PromptRank]:
    """The ranking from embeddings alone (pure): best margin first, ties kept in input order."""
    good = cosine_matrix(text_embeddings, good_embeddings).mean(dim=1)
    bad = cosine_matrix(text_embeddings, bad_embeddings).mean(dim=1) if bad_embeddings is not None else None
    rows = [
        PromptRank(template=t, prompt=p, good=float(good[i]),
                   bad=None if bad is None else float(bad[i]),
                   margin=float(good[i] - (bad[i] if bad is not None else 0.0)))
        for i, (t, p) in enumerate(zip(templates, prompts, strict=True))
    ]
    return sorted(rows, key=lambda r: -r.margin)


def rank_prompts(clip: Any, templates: Sequence[str], *, good: Sequence[Image.Image],
                 bad: Sequence[Image.Image] = (), class_noun: str = "") -> list[PromptRank]:
    """Score each template with the CLIP encoder against the good (and bad) images."""
    # 1. check inputs
    if not templates:
        raise ValueError("no prompt templates to rank")
    if not good:
        raise ValueError("prompt ranking needs at least one good example image")
    # 2. fill the templates and embed everything
    prompts = [fill_template(t, class_noun=class_noun) for t in templates]
    text = encode_texts(clip, prompts)
    good_emb = encode_images(clip, list(good))
    bad_emb = encode_images(clip, list(bad)) if bad else None
    # 3. score and sort
    return rank_scores(text, good_emb, bad_emb, templates, prompts)


def format_ranking(ranking: Sequence[PromptRank]) -> str:
    """A plain-text table for the terminal."""
    width = max([len(r.prompt) for r in ranking] + [6])
    lines = [f"{'#':>2}  {'prompt':<{width}}  {'good':>7}  {'bad':>7}  {'margin':>7}"]
    for i, r in enumerate(ranking, 1):
        bad = f"{r.bad:7.4f}" if r.bad is not None else f"{'-':>7}"
        lines.append(f"{i:>2}  {r.prompt:<{width}}  {r.good:7.4f}  {bad}  {r.margin:7.4f}")
    return "\n".join(lines)
