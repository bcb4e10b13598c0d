"""What pip resolved, against what pyproject.toml allows and what the suite last passed with.

CI installs into a fresh virtual environment, so it tests what a newcomer's `make test` resolves
today. This prints that resolve, names every package outside pyproject.toml's ranges (an old
environment that was never re-resolved: exit 1), and lists what differs from
.ci/tested-versions.txt (the last resolve the whole suite passed with; update it when a newer
resolve passes). Usage: python .ci/versions.py
"""

from __future__ import annotations

import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
PROJECT = "stickerbot"
TESTED = ROOT / ".ci" / "tested-versions.txt"


def declared_ranges(pyproject: Path = ROOT / "pyproject.toml",
                    extras: tuple[str, ...] = ("celery", "emoji", "test")) -> dict[str, SpecifierSet]:
    """Package name -> the range pyproject.toml allows (the dependencies and the given extras)."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    lines = list(project["dependencies"])
    for extra in extras:
        lines += project.get("optional-dependencies", {}).get(extra, [])
    out: dict[str, SpecifierSet] = {}
    for line in lines:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        if name != PROJECT:  # "stickerbot[celery]": an extra of this project, listed itself
            out[name] = out.get(name, SpecifierSet()) & req.specifier
    return out


def read_pins(path: Path = TESTED) -> dict[str, str]:
    """``name==version`` lines (comments and blank lines skipped)."""
    pins = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name.strip())] = version.strip()
    return pins


def outside(versions: dict[str, str], ranges: dict[str, SpecifierSet]) -> list[str]:
    """Each package whose version the ranges do not admit (local labels such as +cpu ignored)."""
    return [f"{name} {version} (pyproject: {ranges[name]})" for name, version in sorted(versions.items())
            if name in ranges and not ranges[name].contains(version.split("+")[0], prereleases=True)]


def installed(names: list[str]) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def main() -> int:
    ranges = declared_ranges()
    now = installed(sorted(ranges))
    print("resolved: " + "; ".join(f"{n} {v}" for n, v in now.items()))
    missing = [n for n, v in now.items() if v == "missing"]
    bad = outside({n: v for n, v in now.items() if v != "missing"}, ranges)
    tested = read_pins()
    changed = [f"{n} {tested[n]} -> {now.get(n)}" for n in sorted(tested)
               if str(now.get(n)).split("+")[0] != tested[n]]
    if changed:
        print("differs from .ci/tested-versions.txt (update it when the suite passes): " + "; ".join(changed))
    for line in missing:
        print(f"not installed: {line}")
    for line in bad:
        print(f"outside pyproject.toml's range: {line}")
    return 1 if missing or bad else 0


if __name__ == "__main__":
    sys.exit(main())
