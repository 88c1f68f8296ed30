"""Run every benchmark case, each in its own process, and write a Markdown report.

    python bench/run.py                 # the full run (about 10-15 minutes on 2 cores)
    python bench/run.py --quick         # a smoke run (tiny sizes, one repetition)
    python bench/run.py --only submit   # cases whose name contains "submit"

See bench/README.md for what each case measures.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from cases import CASES  # noqa: E402  (bench/ is not a package; its folder goes on the path first)
from common import median_of  # noqa: E402

#: Repetitions in a full run (the median is reported); heavy cases run fewer times.
REPS = {
    "e2e.makespan": 2,
    "wake.other_process": 1,
    "memory.queued_100k": 1,
    "memory.finished_1k": 1,
    "memory.finished_big": 1,
    "startup.recover": 3,
    "imagetask.claim_finish": 3,
    "stdlib.claim_finish_file": 3,
    "memory.drain_100k": 1,
    "web.sse_streams": 1,
    "imagetask.drain": 3,
    "asyncio.drain": 3,
}

#: (label, metric, case, baseline case or None, comparison, bound)
TARGETS: list[tuple[str, str, str, str | None, str, float]] = [
    ("submit, one after another, vs stdlib sqlite3", "ops", "imagetask.submit", "stdlib.submit", ">=", 0.45),
    ("submit from 100 coroutines vs stdlib one at a time", "ops", "imagetask.submit_concurrent",
     "stdlib.submit", ">=", 1.0),
    ("submit from 100 coroutines vs huey enqueue", "ops", "imagetask.submit_concurrent", "huey.enqueue",
     ">", 1.0),
    ("submit while 16 generations run here vs stdlib one at a time", "ops", "imagetask.submit_busy",
     "stdlib.submit", ">=", 0.45),
    ("burst of 1,500 (gather, semaphore 100) vs stdlib one at a time", "ops", "imagetask.burst",
     "stdlib.submit", ">=", 1.0),
    ("burst of 1,500 vs huey enqueue", "ops", "imagetask.burst", "huey.enqueue", ">", 1.0),
    ("submit_many(100) vs stdlib one at a time", "ops", "imagetask.submit_many", "stdlib.submit", ">=", 4.0),
    ("submit_many(100) vs stdlib's own 100-row transaction", "ops", "imagetask.submit_many",
     "stdlib.submit_batch", ">=", 0.8),
    ("drain 2,000 (latency 0, C=16) vs a plain asyncio loop", "ops", "imagetask.drain", "asyncio.drain",
     ">=", 0.8),
    ("list(limit=50) vs the same SQL in stdlib", "ops", "imagetask.list", "stdlib.list", ">=", 0.5),
    ("pending(owner) vs the same SQL in stdlib", "ops", "imagetask.pending_1k", "stdlib.pending", ">=", 0.5),
    ("poll vs stdlib (same one-statement read)", "ops", "imagetask.poll", "stdlib.poll", ">=", 0.5),
    ("pending time, 1,000,000 vs 1,000 finished rows", "ops", "imagetask.pending_1k",
     "imagetask.pending_big", "<=", 1.2),
    ("pending() of every owner, 1,000,000 vs 1,000 finished rows", "ops", "imagetask.pending_all_1k",
     "imagetask.pending_all_big", "<=", 1.2),
    ("list(status=...) page, 1,000,000 vs 1,000 finished rows", "ops", "imagetask.list_failed_1k",
     "imagetask.list_failed_big", "<=", 1.2),
    ("poll over HTTP (uvicorn, token, task JSON) vs a bare Starlette route, same read", "ops", "web.poll",
     "starlette.poll", ">=", 0.8),
    ("makespan / ideal (L=100 ms, N=1,000, C=16)", "ratio", "e2e.makespan", None, "<=", 1.05),
    ("same-process wake-up p50 (ms)", "p50_us", "wake.same_process", None, "<", 2000),
    ("peak RSS: 1,000,000 / 1,000 finished rows", "rss_peak_mb", "memory.finished_big",
     "memory.finished_1k", "<=", 1.1),
    ("RSS after 100,000 drained / after 50,000 (page caches full by then)", "growth_second_half",
     "memory.drain_100k", None, "<=", 1.05),
]  # fmt: skip


#: Ratios with no target, shown for context: how close each path is to its own floor.
REFERENCES: list[tuple[str, str, str]] = [
    ("submit then wait, one after another (latency 0), vs generating + writing by hand",
     "imagetask.submit_to_wait", "asyncio.generate_write"),
    ("stdlib inserting 100 rows in one transaction vs one at a time", "stdlib.submit_batch", "stdlib.submit"),
    ("submit vs aiosqlite, the same transaction in one thread hop", "imagetask.submit",
     "aiosqlite.submit_one_hop"),
    ("`imagetask ls` (a whole command) vs `python -c 'import sqlite3'`", "startup.cli_ls",
     "startup.python_sqlite"),
    ("POST /api/tasks vs GET of the bare Starlette route", "web.submit", "starlette.poll"),
]  # fmt: skip


def run_case(name: str, quick: bool, reps: int) -> dict[str, Any]:
    cmd = [sys.executable, str(HERE / "cases.py"), name, "--reps", str(reps)]
    if quick:
        cmd.append("--quick")
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1], "seconds": 0}
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    result["seconds"] = time.monotonic() - started
    return result


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return f"{platform.system()} {platform.release()}, {os.cpu_count()} CPUs ({cpu}){mem}"


def fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One case's rounds -> medians (with the min-max of ops/s), or the first error."""
    for r in runs:
        if "error" in r:
            return r
    numeric = [
        {k: v for k, v in r.items() if isinstance(v, int | float) and k not in ("reps", "seconds")}
        for r in runs
    ]
    out = median_of(numeric)
    out["rounds"] = out.pop("reps")
    return out


