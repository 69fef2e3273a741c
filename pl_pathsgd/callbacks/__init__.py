"""Lightning callbacks that work with any LightningModule and any Trainer.

* :class:`PathNormMonitor` logs ``path_norm/p1``, ``path_norm/p2``, ``path_norm/pinf`` ...
* :class:`RescalingInvarianceCheck` logs ``invariance/function``, ``invariance/path_norm``,
  ``invariance/update`` (Theorem 5.1) on a rescaled copy of the network.
* :class:`EpochErrorMonitor` logs ``{train,val,test}/{error,loss}`` on the whole sets.
* :class:`CapacityReport` logs ``capacity/path_norm_l1`` ... ``capacity/rademacher``: path-norms, the training
  margin and a path-norm generalization bound (Gonon et al., ICLR 2024).
* :class:`TensorBoardExtras` adds per-epoch charts, a learning-curve figure and hyper-parameters with the
  final test error to TensorBoard.
* :class:`Rebalance` rescales the hidden units (smallest l2 norm, or Lemma 4.1's balance) without changing
  the network's function, carrying the optimizer's state along.

All but ``Rebalance`` are observers: with any of them on, a seeded run ends with the same weights, optimizer
state, module modes and random states as without them (``docs/callbacks.md`` states the contract).
``Rebalance`` changes the weights and the optimizer state by design, and nothing else.

The network is ``pl_module.path_network`` when the module defines it, else the module itself; the input
shape is the callback's ``input_shape``, else ``pl_module.example_input_array``'s (without the batch
dimension), else that of a ``PathSGD`` of the run bound to the network, else that of the first training
batch's inputs.  Inputs and targets are read from a batch by ``unpack_batch`` (every callback takes it):
``(x, y)`` tuples and lists and ``{"x": ..., "y": ...}``-style dicts work out of the box
(:func:`default_unpack_batch`); the first batch is checked before any training step.
"""

from pl_pathsgd.callbacks._batch import UnreadableBatchError, default_unpack_batch
from pl_pathsgd.callbacks.capacity import CapacityReport
from pl_pathsgd.callbacks.error_monitor import EpochErrorMonitor
from pl_pathsgd.callbacks.invariance import InvarianceViolationError, RescalingInvarianceCheck
from pl_pathsgd.callbacks.path_norm import PathNormMonitor
from pl_pathsgd.callbacks.rebalance import Rebalance
from pl_pathsgd.callbacks.tensorboard import TensorBoardExtras, default_layout

__all__ = [
    "CapacityReport",
    "EpochErrorMonitor",
    "InvarianceViolationError",
    "PathNormMonitor",
    "Rebalance",
    "RescalingInvarianceCheck",
    "TensorBoardExtras",
    "UnreadableBatchError",
    "default_layout",
    "default_unpack_batch",
]
