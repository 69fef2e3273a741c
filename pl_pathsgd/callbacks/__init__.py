"""Lightning callbacks that work with any LightningModule and any Trainer.

* :class:`PathNormMonitor` logs ``path_norm/p1``, ``path_norm/p2``, ``path_norm/pinf`` ...
* :class:`RescalingInvarianceCheck` logs ``invariance/function``, ``invariance/path_norm``,
  ``invariance/update`` (Theorem 5.1) on a rescaled copy of the network.
* :class:`EpochErrorMonitor` logs ``{train,val,test}/{error,loss}`` on the full sets every epoch.
* :class:`TensorBoardExtras` adds a custom-scalars layout, a learning-curve figure and
  hyper-parameters with the final test error to TensorBoard.

The network is ``pl_module.path_network`` when the module defines it, else the module itself; the input
shape is the callback's ``input_shape``, else ``pl_module.path_input_shape``, else the shape of the first
training batch's inputs, else inferred from a leading ``Linear`` layer.
"""

from pl_pathsgd.callbacks.error_monitor import EpochErrorMonitor
from pl_pathsgd.callbacks.invariance import InvarianceViolationError, RescalingInvarianceCheck
from pl_pathsgd.callbacks.path_norm import PathNormMonitor
from pl_pathsgd.callbacks.tensorboard import TensorBoardExtras, default_layout

__all__ = [
    "EpochErrorMonitor",
    "InvarianceViolationError",
    "PathNormMonitor",
    "RescalingInvarianceCheck",
    "TensorBoardExtras",
    "default_layout",
]
