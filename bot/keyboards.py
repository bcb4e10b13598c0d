"""Inline keyboards. Callback data is ``<verb>:<id>`` (at most 64 bytes) and names only things
the server checks again: a button can be forged, so handlers look the id up *for this user*."""

from __future__ import annotations

from collections.abc import Sequence

from aiogram.types import InlineKeyboardButton, InlineKeyboardMarkup

from bot.nouns import SUBJECTS, label
from bot.texts import t
from pipeline.storage.repository import Style


def _button(text: str, data: str) -> InlineKeyboardButton:
    if len(data.encode()) > 64:
        raise ValueError(f"callback data over 64 bytes: {data[:20]}...")
    return InlineKeyboardButton(text=text, callback_data=data)


def start_keyboard(lang: str) -> InlineKeyboardMarkup:
    return InlineKeyboardMarkup(inline_keyboard=[
        [_button(t(lang, "btn_new_style"), "new"), _button(t(lang, "btn_train"), "train")],
        [_button(t(lang, "btn_styles"), "styles"), _button(t(lang, "btn_help"), "help")],
    ])


def train_keyboard(lang: str) -> InlineKeyboardMarkup:
    return InlineKeyboardMarkup(inline_keyboard=[[_button(t(lang, "btn_train"), "train")]])


def noun_keyboard(lang: str) -> InlineKeyboardMarkup:
    """The common sticker subjects, labelled in ``lang``; the data carries the English noun."""
    buttons = [_button(label(noun, lang), f"noun:{noun}") for noun in SUBJECTS]
    return InlineKeyboardMarkup(inline_keyboard=[buttons[i:i + 5] for i in range(0, len(buttons), 5)])


def sticker_keyboard(lang: str, sticker_id: str) -> InlineKeyboardMarkup:
    return InlineKeyboardMarkup(inline_keyboard=[
        [_button(t(lang, "btn_another"), f"again:{sticker_id}"),
         _button(t(lang, "btn_add_pack"), f"pack:{sticker_id}")],
        [_button(t(lang, "btn_other_style"), f"other:{sticker_id}")],
    ])


def styles_keyboard(styles: Sequence[Style], active_id: str | None) -> InlineKeyboardMarkup:
    rows = []
    for style in styles:
        mark = "✅ " if style.id == active_id else ""
        rows.append([_button(f"{mark}{style.name} · {style.status}", f"style:{style.id}")])
    return InlineKeyboardMarkup(inline_keyboard=rows)


def style_card_keyboard(lang: str, style: Style) -> InlineKeyboardMarkup:
    first = []
    if style.status == "ready":
        first.append(_button(t(lang, "btn_use"), f"use:{style.id}"))
    first.append(_button(t(lang, "btn_rename"), f"rename:{style.id}"))
    return InlineKeyboardMarkup(inline_keyboard=[
        first, [_button(t(lang, "btn_delete"), f"del:{style.id}")],
    ])


def style_pick_keyboard(styles: Sequence[Style]) -> InlineKeyboardMarkup:
    return InlineKeyboardMarkup(inline_keyboard=[
        [_button(style.name, f"redo:{style.id}")] for style in styles
    ])


def confirm_delete_style_keyboard(lang: str, style_id: str) -> InlineKeyboardMarkup:
    return InlineKeyboardMarkup(inline_keyboard=[[
        _button(t(lang, "btn_yes_delete"), f"delyes:{style_id}"), _button(t(lang, "btn_no"), "keep"),
    ]])


def confirm_delete_me_keyboard(lang: str) -> InlineKeyboardMarkup:
    return InlineKeyboardMarkup(inline_keyboard=[[
        _button(t(lang, "btn_yes_delete_all"), "forget:yes"), _button(t(lang, "btn_no"), "keep"),
    ]])


def language_keyboard() -> InlineKeyboardMarkup:
    return InlineKeyboardMarkup(inline_keyboard=[[
        _button("English", "lang:en"), _button("Русский", "lang:ru"),
    ]])
