"""Figure 1's capacity panel: FinalCapacityReport measures once, after the last epoch, and changes nothing; the
runner records the l2 path-norm, the margin and their ratio per width (CSV columns, a fourth panel), each in the
epoch it was measured and never a stale value."""

from __future__ import annotations

import csv
import json
import math

import lightning.pytorch as pl
import pytest
import yaml
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from pl_pathsgd.experiments import FinalCapacityReport
from pl_pathsgd.experiments.claims import check_claims
from pl_pathsgd.experiments.grids import config_path
from pl_pathsgd.experiments.runner import run
from pl_pathsgd.experiments.summaries import figure1_summary, spearman
from tests.test_callbacks_contract import ContractModule, NoisyDataset, Scenario, assert_observes_without_changing

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*(log_every_n_steps|does not have many workers|LeafSpec|litlogger|litmodels|in eval mode|margins).*"
)
CAPACITY_COLUMNS = ("path_norm_l2", "margin", "normalized_path_norm_l2")


class CountingReport(FinalCapacityReport):
    """FinalCapacityReport that notes the epochs in which it measured."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.measured_in: list[int] = []

    def measure(self, trainer, pl_module):
        self.measured_in.append(trainer.current_epoch + 1)
        return super().measure(trainer, pl_module)


def test_it_measures_once_after_the_last_epoch_and_changes_nothing(tmp_path_factory):
    report = CountingReport(percentile=50, eval_batch_size=5)
    trainer = assert_observes_without_changing(lambda: [report], Scenario("pathsgd", accumulate=2), tmp_path_factory)
    assert report.measured_in == [2]  # the contract's fit runs 2 epochs
    assert {"capacity/path_norm_l2", "capacity/margin"} <= set(trainer.callback_metrics)


class StopAfterFirstEpoch(Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = True


@pytest.mark.parametrize("limits, stopper, expected", [
    ({"max_epochs": -1, "max_steps": 5}, False, [2]),  # 4 steps an epoch: step 5 ends the second epoch
    ({"max_epochs": 5}, True, [1]),  # a requested stop ends the first
])
def test_the_last_epoch_is_found_whatever_ends_the_fit(tmp_path, limits, stopper, expected):
    report = CountingReport(eval_batch_size=16)
    callbacks = [StopAfterFirstEpoch()] if stopper else []
    trainer = pl.Trainer(**limits, limit_train_batches=4, callbacks=[*callbacks, report], logger=CSVLogger(tmp_path),
                         default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False)
    trainer.fit(ContractModule("sgd"), DataLoader(NoisyDataset(), batch_size=8))
    assert report.measured_in == expected


def test_the_arguments_are_checked():
    with pytest.raises(ValueError, match="percentile"):
        FinalCapacityReport(percentile=120)
    with pytest.raises(ValueError, match="eval_batch_size"):
        FinalCapacityReport(eval_batch_size=0)


@pytest.mark.parametrize("name", ["figure1_mnist", "figure1_cifar10", "smoke/figure1"])
def test_the_figure1_configs_measure_the_capacity(name):
    config = yaml.safe_load(_configs_file(name).read_text())
    paths = [c["class_path"] for c in config["trainer"]["callbacks"]]
    assert "pl_pathsgd.experiments.FinalCapacityReport" in paths


def _configs_file(name: str):
    if name.startswith("smoke"):
        return config_path("figure1", "digits", True)
    return config_path("figure1", name.split("_", 1)[1], False)


def test_the_runner_records_each_measurement_in_its_epoch(tmp_path, capsys):
    """A CapacityReport every 2 epochs beside the config's FinalCapacityReport, 5 epochs: values in epochs 2, 4 and 5
    only. Lightning keeps a logged value in callback_metrics after its epoch: epochs 3 and 5 must not repeat it."""
    every_two = {"class_path": "pl_pathsgd.callbacks.CapacityReport", "init_args": {"every_n_epochs": 2}}
    rows = run(["figure1", "--smoke", "--out", str(tmp_path), "--widths", "16", "64", "--trainer.max_epochs=5",
                f"--trainer.callbacks+={json.dumps(every_two)}"])
    for width in (16, 64):
        epochs = sorted((r for r in rows if r["width"] == width), key=lambda r: r["epoch"])
        measured = [r["epoch"] for r in epochs if r["path_norm_l2"] is not None]
        assert measured == [2, 4, 5], measured
        norms = [r["path_norm_l2"] for r in epochs if r["path_norm_l2"] is not None]
        assert len(set(norms)) == 3 and all(math.isfinite(n) and n > 0 for n in norms)  # training moved the norm
        last = epochs[-1]
        assert last["normalized_path_norm_l2"] == pytest.approx(last["path_norm_l2"] / last["margin"], rel=1e-12)
        assert last["parameters"] == 64 * width + width + width * 10 + 10 and last["precision"] == "32-true"
    with (tmp_path / "figure1.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert set(CAPACITY_COLUMNS) <= set(table[0])
    assert [row["path_norm_l2"] != "" for row in table] == [r["path_norm_l2"] is not None for r in rows]
    summary = figure1_summary(table)  # from the CSV as a user reads it back
    assert [s["path_norm_l2"] for s in summary] == [r["path_norm_l2"] for r in rows if r["epoch"] == 5]


def test_a_cell_without_capacity_leaves_the_columns_empty(tmp_path):
    rows = run(["figure1", "--smoke", "--out", str(tmp_path), "--widths", "16", "--trainer.max_epochs=1",
                '--trainer.callbacks=[{"class_path": "pl_pathsgd.callbacks.EpochErrorMonitor"}]'])
    assert all(r[c] is None for r in rows for c in CAPACITY_COLUMNS)
    assert figure1_summary(rows)[0]["normalized_path_norm_l2"] is None
    assert (tmp_path / "figure1.png").stat().st_size > 10_000  # the panel says what is missing instead of failing


def summary_rows(norms, errors, widths=(8, 16, 32, 64)):
    """One epoch per width with the given normalized norms and test errors."""
    return [{"cell": f"w{w}", "width": w, "epoch": 1, "train_error": 0.0, "val_error": e, "test_error": e,
             "parameters": 100 * w, "path_norm_l2": 2.0 * n if n is not None else None, "margin": 2.0,
             "normalized_path_norm_l2": n} for w, n, e in zip(widths, norms, errors)]


def test_the_norm_claim_follows_the_rank_correlation():
    passing = check_claims("figure1", summary_rows([8.0, 4.0, 3.0, 2.0], [0.10, 0.05, 0.06, 0.04]))[-1]
    assert passing[1] and "normalized path-norm 0.80, parameter count -0.80" in passing[2]
    # a norm that grows while the test error falls does not explain it
    failing = check_claims("figure1", summary_rows([2.0, 3.0, 4.0, 8.0], [0.10, 0.05, 0.06, 0.04]))[-1]
    assert not failing[1]
    # widths without a normalized norm (margin <= 0) are left out; fewer than three widths: no claim
    assert len(check_claims("figure1", summary_rows([None, None, 3.0, 2.0], [0.2, 0.1, 0.1, 0.1]))) == 2


def test_spearman():
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [1, 1, 2, 2]) == pytest.approx(0.894427, rel=1e-5)  # ties take their mean rank
    assert math.isnan(spearman([1, 2, 3], [5, 5, 5]))
