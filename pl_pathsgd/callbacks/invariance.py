"""RescalingInvarianceCheck: measure how the network and the optimizer react to node-wise rescaling."""

from __future__ import annotations

import copy
import inspect
import itertools
import math
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from pl_pathsgd.callbacks._batch import BatchReader, UnpackBatch
from pl_pathsgd.callbacks._common import (
    GraphCallback,
    SharedGraph,
    check_every_n_epochs,
    check_input_shape,
    is_number,
    metric_tensor,
    network_of,
    require_class_scores,
)
from pl_pathsgd.callbacks._observe import preserved_rng
from pl_pathsgd.optim import PathSGD
from pl_pathsgd.paths import PathGraph, path_norm, rescalable_units, rescale_units

LossFn = Callable[[Tensor, Tensor], Tensor]

#: Default interval: a check costs about two training steps plus a copy of the network, a few percent
#: of an epoch or less for the paper's networks (see benchmarks/callback_overhead.py).
DEFAULT_EVERY_N_EPOCHS = 1


class InvarianceViolationError(RuntimeError):
    """Path-SGD's update changed under a node-wise rescaling by more than the allowed tolerance."""


class RescalingInvarianceCheck(GraphCallback):
    r"""Check node-wise rescaling invariance (Theorem 5.1 of Path-SGD) on one copy of the network.

    At the end of every ``every_n_epochs``-th training epoch the callback copies the network once (on
    ``device``; the training model is never touched) in the network's own modes, draws one factor per
    rescalable hidden unit, log-uniformly in ``[min_factor, max_factor]`` (seeded by ``seed`` and the epoch),
    and works on that one copy.  With A the network, T the rescaling, B = T(A), and the *probe batch* x (the
    first training batch of the fit) it logs:

    ``invariance/function``
        max|B(x) - A(x)| / max|A(x)|; 0 up to round-off for a ReLU network.
    ``invariance/path_norm``
        |phi_2(B) - phi_2(A)| / phi_2(A); 0 up to round-off.
    ``invariance/update``
        max|B'(x) - A'(x)| / max|A'(x) - A(x)|, where A' and B' are A and B after one step of a *fresh*
        optimizer of the trainer's class and hyper-parameters (``trainer.optimizers[0]``'s param groups, e.g.
        the current learning rate; for ``PathSGD`` the same ``p``, ``eps`` and ``dtype``) on the probe batch with
        ``loss_fn``.  Theorem 5.1: Path-SGD's update commutes with rescaling, B' = T(A'), so the two networks
        still compute the same function and the gap is round-off (about 1e-13 in float64, 1e-5 in float32)
        relative to how much the step changed the function; SGD's is of order 1 or far larger.  A fresh
        optimizer has no momentum buffer, so this is the first step of a momentum method (Path-SGD keeps the
        invariance with momentum; ``weight_decay > 0`` breaks it).  0 when neither step changes the output.

    Cost: one copy of the network at a time (no second copy: B is the copy rescaled in place, and A is
    copied back into it for the second step), plus the gradients and optimizer state of one step while it
    runs; four forward passes and two steps on the probe batch.  The copy is made for each check and
    released after it, except with ``PathSGD`` on an engine whose ``PathSGD.bind`` cannot take the traced
    graph bound to the copy: the copy must then be traced, and the one copy is kept for the whole fit.
    ``device="cpu"`` keeps a GPU model's copy off the GPU.  Randomness comes only from the callback's own generator, and the global random states are
    restored afterwards, so the training run is bit-identical with and without the check.

    Every process computes the same values under DDP: the probe batch is rank 0's and the weights are the
    same on every rank.

    Args:
        every_n_epochs: check after every n-th training epoch.
        min_factor, max_factor: range of the rescaling factors (``0 < min_factor <= max_factor < inf``).
        tolerance: if set, raise :class:`InvarianceViolationError` when the optimizer is ``PathSGD`` and the
            update gap is larger (or not finite).  A float32 network needs about ``1e-3``; float64 ``1e-9``.
        seed: seed of the rescaling factors (combined with the epoch).
        input_shape: shape of one example without the batch dimension (default: ``example_input_array``'s,
            else that of the run's ``PathSGD``, else the probe batch's).
        loss_fn: ``loss_fn(network(x), y)`` for the update step; default :func:`torch.nn.functional.cross_entropy`.
        device: where the copy lives and runs (default: the network's device).
        unpack_batch: ``batch -> (inputs, targets)`` for batches that are not ``(x, y)`` tuples/lists or dicts
            with ``"x"``/``"y"``-like keys (see :mod:`pl_pathsgd.callbacks`).  Without targets the update is not
            checked.

    A network without rescalable units (e.g. a single Linear layer) is skipped with a warning.
    """

    def __init__(
        self,
        every_n_epochs: int = DEFAULT_EVERY_N_EPOCHS,
        min_factor: float = 1e-3,
        max_factor: float = 1e3,
        tolerance: float | None = None,
        seed: int = 0,
        input_shape: tuple[int, ...] | None = None,
        loss_fn: LossFn | None = None,
        device: str | torch.device | None = None,
        unpack_batch: UnpackBatch | None = None,
    ):
        owner = "RescalingInvarianceCheck"
        self.every_n_epochs = check_every_n_epochs(every_n_epochs, owner)
        for name, value in (("min_factor", min_factor), ("max_factor", max_factor)):
            if not is_number(value) or not (0 < value < math.inf):
                raise ValueError(f"{owner}({name}={value!r}) must be a positive finite number")
        if min_factor > max_factor:
            raise ValueError(f"{owner}: min_factor={min_factor} must not exceed max_factor={max_factor}")
        if tolerance is not None and (not is_number(tolerance) or not (0 <= tolerance < math.inf)):
            raise ValueError(f"{owner}(tolerance={tolerance!r}) must be None or a number >= 0")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"{owner}(seed={seed!r}) must be an int")
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"{owner}(loss_fn=...) must be callable: loss_fn(outputs, targets)")
        try:
            self.device = None if device is None else torch.device(device)
        except (RuntimeError, TypeError) as error:
            raise ValueError(f"{owner}(device={device!r}) is not a torch device: {error}") from None
        self.min_factor = float(min_factor)
        self.max_factor = float(max_factor)
        self.tolerance = None if tolerance is None else float(tolerance)
        self.seed = seed
        self.input_shape = check_input_shape(input_shape, owner)
        self.loss_fn: LossFn = loss_fn if loss_fn is not None else F.cross_entropy
        self.reader = BatchReader(unpack_batch, owner, inputs_tensor=True, targets=False)
        self.probe: tuple[Tensor, Tensor | None] | None = None
        self._probe_shared = False
        self._graph = SharedGraph(self.input_shape, owner)
        self._batch_checked = False
        self.checks_done = 0
        self.last: dict[str, float] = {}
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ Lightning plumbing

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            every_n_epochs=self.every_n_epochs, min_factor=self.min_factor, max_factor=self.max_factor, seed=self.seed
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"probe": self.probe, "checks_done": self.checks_done, "last": dict(self.last)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        probe = state_dict.get("probe")
        self.probe = None if probe is None else (probe[0], probe[1])
        self._probe_shared = probe is not None  # a restored probe is the same file on every rank
        self.checks_done = int(state_dict.get("checks_done", 0))
        self.last = dict(state_dict.get("last", {}))

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._graph.reset()
        self._batch_checked = False
        self._graph.at_fit_start(trainer, pl_module)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._batch_checked:
            return
        self._batch_checked = True
        inputs, targets = self.reader.check(batch, "first training batch")
        if self.loss_fn is F.cross_entropy:
            require_class_scores(trainer, pl_module, inputs, type(self).__name__,
                                 "the update step's default loss, cross-entropy, needs (pass loss_fn=..., e.g. "
                                 "torch.nn.functional.mse_loss for a regressor)")
        self._graph.at_first_batch(trainer, pl_module, inputs)
        if self.probe is None:
            target = targets.detach().cpu().clone() if isinstance(targets, Tensor) else None
            self.probe = (inputs.detach().cpu().clone(), target)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs != 0:
            return
        if not self._probe_shared and trainer.world_size > 1:
            self.probe = trainer.strategy.broadcast(self.probe, src=0)
        self._probe_shared = True
        if self.probe is None:
            return
        with preserved_rng():
            results = self.measure(trainer, pl_module)
        if not results:
            return
        self.last = results
        self.checks_done += 1
        for key, value in results.items():
            # every rank computes the same numbers (same weights, rank 0's probe)
            pl_module.log(key, metric_tensor(value, pl_module.device), on_step=False, on_epoch=True, sync_dist=True)
        update_gap = results.get("invariance/update")
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        if self.tolerance is not None and isinstance(optimizer, PathSGD) and update_gap is not None:
            if not update_gap <= self.tolerance:  # also catches NaN
                raise InvarianceViolationError(
                    f"Path-SGD's update is not invariant to node-wise rescaling at epoch {trainer.current_epoch}: "
                    f"relative gap max|B'(x) - A'(x)| / max|A'(x) - A(x)| = {update_gap:.3e} > tolerance "
                    f"{self.tolerance:.3e}. Theorem 5.1 says one Path-SGD step from a rescaled network B = T(A) lands "
                    "on the rescaling of the step from A, so both compute the same function up to round-off. A "
                    "larger gap means the update is not rescaling-invariant here: weight_decay > 0, parameters that "
                    "PathSGD does not scale, a rescaling that changes the network's function (see "
                    "invariance/function), or a tolerance tighter than the round-off of this precision (about 1e-3 "
                    "suits float32)."
                )

    # ------------------------------------------------------------------ the measurement

    def factors(self, units: dict[str, int], epoch: int) -> dict[str, Tensor]:
        """One log-uniform factor in [min_factor, max_factor] per unit, reproducible from (seed, epoch)."""
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2**63))
        low, high = math.log(self.min_factor), math.log(self.max_factor)
        return {
            name: torch.exp(low + (high - low) * torch.rand(count, generator=generator, dtype=torch.float64))
            for name, count in units.items()
        }

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """The logged gaps for the current weights (empty when the network cannot be rescaled)."""
        assert self.probe is not None
        network = network_of(pl_module)
        graph = self._graph.get(pl_module)
        units = rescalable_units(graph)
        if not units:
            self._warn_once(
                "units", f"{type(self).__name__}: {type(network).__name__} has no rescalable hidden units; skipping"
            )
            return {}
        factors = self.factors(units, trainer.current_epoch)
        work = self._copy_of(network)  # the one copy: A, then B = T(A), then A again
        bound = graph.bind(work)
        x, y = self._probe_on(work, _device_of(work))

        results: dict[str, float] = {}
        with torch.no_grad():
            out_a, phi_a = self._forward(work, x), path_norm(bound, 2)
            rescale_units(bound, factors)
            out_b, phi_b = self._forward(work, x), path_norm(bound, 2)
        results["invariance/function"] = _ratio(_max_abs_diff(out_b, out_a), _max_abs(out_a))
        results["invariance/path_norm"] = _ratio((phi_b - phi_a).abs(), phi_a)

        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        if optimizer is None:
            self._warn_once("optimizer", f"{type(self).__name__}: the trainer has no optimizer; no invariance/update")
        elif y is None:
            self._warn_once("target", f"{type(self).__name__}: the probe batch has no targets; no invariance/update")
        elif self._step(optimizer, network, bound, x, y):  # B -> B'
            with torch.no_grad():
                out_b_next = self._forward(work, x)
                for target, source in zip(_tensors(work), _tensors(network)):
                    target.copy_(source)  # back to A, exactly
            self._step(optimizer, network, bound, x, y)  # A -> A'
            with torch.no_grad():
                out_a_next = self._forward(work, x)
            results["invariance/update"] = _ratio(_max_abs_diff(out_b_next, out_a_next),
                                                  _max_abs_diff(out_a_next, out_a))
        return results

    def _copy_of(self, network: nn.Module) -> nn.Module:
        """A copy of the network, in the network's modes, on ``device`` (freed after the check).

        Keeping the modes keeps the traced graph of the network valid for the copy (no new trace); dropout
        draws the same masks in every evaluation of a check (:meth:`_forward`), so A and B see the same ones.
        """
        return copy_to(network, self.device if self.device is not None else _device_of(network))

    def _forward(self, work: nn.Module, x: Tensor) -> Tensor:
        """The copy's output, with dropout masks drawn from a private seed: the same masks at every call."""
        device = _device_of(work)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            return work(x)

    def _probe_on(self, work: nn.Module, device: torch.device) -> tuple[Tensor, Tensor | None]:
        x, y = self.probe
        dtype = next((t.dtype for t in work.parameters() if t.is_floating_point()), None)
        x = x.to(device)
        if dtype is not None and x.is_floating_point():
            x = x.to(dtype)  # e.g. float32 batches for a float64 network ("64-true" converts them in the step)
        return x, None if y is None else y.to(device)

    def _step(self, optimizer: torch.optim.Optimizer, network: nn.Module, bound: PathGraph, x: Tensor,
              y: Tensor) -> bool:
        """One step of a fresh optimizer like ``optimizer`` on the copy; False when that cannot be built."""
        work = bound.model
        try:
            fresh = self._fresh_optimizer(optimizer, network, bound)
        except Exception as error:  # a custom optimizer whose constructor we cannot call
            self._warn_once("fresh", f"{type(self).__name__}: cannot build a fresh {type(optimizer).__name__} for the "
                                     f"copy ({type(error).__name__}: {error}); no invariance/update")
            return False
        if fresh is None:
            self._warn_once("params", f"{type(self).__name__}: the optimizer has none of the network's parameters; "
                                      "no invariance/update")
            return False

        def closure() -> Tensor:
            fresh.zero_grad()
            loss = self.loss_fn(self._forward(work, x), y)
            loss.backward()
            return loss

        with torch.enable_grad():
            fresh.step(closure)
        fresh.zero_grad(set_to_none=True)  # release the gradients before the next forward
        return True

    def _fresh_optimizer(self, optimizer: torch.optim.Optimizer, network: nn.Module,
                         bound: PathGraph) -> torch.optim.Optimizer | None:
        """An optimizer of ``optimizer``'s class and hyper-parameters over the matching parameters of the copy."""
        name_of = {id(t): name for name, t in network.named_parameters()}
        copied = dict(bound.model.named_parameters())
        groups = []
        for group in optimizer.param_groups:
            params = [copied[name_of[id(t)]] for t in group["params"] if id(t) in name_of]
            if params:
                groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": params})
        if not groups:
            return None
        cls = type(optimizer)
        signature = inspect.signature(cls.__init__).parameters
        accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.values())
        kwargs = {k: v for k, v in optimizer.defaults.items() if k != "params" and (accepts_any or k in signature)}
        if not isinstance(optimizer, PathSGD):
            return cls(groups, **kwargs)
        return cls(groups, **kwargs).bind(bound)  # the traced graph bound to the copy: no new trace

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)


def copy_to(network: nn.Module, device: torch.device) -> nn.Module:
    """A deep copy of ``network`` whose parameters and buffers are made directly on ``device`` (no gradients)."""
    memo: dict[int, Any] = {}
    for _, tensor in itertools.chain(network.named_parameters(remove_duplicate=True),
                                     network.named_buffers(remove_duplicate=True)):
        data = tensor.detach().to(device, copy=True)
        memo[id(tensor)] = nn.Parameter(data, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else data
    return copy.deepcopy(network, memo)


def _tensors(module: nn.Module) -> list[Tensor]:
    return [*module.parameters(), *module.buffers()]


def _device_of(module: nn.Module) -> torch.device:
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _max_abs(tensor: Tensor) -> Tensor:
    return tensor.double().abs().max()


def _max_abs_diff(first: Tensor, second: Tensor) -> Tensor:
    return (first.double() - second.double()).abs().max()


def _ratio(numerator: Tensor, denominator: Tensor) -> float:
    numerator, denominator = float(numerator), float(denominator)
    if denominator == 0:
        return 0.0 if numerator == 0 else math.inf
    return numerator / denominator
