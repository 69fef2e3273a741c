"""Path geometry in pure PyTorch: path-norms, the Path-SGD scaling, node-wise rescaling.

Nothing here imports Lightning.
"""

from pl_pathsgd.paths.balancing import rebalance
from pl_pathsgd.paths.batchnorm import freeze_batchnorm
from pl_pathsgd.paths.capacity import network_structure, rademacher_coefficient
from pl_pathsgd.paths.errors import PathGeometryError, UnsupportedModelError
from pl_pathsgd.paths.graph import PathGraph, trace
from pl_pathsgd.paths.norms import path_norm, path_scaling, recurrence_ratio, recurrent_kappas
from pl_pathsgd.paths.rescaling import (
    balance,
    balanced_init_,
    max_unit_norm,
    rescalable_units,
    rescale_units,
    unbalanced_init_,
)

__all__ = [
    "PathGeometryError",
    "PathGraph",
    "UnsupportedModelError",
    "balance",
    "balanced_init_",
    "freeze_batchnorm",
    "max_unit_norm",
    "network_structure",
    "path_norm",
    "path_scaling",
    "rademacher_coefficient",
    "rebalance",
    "recurrence_ratio",
    "recurrent_kappas",
    "rescalable_units",
    "rescale_units",
    "trace",
    "unbalanced_init_",
]
