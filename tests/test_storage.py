from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator

import pytest

from pipeline.storage import db
from pipeline.storage.files import DataDir, atomic_directory
from pipeline.storage.repository import Repository


@pytest.fixture
async def repo(tmp_path) -> AsyncIterator[Repository]:
    """A repository on a fresh SQLite file, with users 1 and 2."""
    conn = await db.open_database(tmp_path / "s.sqlite3")
    repository = Repository(conn)
    await repository.ensure_user(1)
    await repository.ensure_user(2)
    yield repository
    await conn.close()


async def test_fresh_database_reaches_latest_and_is_wal(tmp_path):
    conn = await db.open_database(tmp_path / "s.sqlite3")
    assert await db.schema_version(conn) == db.LATEST_VERSION
    async with conn.execute("PRAGMA journal_mode") as cur:
        assert (await cur.fetchone())[0] == "wal"
    await conn.close()


async def test_migrating_twice_changes_nothing(tmp_path):
    path = tmp_path / "s.sqlite3"
    conn = await db.open_database(path)
    await conn.close()
    before = sqlite3.connect(path).execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall()
    conn = await db.open_database(path)
    assert await db.migrate(conn) == db.LATEST_VERSION
    await conn.close()
    after = sqlite3.connect(path).execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall()
    assert before == after


async def test_older_schema_upgrades_without_losing_rows(tmp_path):
    path = tmp_path / "s.sqlite3"
    conn = await db.connect(path)
    await db.migrate(conn, target=1)
    repo = Repository(conn)
    await repo.ensure_user(42, language="ru")
    style = await repo.create_style(42, "cats")
    await conn.execute(
        "INSERT INTO stickers (id, user_id, style_id, path, created_at) VALUES ('s1', 42, ?, 'x', 0)",
        (style.id,),
    )
    await conn.close()

    conn = await db.open_database(path)
    repo = Repository(conn)
    assert await db.schema_version(conn) == db.LATEST_VERSION
    assert (await repo.get_user(42)).language == "ru"
    assert (await repo.get_style(style.id)).name == "cats"
    sticker = await repo.get_sticker("s1")
    assert sticker is not None and sticker.telegram_file_id is None  # the v2 column, empty
    await conn.close()


async def test_ownership_checks_and_cascading_delete(repo: Repository) -> None:
    mine = await repo.create_style(1, "mine")
    assert await repo.get_user_style(2, mine.id) is None
    assert await repo.get_user_style(1, mine.id) is not None
    assert await repo.add_image(mine.id, sha256="a" * 64, path="p", width=1, height=1, source="photo")
    assert not await repo.add_image(mine.id, sha256="a" * 64, path="p", width=1, height=1,
                                    source="photo")
    await repo.delete_user(1)
    assert await repo.get_style(mine.id) is None
    assert await repo.count_images(mine.id) == 0


async def test_reference_counts_result_lookups_and_the_operators_totals(repo: Repository) -> None:
    style = await repo.create_style(1, "cats")
    await repo.add_image(style.id, sha256="b" * 64, path="blobs/shared.png", width=1, height=1,
                         source="photo")
    made = await repo.add_sticker(user_id=1, style_id=style.id, job_id="job-1", path="blobs/shared.png",
                                  emoji="x", caption="", seed=1)
    await repo.add_sticker(user_id=2, style_id=None, job_id="job-2", path="results/job-2/0.webp",
                           emoji="x", caption="", seed=None)
    assert await repo.references("blobs/shared.png") == 2  # one image row, one sticker row
    assert await repo.references("blobs/nobody.png") == 0
    assert await repo.sticker_for_result("job-1", "blobs/shared.png") == made.id
    assert await repo.sticker_for_result("job-1", "results/job-2/0.webp") is None
    assert await repo.sticker_paths(2) == ["results/job-2/0.webp"]
    assert await repo.totals() == {"users": 2, "styles": 1, "stickers": 2}
    assert await repo.job_leases(100.0) == (0, 0, None)
    for job_id, state, lease, finished in (("a", "running", 150.0, None), ("b", "running", 50.0, None),
                                           ("c", "succeeded", None, 90.0)):
        await repo.conn.execute(
            "INSERT INTO jobs (id, kind, user_id, state, created_at, updated_at, lease_expires_at, "
            "finished_at) VALUES (?, 'noop', 1, ?, 0, 0, ?, ?)", (job_id, state, lease, finished))
    assert await repo.job_leases(100.0) == (1, 1, 90.0)  # a live lease, an expired one, the last finish


async def test_pack_import_records_move_on_and_go_with_their_user_or_style(repo: Repository) -> None:
    first = await repo.create_style(1, "cats")
    other = await repo.create_style(2, "dogs")
    kw = {"title": "Cats", "chat_id": 1, "message_id": 7, "lang": "en"}
    record = await repo.start_import(user_id=1, pack="CatsPack", style_id=first.id, **kw)
    assert (record.done, record.added, record.skipped) == (0, 0, 0)
    await repo.import_progress(1, "CatsPack", done=5, added=4, skipped=1)
    await repo.start_import(user_id=2, pack="DogsPack", style_id=other.id, **kw)
    pending = await repo.pending_imports()
    assert [(p.user_id, p.pack, p.done, p.added, p.skipped) for p in pending] == [
        (1, "CatsPack", 5, 4, 1), (2, "DogsPack", 0, 0, 0)]
    # Starting the same pack again starts it over.
    again = await repo.start_import(user_id=1, pack="CatsPack", style_id=first.id, **kw)
    assert again.done == 0
    await repo.finish_import(1, "CatsPack")
    assert await repo.get_import(1, "CatsPack") is None
    await repo.delete_style(other.id)  # the draft is gone: so is its import
    assert await repo.pending_imports() == []
    await repo.start_import(user_id=1, pack="CatsPack", style_id=first.id, **kw)
    await repo.delete_user(1)
    assert await repo.pending_imports() == []


def test_blobs_are_content_addressed_and_paths_checked(tmp_path):
    data = DataDir(tmp_path)
    rel, digest = data.put_blob(b"hello", suffix=".png")
    assert rel == f"blobs/{digest[:2]}/{digest}.png"
    assert data.put_blob(b"hello", suffix=".png") == (rel, digest)
    assert data.resolve(rel).read_bytes() == b"hello"
    for hostile in ("../etc/passwd", "/etc/passwd", "a/../../x"):
        with pytest.raises(ValueError):
            data.resolve(hostile)
    with pytest.raises(ValueError):
        data.path_for("styles", "../x")
    with pytest.raises(ValueError):
        data.put_blob(b"x", suffix="/../x")


def test_atomic_directory_leaves_nothing_on_error(tmp_path):
    final = tmp_path / "style"
    with pytest.raises(RuntimeError), atomic_directory(final) as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("boom")
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []
    with atomic_directory(final) as tmp:
        (tmp / "whole.bin").write_bytes(b"y")
    assert (final / "whole.bin").read_bytes() == b"y"
