"""The benchmark suite still runs (its quick mode, once); it asserts no speed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_quick_benchmark_writes_a_report(tmp_path):
    """`bench/run.py --quick` runs every case without error and writes the Markdown tables."""
    pytest.importorskip("huey")
    pytest.importorskip("persistqueue")
    out = tmp_path / "results.md"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert "## Targets" in text and "## All cases" in text
    assert "error" not in text
    for case in ("stdlib.submit", "imagetask.submit", "huey.enqueue", "persistqueue.put", "e2e.makespan"):
        assert f"| {case} |" in text
