"""Task ids: 26 characters, time-sortable, unique (the ULID layout, monotonic in a process)."""

from __future__ import annotations

import functools
import os
import threading
import time

__all__ = ["new_task_id", "new_task_ids", "task_id_ms"]

# 48 bits of milliseconds then 80 random bits in Crockford base32 (the ULID layout), made
# monotonic within a process so ids submitted in one millisecond still sort in order.

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_TO_BASE32 = str.maketrans(_CROCKFORD, "0123456789ABCDEFGHIJKLMNOPQRSTUV")
_CROCKFORD_SET = frozenset(_CROCKFORD)
_id_lock = threading.Lock()
_last_id = (0, 0)


#: Every 10-bit value as two Crockford characters.
_PAIRS = [a + b for a in _CROCKFORD for b in _CROCKFORD]


@functools.lru_cache(maxsize=4)
def _time_part(ms: int) -> str:
    """The first 10 characters of an id: two zero bits, then 48 bits of milliseconds."""
    return "".join(_CROCKFORD[(ms >> shift) & 31] for shift in range(45, -1, -5))


def new_task_id() -> str:
    """A new 26-character, time-sortable task id."""
    ms, r = _reserve(1)
    return _time_part(ms) + _random_part(r)


def new_task_ids(count: int) -> list[str]:
    """``count`` new task ids, in order (one lock and one clock read for them all)."""
    ms, first = _reserve(count)
    head = _time_part(ms)  # changes once a millisecond (cached)
    return [head + _random_part(r) for r in range(first, first + count)]


def _random_part(r: int) -> str:
    """The last 16 characters of an id: 80 random bits, as 8 pairs."""
    p = _PAIRS
    return (
        p[(r >> 70) & 1023] + p[(r >> 60) & 1023] + p[(r >> 50) & 1023] + p[(r >> 40) & 1023]
        + p[(r >> 30) & 1023] + p[(r >> 20) & 1023] + p[(r >> 10) & 1023] + p[r & 1023]
    )  # fmt: skip


def _reserve(count: int) -> tuple[int, int]:
    """The millisecond and the first of ``count`` consecutive 80-bit random parts, after every
    id made before in this process."""
    global _last_id
    with _id_lock:
        ms = time.time_ns() // 1_000_000
        last_ms, last_rand = _last_id
        if ms <= last_ms:
            ms, first = last_ms, last_rand + 1
        else:
            first = int.from_bytes(os.urandom(10), "big") >> 1
        _last_id = (ms, first + count - 1)
    return ms, first


def task_id_ms(task_id: str) -> int:
    """The millisecond timestamp inside a task id."""
    # 10 chars hold the top 50 bits of 130: two zero bits, then the 48-bit time. Crockford's
    # digits, mapped to int()'s base-32 digits (0-9, A-V), are read in one call.
    head = task_id[:10]
    if len(head) < 10 or not _CROCKFORD_SET.issuperset(head):
        raise ValueError(f"{task_id!r} is not a task id")
    return int(head.translate(_TO_BASE32), 32)
