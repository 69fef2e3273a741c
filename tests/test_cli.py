"""The ``pl-pathsgd`` command line: configs, optimizers and schedulers by class path, old options, predict,
precision, traces, resume and DDP."""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser

import pl_pathsgd.paths.graph as graph_module
import pl_pathsgd.paths.tracing as tracing
from pl_pathsgd.cli import make_cli
from pl_pathsgd.module import PathSGDClassifier
from pl_pathsgd.optim import PathSGD
from pl_pathsgd.schedules import PaperSchedule, ReduceLROnPlateau

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def quick_args(tmp_path: Path, config: Path = QUICKSTART, *extra: str, subcommand: str = "fit") -> list[str]:
    return [subcommand, "--config", str(config), f"--trainer.logger.init_args.save_dir={tmp_path}",
            f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false",
            "--trainer.max_epochs=1", "--trainer.limit_train_batches=3", *extra]


def bare_args(tmp_path: Path, *extra: str) -> list[str]:
    """The quick start without its callbacks and logger: only what the model and optimizer do."""
    return ["fit", "--config", str(QUICKSTART), "--trainer.logger=false", "--trainer.callbacks=[]",
            "--trainer.enable_checkpointing=false", f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", *extra]


@pytest.fixture
def lightning_log():
    """Messages of Lightning's rank-zero logging (its logger does not propagate to pytest's)."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    logger, handler = logging.getLogger("lightning.pytorch"), Collect(logging.INFO)
    logger.addHandler(handler)
    yield messages
    logger.removeHandler(handler)


@pytest.mark.parametrize("config, optimizer", [("quickstart.yaml", PathSGD), ("quickstart_sgd.yaml", torch.optim.SGD),
                                               ("quickstart_adagrad.yaml", torch.optim.Adagrad)])
def test_quickstart_configs_run_and_report(tmp_path, capsys, lightning_log, config, optimizer):
    cli = make_cli(quick_args(tmp_path, ROOT / "configs" / config))
    assert type(cli.trainer.optimizers[0]) is optimizer
    final = [m for m in lightning_log if m.startswith("Final: train error")]
    assert len(final) == 1 and "test error" in final[0]  # through rank-zero logging ...
    assert "Final:" not in capsys.readouterr().out  # ... not print
    assert list(tmp_path.rglob("events.out.tfevents.*")), "TensorBoard event files are written"


def test_print_config_round_trips(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        make_cli(["fit", "--config", str(QUICKSTART), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    config = yaml.safe_load(printed)
    assert config["model"]["class_path"] == "pl_pathsgd.module.PathSGDClassifier"
    assert config["model"]["init_args"]["optimizer"]["class_path"] == "pl_pathsgd.PathSGD"
    assert config["model"]["init_args"]["optimizer"]["init_args"]["lr"] == 0.01
    saved = tmp_path / "printed.yaml"
    saved.write_text(printed)
    with pytest.raises(SystemExit):
        make_cli(["fit", "--config", str(saved), "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out) == config


SCHEDULED_YAML = """
model:
  init_args:
    optimizer:
      class_path: torch.optim.SGD
      init_args: {lr: 0.05, momentum: 0.9}
    lr_scheduler:
      class_path: torch.optim.lr_scheduler.StepLR
      init_args: {step_size: 1, gamma: 0.5}
"""
PLATEAU_YAML = """
model:
  init_args:
    lr_scheduler:
      class_path: ReduceLROnPlateau
      init_args: {mode: max, patience: 0}
"""

# (extra arguments or YAML, optimizer class, its final lr, scheduler class, monitor); 2 epochs each
ROUTES = {
    "yaml": (SCHEDULED_YAML, torch.optim.SGD, 0.05 * 0.5**2, torch.optim.lr_scheduler.StepLR, None),
    "command line": (["--model.init_args.optimizer=Adagrad", "--model.init_args.optimizer.lr=0.05",
                      "--model.init_args.lr_scheduler=StepLR", "--model.init_args.lr_scheduler.step_size=1"],
                     torch.optim.Adagrad, 0.05 * 0.1**2, torch.optim.lr_scheduler.StepLR, None),
    # mode=max on a falling validation loss: the plateau scheduler lowers the rate after every epoch but the first
    "plateau, short name, command line": (["--model.lr_scheduler=ReduceLROnPlateau", "--model.lr_scheduler.mode=max",
                                           "--model.lr_scheduler.patience=0"],
                                          PathSGD, 0.01 * 0.1, ReduceLROnPlateau, "val/loss"),
    "plateau, short name, yaml": (PLATEAU_YAML, PathSGD, 0.01 * 0.1, ReduceLROnPlateau, "val/loss"),
    "plateau, class path, command line": (
        ['--model.init_args.lr_scheduler={"class_path": "torch.optim.lr_scheduler.ReduceLROnPlateau", '
         '"init_args": {"patience": 5}}', "--model.init_args.monitor=val/error"],
        PathSGD, 0.01, torch.optim.lr_scheduler.ReduceLROnPlateau, "val/error"),
    "paper schedule, command line": (["--model.lr_scheduler=PaperSchedule", "--model.lr_scheduler.decay=0.5"],
                                     PathSGD, 0.01 * 0.5**2, PaperSchedule, None),
}


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_optimizer_and_scheduler_by_class_path(tmp_path, route):
    extra, optimizer_class, lr, scheduler_class, monitor = ROUTES[route]
    if isinstance(extra, str):
        config = tmp_path / "override.yaml"
        config.write_text(extra)
        extra = ["--config", str(config)]
    cli = make_cli(bare_args(tmp_path, "--trainer.max_epochs=2", *extra))
    optimizer = cli.trainer.optimizers[0]
    assert type(optimizer) is optimizer_class
    if optimizer_class is PathSGD:
        assert optimizer.model is cli.model.network
    [config] = cli.trainer.lr_scheduler_configs
    assert type(config.scheduler) is scheduler_class and config.monitor == monitor
    assert optimizer.param_groups[0]["lr"] == pytest.approx(lr)
    hparams = cli.model.hparams
    assert hparams["lr_scheduler"]["class_path"].endswith(scheduler_class.__name__)


def test_old_options_fail_with_their_replacement_named(tmp_path, capsys):
    old = tmp_path / "old.yaml"
    old.write_text("model:\n  class_path: pl_pathsgd.module.PathSGDClassifier\n  init_args:\n"
                   "    optimizer: pathsgd\n    lr: 0.01\n    paper_schedule: true\n")
    with pytest.raises(SystemExit) as exit_info:
        make_cli(["fit", "--config", str(old)])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "model.init_args.optimizer: 'pathsgd' in " in message and "class_path: pl_pathsgd.PathSGD" in message
    assert "model.init_args.lr in " in message and "--model.init_args.optimizer.lr=" in message
    assert "model.init_args.paper_schedule in " in message and "pl_pathsgd.PaperSchedule" in message
    for args in (["--model.init_args.custom_optimizer={}"], ["--model.momentum", "0.9"],
                 ["--model.init_args.optimizer=sgd"], ["--model.init_args.weight_decay=0.1"]):
        with pytest.raises(SystemExit):
            make_cli(["fit", "--config", str(QUICKSTART), *args])
        message = capsys.readouterr().err
        assert "on the command line" in message and "Traceback" not in message
        assert "init_args" in message or "torch.optim.SGD" in message


class ClassifierWithItsOwnLr(PathSGDClassifier):
    def __init__(self, lr: float = 0.1, **kwargs):
        """Args:
            lr: a setting of this subclass, not of the optimizer.
        """
        super().__init__(**kwargs)
        self.own_lr = lr


def test_a_subclass_may_have_options_named_like_old_ones(capsys):
    with pytest.raises(SystemExit) as exit_info:
        make_cli(["fit", "--config", str(QUICKSTART), f"--model={__name__}.ClassifierWithItsOwnLr",
                  "--model.init_args.lr=0.5", "--print_config"])
    assert exit_info.value.code in (0, None)
    assert yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["lr"] == 0.5


def test_misspelt_optimizer_class_gets_a_clear_message(capsys):
    with pytest.raises(SystemExit) as exit_info:
        make_cli(["fit", "--config", str(QUICKSTART), "--model.init_args.optimizer=PathSDG"])
    assert exit_info.value.code != 0
    message = capsys.readouterr().err
    assert "PathSDG" in message and "optimizer" in message and "Traceback" not in message


def test_every_model_argument_has_help():
    parser = ArgumentParser()
    parser.add_class_arguments(PathSGDClassifier, "model")
    arguments = {a.dest: a.help for a in parser._actions if a.dest.startswith("model.") and not a.dest.endswith(".help")}
    assert set(arguments) >= {f"model.{name}" for name in ("optimizer", "lr_scheduler", "monitor", "hidden", "init")}
    undocumented = [dest for dest, text in arguments.items() if not text or not text.strip()]
    assert not undocumented, undocumented


def test_help_describes_the_program():
    command = Path(sys.executable).parent / "pl-pathsgd"  # the installed entry point
    assert command.is_file(), "install the package (pip install -e .) to get the pl-pathsgd command"
    result = subprocess.run([str(command), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: pl-pathsgd")
    assert "Path-SGD" in result.stdout and "pl-pathsgd fit --config configs/quickstart.yaml" in result.stdout
    assert "Runs the full optimization routine" in result.stdout  # the subcommands are listed


def test_predict_writes_the_test_split_predictions(tmp_path, lightning_log):
    fit = make_cli(quick_args(tmp_path / "fit", QUICKSTART, "--trainer.callbacks=[]"))
    checkpoint = fit.trainer.checkpoint_callback.best_model_path
    # the data's output count is linked to models that take it; a classifier's checkpoint does not name it
    assert "num_outputs" not in torch.load(checkpoint, weights_only=False)["hyper_parameters"]
    assert type(PathSGDClassifier.load_from_checkpoint(checkpoint)) is PathSGDClassifier
    cli = make_cli(quick_args(tmp_path / "predict", QUICKSTART, "--trainer.callbacks=[]", f"--ckpt_path={checkpoint}",
                              subcommand="predict"))
    [written] = list((tmp_path / "predict").rglob("predictions.csv"))
    rows = list(csv.DictReader(written.open()))
    test_x, _ = cli.datamodule.test_dataset.tensors
    with torch.no_grad():
        expected = fit.model(test_x).argmax(1).tolist()
    assert [int(r["prediction"]) for r in rows] == expected and len(rows) == 300
    assert [int(r["index"]) for r in rows] == list(range(300))
    assert any(str(written) in m for m in lightning_log)


def test_float64_by_precision_leaves_the_default_dtype(tmp_path):
    cli = make_cli(bare_args(tmp_path, "--trainer.precision=64-true", "--model.init_args.init=unbalanced"))
    weights = [p for p in cli.model.parameters()]
    assert weights and all(p.dtype == torch.float64 for p in weights)
    assert cli.trainer.optimizers[0].last_geometry_dtype == torch.float64
    assert torch.get_default_dtype() == torch.float32


def traces_of_the_network(monkeypatch, args) -> tuple[int, int, object]:
    """(traces of the trained network, all traces, the cli) over one CLI fit."""
    traced = []
    original = tracing.export_program

    def counting(model, input_shape):
        traced.append(model)
        return original(model, input_shape)

    monkeypatch.setattr(tracing, "export_program", counting)
    before = graph_module.TRACE_COUNT
    cli = make_cli(args)
    network = cli.model.network
    return sum(model is network for model in traced), graph_module.TRACE_COUNT - before, cli


@pytest.mark.parametrize("init", ["balanced", "unbalanced"])
def test_the_model_and_optimizer_trace_the_network_once(tmp_path, monkeypatch, init):
    of_network, total, cli = traces_of_the_network(
        monkeypatch, bare_args(tmp_path, f"--model.init_args.init={init}", "--trainer.max_epochs=2"))
    assert of_network == total == 1  # the unbalanced init and PathSGD share the one trace
    assert cli.trainer.optimizers[0].graph is graph_module.trace(cli.model.network, (64,))


def test_a_quickstart_run_traces_the_network_once(tmp_path, monkeypatch):
    of_network, _, _ = traces_of_the_network(monkeypatch, quick_args(tmp_path))
    assert of_network == 1


def final_state(cli) -> tuple[dict[str, torch.Tensor], dict]:
    weights = {k: v.detach().clone() for k, v in cli.model.state_dict().items()}
    group = cli.trainer.optimizers[0].param_groups[0]
    return weights, {"lr": group["lr"], "momentum": group["momentum"]}


def test_resume_from_checkpoint_is_bit_identical(tmp_path):
    common = ["--model.init_args.optimizer.momentum=0.5", "--model.init_args.lr_scheduler=PaperSchedule",
              "--trainer.limit_train_batches=4", "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
              "--trainer.callbacks.save_last=true"]
    straight = make_cli(quick_args(tmp_path / "straight", QUICKSTART, *common, "--trainer.max_epochs=2"))
    make_cli(quick_args(tmp_path / "resumed", QUICKSTART, *common, "--trainer.max_epochs=1"))
    checkpoint = next((tmp_path / "resumed").rglob("last.ckpt"))
    resumed = make_cli(quick_args(tmp_path / "resumed2", QUICKSTART, *common, "--trainer.max_epochs=2",
                                  f"--ckpt_path={checkpoint}"))
    assert resumed.trainer.current_epoch == 2
    (a, schedule_a), (b, schedule_b) = final_state(straight), final_state(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert schedule_a == schedule_b == {"lr": pytest.approx(0.01 * 0.99**2), "momentum": pytest.approx(0.54)}
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


def test_json_lists_of_loggers_still_work_with_the_runner_form(tmp_path):
    """The sweep runner passes its loggers as JSON on the command line; the optimizer form must not disturb it."""
    loggers = [{"class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(tmp_path), "name": "", "version": "csv"}}]
    optimizer = {"class_path": "torch.optim.Adagrad", "init_args": {"lr": 0.01}}
    cli = make_cli(bare_args(tmp_path, f"--trainer.logger={json.dumps(loggers)}",
                             f"--model.init_args.optimizer={json.dumps(optimizer)}"))
    assert type(cli.trainer.optimizers[0]) is torch.optim.Adagrad
    assert (tmp_path / "csv" / "hparams.yaml").is_file()
