"""The code is formatted (`ruff format`, 110 columns) and lint-clean (`ruff check`: pyflakes,
pycodestyle, import order), so a change shows as its own diff, not as reformatting."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("ruff")


@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]], ids=["check", "format"])
def test_ruff(args):
    out = subprocess.run(
        [sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, (
        f"ruff {' '.join(args)} (run `ruff format . && ruff check --fix .`):\n{out.stdout[-3000:]}"
    )
