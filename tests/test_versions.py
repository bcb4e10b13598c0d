"""The installed packages and the last tested resolve against pyproject.toml's ranges.

CI resolves afresh (what a newcomer's `make test` gets today); .ci/versions.py prints that
resolve. These tests keep the three in step: an environment that was never re-resolved after
the ranges moved fails here, and so does a range that shuts out the versions the suite passed
with (a stale upper bound)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def versions() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ci_versions", ROOT / ".ci" / "versions.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_installed_packages_are_within_pyproject_ranges(versions: ModuleType) -> None:
    ranges = versions.declared_ranges()
    assert {"torch", "diffusers", "transformers", "peft", "celery", "pytest"} <= set(ranges)
    now = versions.installed(sorted(ranges))
    assert [n for n, v in now.items() if v == "missing"] == []
    assert versions.outside(now, ranges) == []


def test_the_tested_resolve_is_admitted_by_pyproject(versions: ModuleType) -> None:
    ranges = versions.declared_ranges()
    pins = versions.read_pins()
    assert {"torch", "diffusers", "transformers", "peft"} <= set(pins)
    assert set(pins) <= set(ranges), set(pins) - set(ranges)
    assert versions.outside(pins, ranges) == []


def test_outside_names_what_a_range_shuts_out(versions: ModuleType, tmp_path: Path) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "stickerbot"\ndependencies = ["transformers>=5.0,<5.24", '
                         '"torch>=2.4,<3"]\n[project.optional-dependencies]\ntest = ["stickerbot[celery]"]\n')
    ranges = versions.declared_ranges(pyproject)
    assert set(ranges) == {"transformers", "torch"}
    assert versions.outside({"transformers": "5.25.0", "torch": "2.13.0+cpu"}, ranges) == [
        "transformers 5.25.0 (pyproject: <5.24,>=5.0)"]
