"""``pl-pathsgd``: LightningCLI for the package's classifier and DataModules, configured from YAML."""

from __future__ import annotations

import argparse
import csv
import inspect
import json
import pickle
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml
from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.model_helpers import is_overridden
from typing_extensions import override

from pl_pathsgd.data import BaseDataModule, DataError
from pl_pathsgd.experiments.cell import CellError, CellRecorder
from pl_pathsgd.experiments.provenance import lookup, same_value
from pl_pathsgd.factories import OPTIMIZER_NAMES, as_factory, removed_name_message
from pl_pathsgd.module import PathSGDClassifier, SequenceRegressor

try:  # Lightning's instantiator, which records the classes' arguments as the checkpoint's hyper-parameters
    from lightning.pytorch.cli import _get_module_type, _InstantiatorFn
except ImportError:  # a Lightning without it records none: nothing to leave out
    _InstantiatorFn = None

DESCRIPTION = """\
Train, evaluate and apply the Path-SGD paper's ReLU networks with PyTorch Lightning.

The model (pl_pathsgd.PathSGDClassifier, pl_pathsgd.module.SequenceRegressor for sequences, or any
LightningModule), its optimizer and learning-rate scheduler
(any torch.optim class, pl_pathsgd.PathSGD, pl_pathsgd.PaperSchedule, ...) and the data (a
pl_pathsgd.data DataModule) are chosen by class_path/init_args in YAML or on the command line; the
model's input shape and class (or output) count come from the DataModule. `predict` writes the prediction for
every test example (a classifier's class, a regressor's values) to predictions.csv in the run's log folder.

One seed drives a run: seed_everything sets the validation split, the training order (the DataModule's
seed: null) and the initialisation (the model's init_seed: null); pin those to decouple them. With
--ckpt_path, model options that differ from the checkpoint's are an error naming each one; options
not given are taken from the checkpoint. SIGTERM stops a run cleanly with exit status 143.

  pl-pathsgd fit --config configs/quickstart.yaml
  pl-pathsgd fit --config quickstart          a config that comes with the package, by name
  pl-pathsgd configs list                     the packaged configs (configs show NAME, configs copy NAME FILE)
  pl-pathsgd fit --config configs/quickstart.yaml --model.init_args.optimizer=SGD --model.init_args.optimizer.lr=0.1
  pl-pathsgd fit --config rnn/addition        a ReLU RNN on the addition problem (SequenceRegressor)
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


class _Instantiator(_InstantiatorFn or object):
    """Lightning's instantiator, whose saved hyperparameters leave out a linked value the class does not
    take (jsonargparse skips such a link, but reports it as applied): the checkpoint must rebuild the class."""

    def __call__(self, class_type, *args, applied_instantiation_links: dict, **kwargs):
        taken = _keywords_taken(class_type)
        links = {key: value for key, value in applied_instantiation_links.items()
                 if taken is None or key.rsplit(".", 1)[-1] in taken}
        return super().__call__(class_type, *args, applied_instantiation_links=links, **kwargs)


def _keywords_taken(class_type) -> set[str] | None:
    """The keyword arguments ``class_type(...)`` takes; None when it takes any."""
    parameters = inspect.signature(class_type).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters}


class PathSGDCLI(LightningCLI):
    """LightningCLI whose model input shape and output count come from the chosen DataModule."""

    def add_arguments_to_parser(self, parser) -> None:
        # a link whose source or target the chosen classes lack is skipped: the checks below name the mismatch
        parser.link_arguments("data.input_shape", "model.init_args.input_shape", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.num_outputs", "model.init_args.num_outputs", apply_on="instantiate")

    @override
    def _add_instantiators(self) -> None:
        if _InstantiatorFn is None:
            return super()._add_instantiators()
        self.parser.add_instantiator(_Instantiator(cli=self, key="model"), _get_module_type(self._model_class),
                                     subclasses=self.subclass_mode_model)
        self.parser.add_instantiator(_Instantiator(cli=self, key="data"), _get_module_type(self._datamodule_class),
                                     subclasses=self.subclass_mode_data)

    @override
    def instantiate_classes(self) -> None:
        """Build the classes; a DataModule argument that is out of range is one line naming the option."""
        try:
            super().instantiate_classes()
        except Exception as error:
            cause = _data_error(error)
            if cause is not None:
                option = f"--data.init_args.{cause.argument}" if getattr(cause, "argument", None) else "--data"
                _fail(f"{option}: {cause}")
            refusal = _package_refusal(error)
            if refusal is None:
                raise
            _fail(f"--model: {refusal}")
        _check_task(self.model, self.datamodule)

    def parse_arguments(self, parser, args) -> None:
        problems = removed_options(sys.argv[1:] if args is None else args)
        if problems:
            sys.stderr.write("pl-pathsgd: error: options of pl-pathsgd 0.1 that no longer exist:\n"
                             + "".join(f"  - {problem}\n" for problem in problems))
            raise SystemExit(2)
        self._args = args
        super().parse_arguments(parser, args)

    @override
    def _parse_ckpt_path(self) -> None:
        """Take the model options not given from the checkpoint, as LightningCLI does, but refuse options
        given in a config or on the command line that differ from the checkpoint's (instead of silently
        replacing them), and say in one line what is wrong with a checkpoint that cannot be read."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or not Path(ckpt_path).is_file():  # "last", "best", ... or missing: Lightning says so
            return
        hparams = dict(read_checkpoint(ckpt_path).get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        conflicts = checkpoint_conflicts(self._given_model_options(subcommand), hparams)
        if conflicts:
            _fail(f"--ckpt_path={ckpt_path} was trained with other model options than those given: "
                  + "; ".join(conflicts) + ". Leave them out (they are read from the checkpoint) or give the "
                  "checkpoint's values; a different model needs a new run without --ckpt_path")
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)

    def _given_model_options(self, subcommand: str) -> dict:
        """The model options given in config files and on the command line (defaults left out)."""
        try:
            given = self.parser.parse_args(self._args, defaults=False)[subcommand].get("model")
        except (SystemExit, Exception):  # noqa: BLE001 - compare every option, defaults included
            given = self.config[subcommand].get("model")
        if given is None:
            return {}
        return given.as_dict() if hasattr(given, "as_dict") else dict(given)

    def resolved_config(self) -> dict:
        """The run's configuration as plain data: every option, defaults included."""
        config = self.config.get(str(self.subcommand), self.config)
        return yaml.safe_load(self._parser(self.subcommand).dump(config, skip_none=False, skip_validation=True))

    @override
    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        recorders = [c for c in self.trainer.callbacks if isinstance(c, CellRecorder)]
        if recorders and self.subcommand == "fit":
            config = self.resolved_config()
            for recorder in recorders:
                try:
                    recorder.prepare(config)
                except CellError as error:
                    _fail(str(error))

    @override
    def _run_subcommand(self, subcommand: str) -> None:
        if subcommand in ("validate", "test", "predict") and not self.config[subcommand].get("ckpt_path"):
            rank_zero_warn(f"pl-pathsgd {subcommand}: no --ckpt_path given, so this uses the untrained network as "
                           "initialised; pass --ckpt_path=path/to/checkpoint.ckpt to use a trained one")
        try:
            super()._run_subcommand(subcommand)
        except SIGTERMException:
            progress = f" at epoch {self.trainer.current_epoch}, step {self.trainer.global_step}" \
                if subcommand == "fit" else ""
            rank_zero_warn(f"pl-pathsgd {subcommand}: stopped after SIGTERM{progress}; exit status 143")
            raise SystemExit(143) from None

    def after_fit(self) -> None:
        metrics = self.trainer.callback_metrics
        parts = [f"{split} error {float(metrics[f'{split}/error']):.4f}"
                 for split in ("train", "val", "test") if f"{split}/error" in metrics]
        if parts:
            rank_zero_info("Final: " + ", ".join(parts))

    def predict(self, model: pl.LightningModule, datamodule: pl.LightningDataModule | None = None,
                **kwargs: Any) -> None:
        """``pl-pathsgd predict``: the predictions of the test split (a classifier's classes, a regressor's
        values), one row per example, written to ``predictions.csv``."""
        if datamodule is not None and not is_overridden("predict_dataloader", datamodule, pl.LightningDataModule):
            datamodule.predict_dataloader = datamodule.test_dataloader  # predict on the test split
        predictions = self.trainer.predict(model, datamodule=datamodule, **kwargs)
        if predictions is None:  # return_predictions=false
            return
        if not all(isinstance(batch, torch.Tensor) and batch.dim() >= 1 for batch in predictions):
            rank_zero_info("pl-pathsgd predict: the model's predict_step does not return a tensor per batch; "
                           "nothing written")
            return
        if self.trainer.world_size > 1:
            rank_zero_warn("pl-pathsgd predict: with several processes each holds part of the predictions; none "
                           "are written. Add a lightning.pytorch.callbacks.BasePredictionWriter to save them.")
            return
        rows = torch.cat([batch.reshape(len(batch), -1) for batch in predictions])  # one row per example
        header = ["prediction"] if rows.shape[1] == 1 else [f"prediction_{k}" for k in range(rows.shape[1])]
        path = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "predictions.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["index", *header])
            writer.writerows([index, *row] for index, row in enumerate(rows.tolist()))
        what = "values" if rows.is_floating_point() else "classes"
        rank_zero_info(f"Predicted the {what} of {len(rows)} test examples: {path}")