#: Two runs back to back: (case, its result, baseline, its result), in one round.
Pair = tuple[str, dict[str, Any], str, dict[str, Any]]


def ratio(pairs: list[Pair], case: str, base: str, metric: str) -> float | None:
    """The median over rounds of case/base, each from a pair of runs made back to back."""
    found = [
        a[metric] / b[metric]
        for name, a, base_name, b in pairs
        if (name, base_name) == (case, base)
        and isinstance(a.get(metric), int | float)
        and isinstance(b.get(metric), int | float)
        and b[metric]
    ]
    return statistics.median(found) if found else None


def compared() -> list[tuple[str, str]]:
    """Every (case, baseline) pair a target or a context line compares, once each."""
    wanted = [(case, base) for _, _, case, base, _, _ in TARGETS if base is not None]
    wanted += [(case, base) for _, case, base in REFERENCES]
    return list(dict.fromkeys(wanted))


def schedule(names: list[str], round_no: int, quick: bool, rounds: int) -> list[tuple[str, ...]]:
    """One round's runs, in order: each compared pair back to back, as ``(case, baseline)``
    (the baseline runs first in rounds 1, 3, 5... and second in rounds 2, 4..., so a
    drift of the machine's speed mostly cancels out), then every other case once, as ``(case,)``."""

    def due(name: str) -> bool:
        return name in names and round_no < (1 if quick else REPS.get(name, rounds))

    steps: list[tuple[str, ...]] = [(case, base) for case, base in compared() if due(case) and due(base)]
    paired = {name for step in steps for name in step}
    return steps + [(name,) for name in names if due(name) and name not in paired]


