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


def test_every_test_named_in_the_guarantees_exists():
    """Each test that docs/guarantees.md cites as proof is a test function in tests/ (in the
    file it names, or in some test file when it names none)."""
    import re

    text = (ROOT / "docs" / "guarantees.md").read_text()
    sources = {p.name: p.read_text() for p in (ROOT / "tests").glob("test_*.py")}
    cited = re.findall(r"`(?:(test_\w+\.py)::)?(?:\w+::)?(test_\w+)`", text)
    assert len(cited) > 40
    missing = []
    for module, name in cited:
        pattern = re.compile(rf"^(?:async )?def {name}\(|^    (?:async )?def {name}\(", re.M)
        where = [sources[module]] if module else sources.values()
        if not any(pattern.search(source) for source in where):
            missing.append(f"{module}::{name}" if module else name)
    assert missing == []


@pytest.mark.timeout(300)
def test_the_docs_site_builds_strictly(tmp_path):
    """`mkdocs build --strict` succeeds: no broken link, no docstring the reference cannot render."""
    pytest.importorskip("mkdocs")
    result = run(sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "reference" / "index.html").exists()
