"""Shared fixtures. Everything offline and seeded; tiny random-weight models only."""

from __future__ import annotations

import os

# Before any Hugging Face import: no test may reach the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
for _var in list(os.environ):
    # The operator's own configuration must not leak into tests.
    if _var.startswith("STICKERBOT_") or _var in ("BOT_TOKEN", "TELEGRAM_API_BASE"):
        del os.environ[_var]

from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from pipeline.settings import Settings, load_settings  # noqa: E402

TEST_TOKEN = "123456:TEST-token-that-is-long-enough-0123456789"


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny models gain nothing from a second intra-op thread, and tests run beside worker
    subprocesses on two cores, where two spinning OpenMP threads per process run several times
    slower than one. One thread also keeps CPU results reproducible run to run."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model zoo, built once per test session (about 7 s on 2 cores)."""
    from pipeline.architectures import TINY
    from pipeline.zoo import build_zoo

    return build_zoo(tmp_path_factory.mktemp("zoo") / "tiny-zoo", TINY)


@pytest.fixture
def tiny_settings(tmp_path: Path, tiny_zoo: Path) -> Settings:
    """Settings for the tiny preset with a fresh data dir under ``tmp_path``."""
    return load_settings(preset="tiny", data_dir=tmp_path / "data", tiny_zoo_dir=tiny_zoo,
                         device="cpu", dtype="float32")


@pytest.fixture
def tiny_env(tiny_settings: Settings) -> dict[str, str]:
    """Environment for subprocesses (workers, CLI) that should see the same configuration."""
    env = dict(os.environ)
    env.update(
        STICKERBOT_PRESET="tiny",
        STICKERBOT_DATA_DIR=str(tiny_settings.data_dir),
        STICKERBOT_TINY_ZOO_DIR=str(tiny_settings.zoo_dir),
        STICKERBOT_DEVICE="cpu",
        STICKERBOT_DTYPE="float32",
        HF_HUB_OFFLINE="1",
    )
    return env


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory, tiny_zoo: Path):  # -> Models
    """Tiny models loaded once per session. Shared: a test that changes them (adds adapters,
    trains) must load its own with ``load_models(tiny_settings)`` instead."""
    from pipeline.models import load_models

    settings = load_settings(preset="tiny", data_dir=tmp_path_factory.mktemp("shared-data"),
                             tiny_zoo_dir=tiny_zoo, device="cpu", dtype="float32")
    return load_models(settings)


@pytest.fixture(scope="session")
def hub_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face hub cache holding tiny models under the sd15 preset's real ids and layouts
    (tests/hub_mirror.py), built once per session (about 10 s on 2 cores). Read-only: a test
    that damages files copies it first (``hub_mirror.copy_hub``)."""
    from tests.hub_mirror import build_hub_cache

    return build_hub_cache(tmp_path_factory.mktemp("hub-mirror"))


@pytest.fixture
def sd15_settings(tmp_path: Path, hub_cache: Path) -> Settings:
    """The default preset, offline, against the mirror (in-process: the cache goes in as
    ``model_cache_dir``, since huggingface_hub reads HF_HUB_CACHE once at import)."""
    return load_settings(preset="sd15", data_dir=tmp_path / "data", model_cache_dir=hub_cache,
                         device="cpu", dtype="auto")


@pytest.fixture
def sd15_env(sd15_settings: Settings, hub_cache: Path) -> dict[str, str]:
    """Environment for subprocesses on the sd15 preset: HF_HUB_CACHE/HF_HOME point at the mirror,
    as an operator's cache after the first download."""
    from tests.hub_mirror import hub_env

    return hub_env(hub_cache, STICKERBOT_DATA_DIR=str(sd15_settings.data_dir))
