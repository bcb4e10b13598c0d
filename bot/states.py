"""The conversation's FSM states (kept in the SQLite FSM storage, so they survive restarts)."""

from __future__ import annotations

from aiogram.fsm.state import State, StatesGroup


class Collect(StatesGroup):
    images = State()  # photos and image documents go into the draft, not to sticker jobs


class Train(StatesGroup):
    noun = State()  # waiting for the class noun of the draft being trained


class Styles(StatesGroup):
    rename = State()  # waiting for a new name; data: {"style_id": ...}
