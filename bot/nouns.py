"""Class nouns for /train, always in English.

Stable Diffusion 1.5's CLIP text encoder was trained on English captions and understands
Russian poorly: "a zqv кот sticker" weakens the class prior and every prompt of the style. So the
noun a style is trained with is English, whatever the user's language: common sticker subjects
are buttons labelled in the user's language (callback data carries the English noun), typed
words go through a small built-in dictionary, plain English words pass as they are, and
anything else is asked again with the buttons.
"""

from __future__ import annotations

import re

# The buttons: English noun -> label per language (English labels are the nouns themselves).
SUBJECTS: dict[str, dict[str, str]] = {
    "cat": {"ru": "кот"},
    "dog": {"ru": "собака"},
    "girl": {"ru": "девушка"},
    "boy": {"ru": "парень"},
    "person": {"ru": "человек"},
    "character": {"ru": "персонаж"},
    "animal": {"ru": "животное"},
    "bird": {"ru": "птица"},
    "robot": {"ru": "робот"},
    "object": {"ru": "предмет"},
}

# Russian nouns (the forms people type: diminutives, both genders) -> English.
_RU_NOUNS = {
    "cat": "кот кошка котик котенок котёнок кошечка киса",
    "dog": "собака пес пёс щенок собачка песик пёсик",
    "girl": "девушка девочка девчонка",
    "boy": "парень мальчик пацан",
    "man": "мужчина дядя",
    "woman": "женщина тетя тётя",
    "person": "человек люди",
    "character": "персонаж герой",
    "animal": "животное зверь зверек зверёк",
    "bird": "птица птичка воробей",
    "robot": "робот",
    "object": "предмет вещь",
    "bear": "медведь мишка медвежонок",
    "rabbit": "кролик заяц зайчик зайка",
    "fox": "лиса лис лисичка лисенок лисёнок",
    "panda": "панда",
    "frog": "лягушка жаба",
    "duck": "утка уточка утенок утёнок",
    "mouse": "мышь мышка",
    "hamster": "хомяк хомячок",
    "owl": "сова совенок совёнок",
    "penguin": "пингвин",
    "dragon": "дракон",
    "dinosaur": "динозавр",
    "unicorn": "единорог",
    "monkey": "обезьяна мартышка",
    "pig": "свинья свинка поросенок поросёнок",
    "cow": "корова",
    "horse": "лошадь конь",
    "fish": "рыба рыбка",
    "cactus": "кактус",
    "flower": "цветок",
    "food": "еда",
    "baby": "малыш ребенок ребёнок",
    "child": "дети",
    "ghost": "привидение призрак",
    "cartoon": "мультик",
}
# Adjectives that often come with the noun ("мультяшная девушка" -> "cartoon girl").
_RU_ADJECTIVES = {
    "cartoon": "мультяшный мультяшная мультяшное мультяшные",
    "anime": "аниме",
    "cute": "милый милая милое милые",
    "little": "маленький маленькая маленькое",
    "fat": "толстый толстая толстое",
    "ginger": "рыжий рыжая рыжее",
    "black": "черный черная черное чёрный чёрная чёрное",
    "white": "белый белая белое",
    "pixel": "пиксельный пиксельная пиксельное",
}


def _index(table: dict[str, str]) -> dict[str, str]:
    return {form.replace("ё", "е"): english for english, forms in table.items() for form in forms.split()}


RU_NOUNS = _index(_RU_NOUNS)
RU_ADJECTIVES = _index(_RU_ADJECTIVES)
_ENGLISH_WORD = re.compile(r"^[a-z]{2,20}$")
_WORD = re.compile(r"^[^\W\d_]{2,20}$")


def label(noun: str, lang: str) -> str:
    """The button label of ``noun`` in ``lang`` (the noun itself where there is none)."""
    return SUBJECTS.get(noun, {}).get(lang, noun)


def to_english(text: str) -> str | None:
    """The English class noun for what the user typed: one or two words, lower case; None when
    it is not understood (an unknown non-English word, digits, three words, markup).

    English words pass as they are. Russian ones go through the dictionary; an unknown
    adjective before a known noun is dropped (the noun is what matters)."""
    words = " ".join(text.strip().lower().replace("ё", "е").split()).split(" ")
    if not 1 <= len(words) <= 2 or not all(_WORD.match(w) for w in words):
        return None
    if all(_ENGLISH_WORD.match(w) for w in words):
        return " ".join(words)
    *adjectives, noun = words
    english = RU_NOUNS.get(noun)
    if english is None:
        return None
    known = [RU_ADJECTIVES[a] for a in adjectives if a in RU_ADJECTIVES]
    return " ".join([*known, english])
