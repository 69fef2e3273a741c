"""``pl-pathsgd``: LightningCLI for the package's classifier and DataModules, configured from YAML."""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml
from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden

from pl_pathsgd.data import BaseDataModule
from pl_pathsgd.factories import OPTIMIZER_NAMES, as_factory, removed_name_message
from pl_pathsgd.module import PathSGDClassifier

DESCRIPTION = """\
Train, evaluate and apply the Path-SGD paper's ReLU networks with PyTorch Lightning.

The model (pl_pathsgd.PathSGDClassifier or a subclass), its optimizer and learning-rate scheduler
(any torch.optim class, pl_pathsgd.PathSGD, pl_pathsgd.PaperSchedule, ...) and the data (a
pl_pathsgd.data DataModule) are chosen by class_path/init_args in YAML or on the command line; the
model's input shape and class count come from the DataModule. `predict` returns the predicted class
of every test example and writes them to predictions.csv in the run's log folder.

  pl-pathsgd fit --config configs/quickstart.yaml
  pl-pathsgd fit --config configs/quickstart.yaml --model.init_args.optimizer=SGD --model.init_args.optimizer.lr=0.1
  pl-pathsgd fit --help                      every option, with its help
  pl-pathsgd fit --model.help PathSGDClassifier
"""

#: model options of pl-pathsgd 0.1 and where their setting now lives
REMOVED_MODEL_OPTIONS = {
    "lr": "the optimizer's init_args: `optimizer: {class_path: pl_pathsgd.PathSGD, init_args: {lr: 0.01}}` "
          "(command line: --model.init_args.optimizer.lr=0.01)",
    "momentum": "the optimizer's init_args: `optimizer: {class_path: pl_pathsgd.PathSGD, init_args: {momentum: 0.9}}` "
                "(command line: --model.init_args.optimizer.momentum=0.9)",
    "weight_decay": "the optimizer's init_args: `optimizer: {class_path: ..., init_args: {weight_decay: ...}}` "
                    "(command line: --model.init_args.optimizer.weight_decay=...)",
    "p": "PathSGD's init_args: `optimizer: {class_path: pl_pathsgd.PathSGD, init_args: {p: 2}}` "
         "(command line: --model.init_args.optimizer.p=2)",
    "paper_schedule": "a scheduler: `lr_scheduler: {class_path: pl_pathsgd.PaperSchedule}` "
                      "(command line: --model.init_args.lr_scheduler=PaperSchedule)",
    "custom_optimizer": "`optimizer`, which takes the same class_path/init_args form",
}


class _HelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's help formatter, keeping the line breaks of the description."""


