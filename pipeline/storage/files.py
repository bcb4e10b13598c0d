"""Files under the data dir: atomic writes, content-addressed blobs, safe relative paths.

Nothing here builds a path from a name that came from outside (a Telegram ``file_path``, an
upload's file name): blobs are named by the SHA-256 of their bytes, styles and results by ids
this process generated.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

_SAFE_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SAFE_SUFFIX = re.compile(r"^\.[a-z0-9]{1,8}$")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_atomic_with(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Let ``write`` fill a temporary file beside ``path``, then rename it over ``path``: readers
    (and a process that crashes half-way) see the old file or the whole new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`write_atomic_with`)."""
    write_atomic_with(path, lambda fh: fh.write(data))


@contextmanager
def file_lock(path: Path, *, on_wait: Callable[[], None] | None = None,
              interval: float = 0.25) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (created if missing), across processes: one
    builder of a shared cache works while the others wait, then reuse what it made. With
    ``on_wait`` the wait polls, calling it every ``interval`` seconds while another holds the
    lock (it may raise to give up waiting: a preempted or cancelled job)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        if on_wait is None:
            fcntl.flock(fh, fcntl.LOCK_EX)
        else:
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    on_wait()
                    time.sleep(interval)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``final``; on success it is renamed to ``final``
    (replacing an older one), on error it is removed: no half-written directory ever shows."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


class DataDir:
    """The product's data directory. Every stored path is relative to ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def resolve(self, relative: str | Path) -> Path:
        """The absolute path of a stored relative path; refuses anything that escapes ``root``."""
        rel = Path(relative)
        if rel.is_absolute() or ".." in rel.parts:
            raise ValueError(f"refusing a path outside the data dir: {str(relative)[:80]!r}")
        full = (self.root / rel).resolve()
        if not full.is_relative_to(self.root):
            raise ValueError(f"refusing a path outside the data dir: {str(relative)[:80]!r}")
        return full

    def put_blob(self, data: bytes, *, suffix: str, area: str = "blobs") -> tuple[str, str]:
        """Store bytes by content hash; returns (relative path, sha256). Idempotent."""
        if not _SAFE_SUFFIX.match(suffix):
            raise ValueError(f"bad suffix {suffix!r}")
        if not _SAFE_PART.match(area):
            raise ValueError(f"bad area {area!r}")
        digest = sha256_hex(data)
        rel = f"{area}/{digest[:2]}/{digest}{suffix}"
        path = self.resolve(rel)
        if not path.exists():
            write_atomic(path, data)
        return rel, digest

    def path_for(self, *parts: str) -> Path:
        """A path under ``root`` from internal, checked parts (ids this process generated)."""
        for part in parts:
            if not _SAFE_PART.match(part):
                raise ValueError(f"unsafe path part {part[:40]!r}")
        return self.resolve(Path(*parts))

    def relative(self, path: Path) -> str:
        return str(Path(path).resolve().relative_to(self.root))
