"""The commands, each an ``async def (args) -> exit code`` on the public TaskManager API."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import os
import platform
import signal
import sqlite3
import statistics
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from .. import (
    ConfigError,
    Task,
    TaskManager,
    TaskStatus,
    WaitTimeout,
    __version__,
    default_home,
)
from .._jsonout import iso_time
from ..providers import GEMINI_MODELS, FakeProvider, GeminiProvider, Provider
from . import _output
from ._sheet import write_sheet

__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_USAGE",
    "Interrupted",
    "UsageError",
]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

DB_NAME = "tasks.db"  # the layout of a data folder: tasks.db and images/

DEMO_PROMPTS = (
    "a lighthouse at dusk, oil painting",
    "a nano banana on a porcelain plate",
    "a fox reading a newspaper in the rain",
    "a paper boat on a mountain lake",
    "a robot watering tomatoes at sunrise",
    "a tiny dragon asleep in a teacup",
)


class Interrupted(Exception):
    """Ctrl-C while watching: the tasks go on; ``resume`` says how to watch them again."""

    def __init__(self, resume: str) -> None:
        super().__init__(resume)
        self.resume = resume


class UsageError(Exception):
    """A bad combination of arguments, found after parsing (exit 2)."""


def home(args: argparse.Namespace) -> Path:
    if args.home is None:
        return default_home()
    if not args.home.strip():
        raise UsageError("--home: is empty; give a folder, or leave --home out for the default")
    return Path(args.home).expanduser()


def database(args: argparse.Namespace) -> Path:
    return home(args) / DB_NAME


def work_provider(args: argparse.Namespace, *, required: bool) -> Provider | None:
    """The provider of a command that runs work: Gemini when a key is set, FakeProvider (with
    Gemini's model table) with ``--provider fake``; None (or exit 2) without either."""
    choice = getattr(args, "provider", None)
    if choice == "fake":
        return FakeProvider(latency=args.latency, models=GEMINI_MODELS)
    if choice == "gemini" or GeminiProvider.key_in_environment() is not None:
        return GeminiProvider()
    if required:
        raise ConfigError(
            "no Gemini API key: set GEMINI_API_KEY (or GOOGLE_API_KEY), or pass --provider fake "
            "to run offline on FakeProvider"
        )
    return None


def reader(args: argparse.Namespace) -> TaskManager:
    """A manager that only reads and writes the database (no workers, no key)."""
    return TaskManager(database(args), provider=FakeProvider(models=GEMINI_MODELS), workers=False)


def parse_duration(text: str, *, unit_required: bool = False) -> float:
    """``90``, ``90s``, ``15m``, ``12h``, ``7d`` or ``2w`` as seconds (for argparse); with
    ``unit_required`` a bare number is refused (``prune --older-than 7`` is not 7 days)."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    value = text.strip().lower()
    scale = units.get(value[-1:])
    if scale is None and unit_required:
        raise argparse.ArgumentTypeError(f"{text!r} has no unit; say 90s, 15m, 12h, 7d or 2w")
    number = value[:-1] if scale is not None else value
    try:
        seconds = float(number) * (scale or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration; use e.g. 90s, 15m, 12h or 7d"
        ) from None
    if not 0 <= seconds <= 1e9:
        raise argparse.ArgumentTypeError(f"{text!r}: must be from 0 to 1e9 seconds")
    return seconds


# -- read commands ----------------------------------------------------------------------------


async def ls(args: argparse.Namespace) -> int:
    if args.pending and args.status:
        raise UsageError("ls: --pending lists queued and running tasks; use it or --status, not both")
    async with reader(args) as tm:
        if args.pending:
            tasks = (await tm.pending(args.owner))[: args.limit]
        else:
            tasks = await tm.list(owner=args.owner, status=args.status, limit=args.limit)
    if args.json:
        _output.dump_json([_output.task_json(t) for t in tasks])
    elif not tasks:
        print("no tasks", file=sys.stderr)
    else:
        print(_output.TASK_HEADER)
        for task in tasks:
            print(_output.task_line(task))
    return EXIT_OK


async def show(args: argparse.Namespace) -> int:
    async with reader(args) as tm:
        task = await tm.poll(args.id)
    if args.json:
        _output.dump_json(_output.task_json(task))
    else:
        print("\n".join(_output.describe(task)))
    return EXIT_OK


async def events(args: argparse.Namespace) -> int:
    async with reader(args) as tm:
        found = await tm.events(args.id)
    if args.json:
        _output.dump_json([_output.event_json(e) for e in found])
        return EXIT_OK
    if not found:  # the submit is the task row itself, not an event
        print(f"no transitions yet: the task is queued, waiting for a worker ({args.id})", file=sys.stderr)
    for e in found:
        detail = f"  {e.detail}" if e.detail else ""
        print(f"{iso_time(e.at)}  {e.kind:<13} attempt {e.attempt}  -> {e.status.value}{detail}")
    return EXIT_OK


async def credits(args: argparse.Namespace) -> int:
    if args.action == "grant" and args.amount is None:
        raise UsageError("credits grant: give an AMOUNT (negative to take credits away)")
    if args.action == "balance" and args.amount is not None:
        raise UsageError("credits balance: takes only an OWNER (did you mean `credits grant`?)")
    async with reader(args) as tm:
        if args.action == "grant":
            balance = await tm.credits.grant(args.owner, args.amount)
        else:
            balance = await tm.credits.balance(args.owner)
    if args.json:
        _output.dump_json({"owner": args.owner, "balance": balance})
    else:
        print(f"{args.owner}: {balance} credit(s)")
    return EXIT_OK


async def cancel(args: argparse.Namespace) -> int:
    async with reader(args) as tm:
        for task_id in args.ids:  # every id must exist before any is cancelled
            await tm.poll(task_id)
        for task_id in args.ids:
            before = await tm.poll(task_id)
            task = await tm.cancel(task_id)
            print(_output.task_line(task))
            if before.done:
                print(f"{task.id}: had already {before.status.value}; not cancelled", file=sys.stderr)
    return EXIT_OK


async def prune(args: argparse.Namespace) -> int:
    async with reader(args) as tm:
        if args.dry_run:
            cutoff = time.time() - args.older_than
            count, files, before = 0, 0, None
            while True:
                page = await tm.list(limit=1000, before=before)
                for t in page:
                    if t.done and t.finished_at and t.finished_at.timestamp() < cutoff:
                        count += 1
                        files += len(t.images) + len(t.references)
                if len(page) < 1000:
                    break
                before = page[-1].id
            print(
                f"would delete {count} finished task(s) and {files} image file(s) (nothing deleted; "
                "a real run also sweeps orphan files no task points to)"
            )
            return EXIT_OK
        report = await tm.prune(args.older_than)
    print(
        f"deleted {report.tasks} task(s), {report.files} image file(s), {report.orphans} orphan file(s), "
        f"{report.thumbnails} cached thumbnail(s)"
    )
    return EXIT_OK


async def sheet(args: argparse.Namespace) -> int:
    out = Path(args.output)
    if not out.parent.is_dir():
        raise UsageError(f"-o: the folder {out.parent} does not exist")
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise UsageError(f"-o: {out.name} should end in .png, .jpg or .webp")
    async with reader(args) as tm:
        tasks = await tm.list(owner=args.owner, status=TaskStatus.SUCCEEDED, limit=args.last)
    count = await asyncio.to_thread(write_sheet, tasks, out)
    if args.json:
        _output.dump_json({"path": str(out.absolute()), "images": count})
    else:
        print(f"wrote a contact sheet of {count} image(s): {out.absolute()}")
    return EXIT_OK


async def doctor(args: argparse.Namespace) -> int:
    db = database(args)
    report: dict[str, Any] = {
        "imagetask": __version__,
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "pillow": _version("pillow"),
        "google-genai": _version("google-genai"),
        "home": str(home(args)),
        "database": str(db),
        "api_key": GeminiProvider.key_in_environment() or None,
    }
    if db.exists():
        async with reader(args) as tm:
            health = await tm.health()
        report |= {
            "images": str(health.images_root),
            "schema_version": health.schema_version,
            "integrity": health.integrity,
            "wal_bytes": health.wal_bytes,
            "tasks": dict(health.counts),
            "expired_leases": health.expired_leases,
        }
    if args.json:
        _output.dump_json(report)
    else:
        key = report["api_key"]
        lines = [
            f"imagetask {report['imagetask']} (Python {report['python']}, SQLite {report['sqlite']}, "
            f"Pillow {report['pillow']}, google-genai {report['google-genai']})",
            f"data folder:   {report['home']}",
            f"database:      {db}" + ("" if db.exists() else "  (not created yet)"),
            "API key:       "
            + (f"set in {key}" if key else "not set (GEMINI_API_KEY): work runs only with --provider fake"),
        ]
        if "integrity" in report:
            counts = ", ".join(f"{n} {s}" for s, n in report["tasks"].items())
            lines += [
                f"images:        {report['images']}",
                f"schema:        version {report['schema_version']}",
                f"integrity:     {report['integrity']}",
                f"WAL:           {report['wal_bytes']:,} bytes",
                f"tasks:         {counts}",
                f"expired leases: {report['expired_leases']} (taken back by the next worker)",
            ]
        print("\n".join(lines))
    return EXIT_OK if report.get("integrity", "ok") == "ok" else EXIT_FAILED


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


# -- commands that run work -------------------------------------------------------------------


async def generate(args: argparse.Namespace) -> int:
    provider = work_provider(args, required=not args.no_wait)
    options: dict[str, Any] = {"provider": provider or FakeProvider(models=GEMINI_MODELS)}
    async with TaskManager(database(args), workers=not args.no_wait, **options) as tm:
        task = await tm.submit(
            args.prompt,
            n=args.n,
            model=args.model,
            aspect_ratio=args.aspect_ratio,
            size=args.size,
            images=args.image or (),
            owner=args.owner,
            idempotency_key=args.key,
        )
        if args.no_wait:
            if args.json:
                _output.dump_json(_output.task_json(task))
            else:
                print(task.id)
            return EXIT_OK
        done = await watch(tm, [task.id], json_output=args.json, timeout=None, resume_flags=_flags(args))
    return _report(done, args.json)


def _flags(args: argparse.Namespace) -> str:
    """The work options to repeat in a resume command (`--provider fake --latency 1`)."""
    if getattr(args, "provider", None) == "fake":
        return f" --provider fake --latency {args.latency:g}"
    return " --provider gemini" if getattr(args, "provider", None) == "gemini" else ""


async def wait(args: argparse.Namespace) -> int:
    provider = work_provider(args, required=False)
    workers = provider is not None
    options: dict[str, Any] = {"provider": provider or FakeProvider(models=GEMINI_MODELS)}
    async with TaskManager(database(args), workers=workers, **options) as tm:
        for task_id in args.ids:
            await tm.poll(task_id)  # unknown ids fail before any waiting
        done = await watch(
            tm, args.ids, json_output=args.json, timeout=args.timeout, resume_flags=_flags(args)
        )
    return _report(done, args.json)


def _report(done: Sequence[Task], json_output: bool) -> int:
    if json_output:
        _output.dump_json([_output.task_json(t) for t in done])
    else:
        for task in done:
            for im in task.images:
                print(im.path)
    return EXIT_OK if all(t.ok for t in done) else EXIT_FAILED


async def watch(
    tm: TaskManager, ids: Sequence[str], *, json_output: bool, timeout: float | None, resume_flags: str = ""
) -> list[Task]:
    """Show each task's status, attempt, elapsed time and ETA until all end; return them.

    Raises:
        Interrupted: on Ctrl-C (the tasks go on).
        WaitTimeout: ``timeout`` passed.
    """
    resume = f"imagetask wait {' '.join(ids)}" + resume_flags
    estimates = await _estimates(tm, ids)
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        async with _live(enabled=not json_output and sys.stderr.isatty()) as show:
            while True:
                tasks = [await tm.poll(task_id) for task_id in ids]
                show(tasks, estimates)
                if all(t.done for t in tasks):
                    return tasks
                if deadline is not None and time.monotonic() >= deadline:
                    raise WaitTimeout(", ".join(t.id for t in tasks if not t.done), timeout or 0.0)
                await asyncio.sleep(0.1)
    except asyncio.CancelledError:  # Ctrl-C: asyncio.run cancels the main task
        raise Interrupted(resume) from None


async def _estimates(tm: TaskManager, ids: Sequence[str]) -> dict[str, float | None]:
    """Per task: the median run time of the latest finished tasks of its model and size."""
    recent = await tm.list(status=TaskStatus.SUCCEEDED, limit=200)
    durations: dict[tuple[str, Any], list[float]] = {}
    for t in recent:
        if t.started_at and t.finished_at:
            key = (t.model, t.params.get("size"))
            durations.setdefault(key, []).append((t.finished_at - t.started_at).total_seconds())
    out: dict[str, float | None] = {}
    for task_id in ids:
        task = await tm.poll(task_id)
        samples = durations.get((task.model, task.params.get("size")))
        out[task.id] = statistics.median(samples) if samples else None
    return out


def _progress(task: Task, estimate: float | None) -> tuple[str, str]:
    """(elapsed, ETA) of a task as text: time since it started (or was submitted), and the
    median run time of earlier tasks like it minus that, or "no estimate yet"."""
    start = task.started_at or task.created_at
    end = task.finished_at.timestamp() if task.finished_at else time.time()
    elapsed = end - start.timestamp() if start else 0.0
    if task.done:
        eta = "-"
    elif estimate is None:
        eta = "no estimate yet"
    else:
        left = estimate - (elapsed if task.started_at else 0.0)
        eta = f"~{max(1, round(left))} s" if left > 0 else "any moment (past the usual time)"
    return f"{elapsed:.1f} s", eta


@contextlib.asynccontextmanager
async def _live(*, enabled: bool) -> AsyncIterator[Any]:
    """A live table on a terminal (rich); plain lines, one per change, elsewhere."""
    if not enabled:
        seen: dict[str, tuple[TaskStatus, int]] = {}

        def plain(tasks: Sequence[Task], estimates: dict[str, float | None]) -> None:
            for t in tasks:
                if seen.get(t.id) != (t.status, t.attempts):
                    seen[t.id] = (t.status, t.attempts)
                    elapsed, eta = _progress(t, estimates.get(t.id))
                    line = f"{t.id}  {t.status.value:<9}  attempt {t.attempts}  {elapsed}  eta {eta}"
                    print(
                        f"{line}  {t.prompt[:40]}"
                        + (f"  [{t.error.code}: {t.error.message}]" if t.error else ""),
                        file=sys.stderr,
                        flush=True,
                    )

        yield plain
        return
    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

    def table(tasks: Sequence[Task], estimates: dict[str, float | None]) -> Table:
        grid = Table(box=None, pad_edge=False)
        grid.add_column("task", no_wrap=True, min_width=26)  # the id `imagetask wait` needs
        for column in ("status", "attempt", "elapsed", "eta", "prompt"):
            grid.add_column(column, overflow="ellipsis", no_wrap=True)
        for t in tasks:
            elapsed, eta = _progress(t, estimates.get(t.id))
            status = t.status.value + (f" ({t.error.code})" if t.error else "")
            grid.add_row(t.id, status, str(t.attempts), elapsed, eta, t.prompt[:40])
        return grid

    with Live(console=Console(stderr=True), refresh_per_second=8, transient=False) as live:
        yield lambda tasks, estimates: live.update(table(tasks, estimates))


async def demo(args: argparse.Namespace) -> int:
    if GeminiProvider.key_in_environment() is not None:
        provider: Provider = GeminiProvider()
        label = "Gemini (an API key is set)"
    else:
        provider = FakeProvider(latency=args.latency)
        label = "the offline FakeProvider (no GEMINI_API_KEY set)"
    count = args.tasks
    db = database(args)
    print(
        f"imagetask {__version__} demo: {count} task{'s' if count != 1 else ''} for owner 'demo' on {label}"
    )
    print(f"database: {db}")
    async with TaskManager(db, provider=provider, concurrency=4, per_owner=4, poll_interval=0.1) as tm:
        started = time.monotonic()
        tasks = await tm.submit_many(
            [{"prompt": DEMO_PROMPTS[i % len(DEMO_PROMPTS)], "owner": "demo"} for i in range(count)]
        )
        print(
            f"submitted {count} task{'s' if count != 1 else ''} in "
            f"{1000 * (time.monotonic() - started):.1f} ms (at most 4 run at once for one owner; "
            "the rest wait queued)\n"
        )
        seen: dict[str, TaskStatus] = {}
        for task in tasks:  # what the submit answered: queued, before any work
            seen[task.id] = task.status
            _print_change(task, 0.0)
        ids = [t.id for t in tasks]
        while True:
            current = [await tm.poll(task_id) for task_id in ids]  # database reads only
            for task in current:
                if seen.get(task.id) is not task.status:
                    seen[task.id] = task.status
                    _print_change(task, time.monotonic() - started)
            if all(task.done for task in current):
                break
            await asyncio.sleep(0.05)
        ok = [t for t in current if t.ok]
        print(f"\n{len(ok)} of {count} succeeded in {time.monotonic() - started:.1f} s.")
        if ok:
            print(f"images are in {tm.images_root}, e.g.\n  {ok[0].images[0].path}")
            out = home(args) / "sheet.png"
            await asyncio.to_thread(write_sheet, ok, out)
            print(f"contact sheet of them all: {out}")
        return EXIT_OK if len(ok) == count else EXIT_FAILED


def _print_change(task: Task, elapsed: float) -> None:
    line = f"{elapsed:6.2f}s  {task.id}  {task.status.value:<9}  {task.prompt[:40]}"
    if task.error is not None:
        line += f"  [{task.error.code}: {task.error.message}]"
    if task.ok:
        image = task.images[0]
        line += f"  -> {image.width}x{image.height} {image.mime}"
    print(line, flush=True)


async def worker(args: argparse.Namespace) -> int:
    provider = work_provider(args, required=True)
    assert provider is not None
    loop = asyncio.get_running_loop()
    first, second = asyncio.Event(), asyncio.Event()

    def on_signal(number: int) -> None:
        if not first.is_set():
            first.set()
            print(
                f"{signal.Signals(number).name}: no new tasks; letting running attempts finish "
                f"(up to {args.grace:g} s); send it again to hand them back now",
                file=sys.stderr,
                flush=True,
            )
        else:
            second.set()
            print("handing the running attempts back now", file=sys.stderr, flush=True)

    tm = TaskManager(
        database(args), provider=provider, concurrency=args.concurrency, per_owner=args.per_owner
    )
    for number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(number, on_signal, number)
    try:
        await tm.open()
        print(
            f"imagetask worker {os.getpid()} on {tm.path} ({provider.name}, concurrency "
            f"{args.concurrency}, per owner {args.per_owner}); SIGTERM or Ctrl-C stops it",
            file=sys.stderr,
            flush=True,
        )
        await first.wait()
        closing = asyncio.ensure_future(tm.aclose(cancel_running=False, grace=args.grace))
        hurry = asyncio.ensure_future(second.wait())
        await asyncio.wait([closing, hurry], return_when=asyncio.FIRST_COMPLETED)
        hurry.cancel()
        if not closing.done():
            await tm.aclose(cancel_running=True)  # ends the graceful close at once
        await closing
    finally:
        for number in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(number)
        await tm.aclose(cancel_running=True)
    print("worker stopped", file=sys.stderr, flush=True)
    return EXIT_OK
