"""RescalingInvarianceCheck: measure how the network and the optimizer react to node-wise rescaling."""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable, Iterable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from pl_pathsgd.callbacks._common import (
    batch_input_shape,
    check_input_shape,
    is_number,
    metric_tensor,
    network_of,
    require_logger,
    resolve_input_shape,
)
from pl_pathsgd.optim import PathSGD
from pl_pathsgd.paths.norms import path_norm
from pl_pathsgd.paths.rescaling import rescalable_units, rescale_units

LossFn = Callable[[Tensor, Tensor], Tensor]


class InvarianceViolationError(RuntimeError):
    """Path-SGD's update changed under a node-wise rescaling by more than the allowed tolerance."""


class RescalingInvarianceCheck(Callback):
    r"""Check node-wise rescaling invariance (Theorem 5.1 of Path-SGD) on a copy of the network.

    At the end of every ``every_n_epochs``-th training epoch the callback deep-copies the network (the
    training model is never touched), puts the copy in eval mode, draws one factor per rescalable hidden
    unit, log-uniformly in ``[min_factor, max_factor]`` (seeded by ``seed`` and the epoch), and rescales a
    second copy with them (incoming weights and bias times c, outgoing weights divided by c).  With A the
    copy, B = T(A) the rescaled copy, and the *probe batch* (the first training batch the callback saw) it
    logs:

    ``invariance/function``
        max|B(x) - A(x)| / max|A(x)| on the probe inputs; 0 up to round-off for a ReLU network.
    ``invariance/path_norm``
        |phi_2(B) - phi_2(A)| / phi_2(A); 0 up to round-off.
    ``invariance/update``
        ||T(A') - B'|| / ||B' - B||, where A' and B' are A and B after one step of a *fresh* optimizer of the
        trainer's class and hyper-parameters (``trainer.optimizers[0]``: its param groups, e.g. the current
        learning rate; PathSGD gets ``model=`` the copy and the same ``p``, ``input_shape``, ``eps`` and
        ``dtype``) on the probe batch with ``loss_fn``, T is the same rescaling, and the norms run over all
        parameters of the network.  Theorem 5.1: Path-SGD's update commutes with rescaling, so the gap is
        round-off (about 1e-15 in float64, 1e-6 in float32); SGD's is of order 1 or far larger.  A fresh
        optimizer has no momentum buffer, so this is the first step of a momentum method (Path-SGD keeps
        the invariance with momentum; ``weight_decay > 0`` breaks it).  The gap is 0 when the step does not
        move B and A' = A either, and ``inf`` when only A moves.

    Copies run in eval mode (no dropout noise, BatchNorm with running statistics).  Every process computes
    the same values under DDP: the probe batch is rank 0's and the weights are the same on every rank.

    Args:
        every_n_epochs: check after every n-th training epoch.
        min_factor, max_factor: range of the rescaling factors (``0 < min_factor <= max_factor < inf``).
        tolerance: if set, raise :class:`InvarianceViolationError` when the optimizer is ``PathSGD`` and the
            update gap is larger (or not finite).  A float32 network needs about ``1e-4``; float64 ``1e-9``.
        seed: seed of the rescaling factors (combined with the epoch).
        input_shape: shape of one example without the batch dimension (default: ``pl_module.path_input_shape``,
            else the probe batch's).
        loss_fn: ``loss_fn(network(x), y)`` for the update step; default :func:`torch.nn.functional.cross_entropy`.

    A network without rescalable units (e.g. a single Linear layer) is skipped with a warning.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        min_factor: float = 1e-3,
        max_factor: float = 1e3,
        tolerance: float | None = None,
        seed: int = 0,
        input_shape: tuple[int, ...] | None = None,
        loss_fn: LossFn | None = None,
    ):
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"RescalingInvarianceCheck(every_n_epochs={every_n_epochs!r}) must be an int >= 1")
        for name, value in (("min_factor", min_factor), ("max_factor", max_factor)):
            if not is_number(value) or not (0 < value < math.inf):
                raise ValueError(f"RescalingInvarianceCheck({name}={value!r}) must be a positive finite number")
        if min_factor > max_factor:
            raise ValueError(
                f"RescalingInvarianceCheck: min_factor={min_factor} must not exceed max_factor={max_factor}"
            )
        if tolerance is not None and (not is_number(tolerance) or not (0 <= tolerance < math.inf)):
            raise ValueError(f"RescalingInvarianceCheck(tolerance={tolerance!r}) must be None or a number >= 0")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"RescalingInvarianceCheck(seed={seed!r}) must be an int")
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError("RescalingInvarianceCheck(loss_fn=...) must be callable: loss_fn(outputs, targets)")
        self.every_n_epochs = every_n_epochs
        self.min_factor = float(min_factor)
        self.max_factor = float(max_factor)
        self.tolerance = None if tolerance is None else float(tolerance)
        self.seed = seed
        self.input_shape = check_input_shape(input_shape, "RescalingInvarianceCheck")
        self.loss_fn: LossFn = loss_fn if loss_fn is not None else F.cross_entropy
        self.probe: tuple[Tensor, Tensor | None] | None = None
        self._probe_shared = False
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
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            require_logger(trainer, type(self).__name__)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.probe is not None:
            return
        if isinstance(batch, Tensor):
            self.probe = (batch.detach().cpu().clone(), None)
        elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
            target = batch[1] if len(batch) > 1 and isinstance(batch[1], Tensor) else None
            self.probe = (batch[0].detach().cpu().clone(), None if target is None else target.detach().cpu().clone())
        else:
            self._warn_once(
                "batch", f"{type(self).__name__} needs (x, y) or tensor batches; got {type(batch).__name__}"
            )

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs != 0:
            return
        if not self._probe_shared and trainer.world_size > 1:
            self.probe = trainer.strategy.broadcast(self.probe, src=0)
        self._probe_shared = True
        if self.probe is None:
            return
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
                    f"relative gap ||T(A') - B'|| / ||B' - B|| = {update_gap:.3e} > tolerance {self.tolerance:.3e}. "
                    "Theorem 5.1 says one Path-SGD step from a rescaled network T(A) lands on the rescaling of the "
                    "step from A, up to round-off (about 1e-15 in float64, 1e-6 in float32). A larger gap means the "
                    "update is not rescaling-invariant here: weight_decay > 0, parameters that PathSGD does not "
                    "scale, a rescaling that changes the network's function (see invariance/function), or a "
                    "tolerance tighter than the round-off of this precision (use about 1e-4 for float32)."
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
        """Compute the logged gaps for the current weights (an empty dict when the network cannot be rescaled)."""
        assert self.probe is not None
        network = network_of(pl_module)
        shape = resolve_input_shape(self.input_shape, pl_module, batch_input_shape(self.probe[0]))
        a = copy.deepcopy(network).eval()
        units = rescalable_units(a, shape)
        if not units:
            self._warn_once(
                "units", f"{type(self).__name__}: {type(network).__name__} has no rescalable hidden units; skipping"
            )
            return {}
        factors = self.factors(units, trainer.current_epoch)
        b = rescale_units(copy.deepcopy(a), factors, shape)
        device = _device_of(a)
        x = self.probe[0].to(device)
        y = None if self.probe[1] is None else self.probe[1].to(device)

        results: dict[str, float] = {}
        with torch.no_grad():
            out_a, out_b = a(x), b(x)
            results["invariance/function"] = _ratio(
                (out_b.double() - out_a.double()).abs().max(), out_a.double().abs().max()
            )
            phi_a, phi_b = path_norm(a, 2, shape), path_norm(b, 2, shape)
            results["invariance/path_norm"] = _ratio((phi_b - phi_a).abs(), phi_a)

        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        if optimizer is None:
            self._warn_once("optimizer", f"{type(self).__name__}: the trainer has no optimizer; no invariance/update")
        elif y is None:
            self._warn_once("target", f"{type(self).__name__}: the probe batch has no targets; no invariance/update")
        else:
            b_before = [t.detach().clone() for t in b.parameters()]
            self._one_step(optimizer, network, a, shape, x, y)
            self._one_step(optimizer, network, b, shape, x, y)
            rescale_units(a, factors, shape)  # a is now T(A')
            with torch.no_grad():
                gap = _distance(a.parameters(), b.parameters())
                step = _distance(b.parameters(), b_before)
            results["invariance/update"] = _ratio(gap, step)
        return results

    def _one_step(self, optimizer: torch.optim.Optimizer, network: nn.Module, copy_: nn.Module,
                  shape: tuple[int, ...] | None, x: Tensor, y: Tensor) -> None:
        fresh = _fresh_optimizer(optimizer, network, copy_, shape)
        if fresh is None:
            return

        def closure() -> Tensor:
            fresh.zero_grad()
            loss = self.loss_fn(copy_(x), y)
            loss.backward()
            return loss

        with torch.enable_grad():
            fresh.step(closure)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)


def _device_of(module: nn.Module) -> torch.device:
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _distance(first: Iterable[Tensor], second: Iterable[Tensor]) -> Tensor:
    """Euclidean distance between two lists of tensors, taken as one vector, in float64."""
    return torch.stack([(u.double() - v.double()).pow(2).sum() for u, v in zip(first, second)]).sum().sqrt()


def _ratio(numerator: Tensor, denominator: Tensor) -> float:
    numerator, denominator = float(numerator), float(denominator)
    if denominator == 0:
        return 0.0 if numerator == 0 else math.inf
    return numerator / denominator


def _fresh_optimizer(optimizer: torch.optim.Optimizer, network: nn.Module, copy_: nn.Module,
                     shape: tuple[int, ...] | None) -> torch.optim.Optimizer | None:
    """An optimizer of ``optimizer``'s class and hyper-parameters over the matching parameters of ``copy_``."""
    name_of = {id(t): name for name, t in network.named_parameters()}
    copied = dict(copy_.named_parameters())
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
    if isinstance(optimizer, PathSGD):
        same_network = optimizer.model is network
        kwargs.update(
            model=copy_,
            p=optimizer.p,
            input_shape=optimizer.graph.input_shape if same_network else shape,
            eps=optimizer.eps,
            dtype=optimizer.dtype,
        )
    return cls(groups, **kwargs)
