"""Callbacks that the paper's experiments add to their cells.

* :class:`FinalCapacityReport` measures Figure 1's capacity (path-norms, margin) once, after the last epoch.
* :class:`PerturbWeights` moves the weights by a rounding-level amount before the first step: the control
  against which Figure 3's invariance claim is checked.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from pl_pathsgd.callbacks.capacity import DEFAULT_EVAL_BATCH_SIZE, CapacityReport


def ends_fit(trainer: pl.Trainer) -> bool:
    """Whether the training epoch that is ending (in ``on_train_epoch_end``) is the last one of the fit."""
    epochs_done = trainer.current_epoch + 1
    if trainer.max_epochs is not None and 0 <= trainer.max_epochs <= epochs_done:
        return True
    if trainer.max_steps is not None and 0 <= trainer.max_steps <= trainer.global_step:
        return True
    return bool(trainer.should_stop) and epochs_done >= (trainer.min_epochs or 0) \
        and trainer.global_step >= (trainer.min_steps or 0)


class FinalCapacityReport(CapacityReport):
    """:class:`~pl_pathsgd.callbacks.CapacityReport` measured once, after the training epoch that ends the fit
    (``max_epochs`` or ``max_steps`` reached, or a requested stop), whatever the number of epochs: what Figure 1
    needs of every width at the cost of one pass over the training set. It logs the same ``capacity/*`` keys.

    Args:
        percentile: the percentile of the margin distribution, in [0, 100] (default: the 5th).
        eval_batch_size: examples per batch of the training-set pass.
    """

    def __init__(self, percentile: float = 5.0, eval_batch_size: int = DEFAULT_EVAL_BATCH_SIZE):
        super().__init__(percentile=percentile, eval_batch_size=eval_batch_size)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(percentile=self.percentile, final=True)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if ends_fit(trainer):
            super().on_train_epoch_end(trainer, pl_module)  # every_n_epochs is 1: it measures now


class PerturbWeights(Callback):
    """Move every non-zero parameter entry by a rounding-level amount, in a random direction, before the first
    training step.

    Theorem 5.1 says that Path-SGD from a network and from any node-wise rescaling of it computes the same
    function at every step, in exact arithmetic. In floating point the two runs round differently, and
    training amplifies any difference of the weights, however small. The gap between a run and the same run
    from weights perturbed at the rounding level is therefore the yardstick for "the same curve" in a given
    precision: Figure 3's runner adds this callback to a control cell (Path-SGD from the balanced init) and
    compares Path-SGD's balanced/unbalanced gap with it.

    The directions come from a private generator seeded with ``seed``: the same seed gives the same perturbation,
    and no global random state is touched (the data order and everything else stay those of the unperturbed run).
    Zero entries (the biases of the paper's init) stay zero, since a relative perturbation of 0 is 0. Only a fit
    that starts afresh is perturbed: a fit resumed from a checkpoint (``ckpt_path``) holds the weights as the
    first fit perturbed them.

    After the perturbation, ``changed`` is the number of entries that moved and ``relative_change`` the l2 norm of
    the change over that of the parameters (a line on rank zero says both).

    Args:
        relative: None (the default): every non-zero entry moves to its neighbour, up or down, among the numbers
            of its dtype (one unit in the last place: a relative change between eps/2 and eps of the dtype, e.g.
            6e-8 to 1.2e-7 in float32); a number r > 0: every entry is multiplied by 1 + r or 1 - r (computed in
            float64, rounded to the entry's dtype; an r below the dtype's rounding is refused).
        seed: seed of the directions.
    """

    def __init__(self, relative: float | None = None, seed: int = 0):
        if relative is not None and (isinstance(relative, bool) or not isinstance(relative, (int, float))
                                     or not 0 < relative < 1):
            raise ValueError(f"PerturbWeights(relative={relative!r}) must be None (one unit in the last place) or a "
                             "number in (0, 1), e.g. 1e-7")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"PerturbWeights(seed={seed!r}) must be an integer >= 0")
        self.relative = None if relative is None else float(relative)
        self.seed = seed
        self.changed = 0
        self.relative_change = 0.0

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(relative=self.relative, seed=self.seed)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.ckpt_path is not None or trainer.global_step > 0:
            return  # resumed from a checkpoint, which holds the weights as the first fit perturbed them
        self.changed, self.relative_change = perturb_(pl_module.parameters(), self.relative, self.seed)
        size = "one unit in the last place" if self.relative is None else f"a relative {self.relative:g}"
        rank_zero_info(f"PerturbWeights: moved {self.changed} parameter entries by {size} (seed {self.seed}); "
                       f"relative l2 change of the parameters {self.relative_change:.3g}")


def perturb_(parameters, relative: float | None, seed: int) -> tuple[int, float]:
    """Perturb the tensors ``parameters`` in place as :class:`PerturbWeights` describes; return the number of
    entries changed and the relative l2 change."""
    generator = torch.Generator().manual_seed(seed)
    changed, change_sq, norm_sq, nonzero = 0, 0.0, 0.0, 0
    with torch.no_grad():
        for tensor in parameters:
            up = torch.randint(0, 2, tensor.shape, generator=generator).to(tensor.device, torch.bool)
            if relative is None:
                target = torch.where(up, math.inf, -math.inf).to(tensor.dtype)
                moved = torch.nextafter(tensor, target)
            else:
                sign = up.to(torch.float64) * 2 - 1  # +1 or -1, in float64 so that 1 + r is not rounded first
                moved = (tensor.to(torch.float64) * (1 + relative * sign)).to(tensor.dtype)
            moved = torch.where(tensor != 0, moved, tensor)
            difference = (moved.to(torch.float64) - tensor.to(torch.float64))
            changed += int((difference != 0).sum())
            nonzero += int((tensor != 0).sum())
            change_sq += float(difference.square().sum())
            norm_sq += float(tensor.to(torch.float64).square().sum())
            tensor.copy_(moved)
    if nonzero and not changed:
        raise ValueError(f"PerturbWeights(relative={relative!r}) changed no weight: the change is below the rounding "
                         "of the weights' dtype; give a larger relative or None (one unit in the last place)")
    return changed, math.sqrt(change_sq / norm_sq) if norm_sq else 0.0
