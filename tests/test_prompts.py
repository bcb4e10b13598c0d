"""Prompt building: pure functions, tested directly."""

from __future__ import annotations

import pytest

from pipeline.stickers.prompts import (
    DEFAULT_NEGATIVE_PROMPT,
    check_template,
    class_prompt,
    instance_prompt,
    sticker_prompt,
)


def test_instance_and_class_prompts_name_the_style() -> None:
    assert instance_prompt("zqv", "cat") == "a zqv cat sticker"
    assert class_prompt("cat") == "a cat sticker"
    assert instance_prompt("zqv", "dog", "{identifier} style, {class_noun}") == "zqv style, dog"


def test_sticker_prompt_joins_style_and_caption() -> None:
    assert sticker_prompt("zqv", "cat", "man with a hat") == "a zqv cat sticker, man with a hat"
    assert sticker_prompt("zqv", "cat", "  man  ") == "a zqv cat sticker, man"


def test_empty_caption_leaves_no_dangling_comma() -> None:
    assert sticker_prompt("zqv", "cat", "") == "a zqv cat sticker"
    assert sticker_prompt("zqv", "cat", "   ") == "a zqv cat sticker"
    assert sticker_prompt("zqv", "cat", "", "{caption}, {identifier} style") == "zqv style"


def test_custom_template_and_negative_prompt() -> None:
    out = sticker_prompt("zqv", "toy", "dog on a beach", "{caption} in {identifier} {class_noun} style")
    assert out == "dog on a beach in zqv toy style"
    assert "blurry" in DEFAULT_NEGATIVE_PROMPT


@pytest.mark.parametrize("template, message", [
    ("a {identifier} {colour} sticker", "unknown fields"),
    ("a {class_noun} sticker, {caption}", "must contain"),
])
def test_bad_templates_are_refused_clearly(template: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sticker_prompt("zqv", "cat", "x", template)


def test_check_template_requires_fields() -> None:
    assert check_template("{class_noun}", required={"class_noun"}) == "{class_noun}"
    with pytest.raises(ValueError, match="identifier"):
        instance_prompt("zqv", "cat", "a {class_noun} sticker")
    with pytest.raises(ValueError, match="class_noun"):
        class_prompt("cat", "a sticker")
