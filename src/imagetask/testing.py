"""Fault injection for tests of code built on imagetask (and imagetask's own tests).

Most faults can be made for real: kill a process, hold the write lock from another
connection, mount a tiny or read-only filesystem. A few cannot be made on demand, such as
a disk I/O error in one particular transaction, or a commit that reports an error although
it went through. `Faults` injects those at named points of a manager's store::

    from imagetask import TaskManager
    from imagetask.testing import Faults

    faults = Faults()
    faults.fail("succeed", sqlite3.OperationalError("disk I/O error"), times=2)
    async with TaskManager(path, provider=FakeProvider(), faults=faults) as tm:
        ...  # the first two success writes roll back with that error; the worker retries

Operations (the names `fail`, `kill` and `call` take):

- store transactions: ``submit``, ``claim``, ``heartbeat``, ``succeed``, ``retry``,
  ``fail``, ``release``, ``cancel``, ``grant``, ``prune``, ``tokens`` (creating or revoking
  API tokens);
- store reads: ``get``, ``pending``, ``list``, ``statuses``, ``events``, ``balance``,
  ``health``, ``file_state``, ``token`` (an API token's lookup), ``feed`` (the event feed);
- ``write_image``: writing one image file (a generated image or a reference copy), after
  its temporary file was opened; ``sync_folder``: the fsync of an image's folder after the
  rename that made it visible (``durability="full"`` only).

A fault fires inside the transaction (which then rolls back, and the error reaches the
operation's caller as the database's own error would), or, with ``after_commit=True``, once
the transaction has committed: the caller is told it failed although it did not, as when
a commit's acknowledgement is lost. `call` runs your own code at the same points, to make a
race happen on cue (another connection commits just after a read, a read that waits for a
gate). Never use `Faults` in production code.
"""

from __future__ import annotations

import collections
import os
import signal
import threading
from collections.abc import Callable

import attrs

__all__ = ["OPERATIONS", "Faults"]

#: Store transactions: a fault fires inside the transaction or after its commit.
_TRANSACTIONS = frozenset(
    {
        "submit",
        "claim",
        "heartbeat",
        "succeed",
        "retry",
        "fail",
        "release",
        "cancel",
        "grant",
        "prune",
        "tokens",
    }
)
#: Store reads: a fault fires before or after the read (there is no commit to die before).
_READS = frozenset(
    {"get", "pending", "list", "statuses", "events", "balance", "health", "file_state", "token", "feed"}
)
#: Image files: a fault fires while the file is written (``write_image``, with its
#: temporary file open) or at the folder's fsync (``sync_folder``).
_FILES = frozenset({"write_image", "sync_folder"})

#: The operations a fault can be injected into.
OPERATIONS = _TRANSACTIONS | _READS | _FILES


@attrs.define
class _Planned:
    error: BaseException | None
    times: int
    after_commit: bool
    kill: bool
    call: Callable[[], object] | None = None