class SaveRunConfig(SaveConfigCallback):
    """Saves the run's config in its log folder and never over another run's: where ``config.yaml`` is taken
    (e.g. two runs with ``--trainer.logger=false`` in one folder) this run's becomes ``config-1.yaml``, ..."""

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.already_saved and self.save_to_log_dir and trainer.log_dir is not None:
            name = _free_name(Path(trainer.log_dir), self.config_filename) if trainer.is_global_zero else None
            name = trainer.strategy.broadcast(name)
            if name != self.config_filename:
                rank_zero_info(f"{Path(trainer.log_dir) / self.config_filename} holds the config of an earlier run; "
                               f"this run's config is saved as {name}")
                self.config_filename = name
        super().setup(trainer, pl_module, stage)


def _data_error(error: BaseException) -> DataError | None:
    """The DataModule's own error behind one raised while the classes were built, if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, DataError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _package_refusal(error: BaseException) -> BaseException | None:
    """A ValueError or TypeError raised by one of the package's models while the classes were built (its
    message names the argument and the fix), if any; a user's own class keeps its traceback."""
    package = str(Path(__file__).resolve().parent)
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (ValueError, TypeError)) and error.__traceback__ is not None:
            frame = error.__traceback__
            while frame.tb_next is not None:
                frame = frame.tb_next
            if frame.tb_frame.f_code.co_filename.startswith(package):
                return error
        error = error.__cause__ or error.__context__
    return None


