"""The imagetask command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from imagetask._cli import main
from imagetask._store import SCHEMA_VERSION


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
    assert (tmp_path / "sheet.png").exists() and "contact sheet" in out
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


# -- the full command, run as a user would --------------------------------------------------


def cli(
    home, *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """`imagetask --home HOME ARGS...` in a new process (no API key unless ``env`` sets one)."""
    import os

    environ = {k: v for k, v in os.environ.items() if k not in ("GEMINI_API_KEY", "GOOGLE_API_KEY")}
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "imagetask._cli", "--home", str(home), *args],
        capture_output=True, text=True, timeout=timeout, env=environ,
    )  # fmt: skip


def test_generate_offline_prints_json_with_task_field_names(tmp_path):
    """`generate --provider fake --json` runs the work and prints the task: Task's field names,
    ISO 8601 UTC times, images with path, mime, size and hash."""
    import json

    done = cli(
        tmp_path, "generate", "a red boat", "--n", "2", "--provider", "fake", "--latency", "0.1", "--json"
    )
    assert done.returncode == 0, done.stderr
    (task,) = json.loads(done.stdout)
    assert task["status"] == "succeeded" and task["model"] == "gemini-2.5-flash-image"
    assert task["created_at"].endswith("Z") and task["finished_at"].endswith("Z")
    assert [sorted(im) for im in task["images"]] == [
        ["height", "mime", "path", "sha256", "size", "width"]
    ] * 2
    assert all(Path(im["path"]).exists() for im in task["images"])


def test_work_commands_without_a_key_say_how_to_set_one(tmp_path):
    """`generate` with no API key and no --provider exits 2 saying how to set a key."""
    done = cli(tmp_path, "generate", "needs a key")
    assert done.returncode == 2
    assert "GEMINI_API_KEY" in done.stderr and "--provider fake" in done.stderr


def test_submit_list_show_events_wait_and_cancel(tmp_path):
    """--no-wait prints the id; ls, show and events read it (show calls the cost a price,
    charged only with credits on); wait with a provider runs it; cancel ends another; waiting
    on a cancelled task exits 1."""
    import json

    first = cli(tmp_path, "generate", "later", "--no-wait").stdout.strip()
    second = cli(tmp_path, "generate", "never", "--no-wait").stdout.strip()
    pending = json.loads(cli(tmp_path, "ls", "--pending", "--json").stdout)
    assert [t["id"] for t in pending] == [second, first] and {t["status"] for t in pending} == {"queued"}
    shown = cli(tmp_path, "show", first).stdout
    assert "status:      queued" in shown
    assert "cost:        1 credit(s) (its price; charged only when credits are on)" in shown
    assert "no transitions yet" in cli(tmp_path, "events", first).stderr
    cancelled = cli(tmp_path, "cancel", second)
    assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout
    waited = cli(tmp_path, "wait", first, "--provider", "fake", "--latency", "0")
    assert waited.returncode == 0, waited.stderr
    assert Path(waited.stdout.strip()).exists()
    kinds = [e["kind"] for e in json.loads(cli(tmp_path, "events", first, "--json").stdout)]
    assert kinds == ["claimed", "succeeded"]
    assert cli(tmp_path, "wait", second).returncode == 1
    assert cli(tmp_path, "show", "01ARZ3NDEKTSV4RRFFQ69G5FAV").returncode == 3


def test_wait_times_out_with_exit_1(tmp_path):
    """`wait --timeout` on a task nobody runs gives up after that long and exits 1."""
    task_id = cli(tmp_path, "generate", "nobody runs me", "--no-wait").stdout.strip()
    done = cli(tmp_path, "wait", task_id, "--timeout", "0.3s")
    assert done.returncode == 1 and "did not finish" in done.stderr


def test_credits_prune_and_sheet(tmp_path):
    """credits grant/balance print the balance; a bad amount exits 2; prune --dry-run deletes
    nothing; ls prints a header row, then the task; sheet writes a PNG of the latest images;
    prune then says what it deleted."""
    import json

    from PIL import Image

    assert cli(tmp_path, "credits", "grant", "alice", "5").stdout.strip() == "alice: 5 credit(s)"
    assert json.loads(cli(tmp_path, "credits", "balance", "alice", "--json").stdout)["balance"] == 5
    assert cli(tmp_path, "credits", "grant", "alice", "0").returncode == 2
    cli(tmp_path, "generate", "for the sheet", "--provider", "fake", "--latency", "0")
    dry = cli(tmp_path, "prune", "--older-than", "0s", "--dry-run")
    assert "would delete 1" in dry.stdout
    header, line = cli(tmp_path, "ls").stdout.splitlines()
    assert header.split() == ["ID", "STATUS", "MODEL", "PROMPT"] and " succeeded " in line
    out = tmp_path / "sheet.png"
    made = cli(tmp_path, "sheet", "-o", str(out))
    assert made.returncode == 0 and "1 image" in made.stdout
    with Image.open(out) as picture:
        assert picture.format == "PNG" and picture.width >= 256
    pruned = cli(tmp_path, "prune", "--older-than", "0s").stdout.strip()
    assert pruned == "deleted 1 task(s), 1 image file(s), 0 orphan file(s), 0 cached thumbnail(s)"


def test_doctor_reports_health_and_never_prints_the_key(tmp_path):
    """doctor shows the schema version, integrity, counts and whether a key is set, naming the
    variable but never printing the key."""
    import json

    cli(tmp_path, "generate", "for the doctor", "--no-wait")
    secret = "AIza-not-a-real-key-0123456789"
    done = cli(tmp_path, "doctor", "--json", env={"GEMINI_API_KEY": secret})
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["schema_version"] == SCHEMA_VERSION and report["integrity"] == "ok"
    assert report["tasks"]["queued"] == 1 and report["api_key"] == "GEMINI_API_KEY"
    human = cli(tmp_path, "doctor", env={"GEMINI_API_KEY": secret})
    assert secret not in done.stdout + done.stderr + human.stdout + human.stderr


@pytest.mark.parametrize(
    "command", [["ls"], ["show", "ID"], ["events", "ID"], ["doctor"], ["credits", "balance", "alice"]]
)
def test_read_commands_do_not_import_google_genai(tmp_path, command):
    """Read commands (`ls`, `show`, `events`, `doctor`, `credits balance`), run on a home with
    a task in it, never import google-genai (start-up time matters in a shell)."""
    task_id = cli(tmp_path, "generate", "read back", "--no-wait").stdout.strip()
    args = [task_id if a == "ID" else a for a in command]
    code = (
        "import sys\n"
        "from imagetask._cli import main\n"
        f"assert main(['--home', {str(tmp_path)!r}, *{args!r}]) == 0\n"
        "assert not any(m.startswith('google.genai') for m in sys.modules), 'google-genai imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_wait_exits_1_when_any_task_did_not_succeed(tmp_path):
    """`wait A B` exits 1 when one of the tasks did not succeed (here: cancelled), though the
    other did."""
    ok = cli(tmp_path, "generate", "fine", "--no-wait").stdout.strip()
    bad = cli(tmp_path, "generate", "cancelled", "--no-wait").stdout.strip()
    assert cli(tmp_path, "cancel", bad).returncode == 0
    done = cli(tmp_path, "wait", ok, bad, "--provider", "fake", "--latency", "0")
    assert done.returncode == 1, done.stderr
    assert "status:      succeeded" in cli(tmp_path, "show", ok).stdout


def test_json_tasks_have_exactly_the_task_fields(tmp_path):
    """`--json` prints a task with exactly `Task`'s field names, and their values."""
    import attrs

    from imagetask import Task

    done = cli(tmp_path, "generate", "as json", "--provider", "fake", "--latency", "0", "--json")
    assert done.returncode == 0, done.stderr
    (task,) = json.loads(done.stdout)
    assert set(task) == {f.name for f in attrs.fields(Task)}
    assert task["attempts"] == 1 and task["status"] == "succeeded" and task["prompt"] == "as json"


