"""CapacityReport: path-norms, the training margin and a path-norm generalization bound, per epoch."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader
from typing_extensions import override

from pl_pathsgd.callbacks._batch import BatchReader, UnpackBatch
from pl_pathsgd.callbacks._common import (
    GraphCallback,
    SharedGraph,
    check_every_n_epochs,
    check_input_shape,
    is_number,
    metric_tensor,
)
from pl_pathsgd.callbacks._datasets import DatasetReader, whole_dataset_reader
from pl_pathsgd.callbacks._observe import eval_mode, preserved_rng
from pl_pathsgd.paths import path_norm
from pl_pathsgd.paths.capacity import (
    NetworkStructure,
    classification_margins,
    network_structure,
    percentile,
    rademacher_coefficient,
)

#: Examples per evaluation batch of the training-set pass.
DEFAULT_EVAL_BATCH_SIZE = 1024


class CapacityReport(GraphCallback):
    r"""Log capacity measures of the network at the end of every ``every_n_epochs``-th training epoch.

    Logged keys (float64, rank zero):

    ``capacity/path_norm_l1``, ``capacity/path_norm_l2``, ``capacity/path_norm_l4``
        the l1, l2 and l4 path-norms phi_p(w) of the network (biases are paths from a constant 1).
    ``capacity/margin``
        the ``percentile``-th percentile (default 5, as in Neyshabur et al.'s studies of generalization
        bounds) over the whole training set of the margin: the output of the correct class minus the
        largest output of the other classes.  Negative when more than that share of the training set is
        misclassified.
    ``capacity/normalized_path_norm_l2``
        phi_2 / margin, the margin-normalized l2 path-norm: the scale-free quantity the paper argues controls
        generalization.  Logged only while the margin is positive (a warning says when it is not).
    ``capacity/rademacher``, ``capacity/rademacher_sharpened``
        the Rademacher term of the path-norm generalization bound of Gonon, Brisebarre, Riccietti, Gribonval
        (ICLR 2024, Theorem 3.1): (4 B C / sqrt(n)) * phi_1, with C of the theorem, and with the sharper C' of
        their Remark 3.1.  n is the number of training examples, B = max(1, largest |x| of a training input as
        the module receives it: bias paths start at the constant 1), and D, P, K, M, d_in, d_out come from the
        traced network (:func:`pl_pathsgd.paths.capacity.network_structure`; max pooling counts every input of
        its window).  Such bounds are typically vacuous by many orders of magnitude: a trend to watch during
        training, not a guarantee.

    **It observes without changing the run** (``docs/callbacks.md``): the training-set pass runs in eval mode
    under ``torch.no_grad()`` with every submodule's mode restored afterwards and the global random states
    restored, and reads the data without touching the training loader's sampler or iterators, like
    :class:`~pl_pathsgd.callbacks.EpochErrorMonitor`'s ``train`` split.  The path-norms only read the weights.

    **Data.**  The training set is the ``train_dataloader`` argument, else ``datamodule.train_eval_dataloader()``,
    else the dataset of the trainer's training dataloader (all of it, whatever ``limit_train_batches`` says),
    read ``eval_batch_size`` examples at a time; the module's batch-transfer hooks are not applied.  Batches
    are read by ``unpack_batch`` (see :mod:`pl_pathsgd.callbacks`); targets are class indices or one-hot rows,
    and the module's outputs must be (batch, classes).  The first batch is checked before any training step.

    **Cost** per measurement: three twin passes (batch size 1) for the path-norms and one forward pass over the
    training set.  Only rank zero measures and logs (``rank_zero_only``): under DDP the weights are the same on
    every rank, and rank zero reads the whole training set.

    Args:
        percentile: the percentile of the margin distribution, in [0, 100].
        every_n_epochs: measure after every n-th training epoch.
        train_dataloader: the training data to measure on (default: see above).
        eval_batch_size: examples per batch of the training-set pass.
        input_shape: shape of one example without the batch dimension (default: ``example_input_array``'s,
            else that of the run's ``PathSGD``, else that of the first training batch).
        unpack_batch: ``batch -> (inputs, targets)``.
        structure: D, P, K, M, d_in, d_out to use instead of those derived from the traced network.
    """

    def __init__(
        self,
        percentile: float = 5.0,
        every_n_epochs: int = 1,
        train_dataloader: Iterable | None = None,
        eval_batch_size: int = DEFAULT_EVAL_BATCH_SIZE,
        input_shape: tuple[int, ...] | None = None,
        unpack_batch: UnpackBatch | None = None,
        structure: NetworkStructure | None = None,
    ):
        owner = "CapacityReport"
        if not is_number(percentile) or not 0 <= percentile <= 100:
            raise ValueError(f"{owner}(percentile={percentile!r}) must be a number in [0, 100] (5: the 5th percentile)")
        if train_dataloader is not None and not isinstance(train_dataloader, Iterable):
            raise ValueError(f"{owner}(train_dataloader=...) must be an iterable of batches, e.g. a DataLoader")
        if isinstance(eval_batch_size, bool) or not isinstance(eval_batch_size, int) or eval_batch_size < 1:
            raise ValueError(f"{owner}(eval_batch_size={eval_batch_size!r}) must be an int >= 1")
        if structure is not None and not isinstance(structure, NetworkStructure):
            raise ValueError(f"{owner}(structure=...) must be a pl_pathsgd.paths.capacity.NetworkStructure")
        self.percentile = float(percentile)
        self.every_n_epochs = check_every_n_epochs(every_n_epochs, owner)
        self.source = train_dataloader
        self.eval_batch_size = eval_batch_size
        self.input_shape = check_input_shape(input_shape, owner)
        self.reader = BatchReader(unpack_batch, owner, inputs_tensor=True, targets=True)
        self.given_structure = structure
        #: the structural quantities used in this fit (given, or derived at the first training batch)
        self.structure: NetworkStructure | None = structure
        #: the values of the last measurement, by logged key
        self.last: dict[str, float] = {}
        self._graph = SharedGraph(self.input_shape, owner)
        self._reader: DatasetReader | None = None
        self._checked = False
        self._warned: set[str] = set()

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(percentile=self.percentile, every_n_epochs=self.every_n_epochs)

    # ------------------------------------------------------------------ hooks

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._graph.reset()
        self._reader = None
        self._checked = False
        self.structure = self.given_structure
        self._graph.at_fit_start(trainer, pl_module)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._reader = None  # releases the data reader (and any persistent workers)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._checked:
            return
        self._checked = True  # before the first step: the training data, the network and its structure
        reader = self._train_reader(trainer)
        inputs, _ = self.reader.check(batch, "first training batch")
        self._graph.at_first_batch(trainer, pl_module, inputs)
        if self.structure is None:
            self.structure = network_structure(self._graph.get(pl_module))
        with preserved_rng():
            first = next(iter(reader.batches()), None)
            if first is None:
                raise ValueError("CapacityReport: the training data is empty; there is no margin to measure")
            inputs, targets = self.reader.check(first, "first batch of the training data")
            _, outputs = self._forward(trainer, pl_module, inputs[:2])
            try:
                classification_margins(outputs, move_data_to_device(targets[:2], outputs.device))
            except ValueError as error:
                raise ValueError(f"CapacityReport: the training margin is a classifier's; {error} (a "
                                 "regressor has no margin: leave this callback out, or use path_norm for its "
                                 "path-norms)") from None

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs != 0 or not trainer.is_global_zero:
            return
        self.last = self.measure(trainer, pl_module)
        for key, value in self.last.items():
            pl_module.log(key, metric_tensor(value, pl_module.device), on_step=False, on_epoch=True,
                          rank_zero_only=True)

    # ------------------------------------------------------------------ measurement

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """The logged values for the current weights, ``{key: float}`` (see the class docstring)."""
        graph = self._graph.get(pl_module)
        with torch.no_grad():
            norms = {p: float(path_norm(graph, p, dtype=torch.float64)) for p in (1, 2, 4)}
        margins, largest_input, count = self._training_pass(trainer, pl_module)
        margin = percentile(margins, self.percentile)
        structure = self.structure or network_structure(graph)
        bound = max(1.0, largest_input)
        values = {
            "capacity/path_norm_l1": norms[1],
            "capacity/path_norm_l2": norms[2],
            "capacity/path_norm_l4": norms[4],
            "capacity/margin": margin,
            "capacity/rademacher": rademacher_coefficient(**structure.as_dict(), n=count, input_bound=bound) * norms[1],
            "capacity/rademacher_sharpened": rademacher_coefficient(**structure.as_dict(), n=count, input_bound=bound,
                                                                    sharpened=True) * norms[1],
        }
        if margin > 0:
            values["capacity/normalized_path_norm_l2"] = norms[2] / margin
        else:
            self._warn_once("margin", f"CapacityReport: the {self.percentile:g}th percentile of the training margins is "
                                      f"{margin:.3g} <= 0 (more than {self.percentile:g}% of the training set is "
                                      "misclassified); capacity/normalized_path_norm_l2 is not logged until it is positive")
        finite = {key: value for key, value in values.items() if math.isfinite(value)}
        if len(finite) < len(values):
            self._warn_once("finite", f"CapacityReport: {sorted(set(values) - set(finite))} are not finite numbers "
                                      "(the path-norms overflow float64); they are not logged")
        return finite

    def _training_pass(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[Tensor, float, int]:
        """Every training example's margin, the largest |x| of an input, and the number of examples."""
        margins: list[Tensor] = []
        largest = 0.0
        with preserved_rng(), eval_mode(pl_module), torch.no_grad():
            for batch in self._train_reader(trainer).batches():
                inputs, targets = self.reader(batch)
                seen, outputs = self._forward(trainer, pl_module, inputs)
                margins.append(classification_margins(outputs, move_data_to_device(targets, outputs.device)).cpu())
                if seen.numel():
                    largest = max(largest, float(seen.abs().max()))
        every = torch.cat(margins) if margins else torch.zeros(0, dtype=torch.float64)
        if every.numel() == 0:
            raise ValueError("CapacityReport: the training data is empty; there is no margin to measure")
        return every, largest, every.numel()

    @staticmethod
    def _forward(trainer: pl.Trainer, pl_module: pl.LightningModule, inputs: Tensor) -> tuple[Tensor, Tensor]:
        """The inputs as the module receives them, and its outputs (in eval mode, without gradients)."""
        precision = trainer.precision_plugin
        with eval_mode(pl_module), torch.no_grad():
            inputs = precision.convert_input(move_data_to_device(inputs, pl_module.device))
            with precision.val_step_context():
                outputs = pl_module(inputs)
        if not isinstance(outputs, Tensor):
            raise ValueError(f"CapacityReport needs the module to return one tensor of scores, got {type(outputs).__name__}")
        return inputs, outputs.float() if outputs.dtype in (torch.float16, torch.bfloat16) else outputs

    def _train_reader(self, trainer: pl.Trainer) -> DatasetReader:
        """A reader of the whole training set, built once per fit (rank zero reads all of it)."""
        if self._reader is None:
            source = self.source
            if source is None:
                datamodule = trainer.datamodule
                if datamodule is not None and callable(getattr(datamodule, "train_eval_dataloader", None)):
                    source = datamodule.train_eval_dataloader()
                else:
                    source = trainer.train_dataloader
            if source is None:
                raise ValueError("CapacityReport: no training data found; pass train_dataloader=...")
            if isinstance(source, (list, tuple, dict)) and any(
                    isinstance(loader, DataLoader) for loader in (source.values() if isinstance(source, dict) else source)):
                raise ValueError("CapacityReport measures one training set, and this fit has several training "
                                 "dataloaders; pass the one to measure as train_dataloader=...")
            self._reader = whole_dataset_reader(source, self.eval_batch_size)
        return self._reader

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)
