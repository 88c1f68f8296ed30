"""`imagetask serve` (the web door, with uvicorn) and `imagetask token` (its API tokens)."""

from __future__ import annotations

import argparse
import os
import sys

from .. import TaskManager
from .._jsonout import iso_time
from ..providers import GeminiProvider
from . import _output
from ._commands import EXIT_OK, EXIT_USAGE, UsageError, database, reader, work_provider

__all__ = ["serve", "token"]


async def serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..web import create_app
    except ImportError as exc:
        raise UsageError(
            f"`imagetask serve` needs the web extra ({exc.name} is missing): pip install 'imagetask[web]'"
        ) from None
    # Without workers this process only validates and prices requests: Gemini's model table
    # needs no key (the tasks run in an `imagetask worker`), unless --provider fake is asked.
    provider = work_provider(args, required=args.workers) or GeminiProvider()
    tm = TaskManager(
        database(args),
        provider=provider,
        workers=args.workers,
        concurrency=args.concurrency,
        per_owner=args.per_owner,
        credits=args.credits,
    )
    # Every process serving one address must sign stream tickets with the same key.
    secret = os.environ.get("IMAGETASK_TICKET_SECRET")
    app = create_app(tm, max_pending=args.max_pending, secret=secret.encode() if secret else None)
    print(
        f"imagetask serve on http://{args.host}:{args.port}/ ({tm.path}; "
        + (f"workers on {provider.name}" if args.workers else "no workers: run `imagetask worker` beside it")
        + "); sign in with a token from `imagetask token create OWNER`",
        file=sys.stderr,
        flush=True,
    )
    # Open event streams never end on their own: give them a few seconds at shutdown, then
    # close them, so Ctrl-C or SIGTERM does not wait for every browser tab to go away.
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=args.access_log,
        timeout_graceful_shutdown=5,
    )
    await uvicorn.Server(config).serve()
    return EXIT_OK


async def token(args: argparse.Namespace) -> int:
    async with reader(args) as tm:
        if args.action == "create":
            if args.target is None:
                raise UsageError("token create: give the OWNER the token acts as")
            secret = await tm.tokens.create(args.target, label=args.label)
            if args.json:
                _output.dump_json({"owner": args.target, "token": secret})
            else:
                print(secret)
                print(
                    f"a token for {args.target}; it is shown only this once: keep it somewhere safe",
                    file=sys.stderr,
                )
            return EXIT_OK
        if args.action == "revoke":
            if args.target is None:
                raise UsageError("token revoke: give the token, its id, or --owner OWNER")
            done = await tm.tokens.revoke(args.target)
            print("revoked" if done else f"{args.target}: no valid token with that id", file=sys.stderr)
            return EXIT_OK if done else EXIT_USAGE
        found = await tm.tokens.list(args.target)
        if args.json:
            _output.dump_json(
                [
                    {
                        "id": t.id,
                        "owner": t.owner,
                        "label": t.label,
                        "created_at": iso_time(t.created_at),
                        "revoked_at": iso_time(t.revoked_at),
                    }
                    for t in found
                ]
            )
        elif not found:
            print("no tokens; create one with `imagetask token create OWNER`", file=sys.stderr)
        else:
            print(f"{'ID':<12}  {'OWNER':<20}  {'CREATED':<24}  {'STATE':<32}  LABEL")
            for t in found:
                state = "valid" if t.valid else f"revoked {iso_time(t.revoked_at)}"
                print(f"{t.id}  {t.owner:<20}  {iso_time(t.created_at):<24}  {state:<32}  {t.label or ''}")
    return EXIT_OK