def report(runs: dict[str, list[dict[str, Any]]], pairs: list[Pair], quick: bool, elapsed: float) -> str:
    results = {name: combine(rs) for name, rs in runs.items() if rs}
    mode = "QUICK (smoke sizes; the numbers mean nothing)" if quick else "full"
    versions = ", ".join(
        f"{name} {version(name)}" for name in ("imagetask", "aiosqlite", "huey", "persist-queue")
    )
    lines = [
        "# imagetask benchmark results",
        "",
        f"- Run: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {mode} mode, {elapsed:.0f} s in all",
        f"- Machine: {machine()}",
        f"- Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}; {versions}",
        "- Settings: WAL, synchronous=NORMAL (imagetask's default durability: survives a process"
        " crash) for imagetask, the stdlib and aiosqlite floors and huey; persist-queue at its own"
        " default (WAL, synchronous=FULL).",
        "- Each case runs in its own process. The whole suite runs round after round; figures are"
        " medians over all runs (with the min-max of ops/s). In each round, every case that a"
        " ratio compares runs back to back with its baseline (the baseline first in every other"
        " round), and each ratio is the median over rounds of those pairs, so the two share the"
        " load.",
        "",
        "## Targets",
        "",
        "| target | value | bound | result |",
        "|---|---|---|---|",
    ]
    for label, metric, case, base, op, bound in TARGETS:
        value = _metric(results, case, metric) if base is None else ratio(pairs, case, base, metric)
        if metric == "p50_us":  # shown in milliseconds
            value, bound = (None if value is None else value / 1000), bound / 1000
        ok = value is not None and {">=": value >= bound, ">": value > bound, "<=": value <= bound,
                                    "<": value < bound}[op]  # fmt: skip
        verdict = "met" if ok else ("n/a" if value is None else "**missed**")
        lines.append(f"| {label} | {fmt(value, 2)} | {op} {bound:g} | {verdict} |")
    lines += ["", "## For context (no target)", "", "| ratio of ops/s | value |", "|---|---|"]
    for label, case, base in REFERENCES:
        lines.append(f"| {label} | {fmt(ratio(pairs, case, base, 'ops'), 2)} |")
    lines += ["", "## All cases", "", "| case | what | ops/s (median) | min-max | p50 µs | p99 µs | other |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, (what, _) in CASES.items():
        r = results.get(name)
        if r is None:
            continue
        if "error" in r:
            lines.append(f"| {name} | {what} | error: {r['error']} | | | | |")
            continue
        other = ", ".join(
            f"{k}={fmt(v, 3)}" for k, v in r.items()
            if k not in ("ops", "ops_min", "ops_max", "p50_us", "p99_us", "rounds", "seconds")
        )  # fmt: skip
        spread = f"{fmt(r.get('ops_min'))}-{fmt(r.get('ops_max'))}" if "ops_min" in r else ""
        lines.append(
            f"| {name} | {what} | {fmt(r.get('ops'))} | {spread} | {fmt(r.get('p50_us'), 1)} |"
            f" {fmt(r.get('p99_us'), 1)} | {other} |"
        )
    return "\n".join(lines) + "\n"


def _metric(results: dict[str, dict[str, Any]], case: str, metric: str) -> float | None:
    value = results.get(case, {}).get(metric)
    return float(value) if isinstance(value, int | float) else None


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one round (a smoke test)")
    parser.add_argument("--only", default="", help="run only cases whose name contains this")
    parser.add_argument("--reps", type=int, default=5, help="rounds (full mode)")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md", help="where to write the report")
    args = parser.parse_args()
    started = time.monotonic()
    names = [name for name in CASES if args.only in name]
    rounds = 1 if args.quick else args.reps
    # Round after round of the whole suite, so that every ratio is taken within a round, from
    # a case and its baseline run back to back under the same load (see `schedule`).
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    pairs: list[Pair] = []

    def measure(name: str) -> dict[str, Any]:
        print(f"{name:<32}", end=" ", flush=True)
        r = run_case(name, args.quick, 1)
        runs[name].append(r)
        shown = r.get("error") or (f"{r['ops']:,.0f} ops/s" if "ops" in r else json.dumps(r)[:80])
        print(f"{shown}  ({r['seconds']:.1f} s)", flush=True)
        return r

    for round_no in range(rounds):
        print(f"-- round {round_no + 1} of {rounds}", flush=True)
        for step in schedule(names, round_no, args.quick, rounds):
            if len(step) == 1:
                measure(step[0])
                continue
            case, base = step
            if round_no % 2 == 0:
                base_run = measure(base)
                case_run = measure(case)
            else:
                case_run = measure(case)
                base_run = measure(base)
            pairs.append((case, case_run, base, base_run))
    text = report(runs, pairs, args.quick, time.monotonic() - started)
    args.out.write_text(text)
    print(f"\nwrote {args.out}")
    return 1 if any("error" in r for rs in runs.values() for r in rs) else 0


if __name__ == "__main__":
    sys.exit(main())
