"""The background remover's versions in the data dir (no torch: the bot reads these too).

    <data dir>/segmenter/
        current.json            {"version": "<name>", "promoted_at": ...}: what workers serve
        <version>/              save_pretrained of model and image processor, plus
            segmenter.json      figures (held-out IoU, boundary F, alpha MAE), data counts,
                                source, base, mode (bootstrap | refresh), promoted or kept aside
        emoji/                  the emoji tarballs and rasterised PNGs (cache)
        uploads-index.json      which uploaded images carry alpha (cache)

A version directory appears whole (written beside, then renamed). ``current.json`` is replaced
atomically, so a worker that reads it sees the old version or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = "segmenter"
CURRENT = "current.json"
INFO = "segmenter.json"


@dataclass(frozen=True)
class SegmenterVersion:
    name: str
    path: Path
    info: dict[str, Any]

    @property
    def base(self) -> str:
        """The configured segmenter (id or directory) this version was trained from."""
        return str(self.info.get("base", ""))

    @property
    def heldout_iou(self) -> float | None:
        value = (self.info.get("figures") or {}).get("procedural", {}).get("iou")
        return None if value is None else float(value)


def root_of(data_root: Path) -> Path:
    return Path(data_root) / ROOT


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(data, indent=2) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def version(data_root: Path, name: str) -> SegmenterVersion | None:
    path = root_of(data_root) / name
    info = read_json(path / INFO)
    if info is None or not (path / "config.json").exists():
        return None
    return SegmenterVersion(name=name, path=path, info=info)


def current(data_root: Path) -> SegmenterVersion | None:
    """The promoted version, or None (none yet, or its directory is gone)."""
    pointer = read_json(root_of(data_root) / CURRENT)
    if pointer is None or not isinstance(pointer.get("version"), str):
        return None
    return version(data_root, pointer["version"])


def current_stamp(data_root: Path) -> str | None:
    """A cheap token that changes when another version is promoted (a worker polls it)."""
    pointer = read_json(root_of(data_root) / CURRENT)
    return None if pointer is None else str(pointer.get("version"))


def promote(data_root: Path, name: str, *, at: float) -> None:
    write_json_atomic(root_of(data_root) / CURRENT, {"version": name, "promoted_at": at})


def all_versions(data_root: Path) -> list[SegmenterVersion]:
    root = root_of(data_root)
    if not root.is_dir():
        return []
    names = [p.name for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    found = [version(data_root, name) for name in names]
    return [v for v in found if v is not None]


def serving_version(data_root: Path, configured: str) -> SegmenterVersion | None:
    """The version workers serve for the ``configured`` segmenter: the promoted one when it was
    trained from that same configured segmenter (an operator who points the setting at another
    model gets that model, not an older bootstrap of a different one)."""
    promoted = current(data_root)
    if promoted is None or promoted.base != configured:
        return None
    return promoted


def describe(data_root: Path, *, pending: str | None = None) -> str:
    """One line for ``/stats`` and ``doctor``: the version in use, where it came from, its
    held-out figures and how many uploaded sticker images it learned from; what is pending."""
    serving = current(data_root)
    if serving is None:
        text = "no trained version yet (the configured segmenter, or a bootstrap is due)"
    else:
        info = serving.info
        figures = info.get("figures") or {}

        def part(name: str) -> str:
            f = figures.get(name)
            if not f:
                return f"{name}: none held out"
            return (f"{name} IoU {f['iou']:.3f}, boundary F {f['boundary_f']:.3f}, "
                    f"alpha MAE {f['alpha_mae']:.3f}")

        text = (f"{serving.name} ({info.get('source', '?')}); held-out {part('procedural')}; "
                f"{part('uploads')}; learned from {info.get('learned_from_uploads', 0)} uploaded "
                "sticker images")
    kept = [v.name for v in all_versions(data_root) if v.info.get("promoted") is False]
    if kept:
        text += f"; kept aside: {', '.join(kept[-3:])}"
    return text + (f"; pending: {pending}" if pending else "")


def pending_text(states: dict[str, int]) -> str | None:
    """``{"queued": 1, ...}`` of the segmenter jobs -> "1 queued" (None when nothing is pending)."""
    parts = [f"{states[s]} {s}" for s in ("running", "queued") if states.get(s)]
    return ", ".join(parts) or None
