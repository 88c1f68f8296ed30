"""The check a database file must pass before imagetask writes to it: foreign, newer and damaged
files are refused untouched, healthy ones pass (closed, or open in another connection)."""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

import imagetask
from imagetask import StoreError, TaskManager
from imagetask._dbcheck import check_database
from imagetask._store import MIGRATIONS, SCHEMA_VERSION
from imagetask.providers import FakeProvider

from conftest import sql

# --- helpers ------------------------------------------------------------------------------------


def check(db: Path, **limits: float) -> None:
    check_database(db, MIGRATIONS, **limits)  # type: ignore[arg-type]


def snapshot(db: Path) -> dict[str, bytes]:
    """The bytes of the database and of every file beside it named after it (-wal, -shm, -journal)."""
    return {p.name: p.read_bytes() for p in sorted(db.parent.iterdir()) if p.name.startswith(db.name)}


async def imagetask_db(db: Path, tasks: int = 0) -> Path:
    """A real imagetask database, closed (WAL mode, no -wal or -shm file left)."""
    async with TaskManager(db, provider=FakeProvider(), workers=False) as tm:
        for i in range(tasks):
            await tm.submit(f"a watercolour lighthouse at dusk, study number {i}, soft light")
    assert snapshot(db).keys() == {db.name}
    return db


def overwrite_pages(db: Path, count: int = 5, seed: int = 1) -> None:
    """Overwrite ``count`` whole pages past page 1, spread over the file, with random bytes."""
    data = db.read_bytes()
    page_size = int.from_bytes(data[16:18], "big")
    pages = len(data) // page_size
    assert pages > 4 * count, "the database is too small to damage meaningfully"
    rng = random.Random(seed)
    with db.open("r+b") as f:
        for k in range(count):
            page = 2 + k * (pages - 2) // count  # 0-based page numbers 2 .. pages - 1
            f.seek(page * page_size)
            f.write(rng.randbytes(page_size))


def plain_db(db: Path, *statements: str, wal: bool = False) -> Path:
    """An SQLite database another program made with ``statements`` (rollback journal unless ``wal``)."""
    conn = sqlite3.connect(db)
    try:
        if wal:
            conn.execute("PRAGMA journal_mode = WAL")
        for statement in statements:
            conn.execute(statement)
        conn.commit()
    finally:
        conn.close()
    assert snapshot(db).keys() == {db.name}
    return db


def die_mid_write(db: Path, *statements: str, commit: bool) -> None:
    """Run ``statements`` on ``db`` in another process that dies (os._exit) before closing the file.

    ``commit=False`` leaves a hot rollback journal; ``commit=True`` (in WAL mode) leaves the
    commits in the -wal file only (no checkpoint).
    """
    code = (
        "import os, sqlite3, sys\n"
        "conn = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "conn.execute('PRAGMA cache_size = 1')\n"  # spill the changes to the file at once
        "conn.execute('PRAGMA wal_autocheckpoint = 0')\n"
        "conn.execute('BEGIN')\n"
        "for statement in sys.argv[3:]:\n"
        "    conn.execute(statement)\n"
        "if sys.argv[2] == 'commit':\n"
        "    conn.execute('COMMIT')\n"
        "os._exit(0)\n"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(db), "commit" if commit else "die", *statements],
        check=True,
        timeout=30,
    )


def another_app(db: Path) -> Path:
    return plain_db(
        db,
        "CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)",
        "INSERT INTO customers (name) VALUES ('Ada'), ('Grace')",
    )


def rails(db: Path) -> Path:
    return plain_db(
        db,
        'CREATE TABLE "schema_migrations" ("version" varchar NOT NULL PRIMARY KEY)',
        'CREATE TABLE "ar_internal_metadata" ("key" varchar NOT NULL PRIMARY KEY, "value" varchar)',
        "INSERT INTO schema_migrations VALUES ('20240101000000'), ('20240215093000')",
    )


def golang_migrate(db: Path) -> Path:
    return plain_db(
        db,
        "CREATE TABLE schema_migrations (version bigint NOT NULL PRIMARY KEY, dirty boolean NOT NULL)",
        "INSERT INTO schema_migrations VALUES (1, false)",
        "CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT)",
    )


# --- what is not a database ---------------------------------------------------------------------


def test_a_missing_or_empty_file_is_a_new_database(tmp_path):
    """A missing or 0-byte file passes and nothing is created, but one non-SQLite byte in it is refused."""
    db = tmp_path / "tasks.db"
    check(db)
    assert list(tmp_path.iterdir()) == []
    db.write_bytes(b"")
    check(db)
    assert snapshot(db) == {"tasks.db": b""}
    db.write_bytes(b"x")
    with pytest.raises(StoreError, match="not an SQLite database"):
        check(db)


