"""Who holds a lease: a worker id naming its host, boot, process and start time, and whether
that holder is provably gone.

A worker id reads ``host/boot/pid/start/token``: the host name, the first 8 characters of
the kernel's boot id (Linux; ``-`` elsewhere), the process id, the process's start time in
clock ticks since boot (Linux; ``-`` elsewhere) and a random token. A lease holder is
*provably gone* only when it ran on this host in this boot and either no process has its
pid or the process with its pid started at another time (the pid was reused). Anything
else (another host, another boot, an id of an older format, a permission error) proves
nothing, and its leases are left to expire.
"""

from __future__ import annotations

import functools
import os
import secrets
import socket

__all__ = ["holder_gone", "new_worker_id"]


@functools.cache
def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()[:8] or "-"
    except OSError:
        return "-"


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat),
    ``"-"`` where /proc is missing, None when no such process exists (or it has exited and
    only waits to be reaped: a zombie runs no code and renews no lease)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            return None  # /proc works, and has no such process
        return "-"
    except OSError:
        return "-"
    # The command name (field 2) is in parentheses and may hold spaces or ')': split after
    # the last one. The fields after it start at field 3, so the start time is the 20th.
    fields = stat[stat.rfind(b")") + 2 :].split()
    if fields and fields[0] in (b"Z", b"X"):  # zombie or dead: exited, not yet reaped
        return None
    return fields[19].decode() if len(fields) > 19 else "-"


def _host() -> str:
    return socket.gethostname().replace("/", "_") or "-"


def new_worker_id() -> str:
    """A new worker id for this process (see the module docstring)."""
    pid = os.getpid()
    return f"{_host()}/{_boot_id()}/{pid}/{_start_time(pid) or '-'}/{secrets.token_hex(4)}"


def holder_gone(worker: str) -> bool:
    """Whether the process that holds a lease under ``worker`` is provably gone."""
    parts = worker.rsplit("/", 4)
    if len(parts) != 5:
        return False  # not an id of this format: nothing is known about it
    host, boot, pid_text, start, _ = parts
    if host != _host() or boot == "-" or boot != _boot_id() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False  # this process: its own workers keep their own leases
    now = _start_time(pid)
    if now is None:
        return True  # no process has that pid
    if now == "-":  # no /proc: ask the kernel whether the pid exists at all
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False
        return False
    return start != "-" and now != start  # the pid was reused by a later process
