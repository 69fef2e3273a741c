"""pl-pathsgd: Path-SGD, path-norm geometry and PyTorch Lightning integration.

The path geometry, the optimizer and the schedules need only PyTorch; the Lightning parts
(``PathSGDMixin``, ``PathSGDClassifier``, :mod:`pl_pathsgd.callbacks`, :mod:`pl_pathsgd.data`)
import Lightning when first used.
"""

from importlib import import_module

from pl_pathsgd.optim import PathSGD
from pl_pathsgd.paths import (
    PathGeometryError,
    UnsupportedModelError,
    balance,
    balanced_init_,
    freeze_batchnorm,
    max_unit_norm,
    network_structure,
    path_norm,
    path_scaling,
    rademacher_coefficient,
    rebalance,
    recurrence_ratio,
    recurrent_kappas,
    rescalable_units,
    rescale_units,
    trace,
    unbalanced_init_,
)
from pl_pathsgd.schedules import PaperSchedule

__version__ = "0.2.0"  # the package's only version number (pyproject.toml reads it from here)

_LIGHTNING_EXPORTS = {
    "PathSGDMixin": "pl_pathsgd.module",
    "PathSGDClassifier": "pl_pathsgd.module",
    "SequenceRegressor": "pl_pathsgd.module",
}


def __getattr__(name: str):
    if name in _LIGHTNING_EXPORTS:
        return getattr(import_module(_LIGHTNING_EXPORTS[name]), name)
    raise AttributeError(f"module 'pl_pathsgd' has no attribute {name!r}")


__all__ = [
    "PaperSchedule",
    "PathGeometryError",
    "PathSGD",
    "PathSGDClassifier",
    "PathSGDMixin",
    "SequenceRegressor",
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
