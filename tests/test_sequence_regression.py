"""Sequence regression from the command line: SequenceRegressor on the addition problem with Path-SGD."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
import torch

from pl_pathsgd.cli import make_cli
from pl_pathsgd.data.addition import CONSTANT_PREDICTION_MSE
from pl_pathsgd.module import SequenceRegressor

ROOT = Path(__file__).resolve().parents[1]
ADDITION = ROOT / "configs" / "rnn" / "addition.yaml"

# Predicting the second marked value plus 0.5 (the mean of the first) leaves the first value's variance,
# 1/12: a network below that error carries the first marked value across the sequence.
ONE_VALUE_MSE = 1.0 / 12.0


def addition_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(ADDITION), f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.enable_checkpointing=false",
            f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false", *extra]


def test_path_sgd_learns_the_addition_problem_from_the_config(tmp_path):
    """The config as it is (T = 10, 20 epochs): below 1/12 the network must carry the first marked value."""
    cli = make_cli(addition_args(tmp_path))
    assert isinstance(cli.model, SequenceRegressor)
    assert type(cli.trainer.optimizers[0]).__name__ == "PathSGD"
    cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    test_mse = float(cli.trainer.callback_metrics["test/mse"])
    assert test_mse < ONE_VALUE_MSE < CONSTANT_PREDICTION_MSE


def test_the_output_count_comes_from_the_data(tmp_path):
    cli = make_cli(addition_args(tmp_path, "--data.init_args.seq_len=6", "--data.init_args.train_size=40",
                                 "--data.init_args.val_size=10", "--data.init_args.test_size=10",
                                 "--trainer.max_epochs=1", "--trainer.callbacks=[]"))
    assert cli.model.hparams.num_outputs == 1 and list(cli.model.hparams.input_shape) == [6, 2]
    assert cli.model(torch.zeros(3, 6, 2)).shape == (3, 1)


def test_a_classifier_on_regression_data_is_refused_before_training(tmp_path, capsys):
    with pytest.raises(SystemExit):
        make_cli(addition_args(tmp_path, "--model=pl_pathsgd.module.PathSGDClassifier", "--trainer.callbacks=[]"))
    message = capsys.readouterr().err
    assert "AdditionDataModule has no classes" in message and "SequenceRegressor" in message


def test_a_regressor_on_classification_data_is_refused_before_training(tmp_path, capsys):
    pytest.importorskip("sklearn")
    with pytest.raises(SystemExit):
        make_cli(["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--trainer.logger=false",
                  "--data.init_args.as_sequence=rows", "--model=pl_pathsgd.module.SequenceRegressor",
                  f"--trainer.default_root_dir={tmp_path}", "--trainer.callbacks=[]"])
    message = capsys.readouterr().err
    assert "DigitsDataModule is a classification task (10 classes)" in message


def test_a_refused_model_argument_is_one_line(tmp_path, capsys):
    pytest.importorskip("sklearn")
    with pytest.raises(SystemExit):
        make_cli(["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--trainer.logger=false",
                  "--model=pl_pathsgd.module.SequenceRegressor", f"--trainer.default_root_dir={tmp_path}"])
    message = capsys.readouterr().err
    assert message.splitlines()[-1] == ("pl-pathsgd: error: --model: SequenceRegressor takes sequences: "
                                        "input_shape must be (steps, features), got [64]")


def test_sequence_regressor_wants_sequences():
    with pytest.raises(ValueError, match=r"input_shape must be \(steps, features\)"):
        SequenceRegressor(input_shape=(64,))


def test_predict_writes_the_regressors_values(tmp_path):
    """``pl-pathsgd predict`` on a SequenceRegressor checkpoint: one row per test sequence, the predicted value."""
    small = ["--data.init_args.seq_len=6", "--data.init_args.train_size=100", "--data.init_args.val_size=20",
             "--data.init_args.test_size=30", "--trainer.max_epochs=1", "--trainer.callbacks=[]",
             "--trainer.enable_checkpointing=true"]
    fit = make_cli(addition_args(tmp_path / "fit", *small))
    checkpoint = fit.trainer.checkpoint_callback.best_model_path
    args = addition_args(tmp_path / "predict", *small, f"--ckpt_path={checkpoint}")
    cli = make_cli(["predict", *args[1:]])
    [written] = list((tmp_path / "predict").rglob("predictions.csv"))
    rows = list(csv.DictReader(written.open()))
    test_x, _ = cli.datamodule.test_dataset.tensors
    with torch.no_grad():
        expected = fit.model(test_x).reshape(-1).tolist()
    assert [int(r["index"]) for r in rows] == list(range(30))
    assert [float(r["prediction"]) for r in rows] == pytest.approx(expected, rel=1e-6)


def regressor_fit(tmp_path, callback):
    import functools

    import lightning.pytorch as pl

    from pl_pathsgd import PathSGD
    from pl_pathsgd.data import AdditionDataModule

    module = SequenceRegressor(input_shape=(6, 2), optimizer=functools.partial(PathSGD, lr=1e-5))
    before = [t.detach().clone() for t in module.parameters()]
    trainer = pl.Trainer(max_epochs=1, logger=pl.loggers.CSVLogger(tmp_path), enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
    data = AdditionDataModule(seq_len=6, train_size=100, val_size=20, test_size=20)
    return module, before, trainer, lambda: trainer.fit(module, datamodule=data)


@pytest.mark.parametrize("name, message", [
    ("EpochErrorMonitor", "EpochErrorMonitor: the 0-1 error"),
    ("RescalingInvarianceCheck", "pass loss_fn=..., e.g. torch.nn.functional.mse_loss"),
    ("CapacityReport", "CapacityReport: the training margin is a classifier's"),
])
def test_classification_callbacks_refuse_a_regressor_before_the_first_step(tmp_path, name, message):
    """Argmax error, cross-entropy and margins of one output column are constants: refused, not logged as 0."""
    import pl_pathsgd.callbacks as callbacks

    module, before, _, fit = regressor_fit(tmp_path, getattr(callbacks, name)())
    with pytest.raises(Exception, match=re.escape(message)) as info:
        fit()
    assert "(2, 1)" in str(info.value)
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))  # no step was taken


def test_invariance_check_of_a_regressor_with_its_loss(tmp_path):
    import torch.nn.functional as F

    from pl_pathsgd.callbacks import RescalingInvarianceCheck

    check = RescalingInvarianceCheck(loss_fn=F.mse_loss)
    _, _, _, fit = regressor_fit(tmp_path, check)
    fit()
    assert 0 < check.last["invariance/update"] < 1e-4  # Theorem 5.1 for the RNN, in float32
    assert check.last["invariance/function"] < 1e-5


def test_addition_problem_needs_a_step_in_each_half():
    import numpy as np

    from pl_pathsgd.data.addition import addition_problem

    with pytest.raises(ValueError, match="seq_len=1 is too short"):
        addition_problem(3, 1, np.random.default_rng(0))
    inputs, targets = addition_problem(5, 2, np.random.default_rng(0))  # the shortest: both steps marked
    assert inputs[:, :, 1].sum().item() == 10 and torch.allclose(targets[:, 0], inputs[:, :, 0].sum(1))