def test_a_folder_is_refused(tmp_path):
    """A folder as the path is a StoreError that says it is a folder."""
    with pytest.raises(StoreError, match="is a folder"):
        check(tmp_path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_named_pipe_is_refused_without_reading_it(tmp_path):
    """A path that is not a regular file (a named pipe) is refused at once instead of blocking on a read."""
    fifo = tmp_path / "tasks.db"
    os.mkfifo(fifo)
    with pytest.raises(StoreError, match="not a regular file"):
        check(fifo)


#: Checks the file named on its command line as a user who may not read it (run as root, it
#: drops to ``nobody`` first: root reads any file), then prints the StoreError. Exit 2: the
#: file cannot even be reached (then the check would fail on the stat, not the read); exit 3:
#: this process may not change its user.
_CHECK_AS_NOBODY = """
import os, sys
from pathlib import Path
from imagetask import StoreError
from imagetask._dbcheck import check_database
from imagetask._store import MIGRATIONS
if os.geteuid() == 0:
    try:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
    except PermissionError:
        sys.exit(3)
try:
    os.stat(sys.argv[1])
except OSError:
    sys.exit(2)
try:
    check_database(Path(sys.argv[1]), MIGRATIONS)
except StoreError as exc:
    print(exc)
    sys.exit(0)
sys.exit(1)
"""


def test_an_unreadable_file_is_refused():
    """A file that cannot be read (mode 000, read by a user other than its owner) is a
    StoreError naming it and the reason, not a raw OSError."""
    # In /tmp (every user may pass through it), not under pytest's own temporary folder (mode 700).
    folder = Path(
        tempfile.mkdtemp(prefix="imagetask-unreadable-", dir="/tmp" if os.path.isdir("/tmp") else None)
    )
    try:
        folder.chmod(0o711)  # others may reach the file, not list or read it
        db = folder / "tasks.db"
        db.write_bytes(b"SQLite format 3\x00" + bytes(84))
        db.chmod(0)
        done = subprocess.run(
            [sys.executable, "-c", _CHECK_AS_NOBODY, str(db)], capture_output=True, text=True, timeout=60
        )
        if done.returncode == 3:
            pytest.skip("this process runs as root but may not change its user (no CAP_SETUID)")
        if done.returncode == 2:
            pytest.skip(f"another user cannot reach {folder}: a folder above it is closed to them")
        assert done.returncode == 0, done.stdout + done.stderr
        assert re.search(r"cannot read .*tasks\.db.*Permission denied", done.stdout), done.stdout
    finally:
        shutil.rmtree(folder)


@pytest.mark.parametrize(
    "content",
    [b"this is a text file, not a database\n" * 10, b"\x00" * 4096, b"SQLite format 2\x00" + bytes(200)],
    ids=["text", "zeros", "other-magic"],
)
def test_a_non_sqlite_file_is_refused_untouched(tmp_path, content):
    """A file whose first 16 bytes are not SQLite's magic is refused and left exactly as it was."""
    db = tmp_path / "tasks.db"
    db.write_bytes(content)
    before = snapshot(db)
    with pytest.raises(StoreError, match=r"not an SQLite database.*move it away or pass another path"):
        check(db)
    assert snapshot(db) == before


# --- other programs' databases ------------------------------------------------------------------


def test_another_apps_database_is_refused_untouched(tmp_path):
    """Another app's rollback-journal database is refused, byte-identical, with no -wal or -journal made."""
    db = another_app(tmp_path / "app.db")
    before = snapshot(db)
    with pytest.raises(StoreError, match=r"not an imagetask one \(it has tables customers"):
        check(db)
    assert snapshot(db) == before
    assert not Path(f"{db}-wal").exists() and not Path(f"{db}-journal").exists()
    assert db.read_bytes()[18:20] == b"\x01\x01"  # still a rollback-journal database


def test_another_apps_unfinished_transaction_is_refused_not_rolled_back(tmp_path):
    """Another app's database with a hot journal (its writer died) is refused; neither file is touched."""
    db = plain_db(
        tmp_path / "app.db",
        "CREATE TABLE notes (body TEXT)",
        "INSERT INTO notes WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000)"
        " SELECT hex(randomblob(250)) FROM n",
    )
    die_mid_write(db, "UPDATE notes SET body = 'x'", commit=False)
    assert Path(f"{db}-journal").stat().st_size > 0
    before = snapshot(db)
    with pytest.raises(StoreError, match=r"left unfinished \(a hot journal"):
        check(db)
    assert snapshot(db) == before


def test_another_apps_wal_database_is_refused_and_nothing_is_left_beside_it(tmp_path):
    """Another app's closed WAL database is refused, byte-identical, with no -wal or -shm file left."""
    db = plain_db(tmp_path / "app.db", "CREATE TABLE notes (body TEXT)", wal=True)
    before = snapshot(db)
    with pytest.raises(StoreError, match="not an imagetask one"):
        check(db)
    assert snapshot(db) == before


def test_a_rails_schema_migrations_is_refused(tmp_path):
    """A Rails-style schema_migrations (varchar versions like '20240101000000') is a StoreError, untouched."""
    db = rails(tmp_path / "rails.db")
    before = snapshot(db)
    with pytest.raises(StoreError, match=r"schema_migrations table \(version VARCHAR\) is not imagetask's"):
        check(db)
    assert snapshot(db) == before


def test_a_golang_migrate_schema_migrations_is_refused(tmp_path):
    """A golang-migrate schema_migrations (version bigint, dirty boolean, version 1) is a StoreError."""
    db = golang_migrate(tmp_path / "migrate.db")
    before = snapshot(db)
    with pytest.raises(StoreError, match=r"version BIGINT, dirty BOOLEAN\) is not imagetask's"):
        check(db)
    assert snapshot(db) == before


def test_imagetask_columns_with_other_migrations_are_refused(tmp_path):
    """A schema_migrations with imagetask's columns but other descriptions is refused as not imagetask's."""
    db = plain_db(
        tmp_path / "lookalike.db",
        "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY,"
        " description TEXT NOT NULL, applied_at INTEGER NOT NULL)",
        "INSERT INTO schema_migrations VALUES (1, 'create users', 0)",
        "CREATE TABLE users (id INTEGER PRIMARY KEY)",
    )
    with pytest.raises(StoreError, match="are not imagetask's migrations"):
        check(db)


def test_an_empty_schema_migrations_beside_other_tables_is_refused(tmp_path):
    """imagetask's schema_migrations with no rows beside someone's tables is refused, not migrated over."""
    db = plain_db(
        tmp_path / "half.db",
        "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY,"
        " description TEXT NOT NULL, applied_at INTEGER NOT NULL)",
        "CREATE TABLE tasks (id TEXT PRIMARY KEY)",
    )
    with pytest.raises(StoreError, match="no migration recorded"):
        check(db)


# --- imagetask databases ------------------------------------------------------------------------


async def test_a_newer_database_is_refused(tmp_path):
    """A real imagetask database with a version-99 migration row is refused with the upgrade advice."""
    db = await imagetask_db(tmp_path / "tasks.db")
    sql(db, "INSERT INTO schema_migrations VALUES (99, 'from the future', 0)")
    before = snapshot(db)
    with pytest.raises(
        StoreError,
        match=rf"has schema version 99, newer than this imagetask understands \({SCHEMA_VERSION}\); "
        "upgrade imagetask to open it",
    ):
        check(db)
    assert snapshot(db) == before


@pytest.mark.parametrize(
    ("drop", "missing"),
    [
        ("DROP TABLE tasks", "table tasks"),
        ("DROP INDEX tasks_queue", "index tasks_queue"),
        ("ALTER TABLE tasks DROP COLUMN released", "column tasks.released"),
    ],
)
async def test_a_recorded_version_without_its_tables_is_refused(tmp_path, drop, missing):
    """A database whose recorded version's table, index or column is missing is refused, naming it."""
    db = await imagetask_db(tmp_path / "tasks.db")
    sql(db, drop)
    with pytest.raises(
        StoreError, match=f"records imagetask schema version {SCHEMA_VERSION} but has no .*{missing}"
    ):
        check(db)


async def test_a_database_with_overwritten_pages_is_refused_with_recovery_steps(tmp_path):
    """Random bytes over several pages of a real database are refused untouched, saying how to recover."""
    db = await imagetask_db(tmp_path / "tasks.db", tasks=300)
    overwrite_pages(db)
    before = snapshot(db)
    with pytest.raises(StoreError, match="is damaged") as info:
        check(db)
    message = str(info.value)
    assert "backup" in message and '".recover" | sqlite3' in message and str(db) in message
    assert snapshot(db) == before


@pytest.mark.parametrize("keep", [100, 4096, 0.5])
async def test_a_truncated_database_is_refused_as_damaged(tmp_path, keep):
    """A real database cut short (header only, first page only, half) is refused as damaged."""
    db = await imagetask_db(tmp_path / "tasks.db", tasks=100)
    data = db.read_bytes()
    db.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(StoreError, match=r"is damaged .*\.recover"):
        check(db)


async def test_a_healthy_closed_database_passes_untouched(tmp_path):
    """A closed healthy database passes, bytes kept and no -wal or -shm left; one bad page is then refused."""
    db = await imagetask_db(tmp_path / "tasks.db", tasks=300)
    before = snapshot(db)
    check(db)
    assert snapshot(db) == before
    overwrite_pages(db, count=1)
    with pytest.raises(StoreError, match="is damaged"):
        check(db)


async def test_a_healthy_database_open_elsewhere_passes_and_its_wal_is_read(tmp_path):
    """A database open in a TaskManager and a WAL connection passes, and rows only in the WAL are seen."""
    db = await imagetask_db(tmp_path / "tasks.db")
    async with TaskManager(db, provider=FakeProvider(), workers=False) as tm:
        for i in range(50):
            await tm.submit(f"prompt {i}")
        other = sqlite3.connect(db, isolation_level=None)
        try:
            other.execute("PRAGMA wal_autocheckpoint = 0")
            other.execute("BEGIN")
            other.execute("SELECT count(*) FROM tasks").fetchone()  # holds a read transaction open
            assert Path(f"{db}-wal").exists()
            check(db)
            other.execute("COMMIT")
            other.execute("INSERT INTO schema_migrations VALUES (99, 'from the future', 0)")
            with pytest.raises(StoreError, match="newer than this imagetask"):
                check(db)
            other.execute("DELETE FROM schema_migrations WHERE version = 99")
            check(db)
        finally:
            other.close()
        assert (await tm.poll((await tm.submit("still works")).id)).status is imagetask.TaskStatus.QUEUED


async def test_commits_a_killed_process_left_in_the_wal_are_read(tmp_path):
    """Commits left only in the -wal by a killed process are seen (here a newer version), files untouched."""
    db = await imagetask_db(tmp_path / "tasks.db")
    die_mid_write(db, "INSERT INTO schema_migrations VALUES (99, 'from the future', 0)", commit=True)
    assert Path(f"{db}-wal").stat().st_size > 0
    before = snapshot(db)
    with pytest.raises(StoreError, match="has schema version 99"):
        check(db)
    after = snapshot(db)
    assert after.keys() == before.keys()
    assert after[db.name] == before[db.name] and after[f"{db.name}-wal"] == before[f"{db.name}-wal"]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="lists open files through /proc")
