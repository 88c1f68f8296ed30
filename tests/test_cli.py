"""The imagetask command."""

from __future__ import annotations

import subprocess
import sys

import pytest

from imagetask._cli import main


def test_demo_runs_offline_and_shows_each_state(tmp_path):
    """`imagetask demo` without an API key runs on FakeProvider, shows queued -> running ->
    succeeded, and says where the images are."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "imagetask._cli",
            "--home",
            str(tmp_path),
            "demo",
            "--tasks",
            "6",
            "--latency",
            "0.2",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
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
