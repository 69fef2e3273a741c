"""What the callbacks share: finding the network and its input shape, logger checks, naming.

Any LightningModule works with the callbacks:

* the network is ``pl_module.path_network`` when the module defines it, else the module itself
  (its ``forward`` must then take the input batch tensor);
* the input shape (one example, without the batch dimension) is, in this order: the callback's
  ``input_shape`` argument, ``pl_module.path_input_shape``, the shape of the inputs of the first
  training batch (``batch[0].shape[1:]`` for an ``(x, y)`` batch), or what
  :class:`~pl_pathsgd.paths.PathGraph` infers (a network that starts with a ``Linear`` layer).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn

from pl_pathsgd.paths.errors import PathGeometryError, UnsupportedModelError
from pl_pathsgd.paths.graph import PathGraph

NETWORK_ATTRIBUTE = "path_network"
INPUT_SHAPE_ATTRIBUTE = "path_input_shape"

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


def batch_inputs(batch: Any) -> Tensor | None:
    """The input tensor of a batch: ``batch`` itself or ``batch[0]`` for an ``(x, y, ...)`` tuple or list."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    return None


def batch_input_shape(batch: Any) -> Shape | None:
    inputs = batch_inputs(batch)
    if inputs is None or inputs.dim() < 2:
        return None
    return tuple(int(s) for s in inputs.shape[1:])


def resolve_input_shape(explicit: Shape | None, pl_module: nn.Module, batch_shape: Shape | None) -> Shape | None:
    """Argument, then ``pl_module.path_input_shape``, then the first training batch; ``None`` lets PathGraph infer."""
    if explicit is not None:
        return explicit
    declared = getattr(pl_module, INPUT_SHAPE_ATTRIBUTE, None)
    if declared is not None:
        return check_input_shape(declared, f"{type(pl_module).__name__}.{INPUT_SHAPE_ATTRIBUTE}")
    return batch_shape


class NetworkGeometry:
    """The traced :class:`PathGraph` of a module's network, built once and reused.

    ``check`` (at the start of fit) traces the network, so an unsupported network fails before any
    training with :class:`~pl_pathsgd.paths.UnsupportedModelError` naming every offending layer.  When the
    input shape is not known yet (no argument, no ``path_input_shape``, not inferable), the graph is
    built at first use from the shape of the first training batch (``observe``).
    """

    def __init__(self, input_shape: Shape | None):
        self.explicit_shape = input_shape
        self.batch_shape: Shape | None = None
        self.graph: PathGraph | None = None
        self._graph_shape_source: str | None = None  # "known" or "inferred"

    def reset(self) -> None:
        self.batch_shape = None
        self.graph = None
        self._graph_shape_source = None

    def observe(self, batch: Any) -> None:
        if self.batch_shape is None:
            self.batch_shape = batch_input_shape(batch)

    def check(self, pl_module: nn.Module) -> None:
        network = network_of(pl_module)
        known = resolve_input_shape(self.explicit_shape, pl_module, None)
        if known is not None:
            self.graph, self._graph_shape_source = PathGraph(network, known), "known"
            return
        try:
            self.graph, self._graph_shape_source = PathGraph(network), "inferred"
        except UnsupportedModelError:
            raise
        except PathGeometryError:
            # supported, but the input shape must come from the first training batch
            self.graph, self._graph_shape_source = None, None

    def input_shape(self, pl_module: nn.Module) -> Shape | None:
        return resolve_input_shape(self.explicit_shape, pl_module, self.batch_shape)

    def get(self, pl_module: nn.Module) -> PathGraph:
        network = network_of(pl_module)
        graph = self.graph
        if graph is not None and graph.model is network:
            if self._graph_shape_source == "known":
                return graph
            if self.batch_shape is None or tuple(graph.input_shape) == self.batch_shape:
                return graph
        shape = self.input_shape(pl_module)
        self.graph = PathGraph(network, shape)
        self._graph_shape_source = "known" if shape is not None else "inferred"
        return self.graph


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
