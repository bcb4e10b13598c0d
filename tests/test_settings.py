from __future__ import annotations

import logging

import pytest

from pipeline.errors import ConfigError
from pipeline.settings import load_settings
from tests.conftest import TEST_TOKEN


def test_defaults_are_the_real_preset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no stray .env
    s = load_settings()
    assert s.preset == "sd15"
    assert s.db_path == s.data_dir / "stickerbot.sqlite3"
    assert s.bot_token is None


def test_operator_names_are_read(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BOT_TOKEN", TEST_TOKEN)
    monkeypatch.setenv("TELEGRAM_API_BASE", "http://127.0.0.1:8081/")
    monkeypatch.setenv("STICKERBOT_PRESET", "tiny")
    monkeypatch.setenv("STICKERBOT_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("STICKERBOT_ADMIN_IDS", "11, 22")
    s = load_settings()
    assert s.require_token().get_secret_value() == TEST_TOKEN
    assert s.telegram_api_base == "http://127.0.0.1:8081"
    assert s.preset == "tiny"
    assert s.data_dir == tmp_path / "d"
    assert s.admin_ids == [11, 22]


def test_dotenv_file_is_read(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("STICKERBOT_PRESET=tiny\nSTICKERBOT_STICKERS_PER_DAY=7\n")
    s = load_settings()
    assert (s.preset, s.stickers_per_day) == ("tiny", 7)


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("STICKERBOT_PRESET", "sdxl"),
        ("STICKERBOT_ADMIN_IDS", "12,abc"),
        ("TELEGRAM_API_BASE", "ftp://x"),
        ("STICKERBOT_ADAPTER_CACHE_SIZE", "0"),
        ("STICKERBOT_PACK_PREFIX", "bad__name"),
    ],
)
def test_malformed_variable_is_named(monkeypatch, tmp_path, var, value):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert var in str(err.value)


def test_missing_token_says_how_to_get_one(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="BotFather"):
        load_settings().require_token()


def test_token_never_leaks(monkeypatch, tmp_path, caplog):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BOT_TOKEN", TEST_TOKEN)
    s = load_settings()
    logging.getLogger("t").warning("settings: %s %r", s, s)
    assert TEST_TOKEN not in repr(s) and TEST_TOKEN not in str(s)
    assert TEST_TOKEN not in caplog.text
    # A malformed token in the wrong field is not echoed back either.
    monkeypatch.setenv("STICKERBOT_METRICS_PORT", TEST_TOKEN)
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert TEST_TOKEN not in str(err.value)
    monkeypatch.setenv("BOT_TOKEN", "not-a-token-at-all")
    monkeypatch.delenv("STICKERBOT_METRICS_PORT")
    with pytest.raises(ConfigError, match="malformed") as err:
        load_settings().require_token()
    assert "not-a-token-at-all" not in str(err.value)


def test_env_example_lists_every_setting_with_a_comment():
    import re
    from pathlib import Path

    from pipeline.settings import Settings, env_name

    lines = (Path(__file__).parents[1] / ".env.example").read_text().splitlines()
    documented = {}
    for i, line in enumerate(lines):
        m = re.match(r"^([A-Z_]+)=", line)
        if m:
            documented[m.group(1)] = lines[i - 1].startswith("#")
    expected = {env_name(f) for f in Settings.model_fields}
    assert set(documented) == expected
    assert all(documented.values()), [k for k, v in documented.items() if not v]
