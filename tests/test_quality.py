"""The code passes its linters and type checker (so the one test command checks them too)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.timeout(300)
def test_ruff_check_and_format():
    """ruff finds nothing to fix and nothing to reformat in src/ and tests/."""
    if shutil.which("ruff", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    ruff = str(Path(sys.executable).parent / "ruff")
    dirs = [d for d in ("src", "tests", "bench", "examples") if (ROOT / d).is_dir()]
    check = run(ruff, "check", *dirs)
    assert check.returncode == 0, check.stdout + check.stderr
    fmt = run(ruff, "format", "--check", *dirs)
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


@pytest.mark.timeout(300)
def test_mypy_strict_on_src():
    """mypy --strict finds no error in src/."""
    pytest.importorskip("mypy")
    result = run(sys.executable, "-m", "mypy", "src")
    assert result.returncode == 0, result.stdout + result.stderr
