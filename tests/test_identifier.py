"""Identifier rarity against a real (tiny) CLIP tokenizer, and class nouns from captions."""

from __future__ import annotations

import pytest

from pipeline.training.identifier import (
    check_identifier,
    choose_identifier,
    class_noun_from_captions,
    token_rarity,
)
from pipeline.zoo import build_clip_tokenizer


@pytest.fixture(scope="module")
def tokenizer():  # -> CLIPTokenizer
    return build_clip_tokenizer()


def test_common_words_and_blocklist_refused(tokenizer) -> None:
    # "dog" is one early merge of this tokenizer: a common word, so not an identifier
    assert len(tokenizer.tokenize("dog")) == 1
    with pytest.raises(ValueError, match="common token"):
        check_identifier(tokenizer, "dog")
    with pytest.raises(ValueError, match="overused"):
        check_identifier(tokenizer, "sks")
    with pytest.raises(ValueError, match="tokens"):
        check_identifier(tokenizer, "zqxwvkjh", max_tokens=3)
    with pytest.raises(ValueError, match="one lowercase word"):
        check_identifier(tokenizer, "two words")


def test_identifier_must_not_share_tokens_with_class_noun(tokenizer) -> None:
    # "cat" is spelled c + "at</w>": "zat" would share the merged token with it
    assert "at</w>" in tokenizer.tokenize("cat")
    with pytest.raises(ValueError, match="shares tokens"):
        check_identifier(tokenizer, "zat", class_noun="cat")
    assert check_identifier(tokenizer, "zat", class_noun="dog").text == "zat"


def test_choose_prefers_fewest_tokens_then_rarest(tokenizer) -> None:
    chosen = choose_identifier(tokenizer, class_noun="cat", candidates=("dog", "sks", "zqvx", "zwx"))
    assert chosen.text == "zwx" and len(chosen.tokens) == 3
    default = choose_identifier(tokenizer, class_noun="cat")
    assert default.text not in ("sks", "cat") and len(default.tokens) <= 3
    with pytest.raises(ValueError, match="no candidate"):
        choose_identifier(tokenizer, candidates=("dog", "sks"))


def test_rarity_follows_merge_order(tokenizer) -> None:
    vocab = tokenizer.get_vocab()
    assert token_rarity(tokenizer, vocab["a"]) == 0.0
    early, late = vocab["at</w>"], vocab["hair</w>"]
    assert early < late and token_rarity(tokenizer, early) < token_rarity(tokenizer, late) <= 1.0


def test_class_noun_from_captions() -> None:
    captions = ["a cartoon cat with a hat", "a cute kitten smiling", "a dog and a cat", "a red ball"]
    assert class_noun_from_captions(captions) == "cat"
    assert class_noun_from_captions(["a man smiling", "a girl waving"]) == "person"
    assert class_noun_from_captions(["abstract shapes"], default="character") == "character"