@pytest.mark.parametrize("make", [another_app, rails])
def test_a_refusal_leaves_no_file_open(tmp_path, make: Callable[[Path], Path]):
    """A refused database is closed again: no file descriptor of the process points at it or beside it."""
    db = make(tmp_path / "x.db")
    with pytest.raises(StoreError):
        check(db)
    fds = Path("/proc/self/fd")
    open_paths = set()
    for fd in fds.iterdir():
        try:
            open_paths.add(os.readlink(fd))
        except OSError:
            pass
    assert not [p for p in open_paths if p.startswith(str(db))]


# --- the bounded check of big files -------------------------------------------------------------


async def test_a_big_file_is_checked_table_by_table(tmp_path):
    """Past the whole-check size, tables are checked one by one: healthy passes, damaged is refused."""
    db = await imagetask_db(tmp_path / "tasks.db", tasks=300)
    check(db, full_check_max_bytes=0)
    overwrite_pages(db)
    with pytest.raises(StoreError, match="is damaged"):
        check(db, full_check_max_bytes=0)


async def test_a_check_cut_short_by_its_budget_logs_what_it_left_and_passes(tmp_path, caplog):
    """When the budget runs out mid-check the file is not refused and the unchecked tables are logged."""
    db = await imagetask_db(tmp_path / "tasks.db", tasks=100)
    # 40 MB of someone's own table beside imagetask's: its check takes far longer than 10 ms.
    sql(
        db,
        "CREATE TABLE blobs AS WITH RECURSIVE n(i) AS"
        " (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20000)"
        " SELECT i, randomblob(2000) AS b FROM n",
    )
    with caplog.at_level(logging.INFO, logger="imagetask"):
        check(db, full_check_max_bytes=0, budget=0.01)
    (record,) = [r for r in caplog.records if "unchecked" in r.getMessage()]
    message = record.getMessage()
    assert "checked tables sqlite_master" in message
    assert message.split("left ")[1].split(" unchecked")[0].endswith("blobs")
    assert "PRAGMA quick_check" in message


# --- through TaskManager.open -------------------------------------------------------------------


async def damaged(db: Path) -> Path:
    await imagetask_db(db, tasks=300)
    overwrite_pages(db)
    return db


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (another_app, "not an imagetask one"),
        (rails, "not an imagetask one"),
        (golang_migrate, "not an imagetask one"),
        (damaged, "is damaged"),
    ],
    ids=["another-app", "rails", "golang-migrate", "damaged"],
)
async def test_task_manager_open_refuses_before_writing(tmp_path, make, match):
    """TaskManager.open refuses a foreign or damaged file with its bytes and the files beside it unchanged."""
    db = tmp_path / "tasks.db"
    made = make(db)
    if not isinstance(made, Path):
        await made
    before = snapshot(db)
    tm = TaskManager(db, provider=FakeProvider())
    try:
        with pytest.raises(StoreError, match=match):
            await tm.open()
    finally:
        await tm.aclose()
    assert snapshot(db) == before
