"""The imagetask command."""

from __future__ import annotations

import subprocess
import sys

import pytest

from imagetask._cli import main


def run_demo(home, *, tasks: int, latency: float, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`imagetask --home HOME demo` in a new Python process."""
    return subprocess.run(
        [sys.executable, "-m", "imagetask._cli", "--home", str(home), "demo", "--tasks", str(tasks),
         "--latency", str(latency)],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def test_demo_runs_offline_and_shows_each_state(tmp_path):
    """`imagetask demo` without an API key runs on FakeProvider, shows queued -> running ->
    succeeded, and says where the images are."""
    proc = run_demo(tmp_path, tasks=6, latency=0.2)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "FakeProvider" in out
    lines = out.splitlines()
    for task_id in {line.split()[1] for line in lines if line.strip().endswith("painting")}:
        states = [line.split()[2] for line in lines if f" {task_id} " in line]
        assert states == ["queued", "running", "succeeded"]
    assert "6 of 6 succeeded" in out
    assert str(tmp_path / "images") in out
    assert len(list((tmp_path / "images").rglob("a1-0.png"))) == 6


def test_no_command_prints_help_and_exits_2(capsys):
    """Running with no command prints usage and exits with the usage code."""
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out


def test_bad_demo_option_is_a_usage_error():
    """A bad option value exits 2 with a message naming it."""
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--tasks", "0"])
    assert exc.value.code == 2


def test_unusable_database_is_a_usage_error(tmp_path, capsys):
    """A corrupt database file exits 2 with a message naming the file."""
    (tmp_path / "tasks.db").write_text("not sqlite")
    assert main(["--home", str(tmp_path), "demo", "--tasks", "1", "--latency", "0"]) == 2
    assert str(tmp_path / "tasks.db") in capsys.readouterr().err


def test_another_apps_database_is_refused_untouched(tmp_path, capsys):
    """`imagetask demo` on another program's SQLite file exits 2 saying so, and the file is
    byte for byte what it was (not even switched to WAL)."""
    import sqlite3

    db = tmp_path / "tasks.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
    conn.commit()
    conn.close()
    before = db.read_bytes()
    assert main(["--home", str(tmp_path), "demo", "--tasks", "1", "--latency", "0"]) == 2
    assert "not an imagetask" in capsys.readouterr().err
    assert db.read_bytes() == before


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_read_only_image_folder_shows_storage_error(tmp_path, tmpfs):
    """With the image folder on a read-only file system, `imagetask demo` shows the task failing
    with storage_error and the reason (EROFS) once storage_timeout (30 s) is spent, and exits 1."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "images").symlink_to(tmpfs.path)
    tmpfs.remount(ro=True)
    proc = run_demo(home, tasks=1, latency=0, timeout=90)
    assert proc.returncode == 1, proc.stderr
    failed = [line for line in proc.stdout.splitlines() if " failed " in line]
    assert len(failed) == 1 and "[storage_error: " in failed[0] and "EROFS" in failed[0]
    assert "0 of 1 succeeded" in proc.stdout
