"""The ``pl-pathsgd`` command line: configs, print_config, bad input, resume and DDP."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pl_pathsgd.cli import make_cli
from pl_pathsgd.optim import PathSGD

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def quick_args(tmp_path: Path, config: Path = QUICKSTART, *extra: str) -> list[str]:
    return ["fit", "--config", str(config), f"--trainer.logger.init_args.save_dir={tmp_path}",
            f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false",
            "--trainer.max_epochs=1", "--trainer.limit_train_batches=3", *extra]


@pytest.mark.parametrize("config, optimizer", [("quickstart.yaml", PathSGD), ("quickstart_sgd.yaml", torch.optim.SGD),
                                               ("quickstart_adagrad.yaml", torch.optim.Adagrad)])
def test_quickstart_configs_run_and_report(tmp_path, capsys, config, optimizer):
    cli = make_cli(quick_args(tmp_path, ROOT / "configs" / config))
    assert type(cli.trainer.optimizers[0]) is optimizer
    printed = capsys.readouterr().out
    assert "Final: train error" in printed and "test error" in printed
    events = list(tmp_path.rglob("events.out.tfevents.*"))
    assert events, "TensorBoard event files are written"


def test_print_config_round_trips(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        make_cli(["fit", "--config", str(QUICKSTART), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    config = yaml.safe_load(printed)
    assert config["model"]["class_path"] == "pl_pathsgd.module.PathSGDClassifier"
    assert config["model"]["init_args"]["optimizer"] == "pathsgd"
    saved = tmp_path / "printed.yaml"
    saved.write_text(printed)
    with pytest.raises(SystemExit):
        make_cli(["fit", "--config", str(saved), "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out) == config


def test_misspelt_optimizer_gets_a_clear_message(capsys):
    with pytest.raises(SystemExit) as exit_info:
        make_cli(["fit", "--config", str(QUICKSTART), "--model.init_args.optimizer=pathsdg"])
    assert exit_info.value.code != 0
    message = capsys.readouterr().err
    assert "pathsdg" in message and "pathsgd" in message and "optimizer" in message
    assert "Traceback" not in message


def final_weights(cli) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in cli.model.state_dict().items()}


def test_resume_from_checkpoint_is_bit_identical(tmp_path):
    common = ["--model.init_args.momentum=0.9", "--trainer.limit_train_batches=4",
              "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
              "--trainer.callbacks.save_last=true"]
    straight = make_cli(quick_args(tmp_path / "straight", QUICKSTART, *common, "--trainer.max_epochs=2"))
    make_cli(quick_args(tmp_path / "resumed", QUICKSTART, *common, "--trainer.max_epochs=1"))
    checkpoint = next((tmp_path / "resumed").rglob("last.ckpt"))
    resumed = make_cli(quick_args(tmp_path / "resumed2", QUICKSTART, *common, "--trainer.max_epochs=2",
                                  f"--ckpt_path={checkpoint}"))
    assert resumed.trainer.current_epoch == 2
    a, b = final_weights(straight), final_weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    state = resumed.trainer.optimizers[0].state_dict()["state"]
    assert state and all("momentum_buffer" in s for s in state.values())


def test_ddp_on_two_cpu_processes_matches_one_process(tmp_path):
    script = ROOT / "tests" / "scripts" / "ddp_fit.py"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for mode in ("single", "ddp"):
        result = subprocess.run([sys.executable, str(script), str(tmp_path), mode], env=env, cwd=tmp_path,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    single, ddp = torch.load(tmp_path / "single.pt"), torch.load(tmp_path / "ddp.pt")
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], rtol=1e-5, atol=1e-5)
    rows = list(csv.DictReader((tmp_path / "ddp" / "version_0" / "metrics.csv").open()))
    per_epoch = [r for r in rows if r.get("train/error")]
    assert len(per_epoch) == 2, "each epoch's metrics are logged once, from rank zero"
    single_rows = [r for r in csv.DictReader((tmp_path / "single" / "version_0" / "metrics.csv").open())
                   if r.get("train/error")]
    for key in ("train/error", "test/error", "path_norm/p2"):
        assert float(per_epoch[-1][key]) == pytest.approx(float(single_rows[-1][key]), rel=1e-4), key
