"""`imagetask token` and `imagetask serve`: a real command, a real server process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx

from imagetask._cli import main


def _token(env: dict[str, str]) -> str:
    """`imagetask token create alice` in a new process; the token it prints."""
    return subprocess.run(
        [sys.executable, "-m", "imagetask", "token", "create", "alice"],
        env=env, capture_output=True, text=True, check=True, timeout=60,
    ).stdout.strip()  # fmt: skip


def _serve(env: dict[str, str], *options: str) -> tuple[subprocess.Popen[str], str]:
    """`imagetask serve` on a free port of 127.0.0.1, once it answers; (process, base URL)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "imagetask", "serve", "--port", str(port), *options]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(base + "/openapi.json", timeout=1)
            return proc, base
        except httpx.TransportError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise AssertionError(f"imagetask serve did not start: {proc.communicate()[1]}") from None
            time.sleep(0.1)


def test_token_create_list_revoke(tmp_path, capsys):
    """create prints a token (and says it is shown once); list shows its id and owner but
    never the secret; revoke by id marks it revoked; revoking again exits 2."""
    home = str(tmp_path)
    assert main(["--home", home, "token", "create", "alice", "--label", "ci"]) == 0
    out = capsys.readouterr()
    token = out.out.strip()
    assert token.startswith("itk_") and "shown only this once" in out.err
    assert main(["--home", home, "token", "list", "--json"]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert listed["owner"] == "alice" and listed["label"] == "ci" and listed["revoked_at"] is None
    assert token.split("_", 2)[2] not in json.dumps(listed)  # the whole secret (it may hold "_")
    assert main(["--home", home, "token", "revoke", listed["id"]]) == 0
    assert main(["--home", home, "token", "revoke", listed["id"]]) == 2
    assert main(["--home", home, "token", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["revoked_at"] is not None


def test_serve_answers_with_a_token_and_stops_on_sigterm(tmp_path):
    """`imagetask serve --provider fake` serves the API: a token from `token create` signs a
    submit that then succeeds; SIGTERM shuts the server down cleanly within seconds (uvicorn
    then ends the process by that same signal, as servers do), and the token is never logged."""
    env = {**os.environ, "IMAGETASK_HOME": str(tmp_path)}
    token = _token(env)
    proc, base = _serve(env, "--provider", "fake", "--latency", "0.1")
    try:
        headers = {"Authorization": f"Bearer {token}"}
        task = httpx.post(base + "/api/tasks", json={"prompt": "a kite"}, headers=headers).json()
        for _ in range(100):
            done = httpx.get(f"{base}/api/tasks/{task['id']}", headers=headers).json()
            if done["status"] == "succeeded":
                break
            time.sleep(0.1)
        assert done["status"] == "succeeded" and done["owner"] == "alice"
        assert httpx.get(base + "/api/credits").status_code == 401
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    assert proc.returncode in (0, -signal.SIGTERM), err
    assert "Application shutdown complete" in err and token not in err


def test_serve_without_workers_needs_no_key(tmp_path):
    """`imagetask serve --no-workers` with no API key starts (it only validates against
    Gemini's model table; `imagetask worker` runs the tasks) and accepts a Gemini submit."""
    env = {k: v for k, v in os.environ.items() if k not in ("GEMINI_API_KEY", "GOOGLE_API_KEY")}
    env["IMAGETASK_HOME"] = str(tmp_path)
    token = _token(env)
    proc, base = _serve(env, "--no-workers")
    try:
        r = httpx.post(
            base + "/api/tasks",
            json={"prompt": "x", "model": "gemini-2.5-flash-image"},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert r.status_code == 202 and r.json()["status"] == "queued", r.text
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    assert "no workers" in err


def test_token_list_has_a_header_and_the_creation_time(tmp_path, capsys):
    """`token list` prints a header row, then one line per token with its creation time."""
    assert main(["--home", str(tmp_path), "token", "create", "bob"]) == 0
    capsys.readouterr()
    assert main(["--home", str(tmp_path), "token", "list"]) == 0
    header, line = capsys.readouterr().out.splitlines()
    assert header.split() == ["ID", "OWNER", "CREATED", "STATE", "LABEL"]
    assert " bob " in line and "valid" in line and "Z" in line
