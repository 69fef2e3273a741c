"""``--ckpt_path`` never silently overrides model options; unreadable checkpoints, runs without a logger and
evaluation without a checkpoint get clear messages (issue: runs you can trust)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import yaml

from pl_pathsgd.cli import make_cli

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


class Opaque:
    """An object a safe load refuses (stands for anything pickled into a checkpoint by a careless save)."""


def fit_args(root: Path, *extra: str, subcommand: str = "fit") -> list[str]:
    return [subcommand, "--config", str(QUICKSTART), "--trainer.logger=false", "--trainer.callbacks=[]",
            f"--trainer.default_root_dir={root}", "--trainer.enable_progress_bar=false", "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", "--model.init_args.hidden=[32]", *extra]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A checkpoint of the quick start with hidden [32] and dropout 0.25 (everything else from the config)."""
    root = tmp_path_factory.mktemp("trained")
    make_cli(fit_args(root, "--model.init_args.dropout=0.25"))
    return next(root.rglob("*.ckpt"))


def test_a_model_option_that_differs_from_the_checkpoint_is_an_error_naming_both_values(tmp_path, checkpoint, capsys):
    with pytest.raises(SystemExit) as stop:
        make_cli(fit_args(tmp_path, "--model.init_args.hidden=[16]", "--model.init_args.optimizer.lr=0.5",
                          "--trainer.max_epochs=2", f"--ckpt_path={checkpoint}"))
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert f"--ckpt_path={checkpoint}" in error
    assert "model.init_args.hidden given [16], checkpoint [32]" in error
    assert "model.init_args.optimizer.init_args.lr given 0.5, checkpoint 0.01" in error
    assert not list(tmp_path.rglob("*.ckpt")) and not (tmp_path / "config.yaml").exists(), "nothing ran"


def test_options_not_given_are_taken_from_the_checkpoint_and_equal_ones_are_accepted(tmp_path, checkpoint):
    cli = make_cli(fit_args(tmp_path, "--trainer.max_epochs=2", f"--ckpt_path={checkpoint}"))  # dropout not given
    assert cli.model.hparams.dropout == 0.25 and cli.model.hparams.hidden == [32]
    assert cli.trainer.current_epoch == 2


def _truncated(path: Path, checkpoint: Path) -> None:
    data = checkpoint.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path: Path, checkpoint: Path) -> None:
    path.write_bytes(bytes(range(256)) * 20)


def _empty(path: Path, checkpoint: Path) -> None:
    path.write_bytes(b"")


def _unsafe(path: Path, checkpoint: Path) -> None:
    content = torch.load(checkpoint, weights_only=True)
    content["hyper_parameters"]["extra"] = Opaque()
    torch.save(content, path)


@pytest.mark.parametrize("make, says", [
    (_truncated, "the checkpoint is incomplete or damaged"),
    (_garbage, "not a PyTorch checkpoint"),
    (_empty, "the file is empty"),
    (_unsafe, "holds the Python object tests.test_runs_checkpoints.Opaque"),
])
def test_an_unreadable_checkpoint_gets_one_line_naming_the_file_and_the_fix(tmp_path, checkpoint, capsys, make, says):
    bad = tmp_path / "bad.ckpt"
    make(bad, checkpoint)
    with pytest.raises(SystemExit) as stop:
        make_cli(fit_args(tmp_path, f"--ckpt_path={bad}"))
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1, error
    assert error.startswith(f"pl-pathsgd: error: --ckpt_path={bad}: ") and says in error
    assert "weights_only" not in error, "never advise an unsafe load"


def test_a_second_run_without_a_logger_keeps_the_first_runs_config(tmp_path):
    make_cli(fit_args(tmp_path, "--trainer.enable_checkpointing=false"))
    first = (tmp_path / "config.yaml").read_text()
    make_cli(fit_args(tmp_path, "--trainer.enable_checkpointing=false", "--model.init_args.hidden=[16]"))
    assert (tmp_path / "config.yaml").read_text() == first
    assert yaml.safe_load(first)["model"]["init_args"]["hidden"] == [32]
    second = yaml.safe_load((tmp_path / "config-1.yaml").read_text())
    assert second["model"]["init_args"]["hidden"] == [16]


@pytest.mark.parametrize("subcommand", ["validate", "test"])
def test_evaluating_without_a_checkpoint_warns_that_the_model_is_untrained(tmp_path, checkpoint, subcommand):
    args = [subcommand, "--config", str(QUICKSTART), "--trainer.logger=false", "--trainer.callbacks=[]",
            f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false",
            "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1", "--model.init_args.hidden=[32]"]
    with pytest.warns(UserWarning, match=f"pl-pathsgd {subcommand}: no --ckpt_path given, so this uses the "
                                         "untrained network"):
        make_cli(args)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*untrained.*")
        make_cli([*args, f"--ckpt_path={checkpoint}"])
