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
    NEW_IN_EACH_FIGURE[figure](rows, [claim for claim, _, _ in claims])

    # resumable: a second run reuses every finished cell (same settings) and gives the same table
    again = run([figure, "--smoke", "--out", str(tmp_path)])
    assert again == rows
    assert capsys.readouterr().out.count("finished earlier with these settings, reused") == len({r["cell"] for r in rows})


def _figure1_has_the_capacity_panel(rows, claims):
    last = max(r["epoch"] for r in rows)
    assert all(r["path_norm_l2"] is None for r in rows if r["epoch"] < last)  # measured once, after the last epoch
    final = [r for r in rows if r["epoch"] == last]
    assert all(r["path_norm_l2"] > 0 and r["margin"] is not None for r in final)
    assert sum(r["normalized_path_norm_l2"] is not None for r in final) >= 3  # where the margin is positive
    assert any("margin-normalized l2 path-norm" in claim for claim in claims)


def _figure2_has_the_rebalanced_curve(rows, claims):
    assert {r["cell"] for r in rows} == {"balanced", "unbalanced", "unbalanced-rebalanced"}
    assert any("Rebalance" in claim for claim in claims)


def _figure3_has_the_control(rows, claims):
    assert "pathsgd-balanced-perturbed-lr1e-1" in {r["cell"] for r in rows}
    assert all(r["precision"] == "64-true" for r in rows)
    assert any("up to rounding" in claim for claim in claims) and any("far beyond rounding" in claim for claim in claims)


NEW_IN_EACH_FIGURE = {"figure1": _figure1_has_the_capacity_panel, "figure2": _figure2_has_the_rebalanced_curve,
                      "figure3": _figure3_has_the_control}


def test_runner_rejects_bad_requests(tmp_path):
    with pytest.raises(SystemExit):
        run(["figure2", "--dataset", "cifar10", "--out", str(tmp_path)])  # figure 2 is MNIST only
    with pytest.raises(SystemExit):
        run(["figure1", "--smoke", "--dataset", "mnist", "--out", str(tmp_path)])