class Faults:
    """Faults planned for the operations of one manager's store (pass ``faults=`` to it).

    Attributes:
        hits: How many times each operation ran (faulted runs included).
        commits: How many transactions committed, by where: ``"loop"`` (small writes on
            the event loop's own connection) or ``"writer"`` (the writer's thread).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._planned: dict[str, list[_Planned]] = collections.defaultdict(list)
        self.hits: collections.Counter[str] = collections.Counter()
        self.commits: collections.Counter[str] = collections.Counter()

    def __repr__(self) -> str:
        with self._lock:
            planned = {op: sum(p.times for p in plans) for op, plans in self._planned.items() if plans}
        return f"Faults(planned={planned})"

    def fail(
        self, operation: str, error: BaseException, *, times: int = 1, after_commit: bool = False
    ) -> None:
        """Make the next ``times`` runs of ``operation`` raise ``error``.

        Args:
            operation: One of `OPERATIONS`.
            error: What to raise: a ``sqlite3.Error`` for a store operation (it reaches the
                caller as a `StoreError`, like a real database error), an ``OSError`` for
                ``write_image`` and ``sync_folder``.
            times: How many runs in a row fail.
            after_commit: Raise after the transaction committed (a read: once it read)
                instead of inside it; store operations only.
        """
        if not isinstance(error, BaseException):
            raise ValueError(f"error: must be an exception instance, got {error!r}")
        self._plan(operation, _Planned(error, times, after_commit, kill=False))

    def kill(self, operation: str) -> None:
        """SIGKILL this process during the next run of ``operation``: inside the transaction,
        after its statements ran and before it commits (for ``write_image``: with the
        temporary file open). For crash tests run in a child process; store transactions and
        ``write_image`` only (a read has no commit to die before)."""
        if operation in _READS or operation == "sync_folder":
            raise ValueError(
                f"operation: {operation!r} cannot be killed before a commit; use one of "
                f"{', '.join(sorted(_TRANSACTIONS | {'write_image'}))}"
            )
        self._plan(operation, _Planned(None, 1, after_commit=False, kill=True))

    def call(
        self, operation: str, fn: Callable[[], object], *, times: int = 1, after_commit: bool = False
    ) -> None:
        """Call ``fn()`` during the next ``times`` runs of ``operation``: at its start (inside
        its transaction, on the thread that runs it), or with ``after_commit=True`` once it
        committed (a read: once it read), before its caller is answered. What ``fn``
        raises reaches the caller like a planned error."""
        if not callable(fn):
            raise ValueError(f"fn: must be callable, got {fn!r}")
        self._plan(operation, _Planned(None, times, after_commit, kill=False, call=fn))

    def clear(self) -> None:
        """Drop every planned fault."""
        with self._lock:
            self._planned.clear()

    def _plan(self, operation: str, planned: _Planned) -> None:
        if operation not in OPERATIONS:
            raise ValueError(f"operation: unknown {operation!r}; use one of {', '.join(sorted(OPERATIONS))}")
        if isinstance(planned.times, bool) or not isinstance(planned.times, int) or planned.times < 1:
            raise ValueError(f"times: must be an integer >= 1, got {planned.times!r}")
        if planned.after_commit and operation in _FILES:
            raise ValueError(f"after_commit: {operation!r} has no commit; plan it without after_commit")
        with self._lock:
            self._planned[operation].append(planned)

    def _take(self, operation: str, *, after_commit: bool, kill: bool, call: bool = False) -> _Planned | None:
        """The first planned fault of this kind for ``operation`` (one of its ``times`` used)."""
        with self._lock:
            plans = self._planned.get(operation, [])
            wanted = (after_commit, kill, call)
            for i, planned in enumerate(plans):
                if (planned.after_commit, planned.kill, planned.call is not None) == wanted:
                    planned.times -= 1
                    if planned.times == 0:
                        plans.pop(i)
                    return planned
            return None

    # -- called by the store and the image store --

    def before(self, operation: str) -> None:
        """At the start of ``operation`` (inside its transaction): count it, raise a planned error."""
        with self._lock:
            self.hits[operation] += 1
        hook = self._take(operation, after_commit=False, kill=False, call=True)
        if hook is not None and hook.call is not None:
            hook.call()
        planned = self._take(operation, after_commit=False, kill=False)
        if planned is not None and planned.error is not None:
            raise planned.error

    def before_commit(self, operation: str) -> None:
        """After ``operation``'s statements, before its commit: a planned kill happens here."""
        if self._take(operation, after_commit=False, kill=True) is not None:
            os.kill(os.getpid(), signal.SIGKILL)

    def committed(self, where: str) -> None:
        """A transaction committed ``where`` (``"loop"`` or ``"writer"``)."""
        with self._lock:
            self.commits[where] += 1

    def after_commit(self, operation: str) -> BaseException | None:
        """Once ``operation`` committed: run a planned call, then return the error to report
        to its caller, if one is planned."""
        hook = self._take(operation, after_commit=True, kill=False, call=True)
        if hook is not None and hook.call is not None:
            hook.call()
        planned = self._take(operation, after_commit=True, kill=False)
        return None if planned is None else planned.error
