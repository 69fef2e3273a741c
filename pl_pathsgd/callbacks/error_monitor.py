"""EpochErrorMonitor: 0-1 error and cross-entropy on the full train, validation and test sets every epoch."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    Subset,
)
from typing_extensions import override

from pl_pathsgd.callbacks._common import metric_tensor, require_logger

LossFn = Callable[[Tensor, Tensor], Tensor]
SPLITS = ("train", "val", "test")


class EpochErrorMonitor(Callback):
    r"""After every training epoch, measure the 0-1 error and the mean loss on whole datasets.

    Logs ``train/error``, ``train/loss``, ``val/error``, ``val/loss``, ``test/error``, ``test/loss`` (for the
    splits that are enabled and have data) once per epoch with ``pl_module.log(..., on_epoch=True)``, so they
    reach the logger and ``trainer.callback_metrics``.  The error is the fraction of examples whose arg-max
    logit differs from the class label; the loss is the mean of ``loss_fn`` over examples (default:
    cross-entropy).  Unlike the running averages Lightning logs during training, the train numbers are
    measured on the *whole* training set with the weights at the end of the epoch, in eval mode (no dropout)
    under ``torch.no_grad()``; the module's train/eval mode is restored afterwards.  Lightning does not
    run the test set during ``fit``; this callback does (the curves of the Path-SGD paper need it).

    Where each set comes from (the first that exists):

    * train: the ``train_dataloader`` argument; ``trainer.datamodule.train_eval_dataloader()``; the dataset of
      the trainer's training dataloader.
    * val: the ``val_dataloader`` argument; the trainer's validation dataloaders; the validation data given to
      ``fit`` (dataloaders, ``datamodule.val_dataloader()`` or ``pl_module.val_dataloader()``), even when the
      module has no ``validation_step``.
    * test: the ``test_dataloader`` argument; ``datamodule.test_dataloader()``; ``pl_module.test_dataloader()``.

    A split with no data is skipped with a one-time warning.  Several dataloaders of one split are pooled.

    A dataloader over a map-style dataset with a plain (sequential, random or distributed) sampler is read
    through an unshuffled copy (same batch size, ``collate_fn`` and workers, no dropped last batch), so the
    measurement never consumes the global random state and covers each example exactly once; under DDP
    each process reads the examples ``rank, rank + world_size, ...`` and the sums of errors, losses and
    counts are added across processes before dividing.  Other dataloaders (iterable datasets, custom
    samplers) are read as they are.

    Batches are ``(x, y, ...)`` tuples or lists, moved to ``pl_module.device``; the prediction is
    ``pl_module(x)`` (logits), run under the trainer's precision context.

    Args:
        train, val, test: which splits to measure. ``val=None`` (default): validation too, unless the
            module's own validation loop already logs ``val/error`` (then it is left to it, not logged twice).
        train_dataloader, val_dataloader, test_dataloader: dataloaders to use instead of the defaults above.
        loss_fn: ``loss_fn(logits, targets)`` returning the *mean* loss of the batch (it is weighted by the
            batch size); default :func:`torch.nn.functional.cross_entropy`.

    Note:
        The values are logged in ``on_train_epoch_end``, after validation ran.  To monitor them in
        ``ModelCheckpoint`` or ``EarlyStopping``, make those act at the end of the training epoch:
        ``ModelCheckpoint(monitor="val/error", save_on_train_epoch_end=True)``,
        ``EarlyStopping(monitor="val/error", check_on_train_epoch_end=True)``.
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
    ):
        for name, flag in (("train", train), ("val", val), ("test", test)):
            if not isinstance(flag, bool) and not (name == "val" and flag is None):
                raise ValueError(f"EpochErrorMonitor({name}={flag!r}) must be True or False"
                                 + (" (or None: automatic)" if name == "val" else ""))
        if not (train or val is not False or test):
            raise ValueError("EpochErrorMonitor(train=False, val=False, test=False) would measure nothing")
        for name, loader in (
            ("train_dataloader", train_dataloader),
            ("val_dataloader", val_dataloader),
            ("test_dataloader", test_dataloader),
        ):
            if loader is not None and not isinstance(loader, Iterable):
                raise ValueError(
                    f"EpochErrorMonitor({name}=...) must be an iterable of (x, y) batches, e.g. a DataLoader"
                )
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError("EpochErrorMonitor(loss_fn=...) must be callable: loss_fn(logits, targets) -> mean loss")
        self.requested_splits = tuple(s for s, on in zip(SPLITS, (train, val is not False, test)) if on)
        self.splits = self.requested_splits  # what this fit measures
        self.val_auto = val is None
        self._val_logged_elsewhere: bool | None = None  # decided at the first epoch end
        self.dataloaders = {"train": train_dataloader, "val": val_dataloader, "test": test_dataloader}
        self.loss_fn = loss_fn
        self._cache: dict[tuple, tuple[Any, DataLoader]] = {}
        self._fit_loaders: dict[str, Any] = {}
        self._warned: set[str] = set()

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(splits=self.requested_splits)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            require_logger(trainer, type(self).__name__)
            self.splits, self._val_logged_elsewhere = self.requested_splits, None
            self._cache.clear()
            self._fit_loaders.clear()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":  # release the copied dataloaders (and any persistent workers)
            self._cache.clear()
            self._fit_loaders.clear()

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.val_auto and self._val_logged_elsewhere is None:
            # before this callback ever logs, a val/error can only come from the module's validation loop
            self._val_logged_elsewhere = "val/error" in trainer.callback_metrics
            if self._val_logged_elsewhere and "val" in self.splits:
                self.splits = tuple(s for s in self.splits if s != "val")
                rank_zero_info(f"{type(self).__name__}: the module's validation loop logs val/error already; "
                               "measuring train and test only (pass val=True to measure val here too)")
        results = self.evaluate(trainer, pl_module)
        for key, value in results.items():
            # already summed over processes: equal on every rank, and the mean of equal values is that value
            pl_module.log(key, value, on_step=False, on_epoch=True, sync_dist=True)

    # ------------------------------------------------------------------ measurement

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        """``{"train/error": ..., "train/loss": ..., ...}`` for the current weights (float64 scalars)."""
        was_training = pl_module.training
        pl_module.eval()
        results: dict[str, Tensor] = {}
        try:
            for split in self.splits:
                loaders = self._loaders(split, trainer, pl_module)
                if not loaders:
                    self._warn_once(
                        split,
                        f"{type(self).__name__}: no {split} data found (pass {split}_dataloader=... or give the "
                        f"datamodule a {split}_dataloader()); {split}/error and {split}/loss are not logged "
                        "while there is none",
                    )
                    continue
                sums = self._sums(loaders, trainer, pl_module)
                if trainer.world_size > 1:
                    sums = trainer.strategy.reduce(sums, reduce_op="sum")
                errors, loss, count = sums.tolist()
                if count == 0:
                    self._warn_once(split + "-empty", f"{type(self).__name__}: the {split} data is empty; skipped")
                    continue
                results[f"{split}/error"] = metric_tensor(errors / count, pl_module.device)
                results[f"{split}/loss"] = metric_tensor(loss / count, pl_module.device)
        finally:
            pl_module.train(was_training)
        return results

    def _sums(self, loaders: list[Iterable], trainer: pl.Trainer, pl_module: pl.LightningModule) -> Tensor:
        device = pl_module.device
        dtype = torch.float32 if device.type == "mps" else torch.float64
        sums = torch.zeros(3, dtype=dtype, device=device)  # errors, summed loss, examples
        precision = trainer.precision_plugin
        with torch.no_grad():
            for loader in loaders:
                for batch in loader:
                    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                        raise ValueError(
                            f"{type(self).__name__} needs (x, y) batches, got {type(batch).__name__}"
                        )
                    x, y = move_data_to_device((batch[0], batch[1]), device)
                    x = precision.convert_input(x)
                    with precision.val_step_context():
                        logits = pl_module(x)
                    if logits.dtype in (torch.float16, torch.bfloat16):
                        logits = logits.float()
                    labels = y.argmax(dim=-1) if y.dim() == logits.dim() else y
                    if self.loss_fn is None:
                        loss = F.cross_entropy(logits, y, reduction="sum")
                    else:
                        loss = self.loss_fn(logits, y) * len(y)
                    sums[0] += (logits.argmax(dim=-1) != labels).sum().to(dtype)
                    sums[1] += loss.detach().to(dtype)
                    sums[2] += len(y)
        return sums

    # ------------------------------------------------------------------ where the data comes from

    def _loaders(self, split: str, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Iterable]:
        source = self.dataloaders[split]
        if source is None:
            if split not in self._fit_loaders:
                self._fit_loaders[split] = self._default_source(split, trainer, pl_module)
            source = self._fit_loaders[split]
            if split != "test" and source is None:
                # the trainer's loaders may appear later (validation sets up lazily)
                del self._fit_loaders[split]
                source = self._trainer_loaders(split, trainer)
        if source is None:
            return []
        return [self._unshuffled(loader, trainer) for loader in _flatten(source)]

    def _default_source(self, split: str, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        datamodule = trainer.datamodule
        if split == "train":
            if datamodule is not None and callable(getattr(datamodule, "train_eval_dataloader", None)):
                return datamodule.train_eval_dataloader()
            return None  # the trainer's own training dataloader, read through an unshuffled copy
        if split == "val":
            return None
        for owner in (datamodule, pl_module):
            if owner is not None and is_overridden("test_dataloader", owner):
                try:
                    return owner.test_dataloader()
                except Exception as error:  # a datamodule set up for "fit" only may not have its test split
                    self._warned.add("test")  # this warning replaces the generic "no test data" one
                    self._warn_once(
                        "test-error",
                        f"{type(self).__name__}: {type(owner).__name__}.test_dataloader() failed during fit "
                        f"({type(error).__name__}: {error}); pass test_dataloader=... to measure the test set",
                    )
                    return None
        return None

    def _trainer_loaders(self, split: str, trainer: pl.Trainer) -> Any:
        if split == "train":
            loaders = trainer.train_dataloader
            datamodule = trainer.datamodule
            if loaders is None and datamodule is not None and is_overridden("train_dataloader", datamodule):
                loaders = datamodule.train_dataloader()
            return loaders
        loaders = trainer.val_dataloaders
        if loaders is None:
            # Lightning sets up validation lazily, and not at all without a validation_step: use what was given to
            # fit (dataloaders, a datamodule or the module's val_dataloader), requested once per fit
            if "val-source" not in self._fit_loaders:
                self._fit_loaders["val-source"] = _fit_val_source(trainer)
            loaders = self._fit_loaders["val-source"]
        return loaders

    def _unshuffled(self, loader: Iterable, trainer: pl.Trainer) -> Iterable:
        """An unshuffled copy of a plain map-style DataLoader over this process's share of the examples."""
        if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
            return loader
        if loader.batch_size is None or type(loader.batch_sampler) is not BatchSampler:
            return loader
        if not isinstance(loader.sampler, (SequentialSampler, RandomSampler, DistributedSampler)):
            return loader
        key = (id(loader.dataset), loader.batch_size, trainer.world_size, trainer.global_rank)
        cached = self._cache.get(key)
        if cached is not None and cached[0] is loader.dataset:
            return cached[1]
        dataset = loader.dataset
        if trainer.world_size > 1:
            dataset = Subset(dataset, range(trainer.global_rank, len(dataset), trainer.world_size))
        workers = loader.num_workers
        rebuilt = DataLoader(
            dataset,
            batch_size=loader.batch_size,
            shuffle=False,
            drop_last=False,
            collate_fn=loader.collate_fn,
            num_workers=workers,
            pin_memory=loader.pin_memory,
            worker_init_fn=loader.worker_init_fn if workers else None,
            multiprocessing_context=loader.multiprocessing_context if workers else None,
            persistent_workers=loader.persistent_workers if workers else False,
        )
        self._cache[key] = (loader.dataset, rebuilt)
        return rebuilt

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)


def _fit_val_source(trainer: pl.Trainer) -> Any:
    """The validation data given to ``fit``, whether or not Lightning's validation loop uses it."""
    source = getattr(getattr(getattr(trainer.fit_loop, "epoch_loop", None), "val_loop", None), "_data_source", None)
    if source is None or getattr(source, "instance", None) is None or not source.is_defined():
        return None
    return source.dataloader()


def _only_loaders(obj: Any) -> bool:
    if isinstance(obj, DataLoader):
        return True
    if isinstance(obj, dict):
        return bool(obj) and all(_only_loaders(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return bool(obj) and all(_only_loaders(v) for v in obj)
    return False


def _flatten(loaders: Any) -> list[Iterable]:
    """The dataloaders in a list/tuple/dict of DataLoaders (Lightning's combined forms); anything else is one."""
    if isinstance(loaders, (dict, list, tuple)) and _only_loaders(loaders):
        values = loaders.values() if isinstance(loaders, dict) else loaders
        return [loader for value in values for loader in _flatten(value)]
    return [loaders]
