"""Smoke runs of the paper's experiments on the bundled digits: the qualitative claims must hold."""

from __future__ import annotations

import csv

import pytest

from pl_pathsgd.experiments.claims import check_claims
from pl_pathsgd.experiments.runner import run


@pytest.mark.parametrize("figure", ["figure1", "figure2", "figure3"])
def test_smoke_run_reproduces_the_claims(tmp_path, figure, capsys):
    rows = run([figure, "--smoke", "--out", str(tmp_path)])
    claims = check_claims(figure, rows)
    assert claims, "every figure checks at least one claim"
    for claim, ok, detail in claims:
        assert ok, f"{claim}: {detail}"
    with (tmp_path / f"{figure}.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == len(rows) and all(row["train_error"] != "" for row in table)
    assert (tmp_path / f"{figure}.png").stat().st_size > 10_000
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    printed = capsys.readouterr().out
    assert "epoch 1/" in printed and "min left" in printed  # progress is visible

    # resumable: a second run reuses every finished cell (same settings) and gives the same table
    again = run([figure, "--smoke", "--out", str(tmp_path)])
    assert again == rows
    assert capsys.readouterr().out.count("finished earlier with these settings, reused") == len({r["cell"] for r in rows})


def test_runner_rejects_bad_requests(tmp_path):
    with pytest.raises(SystemExit):
        run(["figure2", "--dataset", "cifar10", "--out", str(tmp_path)])  # figure 2 is MNIST only
    with pytest.raises(SystemExit):
        run(["figure1", "--smoke", "--dataset", "mnist", "--out", str(tmp_path)])
