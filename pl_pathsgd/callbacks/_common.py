"""What the callbacks share: the network, its input shape and traced graph, logger checks, naming.

Any LightningModule works with the callbacks:

* the network is ``pl_module.path_network`` when the module defines it, else the module itself
  (its ``forward`` must then take the input batch tensor);
* the input shape (one example, without the batch dimension) is, first match wins: the callback's
  ``input_shape`` argument; ``pl_module.example_input_array`` (Lightning's convention; its shape
  without the batch dimension); the input shape of a ``PathSGD`` of the run bound to the same network;
  the shape of the inputs of the first training batch;
* the traced graph comes from :func:`pl_pathsgd.paths.trace`, which traces a network once per input
  shape, so the optimizer and every callback share one trace.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from typing_extensions import override

from pl_pathsgd.callbacks._observe import eval_mode, preserved_rng
from pl_pathsgd.paths import PathGeometryError, PathGraph, UnsupportedModelError, trace

NETWORK_ATTRIBUTE = "path_network"

Shape = tuple[int, ...]


def network_of(pl_module: nn.Module) -> nn.Module:
    """The network whose path geometry the callbacks measure: ``pl_module.path_network`` or the module."""
    network = getattr(pl_module, NETWORK_ATTRIBUTE, None)
    if network is None:
        return pl_module
    if not isinstance(network, nn.Module):
        raise TypeError(
            f"{type(pl_module).__name__}.{NETWORK_ATTRIBUTE} must be an nn.Module, got {type(network).__name__}"
        )
    return network


def check_input_shape(input_shape: Any, owner: str) -> Shape | None:
    """Validate an ``input_shape`` argument: ``None``, a positive int, or a non-empty sequence of them."""
    if input_shape is None:
        return None
    if isinstance(input_shape, numbers.Integral) and not isinstance(input_shape, bool):
        input_shape = (input_shape,)
    if (
        not isinstance(input_shape, Sequence)
        or isinstance(input_shape, str)
        or not input_shape
        or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s >= 1 for s in input_shape)
    ):
        raise ValueError(
            f"{owner}(input_shape={input_shape!r}): expected the shape of one example without the batch "
            "dimension, a non-empty tuple of positive ints such as (784,) or (3, 32, 32)"
        )
    return tuple(int(s) for s in input_shape)


def example_input_shape(pl_module: nn.Module) -> Shape | None:
    """The shape of ``pl_module.example_input_array`` without its batch dimension, if it is one tensor."""
    example = getattr(pl_module, "example_input_array", None)
    if isinstance(example, (tuple, list)) and len(example) == 1:
        example = example[0]
    if not isinstance(example, Tensor):
        return None  # several forward arguments or none: not the input of a path network
    if example.dim() < 2:
        raise ValueError(
            f"{type(pl_module).__name__}.example_input_array has shape {tuple(example.shape)}; it needs a batch "
            "dimension first, e.g. torch.zeros(1, 784)"
        )
    return tuple(int(s) for s in example.shape[1:])


class SharedGraph:
    """The traced :class:`~pl_pathsgd.paths.PathGraph` of a module's network, as one callback sees it.

    ``at_fit_start`` traces the network when its input shape is known then (argument,
    ``example_input_array``, or a bound ``PathSGD`` of the run, whose graph is reused), so an unsupported
    network fails before any training with :class:`~pl_pathsgd.paths.UnsupportedModelError`.  Otherwise
    ``at_first_batch`` traces it with the first training batch's input shape, still before the first step.
    """

    def __init__(self, input_shape: Shape | None, owner: str):
        self.explicit_shape = input_shape
        self.owner = owner
        self.graph: PathGraph | None = None

    def reset(self) -> None:
        self.graph = None

    def at_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        network = network_of(pl_module)
        shape, source = self.explicit_shape, "the input_shape argument"
        if shape is None:
            shape, source = example_input_shape(pl_module), "example_input_array"
        if shape is not None:
            self.graph = self._trace(trainer, network, shape, source)
            return
        self.graph = _optimizer_graph(trainer, network, None)

    def at_first_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, inputs: Tensor) -> None:
        if self.graph is None:
            shape = tuple(int(s) for s in inputs.shape[1:])
            self.graph = self._trace(trainer, network_of(pl_module), shape, "the first training batch")

    def get(self, pl_module: pl.LightningModule) -> PathGraph:
        if self.graph is None or self.graph.model is not network_of(pl_module):
            raise RuntimeError(f"{self.owner}: the network was replaced after the fit started; "
                               "set path_network before fit")
        return self.graph

    def _trace(self, trainer: pl.Trainer, network: nn.Module, shape: Shape, source: str) -> PathGraph:
        try:
            return _optimizer_graph(trainer, network, shape) or trace(network, shape)
        except UnsupportedModelError:
            raise
        except PathGeometryError as error:
            raise PathGeometryError(
                f"{self.owner}: {type(network).__name__} does not run on input shape {shape} (from {source}): "
                f"{error}. Pass {self.owner}(input_shape=...), the shape of one example of the network's input "
                "without the batch dimension, or set the module's example_input_array."
            ) from error


class GraphCallback(Callback):
    """Base of the callbacks that work on the network's traced path graph, ``self._graph`` (a
    :class:`SharedGraph` the subclass makes).  One whose measurements are its point (``needs_logger``)
    refuses, at setup, a fit without a logger."""

    _graph: SharedGraph
    needs_logger = True

    @property
    def graph(self) -> PathGraph | None:
        """The traced graph of the network in this fit (shared with PathSGD and the other callbacks)."""
        return self._graph.graph

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.needs_logger:
            require_logger(trainer, type(self).__name__)


def _optimizer_graph(trainer: pl.Trainer, network: nn.Module, shape: Shape | None) -> PathGraph | None:
    """The graph of a ``PathSGD`` of the run bound to ``network`` (with ``shape`` if given): the same trace."""
    for optimizer in trainer.optimizers:
        graph = getattr(optimizer, "graph", None)
        if isinstance(graph, PathGraph) and graph.model is network:
            if shape is None or tuple(graph.input_shape) == tuple(shape):
                return graph
    return None


def require_class_scores(trainer: pl.Trainer, pl_module: pl.LightningModule, inputs: Tensor, owner: str,
                         needs: str) -> None:
    """Refuse, before the first step, a module whose outputs are not class scores of shape (batch, classes >= 2):
    ``needs`` says what of the callback needs them and how to do without.  The forward pass is an observer's
    (eval mode, no gradient, random states restored), on two examples of ``inputs``."""
    precision = trainer.precision_plugin
    with preserved_rng(), eval_mode(pl_module), torch.no_grad(), precision.val_step_context():
        outputs = pl_module(precision.convert_input(inputs[:2]))
    if not isinstance(outputs, Tensor) or outputs.dim() != 2 or outputs.shape[1] < 2:
        shape = tuple(outputs.shape) if isinstance(outputs, Tensor) else type(outputs).__name__
        raise MisconfigurationException(f"{owner}: {needs} class scores of shape (batch, classes) with at least "
                                        f"2 classes, but the model returns {shape}")


def require_logger(trainer: pl.Trainer, owner: str) -> None:
    if not trainer.loggers:
        raise MisconfigurationException(
            f"Cannot use `{owner}` callback with `Trainer(logger=False)`: it logs what it measures. "
            "Give the Trainer a logger, e.g. `Trainer(logger=CSVLogger(...))` or `TensorBoardLogger(...)`."
        )


def p_label(p: float) -> str:
    """``p1``, ``p2``, ``p1.5``, ``pinf``: the suffix of ``path_norm/<label>``."""
    if math.isinf(p):
        return "pinf"
    return f"p{int(p)}" if float(p).is_integer() else f"p{float(p)!r}"


def metric_tensor(value: float, device: torch.device) -> Tensor:
    """A value to ``pl_module.log``: on the module's device (``sync_dist`` reduces there), in float64 where possible."""
    dtype = torch.float32 if device.type == "mps" else torch.float64
    return torch.tensor(value, dtype=dtype, device=device)


def is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_every_n_epochs(value: Any, owner: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}(every_n_epochs={value!r}) must be an int >= 1")
    return value
