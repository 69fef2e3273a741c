"""Lightning glue: PathSGDMixin (optimizer and scheduler injected, PathSGD bound to the network) and a ready classifier."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torch.optim.lr_scheduler import ReduceLROnPlateau as TorchReduceLROnPlateau

from pl_pathsgd.factories import as_factory, describe
from pl_pathsgd.models import RecurrentRegressor, classifier_network
from pl_pathsgd.optim import PathSGD
from pl_pathsgd.paths import balanced_init_, unbalanced_init_
from pl_pathsgd.schedules import ReduceLROnPlateau
from pl_pathsgd.seeding import global_seed

#: LightningCLI's ``LRSchedulerCallable`` (a callable taking the optimizer and returning a scheduler), with
#: :class:`pl_pathsgd.schedules.ReduceLROnPlateau` tried first: the short name ``ReduceLROnPlateau`` would
#: otherwise be ambiguous between torch's class and ``lightning.pytorch.cli.ReduceLROnPlateau``.
LRSchedulerCallable = Union[
    Callable[[Optimizer], ReduceLROnPlateau],
    Callable[[Optimizer], Union[LRScheduler, TorchReduceLROnPlateau]],
]


def input_shape_of(example: Any) -> tuple[int, ...] | None:
    """Shape of one example (without the batch dimension) of a batch, ``example_input_array`` or ``(x, y)`` pair."""
    if isinstance(example, (tuple, list)) and example:
        example = example[0]
    if isinstance(example, Tensor) and example.dim() >= 2:
        return tuple(int(s) for s in example.shape[1:])
    return None


class PathSGDMixin:
    """Mix into a LightningModule (before ``LightningModule`` in the bases) for an injected optimizer and
    scheduler, with PathSGD bound to the network it trains.

    ``configure_optimizers`` builds ``optimizer`` from the trainable parameters and ``lr_scheduler`` (if any)
    from the optimizer, stepped once per epoch. A :class:`~pl_pathsgd.PathSGD`, however it was built (a
    class, ``functools.partial``, a factory function, LightningCLI's ``OptimizerCallable``), is bound to
    :attr:`path_network` — the module itself unless overridden — with the input shape of
    ``example_input_array`` or, when that is not set, of the first training batch (``configure_optimizers``
    runs before any batch, so the binding then waits for ``on_train_batch_start``; call ``super()`` if you
    override it). An optimizer that is already bound (``PathSGD(params, model=net)``) is left as it is.
    A scheduler that needs a metric (``ReduceLROnPlateau``) follows its own ``monitor`` if it has one,
    else ``monitor``.

    Args:
        optimizer: builds the optimizer from the parameters: a class, ``functools.partial``, function, an
            import path or a ``{"class_path", "init_args"}`` mapping. Default: ``PathSGD`` (lr 0.01).
        lr_scheduler: builds a scheduler from the optimizer (same forms), stepped per epoch; None: none.
        monitor: the logged metric that a ``ReduceLROnPlateau`` scheduler follows.

    Example::

        class Net(PathSGDMixin, L.LightningModule):
            def __init__(self, optimizer: OptimizerCallable = PathSGD, lr_scheduler: LRSchedulerCallable | None = None):
                super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler)
                self.net = nn.Sequential(nn.Linear(64, 100), nn.ReLU(), nn.Linear(100, 10))
                self.example_input_array = torch.zeros(1, 64)

            @property
            def path_network(self):
                return self.net
    """

    def __init__(self, *args: Any, optimizer: OptimizerCallable = PathSGD,
                 lr_scheduler: Optional[LRSchedulerCallable] = None, monitor: str = "val/loss", **kwargs: Any):
        super().__init__(*args, **kwargs)
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"monitor must be the name of a logged metric such as 'val/loss', got {monitor!r}")
        self.optimizer_factory = as_factory(optimizer, "optimizer")
        self.lr_scheduler_factory = None if lr_scheduler is None else as_factory(lr_scheduler, "lr_scheduler")
        self.monitor = monitor
        self._path_optimizer_awaiting_batch: PathSGD | None = None

    @property
    def path_network(self) -> nn.Module:
        """The network whose path geometry PathSGD follows (the module itself unless overridden)."""
        return self  # type: ignore[return-value]

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]  # type: ignore[attr-defined]
        optimizer = self.optimizer_factory(params)
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must build a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, PathSGD) and not optimizer.is_bound:
            self._bind(optimizer)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        config = {"scheduler": scheduler, "interval": "epoch"}
        if isinstance(scheduler, TorchReduceLROnPlateau):
            config["monitor"] = getattr(scheduler, "monitor", None) or self.monitor
        return {"optimizer": optimizer, "lr_scheduler": config}

    def _bind(self, optimizer: PathSGD) -> None:
        shape = input_shape_of(self.example_input_array)  # type: ignore[attr-defined]
        if shape is None:
            self._path_optimizer_awaiting_batch = optimizer
        else:
            optimizer.bind(self.path_network, shape)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> Any:
        optimizer = self._path_optimizer_awaiting_batch
        if optimizer is not None:
            shape = input_shape_of(batch)
            if shape is None:
                raise ValueError(
                    f"{type(self).__name__}: cannot tell the input shape of {type(self.path_network).__name__} "
                    f"from a training batch of type {type(batch).__name__}; set self.example_input_array to a "
                    "batch of one example, e.g. torch.zeros(1, 3, 32, 32)")
            optimizer.bind(self.path_network, shape)
            self._path_optimizer_awaiting_batch = None
        return super().on_train_batch_start(batch, batch_idx)  # type: ignore[misc]


class _SupervisedModule(PathSGDMixin, pl.LightningModule):
    """What the package's ready modules share: the network built in ``configure_model`` (where Lightning's
    precision applies), logging that costs the training step nothing measurable, and per-split means summed
    as tensors and reduced once per loop.  Subclasses give ``_build_network`` and ``_split_statistics``."""

    def __init__(self, input_shape: Sequence[int], optimizer: OptimizerCallable, lr_scheduler, monitor: str):
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, monitor=monitor)
        self.input_shape = tuple(int(s) for s in input_shape)
        self.network: nn.Module | None = None
        self.example_input_array = torch.zeros(1, *self.input_shape)
        self._split_sums: dict[str, Tensor] = {}  # split -> sums of the split's statistics

    def __setattr__(self, name: str, value: Any) -> None:
        # The Trainer sets ``_current_fx_name`` twice for every hook it calls, some forty times a step;
        # through nn.Module.__setattr__ that alone costs a tenth of a millisecond per step, as much as a
        # small network's whole update. It is a plain attribute (never a parameter, buffer or submodule).
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def _build_network(self) -> nn.Module:
        raise NotImplementedError

    def configure_model(self) -> None:
        """Build and initialise the network (once), in the dtype and on the device Lightning sets up."""
        if self.network is not None:
            return
        self.network = self._build_network()
        # in the network's dtype: Lightning's model summary feeds it to forward as it is
        self.example_input_array = torch.zeros(1, *self.input_shape, dtype=next(self.network.parameters()).dtype)

    @property
    def path_network(self) -> nn.Module:
        if self.network is None:
            self.configure_model()
        return self.network

    def forward(self, x: Tensor) -> Tensor:
        return self.path_network(x)

    def _logs_this_step(self) -> bool:
        """Whether the trainer writes this training step's logged values (Lightning's log_every_n_steps rule)."""
        trainer = self._trainer
        if trainer is None:
            return False
        try:
            return bool(trainer._logger_connector.should_update_logs)
        except AttributeError:  # a Lightning without that connector: the documented rule
            every = trainer.log_every_n_steps
            return every > 0 and (trainer.global_step + 1) % every == 0

    def _add_to_split(self, split: str, batch) -> None:
        with torch.no_grad():
            sums = self._split_statistics(batch)
        self._split_sums[split] = sums if split not in self._split_sums else self._split_sums[split] + sums

    def _split_statistics(self, batch) -> Tensor:
        """Sums of the per-example statistics the split logs, and the example count last."""
        raise NotImplementedError

    def _log_split(self, split: str) -> None:
        sums = self._split_sums.pop(split, None)
        if sums is None:
            return
        sums = self.trainer.strategy.reduce(sums, reduce_op="sum")  # one reduction per loop, across processes
        count = sums[-1].clamp(min=1)
        # already reduced, so the values agree on every process; sync_dist only tells Lightning so
        for name, total in zip(self._split_names, sums[:-1]):
            self.log(f"{split}/{name}", (total / count).float(), sync_dist=True,
                     prog_bar=split == "val" and name == self._split_names[-1])

    _split_names: tuple[str, ...] = ("loss",)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._add_to_split("val", batch)

    def on_validation_epoch_start(self) -> None:
        self._split_sums.pop("val", None)

    def on_validation_epoch_end(self) -> None:
        self._log_split("val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._add_to_split("test", batch)

    def on_test_epoch_start(self) -> None:
        self._split_sums.pop("test", None)

    def on_test_epoch_end(self) -> None:
        self._log_split("test")


class PathSGDClassifier(_SupervisedModule):
    """The paper's classifiers as a LightningModule: feed-forward ReLU nets or a small conv net trained on
    cross-entropy with any optimizer (Path-SGD by default).

    The network is built in ``configure_model``, where Lightning's precision applies (``precision="64-true"``
    builds and initialises it in float64); outside a Trainer it is built on first use. ``example_input_array``
    is a zero batch of one example of ``input_shape``. ``predict`` returns the predicted class of every example.

    Logging costs the training step nothing measurable: ``batch/loss`` (also on the progress bar) and
    ``batch/error`` of the current mini-batch are logged, as tensors, only at the steps where the trainer
    writes to its loggers (every ``log_every_n_steps``); nothing is synchronised or accumulated per step.
    Per-epoch training curves come from :class:`~pl_pathsgd.callbacks.EpochErrorMonitor` (full passes over
    the training set). ``val/loss``, ``val/error``, ``test/loss`` and ``test/error`` are the means over the
    whole split, summed as tensors during the loop and reduced across processes once at its end.

    The initialisation follows the run's seed: with ``init_seed=None`` (the default) it uses the seed that
    ``lightning.seed_everything`` set (``seed_everything`` in pl-pathsgd's configs; 0 if none was set), so
    two seeds give two initialisations and the same seed the same one; an integer pins it. The seed used
    is recorded as the hyper-parameter ``init_seed``.

    Args:
        input_shape: Shape of one example, e.g. [64] or [1, 8, 8] (pl-pathsgd links it from the DataModule).
        num_classes: Number of classes (pl-pathsgd links it from the DataModule).
        network: "mlp" (hidden widths `hidden`, optional `dropout`) or "conv" (`channels`; needs image inputs,
            i.e. the DataModule's flatten: false).
        hidden: Widths of the MLP's hidden layers (the paper: [4000, 4000]).
        channels: Channels of the conv net's 3x3 conv layers, each followed by ReLU and 2x2 max pooling.
        dropout: Drop probability after each hidden layer of the MLP (the paper: 0 or 0.5).
        init: "balanced" (weights N(0, 1/fan_in), biases 0), "unbalanced" (the balanced weights under the
            paper's random node-wise rescaling: same function, same path-norm) or "default" (PyTorch's).
        unbalanced_draws: Units drawn (with replacement) for the unbalanced init; default a quarter of the
            hidden units (2000 for 2x4000).
        init_seed: Seed of the balanced and unbalanced inits (both draw the same balanced weights); None (the
            default) follows seed_everything, an integer pins it.
        optimizer: The optimizer, by class (class_path/init_args in YAML): pl_pathsgd.PathSGD (lr, momentum,
            p, ...) or any torch.optim class; PathSGD is bound to the network. Default: PathSGD with lr 0.01.
        lr_scheduler: A learning-rate scheduler by class (class_path/init_args), stepped once per epoch, e.g.
            pl_pathsgd.PaperSchedule (the paper's Figure 1 schedule), StepLR or ReduceLROnPlateau. Default: none.
        monitor: The logged metric that a ReduceLROnPlateau scheduler follows unless it names its own.
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
        unbalanced_draws: Optional[int] = None,
        init_seed: Optional[int] = None,
        optimizer: OptimizerCallable = PathSGD,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        monitor: str = "val/loss",
    ):
        super().__init__(input_shape, optimizer, lr_scheduler, monitor)
        if init not in ("balanced", "unbalanced", "default"):
            raise ValueError(f"init must be 'balanced', 'unbalanced' or 'default', got {init!r}")
        if init_seed is not None and (isinstance(init_seed, bool) or not isinstance(init_seed, int) or init_seed < 0):
            raise ValueError(f"init_seed must be an integer >= 0, or None to follow seed_everything; got {init_seed!r}")
        init_seed = global_seed() if init_seed is None else init_seed
        # hyper-parameters as plain data (the optimizer and scheduler as class path and init arguments), so
        # that checkpoints load with weights_only=True and load_from_checkpoint rebuilds the same ones
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.save_hyperparameters({"input_shape": list(self.input_shape), "hidden": list(hidden),
                                   "channels": list(channels), "init_seed": init_seed,
                                   "optimizer": describe(self.optimizer_factory),
                                   "lr_scheduler": describe(self.lr_scheduler_factory)})
        self._network_options = dict(kind=network, input_shape=self.input_shape, num_classes=num_classes,
                                     hidden=list(hidden), channels=list(channels), dropout=dropout)
        with torch.device("meta"):  # checks the options now, before any data is loaded; costs nothing
            classifier_network(**self._network_options)
        self._init = (init, unbalanced_draws, init_seed)

    def _build_network(self) -> nn.Module:
        network = classifier_network(**self._network_options)
        init, draws, seed = self._init
        if init != "default":
            balanced_init_(network, seed=seed)
        if init == "unbalanced":
            unbalanced_init_(network, num_draws=draws, seed=seed + 1, input_shape=self.input_shape)
        return network

    def training_step(self, batch, batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        if self._logs_this_step():
            with torch.no_grad():
                error = (logits.argmax(dim=1) != y).to(loss.dtype).mean()
            self.log("batch/loss", loss.detach(), prog_bar=True, batch_size=len(y))
            self.log("batch/error", error, batch_size=len(y))
        return loss

    _split_names = ("loss", "error")

    def _split_statistics(self, batch) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, reduction="sum")
        dtype = torch.promote_types(loss.dtype, torch.float32)
        errors = (logits.argmax(dim=1) != y).sum()
        return torch.stack([loss.to(dtype), errors.to(dtype), torch.tensor(len(y), dtype=dtype, device=loss.device)])

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """The predicted class of every example of the batch (``batch`` or ``(x, y)``)."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).argmax(dim=1)


# Lightning looks at training_step's signature at every step (does it take batch_idx?); a recorded
# signature makes that a lookup instead of an inspection.
PathSGDClassifier.training_step.__signature__ = inspect.signature(PathSGDClassifier.training_step)


class SequenceRegressor(_SupervisedModule):
    """A ReLU recurrent network for sequence regression (e.g. the addition problem), trained on the mean
    squared error with any optimizer (Path-SGD by default, with ``recurrent="kappa1"`` or ``"exact"``).

    The network is :class:`~pl_pathsgd.models.RecurrentRegressor`: ``nn.RNN(nonlinearity="relu")`` read out
    at the last step by a Linear layer. It logs ``batch/mse`` at the trainer's logging steps and ``val/mse``,
    ``test/mse`` (means over the whole split) after each validation and test loop.

    Args:
        input_shape: Shape of one sequence, (steps, features) (pl-pathsgd links it from the DataModule).
        num_outputs: Number of values predicted per sequence (pl-pathsgd links it from the DataModule).
        hidden: Hidden units of each recurrent layer.
        layers: Number of recurrent layers.
        init: "default" (PyTorch's) or "identity" (recurrent weights I, input weights N(0, 0.001^2), biases 0;
            for SGD: Path-SGD's divisors of some recurrent weights are then ~1e-11 and its steps diverge).
        init_seed: Seed of the initialisation; None (the default) follows seed_everything.
        optimizer: The optimizer, by class (class_path/init_args in YAML): pl_pathsgd.PathSGD (lr, momentum,
            recurrent, ...) or any torch.optim class. Default: PathSGD with its default lr 0.01, which diverges
            on an RNN: give a step size (configs/rnn/addition.yaml uses 5e-6).
        lr_scheduler: A learning-rate scheduler by class (class_path/init_args), stepped once per epoch.
        monitor: The logged metric that a ReduceLROnPlateau scheduler follows unless it names its own.
    """

    _split_names = ("mse",)

    def __init__(
        self,
        input_shape: Sequence[int] = (100, 2),
        num_outputs: int = 1,
        hidden: int = 100,
        layers: int = 1,
        init: Literal["default", "identity"] = "default",
        init_seed: Optional[int] = None,
        optimizer: OptimizerCallable = PathSGD,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        monitor: str = "val/mse",
    ):
        super().__init__(input_shape, optimizer, lr_scheduler, monitor)
        if len(self.input_shape) != 2:
            raise ValueError(f"SequenceRegressor takes sequences: input_shape must be (steps, features), got "
                             f"{list(self.input_shape)}")
        if init_seed is not None and (isinstance(init_seed, bool) or not isinstance(init_seed, int) or init_seed < 0):
            raise ValueError(f"init_seed must be an integer >= 0, or None to follow seed_everything; got {init_seed!r}")
        init_seed = global_seed() if init_seed is None else init_seed
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.save_hyperparameters({"input_shape": list(self.input_shape), "init_seed": init_seed,
                                   "optimizer": describe(self.optimizer_factory),
                                   "lr_scheduler": describe(self.lr_scheduler_factory)})
        self._options = dict(features=self.input_shape[1], hidden=hidden, num_outputs=num_outputs, layers=layers,
                             init=init)
        with torch.device("meta"):  # checks the options now, before any data is loaded
            RecurrentRegressor(**self._options)
        self._init_seed = init_seed

    def _build_network(self) -> nn.Module:
        with torch.random.fork_rng(devices=[]):  # the initialisation draws from its own seed, not the run's
            torch.manual_seed(self._init_seed)
            return RecurrentRegressor(**self._options)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.mse_loss(self(x), y)
        if self._logs_this_step():
            self.log("batch/mse", loss.detach(), prog_bar=True, batch_size=len(y))
        return loss

    def _split_statistics(self, batch) -> Tensor:
        x, y = batch
        squared = F.mse_loss(self(x), y, reduction="sum")
        dtype = torch.promote_types(squared.dtype, torch.float32)
        return torch.stack([squared.to(dtype) / y[0].numel(), torch.tensor(len(y), dtype=dtype, device=y.device)])

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """The predicted values of every sequence of the batch (``batch`` or ``(x, y)``)."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x)


SequenceRegressor.training_step.__signature__ = inspect.signature(SequenceRegressor.training_step)
