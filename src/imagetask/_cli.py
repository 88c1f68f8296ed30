"""The ``imagetask`` command.

Exit codes: 0 ok, 1 a task failed, 2 usage error, 3 not found, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from . import __version__, _config
from ._exceptions import ConfigError, ImageTaskError, StoreError, TaskNotFound, ValidationError
from ._manager import TaskManager
from ._models import Task, TaskStatus
from .providers.base import Provider
from .providers.fake import FakeProvider

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

DEMO_PROMPTS = (
    "a lighthouse at dusk, oil painting",
    "a nano banana on a porcelain plate",
    "a fox reading a newspaper in the rain",
    "a paper boat on a mountain lake",
    "a robot watering tomatoes at sunrise",
    "a tiny dragon asleep in a teacup",
)


def _home(args: argparse.Namespace) -> Path:
    return Path(args.home).expanduser() if args.home else _config.default_home()


def _demo_provider(latency: float) -> tuple[Provider, str]:
    if _config.api_key_from_env() is not None:
        from .providers.gemini import GeminiProvider

        return GeminiProvider(), "Gemini (an API key is set)"
    return FakeProvider(latency=latency), "the offline FakeProvider (no GEMINI_API_KEY set)"


async def _demo(args: argparse.Namespace) -> int:
    home = _home(args)
    provider, label = _demo_provider(args.latency)
    count = args.tasks
    print(f"imagetask {__version__} demo: {count} tasks for owner 'demo' on {label}")
    print(f"database: {home / _config.DB_NAME}")
    async with TaskManager(
        home / _config.DB_NAME, provider=provider, concurrency=4, per_owner=4, poll_interval=0.1
    ) as tm:
        started = time.monotonic()
        tasks = [
            await tm.submit(DEMO_PROMPTS[i % len(DEMO_PROMPTS)], owner="demo", metadata={"demo": True})
            for i in range(count)
        ]
        print(
            f"submitted {count} tasks in {1000 * (time.monotonic() - started):.1f} ms "
            f"(at most 4 run at once for one owner; the rest wait queued)\n"
        )
        seen: dict[str, TaskStatus] = {}
        for task in tasks:  # what each submit answered: queued, before any work
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
        return EXIT_OK if len(ok) == count else EXIT_FAILED


def _print_change(task: Task, elapsed: float) -> None:
    line = f"{elapsed:6.2f}s  {task.id}  {task.status.value:<9}  {task.prompt[:40]}"
    if task.error is not None:
        line += f"  [{task.error.code}: {task.error.message}]"
    if task.ok:
        image = task.images[0]
        line += f"  -> {image.width}x{image.height} {image.mime}"
    print(line, flush=True)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(
        prog="imagetask",
        description="Durable background image generation backed by SQLite.",
    )
    parser.add_argument("--version", action="version", version=f"imagetask {__version__}")
    parser.add_argument(
        "--home",
        help=f"data folder holding {_config.DB_NAME} and images/ "
        f"(default: ${_config.HOME_ENV}, else {_config.default_home()})",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="run the seed's flow: submit tasks, watch them finish")
    demo.add_argument("--tasks", type=int, default=6, help="how many tasks to submit (default 6)")
    demo.add_argument(
        "--latency",
        type=float,
        default=1.5,
        help="seconds each fake generation takes (default 1.5; ignored with an API key)",
    )
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    if args.command == "demo" and not 1 <= args.tasks <= 1000:
        parser.error("--tasks: must be from 1 to 1000")
    if args.command == "demo" and args.latency < 0:
        parser.error("--latency: must be >= 0 seconds")
    try:
        return int(asyncio.run(args.func(args)))
    except KeyboardInterrupt:
        print("interrupted; queued tasks stay in the database and resume next time", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`imagetask demo | head`): stop quietly, as other tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILED
    except TaskNotFound as exc:
        print(f"imagetask: {exc}", file=sys.stderr)
        return EXIT_NOT_FOUND
    except (ValidationError, ConfigError, StoreError) as exc:
        print(f"imagetask: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ImageTaskError as exc:
        print(f"imagetask: {exc}", file=sys.stderr)
        return EXIT_FAILED


def _entry() -> None:  # pragma: no cover - console script shim
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
