"""EpochErrorMonitor: 0-1 error and loss on the whole train, validation and test sets during fit."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor
from typing_extensions import override

from pl_pathsgd.callbacks._batch import BatchReader, UnpackBatch
from pl_pathsgd.callbacks._common import metric_tensor, require_class_scores, require_logger
from pl_pathsgd.callbacks._datasets import DatasetReader, whole_dataset_reader
from pl_pathsgd.callbacks._observe import eval_mode, preserved_rng

LossFn = Callable[[Tensor, Tensor], Tensor]
SPLITS = ("train", "val", "test")

#: Examples per evaluation batch: large, since evaluation keeps no activations for a backward pass.
DEFAULT_EVAL_BATCH_SIZE = 1024


class EpochErrorMonitor(Callback):
    r"""Measure the 0-1 error and the mean loss on whole datasets during ``fit``.

    Logs ``train/error``, ``train/loss``, ``test/error``, ``test/loss`` at the end of every training epoch and
    ``val/error``, ``val/loss`` once per validation run (see below), with ``pl_module.log(..., on_epoch=True)``,
    so they reach the loggers and ``trainer.callback_metrics``.  The error is the fraction of examples whose
    arg-max output differs from the class label; the loss is the mean of ``loss_fn`` over examples (default:
    cross-entropy).  Unlike the running averages Lightning logs during training, every number covers the
    *whole* set with the current weights, in eval mode (no dropout) under ``torch.no_grad()``.  Lightning does
    not run the test set during ``fit``; this callback does (the curves of the Path-SGD paper need it).

    **It observes without changing the run.**  Every submodule gets its own train/eval mode back (a submodule
    frozen with ``.eval()`` stays frozen), the global random states (torch, CUDA, numpy, ``random``) are
    restored after each measurement, and the data are read without advancing the training loader's sampler
    or iterators, so a seeded run ends bit-identical with and without the callback.

    **Validation, once per validation run.**  Decided once, at the start of fit, from the module and the
    Trainer (no guess from what was logged):

    * if Lightning validates (the module has a ``validation_step``, there is validation data and
      ``limit_val_batches != 0``), each of Lightning's validation runs is a validation run:
      with ``val=True`` the callback measures the whole validation set at the end of every one of them
      (``on_validation_epoch_end``, so ``check_val_every_n_epoch`` and ``val_check_interval`` decide when,
      sanity checks excluded, and ``limit_val_batches`` does not shorten the measurement); with ``val=None``
      validation is left to the module's own logging and the callback warns once if the first run logged
      no ``val/error``.  ``val/error`` goes to the progress bar, as ``PathSGDClassifier`` logs it; a module that
      also logs ``val/error`` in its own ``on_validation_epoch_end`` must log it the same way (``prog_bar=True``,
      ``sync_dist=True``), or Lightning refuses the second call;
    * otherwise (no ``validation_step``) the callback runs validation itself at the end of every
      ``check_val_every_n_epoch``-th training epoch, on the validation data given to ``fit``, unless
      ``limit_val_batches == 0`` (with ``val=None``, only when ``fit`` was given validation data).

    **Data.**  Each split is read from (first that exists):

    * train: the ``train_dataloader`` argument; ``trainer.datamodule.train_eval_dataloader()``; the dataset of
      the trainer's training dataloader (all of it, whatever ``limit_train_batches`` says);
    * val: the ``val_dataloader`` argument; the trainer's validation dataloaders; the validation data given to
      ``fit`` (also when the module has no ``validation_step``);
    * test: the ``test_dataloader`` argument; ``datamodule.test_dataloader()``; ``pl_module.test_dataloader()``.

    Every example is read once per measurement, ``eval_batch_size`` at a time; a ``TensorDataset`` (such as
    the package's ``InMemoryDataset``) is sliced directly, with no per-example Python (details in
    ``pl_pathsgd.callbacks._datasets``).  Batches are read as the DataLoader yields them and moved to the
    module's device; the module's ``on_before_batch_transfer``/``on_after_batch_transfer`` hooks are not
    applied (they often augment training batches): put what evaluation needs into the dataset or into
    ``unpack_batch``.  Under DDP each process reads every world-size-th example and the sums of errors, losses
    and counts are added across processes.  A split without data is skipped with a one-time warning; several
    dataloaders of one split are pooled.

    **Batches** are read by ``unpack_batch`` (``(x, y)`` tuples/lists and ``{"x": ..., "y": ...}``-style dicts
    out of the box; see :mod:`pl_pathsgd.callbacks`).  The first batch of every source is checked at the first
    training batch, before any step; a batch it cannot read raises :class:`UnreadableBatchError` saying what
    to pass.  The prediction is ``pl_module(inputs)``, run under the trainer's precision context.

    Args:
        train, val, test: which splits to measure. ``val=None`` (default): ``True`` when ``val_dataloader`` is
            given, else automatic as described above.
        train_dataloader, val_dataloader, test_dataloader: data to use instead of the defaults above.
        loss_fn: ``loss_fn(outputs, targets)`` returning the *mean* loss of the batch (it is weighted by the
            batch size); default :func:`torch.nn.functional.cross_entropy`.
        eval_batch_size: examples per evaluation batch (not the training batch size).
        unpack_batch: ``batch -> (inputs, targets)``.

    Note:
        ``train/*`` and ``test/*`` (and ``val/*`` without a ``validation_step``) are logged in
        ``on_train_epoch_end``.  To monitor them in ``ModelCheckpoint`` or ``EarlyStopping``, make those act at
        the end of the training epoch: ``ModelCheckpoint(monitor="test/error", save_on_train_epoch_end=True)``.
        ``val/*`` measured in Lightning's validation runs can be monitored as usual.
    """

    def __init__(
        self,
        train: bool = True,
        val: bool | None = None,
        test: bool = True,
        train_dataloader: Iterable | None = None,
        val_dataloader: Iterable | None = None,
        test_dataloader: Iterable | None = None,
        loss_fn: LossFn | None = None,
        eval_batch_size: int = DEFAULT_EVAL_BATCH_SIZE,
        unpack_batch: UnpackBatch | None = None,
    ):
        owner = "EpochErrorMonitor"
        for name, flag in (("train", train), ("val", val), ("test", test)):
            if not isinstance(flag, bool) and not (name == "val" and flag is None):
                raise ValueError(f"{owner}({name}={flag!r}) must be True or False"
                                 + (" (or None: automatic)" if name == "val" else ""))
        if not (train or val is not False or test):
            raise ValueError(f"{owner}(train=False, val=False, test=False) would measure nothing")
        for name, loader in (("train_dataloader", train_dataloader), ("val_dataloader", val_dataloader),
                             ("test_dataloader", test_dataloader)):
            if loader is not None and not isinstance(loader, Iterable):
                raise ValueError(f"{owner}({name}=...) must be an iterable of batches, e.g. a DataLoader")
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"{owner}(loss_fn=...) must be callable: loss_fn(outputs, targets) -> mean loss")
        if isinstance(eval_batch_size, bool) or not isinstance(eval_batch_size, int) or eval_batch_size < 1:
            raise ValueError(f"{owner}(eval_batch_size={eval_batch_size!r}) must be an int >= 1")
        if val is None and val_dataloader is not None:
            val = True
        self.train, self.val, self.test = train, val, test
        self.sources = {"train": train_dataloader, "val": val_dataloader, "test": test_dataloader}
        self.loss_fn = loss_fn
        self.eval_batch_size = eval_batch_size
        self.reader = BatchReader(unpack_batch, owner, inputs_tensor=False, targets=True)
        #: how validation is measured in this fit: None (not here), "runs" (in Lightning's validation runs),
        #: "epochs" (here, at the end of validation epochs) or "module" (left to the module's own logging)
        self.val_mode: str | None = None
        self._readers: dict[int, tuple[Any, list[DatasetReader]]] = {}
        self._fit_sources: dict[str, Any] = {}
        self._checked = False
        self._warned: set[str] = set()

    @property
    @override
    def state_key(self) -> str:
        splits = tuple(s for s, on in zip(SPLITS, (self.train, self.val is not False, self.test)) if on)
        return self._generate_state_key(splits=splits)

    # ------------------------------------------------------------------ hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        require_logger(trainer, type(self).__name__)
        self._readers.clear()
        self._fit_sources.clear()
        self._checked = False
        self.val_mode = self._decide_val_mode(trainer, pl_module)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":  # release the readers (and any persistent workers)
            self._readers.clear()
            self._fit_sources.clear()

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._checked:  # before the first step: every source this fit reads must be readable
            self._checked = True
            measured = None  # inputs of a batch this callback measures
            for split in self._splits_read_this_fit():
                with preserved_rng():
                    for reader in self._split_readers(split, trainer):
                        first = next(iter(reader.batches()), None)
                        if first is not None:
                            inputs, _ = self.reader.check(first, f"first {split} batch")
                            measured = inputs if measured is None else measured
            if measured is not None:
                require_class_scores(trainer, pl_module, move_data_to_device(measured, pl_module.device),
                                     type(self).__name__, "the 0-1 error (the arg max of the outputs against the "
                                     "labels; a regressor has none: leave this callback out) needs")

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.val_mode == "runs" and trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._log(self.measure(("val",), trainer, pl_module), pl_module)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.val_mode == "module" and not trainer.sanity_checking and "val/error" not in trainer.callback_metrics:
            self._warn_once("module-val", f"{type(self).__name__}(val=None): the module's validation_step does not log "
                                          "val/error; pass val=True to measure it here in every validation run")

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        splits = [split for split, on in (("train", self.train), ("test", self.test)) if on]
        if self.val_mode == "epochs" and _validation_epoch(trainer):
            splits.insert(1, "val")
        self._log(self.measure(splits, trainer, pl_module), pl_module)

    # ------------------------------------------------------------------ measurement

    def measure(self, splits: Iterable[str], trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        """``{"train/error": ..., "train/loss": ..., ...}`` for the current weights (float64 scalars)."""
        results: dict[str, Tensor] = {}
        with preserved_rng(), eval_mode(pl_module), torch.no_grad():
            for split in splits:
                readers = self._split_readers(split, trainer)
                if not readers:
                    self._warn_once(split, f"{type(self).__name__}: no {split} data found (pass {split}_dataloader=... "
                                           f"or give the datamodule a {split}_dataloader()); {split}/error and "
                                           f"{split}/loss are not logged while there is none")
                    continue
                sums = self._sums(readers, trainer, pl_module)
                if trainer.world_size > 1:
                    sums = trainer.strategy.reduce(sums, reduce_op="sum")
                errors, loss, count = sums.tolist()
                if count == 0:
                    self._warn_once(split + "-empty", f"{type(self).__name__}: the {split} data is empty; skipped")
                    continue
                results[f"{split}/error"] = metric_tensor(errors / count, pl_module.device)
                results[f"{split}/loss"] = metric_tensor(loss / count, pl_module.device)
        return results

    def _sums(self, readers: list[DatasetReader], trainer: pl.Trainer, pl_module: pl.LightningModule) -> Tensor:
        device = pl_module.device
        dtype = torch.float32 if device.type == "mps" else torch.float64
        sums = torch.zeros(3, dtype=dtype, device=device)  # errors, summed loss, examples
        precision = trainer.precision_plugin
        for reader in readers:
            for batch in reader.batches():
                inputs, targets = self.reader(batch)
                inputs, targets = move_data_to_device((inputs, targets), device)
                inputs = precision.convert_input(inputs)
                with precision.val_step_context():
                    outputs = pl_module(inputs)
                if outputs.dtype in (torch.float16, torch.bfloat16):
                    outputs = outputs.float()
                labels = targets.argmax(dim=-1) if targets.dim() == outputs.dim() else targets
                if self.loss_fn is None:
                    loss = F.cross_entropy(outputs, targets, reduction="sum")
                else:
                    loss = self.loss_fn(outputs, targets) * len(targets)
                sums[0] += (outputs.argmax(dim=-1) != labels).sum().to(dtype)
                sums[1] += loss.detach().to(dtype)
                sums[2] += len(targets)
        return sums

    def _log(self, results: dict[str, Tensor], pl_module: pl.LightningModule) -> None:
        for key, value in results.items():
            # already summed over processes: equal on every rank, and the mean of equal values is that value
            pl_module.log(key, value, on_step=False, on_epoch=True, sync_dist=True, prog_bar=key == "val/error")

    # ------------------------------------------------------------------ what is measured, from where

    def _decide_val_mode(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> str | None:
        if self.val is False:
            return None
        if _lightning_validates(trainer, pl_module):
            return "runs" if self.val else "module"
        if trainer.limit_val_batches == 0:
            return None
        source = _val_data_source(trainer)
        if self.val is None and (source is None or not source.is_defined()):
            return None  # nothing to validate on, and nobody asked for validation
        return "epochs"

    def _splits_read_this_fit(self) -> list[str]:
        return [split for split, on in (("train", self.train), ("val", self.val_mode in ("runs", "epochs")),
                                        ("test", self.test)) if on]

    def _split_readers(self, split: str, trainer: pl.Trainer) -> list[DatasetReader]:
        source = self._source(split, trainer)
        if source is None:
            return []
        readers = []
        for loader in _flatten(source):
            cached = self._readers.get(id(loader))
            if cached is None or cached[0] is not loader:
                cached = (loader, [whole_dataset_reader(loader, self.eval_batch_size, trainer.global_rank,
                                                        trainer.world_size)])
                self._readers[id(loader)] = cached
            readers.extend(cached[1])
        return readers

    def _source(self, split: str, trainer: pl.Trainer) -> Any:
        if self.sources[split] is not None:
            return self.sources[split]
        if split == "val" and trainer.val_dataloaders is not None:
            return trainer.val_dataloaders
        if split not in self._fit_sources:  # asked once per fit
            source = self._fit_source(split, trainer)
            if source is None and split != "test":
                return None  # the trainer sets its dataloaders up lazily: ask again next time
            self._fit_sources[split] = source
        return self._fit_sources[split]

    def _fit_source(self, split: str, trainer: pl.Trainer) -> Any:
        datamodule = trainer.datamodule
        if split == "train":
            if datamodule is not None and callable(getattr(datamodule, "train_eval_dataloader", None)):
                return datamodule.train_eval_dataloader()
            return trainer.train_dataloader
        if split == "val":
            # Lightning sets validation up lazily, and not at all without a validation_step
            return _fit_val_source(trainer)
        for owner in (datamodule, trainer.lightning_module):
            if owner is not None and is_overridden("test_dataloader", owner):
                try:
                    return owner.test_dataloader()
                except Exception as error:  # a datamodule set up for "fit" only may not have its test split
                    self._warned.add("test")  # this warning replaces the generic "no test data" one
                    self._warn_once("test-error", f"{type(self).__name__}: {type(owner).__name__}.test_dataloader() "
                                                  f"failed during fit ({type(error).__name__}: {error}); pass "
                                                  "test_dataloader=... to measure the test set")
                    return None
        return None

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)


def _lightning_validates(trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
    """Whether Lightning's fit will run validation: a validation_step, validation data, limit_val_batches != 0."""
    if not is_overridden("validation_step", pl_module) or trainer.limit_val_batches == 0:
        return False
    source = _val_data_source(trainer)
    return source is not None and source.is_defined()


def _validation_epoch(trainer: pl.Trainer) -> bool:
    every = trainer.check_val_every_n_epoch
    return every is None or (trainer.current_epoch + 1) % every == 0


def _val_data_source(trainer: pl.Trainer) -> Any:
    source = getattr(getattr(getattr(trainer.fit_loop, "epoch_loop", None), "val_loop", None), "_data_source", None)
    return None if source is None or getattr(source, "instance", None) is None else source


def _fit_val_source(trainer: pl.Trainer) -> Any:
    """The validation data given to ``fit``, whether or not Lightning's validation loop uses it."""
    source = _val_data_source(trainer)
    return source.dataloader() if source is not None and source.is_defined() else None


def _only_loaders(obj: Any) -> bool:
    if isinstance(obj, torch.utils.data.DataLoader):
        return True
    if isinstance(obj, dict):
        return bool(obj) and all(_only_loaders(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return bool(obj) and all(_only_loaders(v) for v in obj)
    return False


def _flatten(loaders: Any) -> list[Any]:
    """The dataloaders in a list/tuple/dict of DataLoaders (Lightning's combined forms); anything else is one."""
    if isinstance(loaders, (dict, list, tuple)) and _only_loaders(loaders):
        values = loaders.values() if isinstance(loaders, dict) else loaders
        return [loader for value in values for loader in _flatten(value)]
    return [loaders]
