"""Parallel and cluster sweeps: ``--jobs N`` gives the sequential results and resumes like it;
``--print-commands`` prints self-contained ``pl-pathsgd fit`` commands and ``--collect`` assembles their cells."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from pl_pathsgd.cli import make_cli
from pl_pathsgd.experiments.cell import read_result
from pl_pathsgd.experiments.parallel import threads_per_job
from pl_pathsgd.experiments.runner import run

SMALL = ["--trainer.max_epochs=2", "--trainer.limit_train_batches=4"]


def figure1(out: Path, widths, *extra: str) -> list[dict]:
    return run(["figure1", "--smoke", "--out", str(out), "--widths", *widths, *SMALL, *extra])


def by_cell(rows: list[dict]) -> dict[str, list[dict]]:
    cells: dict[str, list[dict]] = {}
    for row in rows:
        cells.setdefault(row["cell"], []).append(row)
    return cells


def test_a_parallel_sweep_resumes_gives_the_sequential_numbers_and_collects(tmp_path, capsys):
    # one PyTorch thread per cell in both: CPU kernels round sums by their thread count
    sequential = by_cell(figure1(tmp_path / "seq", ["4", "16", "64"], "--threads", "1"))
    out = tmp_path / "par"
    figure1(out, ["4"], "--threads", "1")  # a sweep stopped after its first cell, as far as the folder is concerned
    capsys.readouterr()
    rows = figure1(out, ["4", "16", "64"], "--jobs", "2", "--threads", "1")
    printed = capsys.readouterr().out
    assert "[figure1 digits width00004] finished earlier with these settings, reused" in printed
    assert "running 2 cells in 2 processes, 1 thread(s) each" in printed
    parallel = by_cell(rows)
    assert parallel.keys() == sequential.keys()
    for cell, epochs in sequential.items():
        for a, b in zip(epochs, parallel[cell], strict=True):
            assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
    assert figure1(out, ["4", "16", "64"], "--jobs", "2") == rows, "resumed: every cell reused"
    table = (out / "figure1.csv").read_text()
    (out / "figure1.csv").unlink()
    assert figure1(out, ["4", "16", "64"], "--collect") == rows
    assert (out / "figure1.csv").read_text() == table and (out / "figure1.png").is_file()
    assert read_result(out / "cells" / "width00016")["threads"] == 1


def test_threads_per_job_share_the_cores():
    assert threads_per_job(1) >= threads_per_job(2) >= 1
    assert threads_per_job(10_000) == 1


def test_printed_commands_run_anywhere_and_collect_assembles_their_cells(tmp_path, capsys):
    out = tmp_path / "cluster"
    assert figure1(out, ["4", "16"], "--print-commands") == []
    commands = capsys.readouterr().out.strip().splitlines()
    assert len(commands) == 2 and all(c.startswith("pl-pathsgd fit --config /") for c in commands)
    with pytest.raises(SystemExit) as stop:
        figure1(out, ["4", "16"], "--collect")
    assert "2 of 2 cells are not finished (width00004, width00016)" in str(stop.value.code)

    elsewhere = tmp_path / "node"
    elsewhere.mkdir()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    first = subprocess.run(commands[0], shell=True, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert read_result(out / "cells" / "width00004") is not None
    assert figure1(out, ["4", "16"], "--print-commands") == []
    assert capsys.readouterr().out.strip().splitlines() == commands[1:], "only the unfinished cell is left"

    with pytest.raises(SystemExit) as again:  # the same command once more, here: the finished cell is kept
        make_cli(shlex.split(commands[0])[1:])
    assert again.value.code == 2 and "holds a finished cell" in capsys.readouterr().err.strip().splitlines()[-1]
    second = subprocess.run(commands[1], shell=True, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    rows = figure1(out, ["4", "16"], "--collect")
    assert {r["cell"] for r in rows} == {"width00004", "width00016"} and len(rows) == 4
    assert list(elsewhere.iterdir()) == [], "a cell writes only into its folder"


def test_cells_that_run_on_several_processes_are_not_given_to_jobs_workers(tmp_path):
    with pytest.raises(SystemExit) as stop:
        figure1(tmp_path, ["4", "16"], "--jobs", "2", "--trainer.strategy=ddp", "--trainer.devices=2",
                "--trainer.accelerator=cpu")
    assert "the cells run on 2 processes each" in str(stop.value.code) and "--print-commands" in str(stop.value.code)
    assert not (tmp_path / "cells").exists()
