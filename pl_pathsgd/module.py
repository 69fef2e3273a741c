"""Lightning glue: PathSGDMixin, the paper's per-epoch schedule, and a ready classifier."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torchmetrics import MeanMetric

from pl_pathsgd.models import MLP, ConvNet
from pl_pathsgd.optim import PathSGD
from pl_pathsgd.paths import balanced_init_, unbalanced_init_

OptimizerName = Literal["pathsgd", "sgd", "adagrad", "adam"]
OPTIMIZER_NAMES = ("pathsgd", "sgd", "adagrad", "adam")


class PaperSchedule(LRScheduler):
    """The paper's per-epoch schedule (Figure 1): lr <- decay * lr and
    momentum <- min(max_momentum, momentum + momentum_step) after each epoch.

    Step it once per epoch. Closed form from the initial values, so resuming is exact.
    Optimizers without momentum only get the learning-rate decay.
    """

    def __init__(self, optimizer: Optimizer, decay: float = 0.99, momentum_step: float = 0.02,
                 max_momentum: float = 0.9, last_epoch: int = -1):
        if not 0 < decay <= 1:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        self.decay, self.momentum_step, self.max_momentum = decay, momentum_step, max_momentum
        self.base_momentums = [group.get("momentum") for group in optimizer.param_groups]
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        return [base * self.decay ** self.last_epoch for base in self.base_lrs]

    def step(self, epoch: int | None = None) -> None:
        super().step(epoch)
        for group, base in zip(self.optimizer.param_groups, self.base_momentums):
            if base is not None:  # never lowers a momentum that starts above the cap
                ramped = base + self.momentum_step * self.last_epoch
                group["momentum"] = min(max(self.max_momentum, base), ramped)


@dataclass
class OptimizerSpec:
    """How :class:`PathSGDMixin` builds its optimizer.

    ``optimizer`` is a name (``"pathsgd"``, ``"sgd"``, ``"adagrad"``, ``"adam"``) built with the
    hyper-parameters below, or a callable taking the parameters (LightningCLI's ``OptimizerCallable``,
    a ``functools.partial``, an optimizer class); a callable that builds a :class:`PathSGD` also
    receives ``model`` and ``input_shape``.
    """

    optimizer: str | Callable[..., Optimizer] = "pathsgd"
    lr: float = 0.1
    momentum: float = 0.0
    p: float = 2.0
    weight_decay: float = 0.0
    paper_schedule: bool = False
    lr_scheduler: Callable[[Optimizer], Any] | None = None


def _optimizer_class(factory: Callable) -> type | None:
    """The class a factory builds: itself, or the class inside a (jsonargparse) partial."""
    if isinstance(factory, type):
        return factory
    for candidate in (getattr(factory, "func", None), *getattr(factory, "args", ())):
        if isinstance(candidate, type):
            return candidate
    return None


def build_optimizer(spec: OptimizerSpec, params: Iterable[Tensor], network: nn.Module,
                    input_shape: Sequence[int] | None) -> Optimizer:
    """Build the optimizer an :class:`OptimizerSpec` describes; PathSGD gets ``network`` to normalise."""
    shape = tuple(input_shape) if input_shape is not None else None
    if callable(spec.optimizer):
        cls = _optimizer_class(spec.optimizer)
        if cls is not None and issubclass(cls, PathSGD):
            return spec.optimizer(params, model=network, input_shape=shape)
        return spec.optimizer(params)
    name = str(spec.optimizer).lower()
    if name == "pathsgd":
        return PathSGD(params, lr=spec.lr, momentum=spec.momentum, p=spec.p, weight_decay=spec.weight_decay,
                       model=network, input_shape=shape)
    if name == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=spec.lr, weight_decay=spec.weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay)
    raise ValueError(f"unknown optimizer {spec.optimizer!r}; choose one of {', '.join(OPTIMIZER_NAMES)} "
                     "or pass an optimizer class / OptimizerCallable")


class PathSGDMixin:
    """Mix into a LightningModule (before ``LightningModule`` in the bases) to get Path-SGD and friends.

    ``configure_optimizers`` builds the optimizer described by ``self.optimizer_spec`` (set it with
    :meth:`set_optimizer` in ``__init__``; Path-SGD with lr 0.1 otherwise) and hands PathSGD the network
    to normalise: :attr:`path_network` (the module itself by default — override it to return your
    network) with :attr:`path_input_shape` (``None``: inferred when the network starts with a Linear).
    Callbacks of :mod:`pl_pathsgd.callbacks` use the same two attributes.

    Example::

        class Net(PathSGDMixin, L.LightningModule):
            def __init__(self):
                super().__init__()
                self.net = nn.Sequential(nn.Linear(64, 100), nn.ReLU(), nn.Linear(100, 10))
                self.set_optimizer("pathsgd", lr=0.05, momentum=0.9)

            @property
            def path_network(self):
                return self.net
    """

    optimizer_spec: OptimizerSpec = OptimizerSpec()

    def set_optimizer(self, optimizer: str | Callable[..., Optimizer] = "pathsgd", *, lr: float = 0.1,
                      momentum: float = 0.0, p: float = 2.0, weight_decay: float = 0.0,
                      paper_schedule: bool = False, lr_scheduler: Callable[[Optimizer], Any] | None = None) -> None:
        """Choose the optimizer (see :class:`OptimizerSpec`). ``paper_schedule`` adds :class:`PaperSchedule`
        (stepped per epoch); ``lr_scheduler`` is a callable taking the optimizer (LightningCLI's
        ``LRSchedulerCallable``), also stepped per epoch."""
        if isinstance(optimizer, str) and optimizer.lower() not in OPTIMIZER_NAMES:
            raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZER_NAMES)}")
        if lr <= 0 or momentum < 0 or weight_decay < 0 or p < 1:
            raise ValueError(f"need lr > 0, momentum >= 0, weight_decay >= 0 and p >= 1; got lr={lr}, "
                             f"momentum={momentum}, weight_decay={weight_decay}, p={p}")
        if paper_schedule and lr_scheduler is not None:
            raise ValueError("use either paper_schedule or lr_scheduler, not both")
        self.optimizer_spec = OptimizerSpec(optimizer, lr, momentum, p, weight_decay, paper_schedule, lr_scheduler)

    @property
    def path_network(self) -> nn.Module:
        """The network whose path geometry PathSGD follows (the module itself unless overridden)."""
        return self  # type: ignore[return-value]

    @property
    def path_input_shape(self) -> tuple[int, ...] | None:
        """Shape of one input example without the batch dimension (None: infer from a leading Linear)."""
        return None

    def configure_optimizers(self):
        spec = self.optimizer_spec
        params = [p for p in self.parameters() if p.requires_grad]  # type: ignore[attr-defined]
        optimizer = build_optimizer(spec, params, self.path_network, self.path_input_shape)
        if spec.paper_schedule:
            scheduler = PaperSchedule(optimizer)
        elif spec.lr_scheduler is not None:
            scheduler = spec.lr_scheduler(optimizer)
        else:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


class PathSGDClassifier(PathSGDMixin, pl.LightningModule):
    """The paper's classifiers as a LightningModule: feed-forward ReLU nets or a small conv net,
    cross-entropy, optimised by Path-SGD, SGD, AdaGrad or Adam.

    Args:
        input_shape: shape of one example (linked from the DataModule by ``pl-pathsgd``).
        num_classes: number of classes (linked from the DataModule by ``pl-pathsgd``).
        network: ``"mlp"`` (hidden widths ``hidden``, optional ``dropout``) or ``"conv"`` (``channels``;
            needs image inputs, i.e. the DataModule's ``flatten: false``).
        init: ``"balanced"`` (weights N(0, 1/fan_in), biases 0), ``"unbalanced"`` (the balanced weights
            rescaled by the paper's random node-wise rescaling: same function, same path-norm) or
            ``"default"`` (PyTorch's). Both paper inits draw from ``init_seed``, so they share weights.
        unbalanced_draws: number of units drawn (with replacement) for the unbalanced init; default a
            quarter of the hidden units (2000 for 2x4000).
        optimizer, lr, momentum, p, weight_decay, paper_schedule: see :meth:`PathSGDMixin.set_optimizer`.
        custom_optimizer: an ``OptimizerCallable`` (``class_path``/``init_args`` in YAML) used instead of
            ``optimizer``; PathSGD built this way also receives the network.
        lr_scheduler: an ``LRSchedulerCallable``, stepped per epoch.

    Logs ``batch/loss`` and ``batch/error`` (running means over the epoch's mini-batches),
    ``val/loss``, ``val/error``, ``test/loss`` and ``test/error``.
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (64,),
        num_classes: int = 10,
        network: Literal["mlp", "conv"] = "mlp",
        hidden: Sequence[int] = (4000, 4000),
        channels: Sequence[int] = (32, 64),
        dropout: float = 0.0,
        init: Literal["balanced", "unbalanced", "default"] = "balanced",
        unbalanced_draws: int | None = None,
        init_seed: int = 0,
        optimizer: OptimizerName = "pathsgd",
        lr: float = 0.1,
        momentum: float = 0.0,
        p: float = 2.0,
        weight_decay: float = 0.0,
        paper_schedule: bool = False,
        custom_optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["custom_optimizer", "lr_scheduler"])
        self.input_shape = tuple(int(s) for s in input_shape)
        self.network = self._build_network(network, hidden, channels, dropout, num_classes)
        self._initialise(init, unbalanced_draws, init_seed)
        self.set_optimizer(custom_optimizer or optimizer, lr=lr, momentum=momentum, p=p, weight_decay=weight_decay,
                           paper_schedule=paper_schedule, lr_scheduler=lr_scheduler)
        self.batch_loss, self.batch_error = MeanMetric(), MeanMetric()
        self.val_loss, self.val_error = MeanMetric(), MeanMetric()
        self.test_loss, self.test_error = MeanMetric(), MeanMetric()

    def _build_network(self, network, hidden, channels, dropout, num_classes) -> nn.Module:
        if network == "mlp":
            mlp = MLP(math.prod(self.input_shape), list(hidden), num_classes, dropout)
            return mlp if len(self.input_shape) == 1 else nn.Sequential(nn.Flatten(), mlp)
        if network == "conv":
            if len(self.input_shape) != 3:
                raise ValueError(f"network='conv' needs image inputs (C, H, W), got input_shape={self.input_shape}; "
                                 "set the DataModule's flatten: false")
            return ConvNet(self.input_shape[0], num_classes, list(channels))
        raise ValueError(f"network must be 'mlp' or 'conv', got {network!r}")

    def _initialise(self, init: str, draws: int | None, seed: int) -> None:
        if init == "default":
            return
        if init not in ("balanced", "unbalanced"):
            raise ValueError(f"init must be 'balanced', 'unbalanced' or 'default', got {init!r}")
        balanced_init_(self.network, seed=seed)
        if init == "unbalanced":
            unbalanced_init_(self.network, num_draws=draws, seed=seed + 1, input_shape=self.input_shape)

    @property
    def path_network(self) -> nn.Module:
        return self.network

    @property
    def path_input_shape(self) -> tuple[int, ...]:
        return self.input_shape

    def forward(self, x: Tensor) -> Tensor:
        return self.network(x)

    def _evaluate(self, batch) -> tuple[Tensor, Tensor, Tensor]:
        x, y = batch
        logits = self(x)
        losses = F.cross_entropy(logits, y, reduction="none")
        errors = (logits.argmax(dim=1) != y).float()
        return losses.mean(), losses, errors

    def training_step(self, batch, batch_idx: int) -> Tensor:
        loss, losses, errors = self._evaluate(batch)
        self.batch_loss(losses)
        self.batch_error(errors)
        self.log("batch/loss", self.batch_loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log("batch/error", self.batch_error, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        _, losses, errors = self._evaluate(batch)
        self.val_loss(losses)
        self.val_error(errors)
        self.log("val/loss", self.val_loss, on_epoch=True)
        self.log("val/error", self.val_error, on_epoch=True, prog_bar=True)

    def test_step(self, batch, batch_idx: int) -> None:
        _, losses, errors = self._evaluate(batch)
        self.test_loss(losses)
        self.test_error(errors)
        self.log("test/loss", self.test_loss, on_epoch=True)
        self.log("test/error", self.test_error, on_epoch=True)
