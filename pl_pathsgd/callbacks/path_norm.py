"""PathNormMonitor: log the l_p path-norms of the network during training."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from pl_pathsgd.callbacks._batch import BatchReader, UnpackBatch
from pl_pathsgd.callbacks._common import GraphCallback, SharedGraph, check_input_shape, is_number, p_label
from pl_pathsgd.paths import path_norm, recurrence_ratio


class PathNormMonitor(GraphCallback):
    r"""Log the l_p path-norms phi_p(w) of the network being trained.

    phi_p(w) = (sum over input->output paths of prod_e |w_e|^p)^(1/p), phi_inf the largest path product
    (biases are edges from a constant unit).  The network is traced once per fit and input shape, and the
    trace is shared with ``PathSGD`` and the other callbacks (:func:`pl_pathsgd.paths.trace`); every
    measurement is one forward pass of its path twin at batch size 1 on the current weights.  It reads the
    weights and changes nothing: not the weights, the modes, nor any random state.

    Logged keys: ``path_norm/p1``, ``path_norm/p2``, ``path_norm/pinf`` for the default ``p``; in general
    ``path_norm/p<p>`` (``p3``, ``p1.5``).  For a recurrent network (``nn.RNN(nonlinearity="relu")``) also
    ``recurrence/kappa2_ratio/<weight>``: the largest kappa^(2)/kappa^(1) over the entries of each recurrent
    weight (:func:`pl_pathsgd.recurrence_ratio`), which says how far Path-SGD's default divisor
    (kappa^(1) alone) is from the exact one; ``recurrence_ratio=False`` turns it off.  With ``logging_interval="epoch"`` they are logged at the end of
    every training epoch; with ``"step"`` after every training batch.  The values are computed in float64
    from the weights, which are the same on every process under DDP, so no reduction is needed.

    The network is ``pl_module.path_network`` if defined, else the module.  Its input shape: ``input_shape``,
    else ``pl_module.example_input_array`` (without the batch dimension), else that of a ``PathSGD`` of the
    run bound to the network, else that of the first training batch's inputs (read with ``unpack_batch``).

    Args:
        p: one value or several, each ``>= 1`` or ``math.inf``.
        logging_interval: ``"epoch"`` or ``"step"``.
        input_shape: shape of one example without the batch dimension.
        unpack_batch: ``batch -> (inputs, targets)``, only needed to take the input shape from a batch that is
            not an ``(x, y)`` tuple/list or a dict with an ``"x"``-like key (see :mod:`pl_pathsgd.callbacks`).
        recurrence_ratio: log ``recurrence/kappa2_ratio/*`` when the network is recurrent.

    Raises:
        ValueError: for an invalid ``p``, a repeated ``p``, or an unknown ``logging_interval``.
        MisconfigurationException: when the Trainer has no logger.
        UnsupportedModelError: before the first training step, when the network has layers without a path
            decomposition.

    Example::

        trainer = Trainer(callbacks=[PathNormMonitor(p=(1, 2, math.inf))], logger=CSVLogger("logs"))
    """

    def __init__(
        self,
        p: float | Iterable[float] = (1, 2, math.inf),
        logging_interval: Literal["epoch", "step"] = "epoch",
        input_shape: tuple[int, ...] | None = None,
        unpack_batch: UnpackBatch | None = None,
        recurrence_ratio: bool = True,
    ):
        values = [p] if is_number(p) else list(p) if isinstance(p, Iterable) and not isinstance(p, str) else [p]
        if not values:
            raise ValueError("PathNormMonitor(p=...) needs at least one p")
        for value in values:
            if not is_number(value) or math.isnan(value) or value < 1:
                raise ValueError(f"PathNormMonitor(p={p!r}): every p must be a number >= 1 or math.inf, got {value!r}")
        self.p: tuple[float, ...] = tuple(math.inf if math.isinf(v) else float(v) for v in values)
        if len(set(self.p)) != len(self.p):
            raise ValueError(f"PathNormMonitor(p={p!r}) repeats a value")
        if logging_interval not in ("epoch", "step"):
            raise ValueError(f"PathNormMonitor(logging_interval={logging_interval!r}): use 'epoch' or 'step'")
        self.logging_interval = logging_interval
        self.input_shape = check_input_shape(input_shape, "PathNormMonitor")
        self.reader = BatchReader(unpack_batch, "PathNormMonitor", inputs_tensor=True, targets=False)
        self.keys = {v: f"path_norm/{p_label(v)}" for v in self.p}
        self._graph = SharedGraph(self.input_shape, "PathNormMonitor")
        self._batch_checked = False
        self.recurrence_ratio = bool(recurrence_ratio)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(p=self.p, logging_interval=self.logging_interval)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after configure_model and configure_optimizers: the network is complete and PathSGD is bound
        self._graph.reset()
        self._batch_checked = False
        self._graph.at_fit_start(trainer, pl_module)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._batch_checked:
            self._batch_checked = True
            if self._graph.graph is None:  # the input shape must come from this batch
                inputs, _ = self.reader.check(batch, "first training batch")
                self._graph.at_first_batch(trainer, pl_module, inputs)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.logging_interval == "step":
            for key, value in self.compute(pl_module).items():
                pl_module.log(key, value, on_step=True, on_epoch=False)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.logging_interval == "epoch":
            for key, value in self.compute(pl_module).items():
                # identical on every rank; sync_dist averages equal values (and keeps Lightning's DDP contract)
                pl_module.log(key, value, on_step=False, on_epoch=True, sync_dist=True)

    def compute(self, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        """The path-norms of the network's current weights, ``{logged key: float64 scalar}``."""
        graph = self._graph.get(pl_module)
        with torch.no_grad():
            values = {self.keys[p]: path_norm(graph, p, dtype=torch.float64) for p in self.p}
        if self.recurrence_ratio:
            device = graph.device()
            for name, ratio in recurrence_ratio(graph).items():
                values[f"recurrence/kappa2_ratio/{name}"] = torch.tensor(ratio, dtype=torch.float64, device=device)
        return values
