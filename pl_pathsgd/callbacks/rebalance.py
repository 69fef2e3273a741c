"""Rebalance: rescale the hidden units during training without changing the function the network computes."""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from pl_pathsgd.callbacks._batch import BatchReader, UnpackBatch
from pl_pathsgd.callbacks._common import (
    GraphCallback,
    SharedGraph,
    check_input_shape,
    is_number,
    metric_tensor,
    network_of,
)
from pl_pathsgd.callbacks._observe import preserved_rng
from pl_pathsgd.paths import PathGeometryError, rescalable_units
from pl_pathsgd.paths.balancing import (
    DEFAULT_MAX_SWEEPS,
    Rebalanced,
    optimizer_problem,
    rebalance,
    rebalance_problem,
    rescale_gradients,
    rescale_optimizer_state,
)
from pl_pathsgd.paths.norms import check_p


class Rebalance(GraphCallback):
    r"""Rescale the network's hidden units every ``every_n_steps`` optimizer steps or ``every_n_epochs`` epochs.

    A node-wise rescaling multiplies a hidden unit's incoming weights and bias by c > 0 and divides its
    outgoing weights by c: a ReLU network computes the same function and has the same path-norms, but SGD,
    Adagrad or Adam do not take the same steps from it (Path-SGD does: Theorem 5.1).  Two choices of c:

    ``method="l2"`` (default)
        the rescaling with the smallest ||theta||_2 (in the spirit of Equi-normalization, Stock et al., ICLR 2019):
        per unit c = (||out||^2 / ||in||^2)^(1/4), exact for one layer given the others, swept over the layers
        until no factor moves by more than ``tolerance`` (:func:`pl_pathsgd.paths.balancing.l2_rebalance`).
        Linear, convolutions, transposed convolutions and BatchNorm; recurrent layers are refused.
    ``method="pathnorm"``
        Lemma 4.1's balancing (:func:`pl_pathsgd.balance`): every layer's largest incoming l_p norm becomes
        phi_p^(1/d).  Layered networks of Linear layers.

    **Optimizer state follows the rescaling.**  A parameter entry multiplied by r has its gradient divided by r,
    so the state of the optimizers is carried into the new coordinates
    (:func:`pl_pathsgd.paths.balancing.rescale_optimizer_state`): ``torch.optim.SGD``'s momentum buffer and
    Adam's first moment are divided by r, Adam's second moments and Adagrad's sums by r^2, and
    ``pl_pathsgd.PathSGD``'s momentum buffer — a sum of path-normalised gradients, which scale like the
    weights — is multiplied by r.  With Path-SGD the run therefore computes the same function at every step
    as without the callback (up to rounding).  Gradients held between micro-batches of an accumulated step are
    divided by r.  Other optimizers, and weight decay added to the gradient of an optimizer with momentum or
    moments (whose state then mixes gradient and weight units), are refused before the first step.

    **What it changes, and what not.**  Unlike the other callbacks of the package it is not an observer: by
    design it changes the weights (within the set of networks that compute the same function), the optimizer
    state and held gradients as described, and the ``running_mean`` of a BatchNorm that receives a rescaled
    unit (so that its map stays the same).  Everything else of the observer contract holds: it draws no random
    numbers, changes no module's train/eval mode, never touches the training data, and the same batches reach
    the same steps.

    **When.**  ``every_n_steps``: after the optimizer step whose number (``trainer.global_step``) is a multiple
    of n, at the end of that training batch; ``every_n_epochs``: at the end of every n-th training epoch
    (the default, with n = 1).  ``at_fit_start=True`` also rebalances once before the first step.  Every
    process of a DDP run makes the same deterministic rescaling of the same weights.

    Logged (``pl_module.log``, when a rebalancing happens during training): ``rebalance/largest_factor``
    (max over units of max(c, 1/c)) and, for ``"l2"``, ``rebalance/weight_norm`` (||theta||_2 after it) and
    ``rebalance/sweeps``.

    Args:
        method: ``"l2"`` or ``"pathnorm"``.
        every_n_steps, every_n_epochs: at most one of them (default: ``every_n_epochs=1``).
        at_fit_start: also rebalance once at the start of fit.
        p: the l_p of ``method="pathnorm"``.
        tolerance, max_sweeps: stopping rule of ``method="l2"`` (default tolerance: 1e-12 for float64 weights,
            about 1.9e-6 for float32).
        input_shape: shape of one example without the batch dimension (default: ``example_input_array``'s,
            else that of the run's ``PathSGD``, else that of the first training batch).
        unpack_batch: ``batch -> (inputs, targets)``, only needed to take the input shape from a batch.
    """

    needs_logger = False  # it rescales whether or not a logger records how much

    def __init__(
        self,
        method: Literal["l2", "pathnorm"] = "l2",
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        at_fit_start: bool = False,
        p: float = 2,
        tolerance: float | None = None,
        max_sweeps: int = DEFAULT_MAX_SWEEPS,
        input_shape: tuple[int, ...] | None = None,
        unpack_batch: UnpackBatch | None = None,
    ):
        owner = "Rebalance"
        if method not in ("l2", "pathnorm"):
            raise ValueError(f"{owner}(method={method!r}): choose 'l2' (smallest ||theta||_2) or 'pathnorm' (Lemma 4.1)")
        if every_n_steps is not None and every_n_epochs is not None:
            raise ValueError(f"{owner}: give every_n_steps or every_n_epochs, not both")
        for name, value in (("every_n_steps", every_n_steps), ("every_n_epochs", every_n_epochs)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{owner}({name}={value!r}) must be an int >= 1")
        if not isinstance(at_fit_start, bool):
            raise ValueError(f"{owner}(at_fit_start={at_fit_start!r}) must be True or False")
        if tolerance is not None and (not is_number(tolerance) or not 0 <= tolerance < math.inf):
            raise ValueError(f"{owner}(tolerance={tolerance!r}) must be None or a number >= 0")
        if isinstance(max_sweeps, bool) or not isinstance(max_sweeps, int) or max_sweeps < 1:
            raise ValueError(f"{owner}(max_sweeps={max_sweeps!r}) must be an int >= 1")
        try:
            self.p = check_p(p, allow_inf=False)
        except PathGeometryError as error:
            raise ValueError(f"{owner}(p={p!r}): {error}") from None
        self.method = method
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs if every_n_steps is None else None
        if self.every_n_steps is None and self.every_n_epochs is None:
            self.every_n_epochs = 1
        self.at_fit_start = at_fit_start
        self.tolerance = None if tolerance is None else float(tolerance)
        self.max_sweeps = max_sweeps
        self.input_shape = check_input_shape(input_shape, owner)
        self.reader = BatchReader(unpack_batch, owner, inputs_tensor=True, targets=False)
        self._graph = SharedGraph(self.input_shape, owner)
        self._ready = False
        self._last_step = -1
        #: number of rebalancings in this fit, and the outcome of the last one
        self.rebalances = 0
        self.last: Rebalanced | None = None
        self._warned: set[str] = set()

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(method=self.method, every_n_steps=self.every_n_steps,
                                        every_n_epochs=self.every_n_epochs)

    # ------------------------------------------------------------------ hooks

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._graph.reset()
        self._ready = False
        self._last_step = -1
        self.rebalances = 0
        self.last = None
        self._graph.at_fit_start(trainer, pl_module)
        if self._graph.graph is not None:
            self._prepare(trainer, pl_module)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if not self._ready:  # the input shape comes from the first batch: still before the first step
            inputs, _ = self.reader.check(batch, "first training batch")
            self._graph.at_first_batch(trainer, pl_module, inputs)
            self._prepare(trainer, pl_module)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps is not None and step > self._last_step and step % self.every_n_steps == 0 and step > 0:
            self._last_step = step
            self._log(self.rebalance_now(trainer, pl_module), pl_module, on_step=True)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs is not None and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._log(self.rebalance_now(trainer, pl_module), pl_module, on_step=False)

    # ------------------------------------------------------------------ the rescaling

    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse what cannot be rebalanced exactly, before any step; rebalance once if ``at_fit_start``."""
        self._ready = True
        graph = self._graph.get(pl_module)
        if not rescalable_units(graph):
            self._warn_once("units", f"Rebalance: {type(network_of(pl_module)).__name__} has no hidden units that can "
                                     "be rescaled; nothing to rebalance")
            return
        problem = rebalance_problem(graph, self.method)
        if problem is not None:
            raise PathGeometryError(f"Rebalance(method={self.method!r}): {problem}")
        for optimizer in self._optimizers(trainer, pl_module):
            problem = optimizer_problem(optimizer)
            if problem is not None:
                raise ValueError(f"Rebalance: {problem}")
        if self.at_fit_start:
            self.rebalance_now(trainer, pl_module)

    def rebalance_now(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Rebalanced | None:
        """Rebalance the network, its optimizers' state and its gradients now; the outcome (None: nothing to do)."""
        graph = self._graph.get(pl_module)
        if not rescalable_units(graph):
            return None
        with preserved_rng(), torch.no_grad():
            result = rebalance(graph, self.method, p=self.p, tolerance=self.tolerance, max_sweeps=self.max_sweeps)
            for optimizer in self._optimizers(trainer, pl_module):
                rescale_optimizer_state(optimizer, graph, result.factors)
            rescale_gradients(graph, result.factors)
        if not result.converged:
            self._warn_once("converged", f"Rebalance: the l2 rebalancing stopped after max_sweeps={self.max_sweeps} "
                                         f"sweeps before every factor was within tolerance of 1; raise max_sweeps")
        self.rebalances += 1
        self.last = result
        return result

    def _optimizers(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[torch.optim.Optimizer]:
        """The optimizers of the run that hold parameters of the network."""
        network = {id(t) for t in network_of(pl_module).parameters()}
        return [optimizer for optimizer in trainer.optimizers
                if any(id(t) in network for group in optimizer.param_groups for t in group["params"])]

    def _log(self, result: Rebalanced | None, pl_module: pl.LightningModule, on_step: bool) -> None:
        if result is None:
            return
        values = {"rebalance/largest_factor": result.largest_factor}
        if result.squared_norm_after is not None:
            values["rebalance/weight_norm"] = math.sqrt(result.squared_norm_after)
            values["rebalance/sweeps"] = float(result.sweeps)
        for key, value in values.items():
            # the same on every rank (same weights, deterministic rescaling)
            pl_module.log(key, metric_tensor(value, pl_module.device), on_step=on_step, on_epoch=not on_step,
                          sync_dist=not on_step)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)
