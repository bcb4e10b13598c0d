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


def test_a_long_caption_is_shortened_never_the_identifier() -> None:
    """With the CLIP tokenizer's count the prompt fits in 77 tokens: the caption loses words from
    its end; the identifier and class noun stay, even where the template puts them last."""
    from pipeline.stickers.prompts import CLIP_MAX_TOKENS, fit_list_prompt
    from pipeline.zoo import build_clip_tokenizer

    tokenizer = build_clip_tokenizer()

    def count(text: str) -> int:
        return len(tokenizer(text).input_ids)

    caption = " ".join(["a happy cat with a red hat sitting on a table"] * 12)
    assert count(sticker_prompt("zqv", "cat", caption)) > CLIP_MAX_TOKENS  # the old prompt: cut by CLIP
    for template in ("a {identifier} {class_noun} sticker, {caption}",
                     "{caption}, in {identifier} {class_noun} style"):
        prompt = sticker_prompt("zqv", "cat", caption, template, count_tokens=count)
        assert count(prompt) <= CLIP_MAX_TOKENS
        assert "zqv cat" in prompt
        ids = tokenizer(prompt, truncation=True, max_length=CLIP_MAX_TOKENS).input_ids
        assert "zqv" in tokenizer.decode(ids)  # what the text encoder actually reads
        assert count(prompt) > CLIP_MAX_TOKENS - 12  # shortened by words, not emptied
        assert not prompt.rstrip().endswith((" a", " with", " on", ","))
    short = sticker_prompt("zqv", "cat", "a cat", count_tokens=count)
    assert short == "a zqv cat sticker, a cat"
    with pytest.raises(ValueError, match="shorten the template"):
        sticker_prompt("zqv", "cat", "x", "{identifier} " + "word " * 80, count_tokens=count)
    negative = fit_list_prompt(", ".join([DEFAULT_NEGATIVE_PROMPT] * 4), count_tokens=count)
    assert count(negative) <= CLIP_MAX_TOKENS and negative.startswith("photo, realistic")
