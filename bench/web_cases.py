"""The web door's benchmark cases (registered into cases.py's CASES): requests per second
through uvicorn against a bare Starlette route, and a thousand open event streams."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from imagetask import GenerationRequest, TaskManager
from imagetask.providers import FakeProvider

HERE = Path(__file__).parent
#: Requests in flight at once from the load generator (one process, one event loop).
CLIENTS = 16


@contextlib.contextmanager
def _server(kind: str, db: Path, *extra: str) -> Any:
    """A server process of ``kind`` on a free port of 127.0.0.1; (base URL, pid)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    port = sock.getsockname()[1]
    cmd = [sys.executable, str(HERE / "web_server.py"), kind, str(db), str(sock.fileno()), *extra]
    proc = subprocess.Popen(cmd, pass_fds=[sock.fileno()])
    sock.close()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(base + "/openapi.json", timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"the {kind} server did not start") from None
                time.sleep(0.05)
        yield base, proc.pid
    finally:
        proc.terminate()
        proc.wait(10)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def _load(base: str, count: int, request: Callable[[httpx.AsyncClient, int], Any]) -> dict[str, float]:
    """``count`` requests from CLIENTS coroutines over keep-alive connections: requests/s and latency."""
    samples: list[float] = []
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client:
        for i in range(min(count, 50)):  # warm up: connections, caches, the server's first reads
            (await request(client, i)).raise_for_status()
        counter = iter(range(count))

        async def worker() -> None:
            for i in counter:
                started = time.perf_counter()
                response = await request(client, i)
                samples.append(time.perf_counter() - started)
                if response.status_code >= 400:
                    raise RuntimeError(f"{response.status_code}: {response.text[:200]}")

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CLIENTS)))
        elapsed = time.perf_counter() - start
    samples.sort()
    return {
        "ops": count / elapsed,
        "p50_us": samples[len(samples) // 2] * 1e6,
        "p99_us": samples[int(len(samples) * 0.99)] * 1e6,
    }


def _seeded(tmp: Path, count: int = 1000) -> tuple[Path, list[str], str]:
    """A database with ``count`` succeeded tasks of alice, and alice's token."""
    db = tmp / "web.db"

    async def seed() -> tuple[list[str], str]:
        async with TaskManager(db, provider=FakeProvider(), concurrency=16, per_owner=16) as tm:
            tasks = await tm.submit_many([GenerationRequest(f"p{i}", owner="alice") for i in range(count)])
            async for _ in tm.as_completed([t.id for t in tasks]):
                pass
            return [t.id for t in tasks], await tm.tokens.create("alice")

    ids, token = asyncio.run(seed())
    return db, ids, token


def register(case: Callable[[str, str], Callable[[Any], Any]], n_ops: Callable[..., int]) -> None:
    @case("starlette.poll", "floor: GET of a bare Starlette route doing the same task read (stdlib), uvicorn")
    def starlette_poll(tmp: Path, quick: bool) -> dict[str, float]:
        db, ids, _ = _seeded(tmp, 200 if quick else 1000)
        with _server("bare", db) as (base, _pid):
            return asyncio.run(
                _load(base, n_ops(quick, 5000), lambda c, i: c.get(f"/api/tasks/{ids[i % len(ids)]}"))
            )

    @case("web.poll", "GET /api/tasks/{id} with a bearer token (token check, read, task JSON), uvicorn")
    def web_poll(tmp: Path, quick: bool) -> dict[str, float]:
        db, ids, token = _seeded(tmp, 200 if quick else 1000)
        headers = {"Authorization": f"Bearer {token}"}
        with _server("imagetask", db) as (base, _pid):
            return asyncio.run(
                _load(
                    base,
                    n_ops(quick, 5000),
                    lambda c, i: c.get(f"/api/tasks/{ids[i % len(ids)]}", headers=headers),
                )
            )

    @case("web.submit", "POST /api/tasks (JSON) with a bearer token, no workers, uvicorn")
    def web_submit(tmp: Path, quick: bool) -> dict[str, float]:
        db, _, token = _seeded(tmp, 10)
        headers = {"Authorization": f"Bearer {token}"}
        with _server("imagetask", db) as (base, _pid):
            return asyncio.run(
                _load(
                    base,
                    n_ops(quick, 3000),
                    lambda c, i: c.post("/api/tasks", json={"prompt": f"p{i}"}, headers=headers),
                )
            )

    @case(
        "web.sse_streams", "1,000 open event streams (50 quick), one owner each, each told of its task's end"
    )
    def web_sse(tmp: Path, quick: bool) -> dict[str, float]:
        return asyncio.run(_streams(tmp, 50 if quick else 1000))


async def _streams(tmp: Path, count: int) -> dict[str, float]:
    db = tmp / "sse.db"
    async with TaskManager(db, provider=FakeProvider(), workers=False) as tm:
        tokens = [await tm.tokens.create(f"owner{i}") for i in range(count)]
    latency = 3.0
    with _server("sse", db, str(latency)) as (base, pid):
        rss_before = _rss_mb(pid)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        told: dict[str, float] = {}
        opened = asyncio.Event()
        open_count = 0
        async with httpx.AsyncClient(base_url=base, limits=limits, timeout=None) as client:

            async def listen(token: str) -> None:
                nonlocal open_count
                headers = {"Authorization": f"Bearer {token}"}
                async with client.stream("GET", "/api/stream", headers=headers) as stream:
                    lines = stream.aiter_lines()
                    await anext(lines)  # subscribed
                    open_count += 1
                    if open_count == count:
                        opened.set()
                    async for line in lines:
                        if line.startswith("data: "):
                            message = json.loads(line[6:])
                            if message["event"] == "succeeded":
                                told[message["task_id"]] = time.time()
                                return

            listeners = [asyncio.create_task(listen(t)) for t in tokens]
            await asyncio.wait_for(opened.wait(), 120)
            rss_open = _rss_mb(pid)
            ids = []
            for token in tokens:  # one submit per owner, through the API
                r = await client.post(
                    "/api/tasks", json={"prompt": "p"}, headers={"Authorization": f"Bearer {token}"}
                )
                ids.append(r.json()["id"])
            await asyncio.wait_for(asyncio.gather(*listeners), 120)
    async with TaskManager(db, provider=FakeProvider(), workers=False) as tm:
        finished = {t: (await tm.poll(t)).finished_at.timestamp() for t in ids}  # type: ignore[union-attr]
    delays = sorted(told[t] - finished[t] for t in ids)
    return {
        "streams": count,
        "last_told_after_last_commit_ms": (max(told.values()) - max(finished.values())) * 1000,
        "delay_p50_ms": delays[len(delays) // 2] * 1000,
        "delay_max_ms": delays[-1] * 1000,
        "server_kb_per_stream": (rss_open - rss_before) * 1024 / count,
    }
