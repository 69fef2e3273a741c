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



def test_addition_problem_prints_a_curve_per_run_and_seed(tmp_path):
    script = [sys.executable, str(ROOT / "examples" / "addition_problem.py")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    runs = ["pathsgd:default:5e-6", "sgd:identity:0.01:0.9"]
    result = subprocess.run([*script, "--seq-len", "6", "--steps", "12", "--seeds", "0,1", *runs], cwd=tmp_path,
                            capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if " seed " in line]
    assert [line.split()[0] for line in lines] == [runs[0]] * 2 + [runs[1]] * 2
    assert all(line.count(": ") == 6 for line in lines)  # the test MSE six times over the steps
    refused = subprocess.run([*script, "adam:default:0.1"], cwd=tmp_path, capture_output=True, text=True,
                             timeout=240, env=env)
    assert refused.returncode != 0 and "optimizer:init:lr[:momentum]" in refused.stderr
