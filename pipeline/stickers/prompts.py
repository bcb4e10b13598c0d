"""Prompt building: pure functions of their inputs, tested directly.

A style is named in prompts by a rare identifier plus a class noun ("a zqv cat sticker"): the
identifier carries what the fine-tuning learned, the class noun what the base model already
knows. Class-prior preservation uses the same prompt without the identifier.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable

# CLIP's text encoder reads 77 tokens, start and end tokens included; the rest is cut silently.
CLIP_MAX_TOKENS = 77
# text -> tokens including start/end: len(tokenizer(text, verbose=False).input_ids)
TokenCounter = Callable[[str], int]

DEFAULT_INSTANCE_TEMPLATE = "a {identifier} {class_noun} sticker"
DEFAULT_CLASS_TEMPLATE = "a {class_noun} sticker"
DEFAULT_STICKER_TEMPLATE = "a {identifier} {class_noun} sticker, {caption}"
DEFAULT_NEGATIVE_PROMPT = (
    "photo, realistic, blurry, low quality, jpeg artifacts, watermark, text, signature, "
    "cropped, deformed, extra limbs, busy background"
)
_FIELDS = {"identifier", "class_noun", "caption"}


def check_template(template: str, *, required: set[str]) -> str:
    """A template may use only ``{identifier}``, ``{class_noun}`` and ``{caption}``, and must use
    every field in ``required``; a clear ValueError otherwise."""
    names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    unknown = names - _FIELDS
    if unknown:
        raise ValueError(f"prompt template {template!r} uses unknown fields {sorted(unknown)}; "
                         f"allowed: {sorted(_FIELDS)}")
    missing = required - names
    if missing:
        wanted = sorted("{" + m + "}" for m in missing)
        raise ValueError(f"prompt template {template!r} must contain {wanted}")
    return template


def _squash(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return re.sub(r"\s+([,.])", r"\1", text).strip(" ,")


def instance_prompt(identifier: str, class_noun: str,
                    template: str = DEFAULT_INSTANCE_TEMPLATE) -> str:
    check_template(template, required={"identifier", "class_noun"})
    return _squash(template.format(identifier=identifier, class_noun=class_noun, caption=""))


def class_prompt(class_noun: str, template: str = DEFAULT_CLASS_TEMPLATE) -> str:
    check_template(template, required={"class_noun"})
    return _squash(template.format(identifier="", class_noun=class_noun, caption=""))


def sticker_prompt(identifier: str, class_noun: str, caption: str,
                   template: str = DEFAULT_STICKER_TEMPLATE, *, count_tokens: TokenCounter | None = None,
                   max_tokens: int = CLIP_MAX_TOKENS) -> str:
    """The img2img prompt for one photo: the style's tokens plus the photo's caption. An empty
    caption leaves no dangling comma.

    With ``count_tokens`` the prompt fits in ``max_tokens``: the caption loses words from its end
    until it does (the text encoder would otherwise cut the prompt's end, wherever the template
    put the identifier). The identifier and class noun are never shortened; a ValueError says so
    when the template alone is too long.
    """
    check_template(template, required={"identifier"})

    def build(text: str) -> str:
        return _squash(template.format(identifier=identifier, class_noun=class_noun, caption=text))

    words = caption.split()
    prompt = build(" ".join(words))
    if count_tokens is None:
        return prompt
    while count_tokens(prompt) > max_tokens:
        if not words:
            raise ValueError(f"the prompt {prompt!r} needs {count_tokens(prompt)} tokens without any "
                             f"caption, more than the text encoder's {max_tokens}: shorten the template")
        words.pop()
        while words and words[-1].rstrip(",").lower() in _DANGLING:
            words.pop()
        prompt = build(" ".join(words).rstrip(","))
    return prompt


# Words a shortened caption should not end on.
_DANGLING = {"a", "an", "the", "and", "with", "of", "in", "on", "at", "to", "is", "are", "or", "its"}


def fit_list_prompt(text: str, *, count_tokens: TokenCounter, max_tokens: int = CLIP_MAX_TOKENS) -> str:
    """A comma-separated prompt (the negative prompt) cut after its last whole item that fits."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    while items and count_tokens(", ".join(items)) > max_tokens:
        items.pop()
    return ", ".join(items)