class PathSGDCLI(LightningCLI):
    """LightningCLI whose model input shape and class count come from the chosen DataModule."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.input_shape", "model.init_args.input_shape", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")

    def parse_arguments(self, parser, args) -> None:
        problems = removed_options(sys.argv[1:] if args is None else args)
        if problems:
            sys.stderr.write("pl-pathsgd: error: options of pl-pathsgd 0.1 that no longer exist:\n"
                             + "".join(f"  - {problem}\n" for problem in problems))
            raise SystemExit(2)
        super().parse_arguments(parser, args)

    def after_fit(self) -> None:
        metrics = self.trainer.callback_metrics
        parts = [f"{split} error {float(metrics[f'{split}/error']):.4f}"
                 for split in ("train", "val", "test") if f"{split}/error" in metrics]
        if parts:
            rank_zero_info("Final: " + ", ".join(parts))

    def predict(self, model: pl.LightningModule, datamodule: pl.LightningDataModule | None = None,
                **kwargs: Any) -> None:
        """``pl-pathsgd predict``: the predicted classes of the test split, written to ``predictions.csv``."""
        if datamodule is not None and not is_overridden("predict_dataloader", datamodule, pl.LightningDataModule):
            datamodule.predict_dataloader = datamodule.test_dataloader  # predict on the test split
        predictions = self.trainer.predict(model, datamodule=datamodule, **kwargs)
        if predictions is None:  # return_predictions=false
            return
        if not all(isinstance(batch, torch.Tensor) for batch in predictions):
            rank_zero_info("pl-pathsgd predict: the model's predict_step does not return tensors of classes; "
                           "nothing written")
            return
        if self.trainer.world_size > 1:
            rank_zero_warn("pl-pathsgd predict: with several processes each holds part of the predictions; none "
                           "are written. Add a lightning.pytorch.callbacks.BasePredictionWriter to save them.")
            return
        classes = torch.cat([batch.reshape(-1) for batch in predictions]).tolist()
        path = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "predictions.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["index", "prediction"])
            writer.writerows(enumerate(classes))
        rank_zero_info(f"Predicted the classes of {len(classes)} test examples: {path}")


def removed_options(args: Any) -> list[str]:
    """The options of pl-pathsgd 0.1 in command-line ``args`` and the config files they name, each with its
    replacement. Only for the package's own classifier: a subclass may well have an ``lr`` of its own."""
    if not isinstance(args, (list, tuple)):
        return []
    args = [str(a) for a in args]
    model_class = None  # the model's class_path, where given (the last one counts, as for the parser)
    found: list[tuple[str, Any, str]] = []  # (option, value, where)
    for index, arg in enumerate(args):
        name, _, value = arg.partition("=")
        if not value and index + 1 < len(args) and not args[index + 1].startswith("-"):
            value = args[index + 1]
        if name in ("--config", "-c") or (name == "--model" and value.endswith((".yaml", ".yml", ".json"))):
            try:
                config = yaml.safe_load(Path(value).read_text())
            except (OSError, yaml.YAMLError):
                continue  # the parser reports unreadable files itself
            for model in _model_sections(config if name != "--model" else {"model": config}):
                model_class = model.get("class_path", model_class)
                section = model.get("init_args", model)
                if isinstance(section, dict):
                    found += [(key, option, f" in {value}") for key, option in section.items()]
        elif name in ("--model", "--model.class_path"):
            model_class = value
        elif name.startswith("--model."):
            parts = name[2:].split(".")[1:]
            if parts[:1] == ["init_args"]:
                parts = parts[1:]
            if len(parts) == 1:
                found.append((parts[0], value, " on the command line"))
    if model_class is not None and not _is_classifier(model_class):
        return []
    return [problem for key, value, where in found for problem in _check(key, value, where)]


def _check(name: str, value: Any, where: str) -> list[str]:
    key = f"model.init_args.{name}"
    if name in REMOVED_MODEL_OPTIONS:
        return [f"{key}{where} was removed; its setting now goes in {REMOVED_MODEL_OPTIONS[name]}"]
    if name == "optimizer" and isinstance(value, str) and value in OPTIMIZER_NAMES:
        return [removed_name_message(key, value, where)]
    return []


def _is_classifier(class_path: Any) -> bool:
    if class_path == PathSGDClassifier.__name__:
        return True
    try:
        return as_factory(class_path, "model") is PathSGDClassifier
    except Exception:  # noqa: BLE001 - not importable here: the parser will say so
        return False


def _model_sections(config: Any) -> Iterator[dict]:
    """The ``model`` entries of a config file (also under a subcommand key such as ``fit:``)."""
    if not isinstance(config, dict):
        return
    for candidate in (config, *(v for v in config.values() if isinstance(v, dict))):
        if isinstance(candidate.get("model"), dict):
            yield candidate["model"]


def make_cli(args=None, run: bool = True) -> PathSGDCLI:
    """The ``pl-pathsgd`` CLI; with ``run=False`` it only builds the model, data and trainer."""
    return PathSGDCLI(
        PathSGDClassifier,
        BaseDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,  # the module builds its own (PathSGD needs the network)
        parser_kwargs={"prog": "pl-pathsgd", "description": DESCRIPTION, "formatter_class": _HelpFormatter},
        run=run,
        args=args,
    )


def main(args=None) -> None:
    from pl_pathsgd import configs  # the packaged configs: `pl-pathsgd configs ...`, `--config NAME`

    command_line = sys.argv[1:] if args is None else args
    if isinstance(command_line, (list, tuple)) and command_line[:1] == ["configs"]:
        raise SystemExit(configs.main(list(command_line[1:])))
    try:
        resolved = configs.resolve_config_args(command_line)
    except configs.UnknownConfigError as error:
        sys.stderr.write(f"pl-pathsgd: error: {error}\n")
        raise SystemExit(2) from None
    if args is None:
        sys.argv[1:] = resolved  # what the user meant, for the parser and any process Lightning launches
    make_cli(None if args is None else resolved)


if __name__ == "__main__":
    main()
