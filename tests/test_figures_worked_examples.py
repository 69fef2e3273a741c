"""``python -m pl_pathsgd.experiments figure2b``: the worked examples of Figures 2(b) and 2(c) through the runner's
entry point."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pl_pathsgd.experiments.runner import main, run

SGD_2B = "after one SGD step the equivalent networks compute different functions; at x: (4) vs (102.01)"
PATHSGD_2C = "after one Path-SGD step the equivalent networks compute the same function; at x: (16, 16) vs (16, 16)"


def test_the_module_runs_the_worked_examples(tmp_path):
    """As a user types it: ``python -m pl_pathsgd.experiments figure2b``, from another folder."""
    done = subprocess.run([sys.executable, "-m", "pl_pathsgd.experiments", "figure2b", "--no-figure"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert SGD_2B in done.stdout and PATHSGD_2C in done.stdout
    assert "(428.04, 428.04)" in done.stdout  # Figure 2(c), SGD from the rescaled network
    assert not list(tmp_path.iterdir())  # --no-figure draws nothing


def test_the_runner_draws_them_into_out(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert run(["figure2b", "--out", str(tmp_path / "figures")]) == []
    printed = capsys.readouterr().out
    assert SGD_2B in printed and f"wrote {tmp_path / 'figures' / 'figure2bc.png'}" in printed
    assert (tmp_path / "figures" / "figure2bc.png").stat().st_size > 10_000


def test_its_options_and_mistakes(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["figure2b", "--help"])
    assert stop.value.code == 0
    assert "python -m pl_pathsgd.experiments figure2b" in capsys.readouterr().out  # its own usage line
    afile = tmp_path / "file"
    afile.write_text("")
    with pytest.raises(SystemExit):
        main(["figure2b", "--out", str(afile)])
    assert f"--out {afile} is a file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["figure2b", "--widths", "4"])  # a sweep's option
    assert "unrecognized arguments: --widths 4" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "figure2b" in capsys.readouterr().out  # the runner's help names it
