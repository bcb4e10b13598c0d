"""Captioning: what is in the photo, in a few words, for the img2img prompt.

BLIP (``Salesforce/blip-image-captioning-base`` in the sd15 preset) generates the caption; an
optional text prefix makes it conditional ("a sticker of" -> "a sticker of a cat ..."). Its raw
output carries known artefacts ("arafed", "there is a ...", words repeated in a loop) that
:func:`clean_caption`, a pure function, removes before the caption reaches a prompt.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from PIL import Image

from pipeline.images import composite_on

if TYPE_CHECKING:
    from pipeline.models import Captioner

DEFAULT_MAX_WORDS = 16
DEFAULT_MAX_NEW_TOKENS = 30

# Leading phrases BLIP produces that say nothing about the subject.
_LEADING_JUNK = re.compile(
    r"^(?:(?:arafed|araffe|arafe|araffed|arafly|arafed\w*|araffe\w*)\b\s*"
    r"|there (?:is|are) (?:a |an )?"
    r"|this is (?:a |an )?(?:picture|photo|image) of (?:a |an )?"
    r"|(?:a |an )?(?:picture|photo|image|close ?up|closeup) of (?:a |an )?)",
    re.IGNORECASE,
)
# Artefact tokens anywhere in the caption ("a arafed man" happens too).
_ANYWHERE_JUNK = re.compile(r"\b(?:arafed|araffe|arafe|araffed)\w*\b", re.IGNORECASE)
_WORD_CHARS = re.compile(r"[^\w\s,'-]+", re.UNICODE)
_ARTICLES = {"a", "an", "the"}
_DANGLING = {"a", "an", "the", "and", "with", "of", "in", "on", "at", "to", "is", "are", "or", "its"}


def clean_caption(text: str, *, max_words: int = DEFAULT_MAX_WORDS) -> str:
    """Remove BLIP's known artefacts from ``text`` and cap it at ``max_words`` words.

    Pure: lower-cases, drops leading "arafed"/"there is a"/"a picture of", stray "arafed"
    anywhere, special tokens and punctuation other than commas, consecutive repeated words and
    repeated phrases ("a cat a cat a cat"), and a dangling article or preposition at the end.
    Returns "" when nothing meaningful is left.
    """
    if max_words < 1:
        raise ValueError(f"max_words must be at least 1, not {max_words}")
    text = re.sub(r"\[[A-Z]+\]|<[^>]*>", " ", text)  # [SEP], [UNK], </s>, ...
    text = _WORD_CHARS.sub(" ", text.lower())
    text = re.sub(r"\s+", " ", text).strip(" ,")
    # Leading artefacts can stack ("arafed there is a ..."): strip until none is left.
    while True:
        stripped = _LEADING_JUNK.sub("", text, count=1).strip(" ,")
        if stripped == text:
            break
        text = stripped
    text = _ANYWHERE_JUNK.sub(" ", text)
    words = [w for w in re.sub(r"\s*,\s*", " , ", text).split() if w]
    words = _drop_repeats(words)
    words = _truncate_words(words, max_words)
    while words and (words[-1] in _DANGLING or words[-1] == ","):
        words.pop()
    while words and words[0] == ",":
        words.pop(0)
    out = " ".join(words).replace(" ,", ",")
    return out if any(ch.isalnum() for ch in out) else ""


def _truncate_words(words: list[str], max_words: int) -> list[str]:
    out: list[str] = []
    n = 0
    for w in words:
        if w != ",":
            if n == max_words:
                break
            n += 1
        out.append(w)
    return out


def _drop_repeats(words: list[str]) -> list[str]:
    """Drop immediate repeats of a word or of a phrase of up to 4 words (BLIP's loops)."""
    out: list[str] = []
    for w in words:
        if out and w == out[-1] and w not in _ARTICLES:
            continue
        out.append(w)
        # A phrase of length n just repeated itself: remove the second copy.
        for n in range(2, 5):
            if len(out) >= 2 * n and out[-n:] == out[-2 * n:-n]:
                del out[-n:]
                break
    return out


def caption_image(
    captioner: Captioner,
    image: Image.Image,
    *,
    prefix: str | None = None,
    max_words: int = DEFAULT_MAX_WORDS,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> str:
    """A cleaned caption of ``image``. With ``prefix``, BLIP continues that text (conditional
    captioning) and the prefix is removed from the result, so it never doubles in a prompt.

    Deterministic: greedy decoding. Transparent pixels are composited onto white first.
    """
    import torch

    rgb = composite_on(image) if image.mode in ("RGBA", "LA", "P") else image.convert("RGB")
    prefix = (prefix or "").strip()
    model = captioner.model
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    if prefix:
        inputs = captioner.processor(images=rgb, text=prefix, return_tensors="pt")
    else:
        inputs = captioner.processor(images=rgb, return_tensors="pt")
    inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device))
              for k, v in inputs.items()}
    with torch.inference_mode():
        tokens = model.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=1, do_sample=False)
    raw = captioner.processor.decode(tokens[0], skip_special_tokens=True)
    if prefix:
        raw = _remove_prefix(raw, prefix)
    return clean_caption(raw, max_words=max_words)


def _remove_prefix(text: str, prefix: str) -> str:
    """BLIP's tokenizer lower-cases and re-spaces the prefix: compare word by word."""
    words, head = text.split(), prefix.lower().split()
    if [w.lower() for w in words[: len(head)]] == head:
        words = words[len(head):]
    return " ".join(words)
