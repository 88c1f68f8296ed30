"""The ``imagetask`` command: argument parsing, and one exit code per outcome.

Exit codes: 0 ok, 1 a task failed, 2 usage error (an unusable database included), 3 not
found, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence

from .. import (
    ConfigError,
    ImageTaskError,
    InsufficientCredits,
    StoreError,
    TaskNotFound,
    TaskStatus,
    ValidationError,
    WaitTimeout,
    __version__,
    default_home,
)
from . import _commands as commands
from . import _web as web
from ._commands import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_NOT_FOUND, EXIT_USAGE

__all__ = ["build_parser", "main"]


def _work_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--provider",
        choices=["gemini", "fake"],
        help="gemini (the default when GEMINI_API_KEY is set) or fake: offline pictures, "
        "with Gemini's model table",
    )
    parser.add_argument(
        "--latency", type=_seconds, default=1.0, help="seconds each fake image takes (default 1)"
    )


def _seconds(text: str) -> float:
    return commands.parse_duration(text)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(
        prog="imagetask",
        description="Durable background image generation (Gemini 'Nano Banana'), backed by SQLite. "
        "Tasks live in a database; generations run in the background and survive crashes.",
    )
    parser.add_argument("--version", action="version", version=f"imagetask {__version__}")
    parser.add_argument(
        "--home",
        help=f"data folder holding tasks.db and images/ (default: $IMAGETASK_HOME, else {default_home()})",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("generate", help="submit a prompt, watch it run, print the image paths")
    p.add_argument("prompt")
    p.add_argument("--n", type=_positive, default=1, help="how many images (1-8)")
    p.add_argument("--model", help="model id (default: the provider's)")
    p.add_argument("--aspect-ratio", help="e.g. 16:9")
    p.add_argument("--size", help="1K, 2K or 4K where the model supports it")
    p.add_argument("--image", action="append", metavar="REF", help="a reference image file (repeatable)")
    p.add_argument("--owner", default="default")
    p.add_argument("--key", help="idempotency key: the same key returns the first task")
    p.add_argument("--no-wait", action="store_true", help="print the task id and return at once")
    p.add_argument("--json", action="store_true", help="print the task(s) as JSON")
    _work_options(p)
    p.set_defaults(func=commands.generate)

    p = sub.add_parser("ls", help="list tasks, newest first")
    p.add_argument("--pending", action="store_true", help="only queued and running tasks")
    p.add_argument("--owner")
    p.add_argument("--status", choices=[s.value for s in TaskStatus])
    p.add_argument("--limit", type=_positive, default=20, help="at most this many (default 20)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=commands.ls)

    for name, func, helptext in (
        ("show", commands.show, "one task in full"),
        ("events", commands.events, "a task's transitions (claims, retries, the end)"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("id")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=func)

    p = sub.add_parser("wait", help="watch tasks until they end (running the work, if a provider is set)")
    p.add_argument("ids", nargs="+", metavar="ID")
    p.add_argument("--timeout", type=_seconds, help="give up after this long (e.g. 90s, 10m); exit 1")
    p.add_argument("--json", action="store_true")
    _work_options(p)
    p.set_defaults(func=commands.wait)

    p = sub.add_parser("cancel", help="cancel queued or running tasks (refunds credits)")
    p.add_argument("ids", nargs="+", metavar="ID")
    p.set_defaults(func=commands.cancel)

    p = sub.add_parser("prune", help="delete finished tasks older than a duration, and orphan files")
    p.add_argument(
        "--older-than",
        type=lambda text: commands.parse_duration(text, unit_required=True),
        required=True,
        help="e.g. 7d, 12h, 30m (a unit is required)",
    )
    p.add_argument("--dry-run", action="store_true", help="count what would go; delete nothing")
    p.set_defaults(func=commands.prune)

    p = sub.add_parser("credits", help="grant credits to an owner, or show a balance")
    p.add_argument("action", choices=["grant", "balance"])
    p.add_argument("owner")
    p.add_argument("amount", nargs="?", type=int)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=commands.credits)

    p = sub.add_parser("doctor", help="versions, paths, database health, whether an API key is set")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=commands.doctor)

    p = sub.add_parser("sheet", help="a labelled grid of the latest images, as one PNG")
    p.add_argument("--owner")
    p.add_argument("--last", type=_positive, default=24, help="how many tasks (default 24)")
    p.add_argument("-o", "--output", default="sheet.png", help="where to write it (default sheet.png)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=commands.sheet)

    p = sub.add_parser("worker", help="run workers until SIGTERM or Ctrl-C (the production set-up)")
    p.add_argument("--concurrency", type=_positive, default=4, help="generations at once (default 4)")
    p.add_argument("--per-owner", type=_positive, default=4, help="running per owner (default 4)")
    p.add_argument("--grace", type=_seconds, default=30.0, help="seconds to let attempts finish (30)")
    _work_options(p)
    p.set_defaults(func=commands.worker)

    p = sub.add_parser("serve", help="run the web app: JSON API, live page, event stream (uvicorn)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=_positive, default=8000, help="port (default 8000)")
    p.add_argument(
        "--workers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run generations in this process (default); --no-workers when `imagetask worker` runs them",
    )
    p.add_argument("--concurrency", type=_positive, default=4, help="generations at once (default 4)")
    p.add_argument("--per-owner", type=_positive, default=4, help="running per owner (default 4)")
    p.add_argument(
        "--max-pending", type=_positive, default=100, help="unfinished tasks per owner before 429 (100)"
    )
    p.add_argument("--credits", action="store_true", help="charge each task's cost to its owner")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument(
        "--access-log", action=argparse.BooleanOptionalAction, default=False, help="log every request"
    )
    _work_options(p)
    p.set_defaults(func=web.serve)

    p = sub.add_parser("token", help="API tokens of the web app: create (shown once), revoke, list")
    p.add_argument("action", choices=["create", "revoke", "list"])
    p.add_argument("target", nargs="?", help="create: the OWNER; revoke: the token or its id; list: an owner")
    p.add_argument("--label", help="create: a note to tell tokens apart ('ci', 'laptop')")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=web.token)

    p = sub.add_parser(
        "demo",
        help="try it: submit a few tasks, watch each go queued -> running -> succeeded, "
        "and get a contact sheet (offline without an API key)",
    )
    p.add_argument("--tasks", type=_positive, default=6, help="how many tasks to submit (default 6)")
    p.add_argument(
        "--latency", type=_seconds, default=1.5, help="seconds each fake image takes (default 1.5)"
    )
    p.set_defaults(func=commands.demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    if args.command == "demo" and args.tasks > 1000:
        parser.error("--tasks: must be from 1 to 1000")
    try:
        return int(asyncio.run(args.func(args)))
    except commands.Interrupted as exc:
        print(
            "\nstopped watching. Attempts this process was running went back to the queue (they "
            "do not count against max_attempts); a worker process, or this command, finishes "
            f"them:\n  {exc.resume}",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("interrupted; queued tasks stay in the database and resume next time", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`imagetask ls | head`): stop quietly, as other tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILED
    except TaskNotFound as exc:
        print(f"imagetask: {exc}", file=sys.stderr)
        return EXIT_NOT_FOUND
    except (ValidationError, ConfigError, StoreError, commands.UsageError) as exc:
        print(f"imagetask: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (WaitTimeout, InsufficientCredits) as exc:
        print(f"imagetask: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except ImageTaskError as exc:
        print(f"imagetask: {exc}", file=sys.stderr)
        return EXIT_FAILED


def _entry() -> None:  # pragma: no cover - console script shim
    sys.exit(main())