@pytest.mark.slow
def test_ctrl_c_stops_watching_not_the_task(tmp_path):
    """Ctrl-C during `generate` exits 130, prints the command that resumes watching, and
    leaves the task queued (handed back) for that command to finish."""
    import os
    import signal
    import time

    environ = {k: v for k, v in os.environ.items() if k not in ("GEMINI_API_KEY", "GOOGLE_API_KEY")}
    proc = subprocess.Popen(
        # faulthandler: should it hang, SIGABRT below prints where every thread is.
        [sys.executable, "-X", "faulthandler", "-m", "imagetask._cli", "--home", str(tmp_path),
         "generate", "interrupted", "--provider", "fake", "--latency", "30"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environ,
        # A shell without job control starts background commands with SIGINT ignored, and
        # Python keeps an ignored SIGINT ignored: give the command the default a user's has.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while " running " not in (cli(tmp_path, "ls").stdout) and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        _, err = proc.communicate(timeout=30)
        pytest.fail(f"generate did not stop within 30 s of Ctrl-C; where it was:\n{err[-8000:]}")
    assert proc.returncode == 130, err
    assert "went back to the queue" in err and "--provider fake" in err  # the resume runs the work
    task_id = err.split("imagetask wait ")[1].split()[0]
    assert "status:      queued" in cli(tmp_path, "show", task_id).stdout
    assert cli(tmp_path, "wait", task_id, "--provider", "fake", "--latency", "0").returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize("signals", [1, 2])
def test_worker_stops_gracefully_on_sigterm(tmp_path, signals):
    """`imagetask worker`: one SIGTERM lets the running attempt finish (the task succeeds) and
    exits 0; a second SIGTERM hands it back at once (the task is queued again), exit 0."""
    import os
    import signal
    import time

    environ = {k: v for k, v in os.environ.items() if k not in ("GEMINI_API_KEY", "GOOGLE_API_KEY")}
    task_id = cli(tmp_path, "generate", "for the worker", "--no-wait").stdout.strip()
    # One signal: the attempt (2 s) finishes within the grace. Two: it must still be running
    # when the second arrives, however late this test saw it running (each `show` is a new
    # process): it never ends by itself.
    latency = "2" if signals == 1 else "600"
    proc = subprocess.Popen(
        [sys.executable, "-m", "imagetask._cli", "--home", str(tmp_path), "worker", "--provider", "fake",
         "--latency", latency],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environ,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while "status:      running" not in cli(tmp_path, "show", task_id).stdout and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.stderr is not None
    proc.send_signal(signal.SIGTERM)
    lines = [proc.stderr.readline()]  # its banner, then the first signal's answer
    while lines[-1] and not lines[-1].startswith("SIGTERM: no new tasks"):
        lines.append(proc.stderr.readline())
    assert lines[-1], lines  # the worker answered the first signal (not exited without a word)
    if signals == 2:
        proc.send_signal(signal.SIGTERM)  # the first was handled: this one is the second
    _, rest = proc.communicate(timeout=30)
    err = "".join(lines) + rest
    assert proc.returncode == 0, err
    status = cli(tmp_path, "show", task_id).stdout
    assert ("status:      succeeded" if signals == 1 else "status:      queued") in status


def test_generate_with_a_reference_shows_progress_and_an_eta(tmp_path):
    """`generate --image REF` copies the reference; its progress lines show status, attempt,
    elapsed time and "no estimate yet" on a fresh database, then an estimate from the tasks
    that finished before."""
    import json

    from PIL import Image

    ref = tmp_path / "ref.png"
    Image.new("RGB", (32, 32), (200, 40, 40)).save(ref)
    first = cli(
        tmp_path,
        "generate",
        "like this",
        "--image",
        str(ref),
        "--provider",
        "fake",
        "--latency",
        "0.3",
        "--json",
    )
    assert first.returncode == 0, first.stderr
    (task,) = json.loads(first.stdout)
    assert len(task["references"]) == 1 and task["status"] == "succeeded"
    assert "attempt 0" in first.stderr or "attempt 1" in first.stderr
    assert "eta no estimate yet" in first.stderr
    second = cli(tmp_path, "generate", "again", "--provider", "fake", "--latency", "0.3")
    assert "eta ~" in second.stderr


def test_risky_arguments_are_refused_before_anything_happens(tmp_path):
    """prune without a unit (7 is not 7 days), cancel with an unknown id among known ones, an
    empty --home, credits balance with an amount, ls --pending with --status, and a sheet into a
    missing folder all exit 2 or 3 and change nothing."""
    queued = cli(tmp_path, "generate", "still here", "--no-wait").stdout.strip()
    assert cli(tmp_path, "prune", "--older-than", "7").returncode == 2
    done = cli(tmp_path, "cancel", "01ARZ3NDEKTSV4RRFFQ69G5FAV", queued)
    assert done.returncode == 3 and "status:      queued" in cli(tmp_path, "show", queued).stdout
    empty = subprocess.run(
        [sys.executable, "-m", "imagetask", "--home", "", "ls"], capture_output=True, text=True, timeout=60
    )
    assert empty.returncode == 2 and "--home" in empty.stderr
    assert cli(tmp_path, "credits", "balance", "alice", "5").returncode == 2
    assert cli(tmp_path, "ls", "--pending", "--status", "failed").returncode == 2
    assert cli(tmp_path, "sheet", "-o", str(tmp_path / "missing" / "s.png")).returncode == 2
    assert not (tmp_path / "missing").exists()
