"""The rare identifier that names a style in prompts, and the class noun beside it.

DreamBooth binds what it learns to a token the base model has no strong meaning for. "sks" is
the usual example and a bad one: it is a common token (a rifle) in CLIP's vocabulary. So the
identifier is checked against the tokenizer itself: CLIP's BPE assigns merged tokens ids in merge
order, which follows frequency in its training text, so a single token late in the merge list is
rare, one early in it is a common word. A candidate is accepted when it

* is not a known-bad choice (``BLOCKLIST``: real words and identifiers overused online),
* splits into at most ``max_tokens`` tokens,
* is not one common token (rarity, the merge position in [0, 1], below ``min_rarity``),
* shares no token with the class noun or the prompt's own words.

Pure functions of a tokenizer and strings; no torch.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

DEFAULT_CANDIDATES = ("zwx", "qzv", "vkq", "xjq", "zqk", "ohwx", "pqz", "kzx")
BLOCKLIST = frozenset({
    "sks",  # a rifle, and the most overused DreamBooth token
    "xyz", "abc", "zzz", "qwe", "asd", "ok", "lol", "sticker", "style", "photo",
})
_PROMPT_WORDS = ("a", "an", "the", "sticker", "of", "in", "style")


@dataclass(frozen=True)
class Identifier:
    text: str
    tokens: tuple[str, ...]
    token_ids: tuple[int, ...]
    rarity: float  # mean merge-order position of its tokens, 0 (common) .. 1 (rarest)


def _base_vocab_size(tokenizer: Any) -> int:
    """Tokens before the first merge: CLIP's byte alphabet, plain and with ``</w>``."""
    vocab = tokenizer.get_vocab()
    return sum(1 for tok in vocab if len(tok.removesuffix("</w>")) == 1)


def token_rarity(tokenizer: Any, token_id: int) -> float:
    """0 for single characters and the earliest (most frequent) merges, up to 1 for the last."""
    base = _base_vocab_size(tokenizer)
    specials = len(tokenizer.all_special_ids)
    merges = max(1, len(tokenizer) - base - specials)
    if token_id < base:
        return 0.0
    return min(1.0, (token_id - base + 1) / merges)


def check_identifier(tokenizer: Any, text: str, *, class_noun: str = "", max_tokens: int = 3,
                     min_rarity: float = 0.5) -> Identifier:
    """The candidate as an :class:`Identifier`, or ValueError saying why it is not rare enough."""
    word = text.strip().lower()
    if not re.fullmatch(r"[a-z][a-z0-9]{1,15}", word):
        raise ValueError(f"identifier {text!r} must be one lowercase word of 2-16 letters/digits")
    if word in BLOCKLIST:
        raise ValueError(f"identifier {word!r} is a common or overused token")
    tokens = tuple(tokenizer.tokenize(word))
    ids = tuple(int(i) for i in tokenizer.convert_tokens_to_ids(list(tokens)))
    if not tokens or len(tokens) > max_tokens:
        raise ValueError(f"identifier {word!r} splits into {len(tokens)} tokens (at most {max_tokens})")
    rarities = [token_rarity(tokenizer, i) for i in ids]
    if len(tokens) == 1 and rarities[0] < min_rarity:
        raise ValueError(f"identifier {word!r} is a common token for this tokenizer "
                         f"(merge rank {rarities[0]:.2f} < {min_rarity})")
    context = set()
    for other in (*class_noun.lower().split(), *_PROMPT_WORDS):
        context.update(tokenizer.tokenize(other))
    # Single characters recur everywhere; a whole-word or merged token shared with the class noun
    # would tie the identifier's meaning to it.
    shared = [t for t in tokens if t in context and len(t.removesuffix("</w>")) > 1]
    if shared:
        raise ValueError(f"identifier {word!r} shares tokens {shared} with the prompt words")
    return Identifier(text=word, tokens=tokens, token_ids=ids, rarity=sum(rarities) / len(rarities))


def choose_identifier(tokenizer: Any, *, class_noun: str = "",
                      candidates: Sequence[str] = DEFAULT_CANDIDATES, max_tokens: int = 3,
                      min_rarity: float = 0.5) -> Identifier:
    """The best candidate the tokenizer keeps rare: fewest tokens first, then the rarest."""
    accepted: list[Identifier] = []
    reasons: list[str] = []
    for cand in candidates:
        try:
            accepted.append(check_identifier(tokenizer, cand, class_noun=class_noun,
                                             max_tokens=max_tokens, min_rarity=min_rarity))
        except ValueError as exc:
            reasons.append(str(exc))
    if not accepted:
        raise ValueError("no candidate identifier is rare for this tokenizer: " + "; ".join(reasons))
    order = {c.lower(): i for i, c in enumerate(candidates)}
    return min(accepted, key=lambda ident: (len(ident.tokens), -round(ident.rarity, 3),
                                            order[ident.text]))


# Caption words -> the class noun a style is trained under. Order breaks ties.
_CLASS_WORDS: dict[str, str] = {
    "cat": "cat", "cats": "cat", "kitten": "cat", "dog": "dog", "dogs": "dog", "puppy": "dog",
    "bear": "bear", "bird": "bird", "fish": "fish", "horse": "horse", "rabbit": "rabbit",
    "bunny": "rabbit", "fox": "fox", "frog": "frog", "duck": "duck", "penguin": "penguin",
    "mouse": "mouse", "panda": "panda", "monkey": "monkey", "robot": "robot",
    "man": "person", "woman": "person", "boy": "person", "girl": "person", "child": "person",
    "baby": "person", "person": "person", "people": "person", "face": "person",
    "animal": "animal", "character": "character", "toy": "toy",
}


def class_noun_from_captions(captions: Iterable[str], *, default: str = "character") -> str:
    """The most frequent known subject in the captions of a set (``default`` when none)."""
    counts: Counter[str] = Counter()
    for caption in captions:
        seen = {_CLASS_WORDS[w] for w in re.findall(r"[a-z]+", caption.lower()) if w in _CLASS_WORDS}
        counts.update(seen)
    if not counts:
        return default
    rank = list(dict.fromkeys(_CLASS_WORDS.values()))
    return min(counts, key=lambda noun: (-counts[noun], rank.index(noun)))
