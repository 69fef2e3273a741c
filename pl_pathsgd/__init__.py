"""pl-pathsgd: Path-SGD, path-norm geometry and PyTorch Lightning integration."""

from pl_pathsgd.optim import PathSGD
from pl_pathsgd.paths import (
    PathGeometryError,
    UnsupportedModelError,
    balance,
    balanced_init_,
    freeze_batchnorm,
    max_unit_norm,
    path_norm,
    path_scaling,
    rescalable_units,
    rescale_units,
    unbalanced_init_,
)

__version__ = "0.1.0"

__all__ = [
    "PathGeometryError",
    "PathSGD",
    "UnsupportedModelError",
    "balance",
    "balanced_init_",
    "freeze_batchnorm",
    "max_unit_norm",
    "path_norm",
    "path_scaling",
    "rescalable_units",
    "rescale_units",
    "unbalanced_init_",
]
