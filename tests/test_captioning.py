"""Captioning: BLIP artefact cleaning (pure) and the tiny BLIP end to end."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.stickers.captioning import _remove_prefix, caption_image, clean_caption


@pytest.mark.parametrize("raw, clean", [
    ("arafed man sitting on a bench with a dog", "man sitting on a bench with a dog"),
    ("araffe there is a woman wearing a hat hat, smiling", "woman wearing a hat, smiling"),
    ("there is a cat cat cat sitting on a table", "cat sitting on a table"),
    ("a picture of a dog with a ball ball ball in the", "dog with a ball"),
    ("[SEP] a cat a cat a cat a cat", "a cat"),
    ("a close up of a arafed man with glasses", "man with glasses"),
    ("Smiling Woman!!! with glasses.", "smiling woman with glasses"),
    ("there are two dogs on the beach", "two dogs on the beach"),
    ("a man holding a cup of coffee", "a man holding a cup of coffee"),
])
def test_clean_caption_removes_blip_artefacts(raw: str, clean: str) -> None:
    assert clean_caption(raw) == clean


@pytest.mark.parametrize("raw", ["", "   ", "arafed", "there is a", "a a a", "[SEP] [PAD]", "!!!"])
def test_clean_caption_of_nothing_is_empty(raw: str) -> None:
    assert clean_caption(raw) == ""


def test_clean_caption_caps_the_length_without_a_dangling_word() -> None:
    words = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"
    assert clean_caption(words, max_words=5) == "one two three four five"
    assert clean_caption("a dog sitting on the grass in a park", max_words=5) == "a dog sitting"
    assert len(clean_caption(" ".join(f"w{i}" for i in range(100))).split()) == 16
    with pytest.raises(ValueError):
        clean_caption("x", max_words=0)


def test_prefix_is_removed_word_by_word() -> None:
    assert _remove_prefix("a sticker of a cat", "A  sticker of") == "a cat"
    assert _remove_prefix("a cat on a mat", "a sticker of") == "a cat on a mat"


def test_caption_image_with_tiny_blip(tiny_models) -> None:
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8))
    first = caption_image(tiny_models.captioner, photo, max_words=6)
    assert first == caption_image(tiny_models.captioner, photo, max_words=6)  # greedy: deterministic
    assert isinstance(first, str) and len(first.split()) <= 6
    assert first == clean_caption(first, max_words=6)  # already clean
    # Every mode a decoded photo can have; a prefix is never repeated in the result.
    rgba = photo.convert("RGBA")
    rgba.putalpha(128)
    for image in (rgba, photo.convert("L"), photo.convert("P")):
        assert isinstance(caption_image(tiny_models.captioner, image), str)
    with_prefix = caption_image(tiny_models.captioner, photo, prefix="a sticker of")
    assert not with_prefix.startswith("a sticker of")
