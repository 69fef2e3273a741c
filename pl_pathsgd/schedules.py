"""Learning-rate schedules, pure PyTorch: the paper's per-epoch schedule and a ReduceLROnPlateau that names its metric.

Nothing here imports Lightning: ``from pl_pathsgd import PaperSchedule`` works in a plain PyTorch loop.
"""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torch.optim.lr_scheduler import ReduceLROnPlateau as _TorchReduceLROnPlateau

__all__ = ["PaperSchedule", "ReduceLROnPlateau"]


class PaperSchedule(LRScheduler):
    """The paper's per-epoch schedule (Figure 1): after each epoch lr <- decay * lr and
    momentum <- min(max_momentum, momentum + momentum_step).

    Step it once per epoch (``PathSGDMixin`` does). The values are a closed form of the initial ones and
    ``last_epoch``, both in :meth:`state_dict`, so resuming from a checkpoint continues exactly. Optimizers
    without a ``momentum`` hyper-parameter (AdaGrad, Adam) only get the learning-rate decay; a momentum that
    starts above ``max_momentum`` is never lowered.

    Args:
        optimizer: the optimizer whose param groups are scheduled.
        decay: factor applied to the learning rate after every epoch, in (0, 1].
        momentum_step: amount added to the momentum after every epoch (>= 0).
        max_momentum: the momentum is not raised beyond this value (in [0, 1)).
        last_epoch: index of the last epoch done (-1: start from the optimizer's values).
    """

    def __init__(self, optimizer: Optimizer, decay: float = 0.99, momentum_step: float = 0.02,
                 max_momentum: float = 0.9, last_epoch: int = -1):
        if not 0 < decay <= 1:
            raise ValueError(f"PaperSchedule: decay must be in (0, 1], got {decay}")
        if momentum_step < 0:
            raise ValueError(f"PaperSchedule: momentum_step must be >= 0, got {momentum_step}")
        if not 0 <= max_momentum < 1:
            raise ValueError(f"PaperSchedule: max_momentum must be in [0, 1), got {max_momentum}")
        self.decay, self.momentum_step, self.max_momentum = decay, momentum_step, max_momentum
        if last_epoch == -1:
            for group in optimizer.param_groups:
                group.setdefault("initial_momentum", group.get("momentum"))
        elif any("initial_momentum" not in group for group in optimizer.param_groups):
            raise KeyError("PaperSchedule: param 'initial_momentum' is not specified in param_groups when resuming "
                           "an optimizer (last_epoch != -1); resume from the optimizer's and scheduler's state_dict")
        self.base_momentums = [group["initial_momentum"] for group in optimizer.param_groups]
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        return [base * self.decay**self.last_epoch for base in self.base_lrs]

    def step(self, epoch: int | None = None) -> None:
        super().step(epoch)
        for group, base in zip(self.optimizer.param_groups, self.base_momentums):
            if base is not None and "momentum" in group:
                ramped = base + self.momentum_step * self.last_epoch
                group["momentum"] = min(max(self.max_momentum, base), ramped)


class ReduceLROnPlateau(_TorchReduceLROnPlateau):
    """:class:`torch.optim.lr_scheduler.ReduceLROnPlateau` that may name the metric it follows.

    ``monitor`` is the logged metric whose plateaus lower the learning rate; ``None`` (default) leaves the
    choice to the module that uses the scheduler (``PathSGDMixin``'s ``monitor``, ``val/loss`` by default).
    Unlike ``lightning.pytorch.cli.ReduceLROnPlateau``, the metric is optional. The other arguments are
    torch's.

    Args:
        optimizer: the optimizer whose learning rates are reduced.
        monitor: name of the logged metric to follow (``None``: the module's choice).
        mode: ``"min"`` (lower is better) or ``"max"``.
        factor: factor by which the learning rate is reduced.
        patience: epochs without improvement before the learning rate is reduced.
        threshold: smallest change that counts as an improvement.
        threshold_mode: ``"rel"`` or ``"abs"`` (how ``threshold`` is applied).
        cooldown: epochs to wait after a reduction before counting again.
        min_lr: lower bound on the learning rate (one value, or one per param group).
        eps: smallest change of the learning rate that is applied.
    """

    def __init__(self, optimizer: Optimizer, monitor: str | None = None, mode: str = "min", factor: float = 0.1,
                 patience: int = 10, threshold: float = 1e-4, threshold_mode: str = "rel", cooldown: int = 0,
                 min_lr: float | list[float] = 0.0, eps: float = 1e-8):
        if monitor is not None and (not isinstance(monitor, str) or not monitor):
            raise ValueError(f"ReduceLROnPlateau: monitor must be a metric name or None, got {monitor!r}")
        super().__init__(optimizer, mode=mode, factor=factor, patience=patience, threshold=threshold,
                         threshold_mode=threshold_mode, cooldown=cooldown, min_lr=min_lr, eps=eps)
        self.monitor = monitor