def _check_task(model: pl.LightningModule, datamodule: Any) -> None:
    """A classifier needs class labels and a regressor values: say so before any work, not at the first loss."""
    classes = getattr(datamodule, "num_classes", None)
    if isinstance(model, PathSGDClassifier) and classes is None:
        _fail(f"{type(datamodule).__name__} has no classes (a regression task): use "
              "--model=pl_pathsgd.module.SequenceRegressor, or a classification DataModule for PathSGDClassifier")
    if isinstance(model, SequenceRegressor) and classes is not None:
        _fail(f"{type(datamodule).__name__} is a classification task ({classes} classes): SequenceRegressor fits "
              "values, e.g. pl_pathsgd.data.AdditionDataModule; use PathSGDClassifier for classes")


def _free_name(folder: Path, name: str) -> str:
    stem, suffix = Path(name).stem, Path(name).suffix
    candidate, number = name, 0
    while (folder / candidate).exists():
        number += 1
        candidate = f"{stem}-{number}{suffix}"
    return candidate


def _fail(message: str) -> None:
    """End the command with a one-line error (the argument parser's exit status)."""
    sys.stderr.write(f"pl-pathsgd: error: {message}\n")
    raise SystemExit(2)


def read_checkpoint(path: str | Path) -> dict:
    """A checkpoint's content, loaded safely (``weights_only``, tensors memory-mapped); a file that is not a
    readable checkpoint ends the command with a one-line error naming the file and what to do."""
    path = Path(path)
    with path.open("rb") as handle:
        head = handle.read(4)
    is_zip = head == b"PK\x03\x04"  # torch.save's format
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except Exception as error:  # noqa: BLE001 - every way a file can fail to load gets the message below
        _fail(f"--ckpt_path={path}: {_why_unreadable(path, is_zip, error)}")
    if not isinstance(checkpoint, dict):
        _fail(f"--ckpt_path={path}: holds a {type(checkpoint).__name__}, not a Lightning checkpoint; pass a "
              ".ckpt file written by Lightning (e.g. the run's checkpoints/last.ckpt)")
    return checkpoint


def _why_unreadable(path: Path, is_zip: bool, error: Exception) -> str:
    size = path.stat().st_size
    if size == 0:
        return "the file is empty; pass a .ckpt file written by Lightning (e.g. the run's checkpoints/last.ckpt)"
    if is_zip and not isinstance(error, pickle.UnpicklingError):
        return (f"the checkpoint is incomplete or damaged ({size} bytes, not a whole archive), e.g. a save or copy "
                "that was cut short; use an intact checkpoint (an earlier one, or copy it again)")
    unsafe = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
    if unsafe:
        return (f"the checkpoint holds the Python object {unsafe.group(1)}, which is not loaded because loading "
                "it could run arbitrary code; pass a checkpoint whose contents are tensors and plain data, as "
                "pl-pathsgd fit writes them")
    return ("not a PyTorch checkpoint (it was not written by torch.save or Lightning); pass a .ckpt file written by "
            "Lightning (e.g. the run's checkpoints/last.ckpt)")


def checkpoint_conflicts(given: dict, saved: dict) -> list[str]:
    """``model.init_args.<key> given <value>, checkpoint <value>`` for every model option given (as parsed,
    ``{"class_path", "init_args"}``) that differs from the checkpoint's hyper-parameters."""
    conflicts = []
    if "class_path" in given and "_class_path" in saved and not same_value("class_path", given["class_path"],
                                                                       saved["_class_path"]):
        conflicts.append(f"model.class_path given {given['class_path']}, checkpoint {saved['_class_path']}")
    options = given.get("init_args", {}) if "class_path" in given else given
    for key, value in _leaves(options or {}):
        if key.split(".", 1)[0] not in saved:
            continue  # an option the checkpoint does not record
        recorded = lookup(saved, key, "(not recorded)")
        if not same_value(key, value, recorded):
            conflicts.append(f"model.init_args.{key} given {_show(value)}, checkpoint {_show(recorded)}")
    return conflicts


def _leaves(options: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(options, dict) and options:
        for key, value in options.items():
            yield from _leaves(value, f"{prefix}.{key}" if prefix else key)
    else:
        yield prefix, options


def _show(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


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
        pl.LightningModule,  # the package's PathSGDClassifier or SequenceRegressor, or any LightningModule
        BaseDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=SaveRunConfig,
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
