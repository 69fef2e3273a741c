"""The scripts in examples/ run offline, as a user would start them, and print their results."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

EXPECTED = {
    "plain_pytorch.py": ["balanced: final loss", "unbalanced: final loss"],
    "callbacks_on_your_module.py": ["train error", "path-norm (p=2)"],
    "conv_mixin.py": ["conv net trained by Path-SGD: test error"],
}


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_example_runs(tmp_path, script):
    result = subprocess.run([sys.executable, str(ROOT / "examples" / script)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=240, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    for text in EXPECTED[script]:
        assert text in result.stdout, result.stdout
    if script == "plain_pytorch.py":  # Path-SGD follows the same trajectory from both inits
        lines = dict(line.strip().split(":", 1) for line in result.stdout.splitlines() if "final loss" in line)
        assert lines["balanced"] == lines["unbalanced"]

