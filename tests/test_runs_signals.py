"""SIGTERM (what timeout, kill and schedulers send) ends fit and sweeps with status 143 after a clean stop;
an interrupted sweep keeps its finished cells, and the partial one is cleaned before it runs again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pl_pathsgd.experiments.runner import run

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def wait_for(condition, process: subprocess.Popen, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if process.poll() is not None:
            out, err = process.communicate()
            raise AssertionError(f"ended early with status {process.returncode}:\n{out[-2000:]}\n{err[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("timed out waiting for the run to start")
        time.sleep(0.2)


def terminate(process: subprocess.Popen) -> tuple[int, str]:
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    return process.returncode, out + err


def test_sigterm_stops_fit_cleanly_with_status_143(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "pl_pathsgd", "fit", "--config", str(QUICKSTART), "--trainer.logger=false",
         "--trainer.callbacks=[]", "--trainer.max_epochs=100000", f"--trainer.default_root_dir={tmp_path}",
         "--trainer.enable_progress_bar=false", "--model.init_args.hidden=[16]"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wait_for(lambda: any((tmp_path / "checkpoints").glob("*.ckpt")), process)  # an epoch is done: training
    status, output = terminate(process)
    assert status == 143, output[-3000:]
    assert "pl-pathsgd fit: stopped after SIGTERM at epoch" in output


def test_sigterm_stops_a_sweep_keeps_finished_cells_and_the_rerun_cleans_the_partial_one(tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["figure1", "--smoke", "--out", str(out), "--widths", "4", "64", "--trainer.max_epochs=40"]
    process = subprocess.Popen([sys.executable, "-m", "pl_pathsgd.experiments", *args], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second = out / "cells" / "width00064"
    wait_for(lambda: any((second / "tb").glob("events.out.tfevents.*")), process)  # the second cell is running
    status, output = terminate(process)
    assert status == 143, output[-3000:]
    assert "stopped by SIGTERM; 1 of 2 cells are finished and kept" in output
    assert (out / "cells" / "width00004" / "cell.json").is_file()
    assert not (second / "cell.json").exists() and not (out / "figure1.csv").exists()

    rows = run(args)  # resumes: the finished cell is reused, the partial one cleaned and run again
    printed = capsys.readouterr().out
    assert "[figure1 digits width00004] finished earlier with these settings, reused" in printed
    assert "[figure1 digits width00064] removing the leftovers of an interrupted run" in printed
    assert len(list((second / "tb").glob("events.out.tfevents.*"))) == 1, "no events of the partial run"
    assert len([r for r in rows if r["cell"] == "width00064"]) == 40
