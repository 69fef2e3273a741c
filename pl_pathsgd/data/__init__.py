"""LightningDataModules for the Path-SGD experiments.

``MNISTDataModule``, ``CIFAR10DataModule``, ``CIFAR100DataModule`` and ``SVHNDataModule`` read the
real files through torchvision's readers; ``DigitsDataModule`` uses scikit-learn's bundled 8x8
digits and needs no files; ``AdditionDataModule`` generates the addition problem for recurrent
networks. Data is prepared once into in-memory tensors (the image sets cached on disk) and the
dataloaders gather whole batches at once.

The package, by concern:

* :mod:`~pl_pathsgd.data.errors` -- error classes and argument checks;
* :mod:`~pl_pathsgd.data.preprocessing` -- exact area downsampling, grayscale, normalisation, layout;
* :mod:`~pl_pathsgd.data.cache` -- content fingerprints and the validated, atomic tensor cache;
* :mod:`~pl_pathsgd.data.download` -- downloads with a timeout;
* :mod:`~pl_pathsgd.data.datasets` -- the in-memory dataset and the epoch-seeded samplers;
* :mod:`~pl_pathsgd.data.base` -- :class:`BaseDataModule` (seed, splits, loaders);
* :mod:`~pl_pathsgd.data.image` -- :class:`ImageDataModule` (image classification);
* :mod:`~pl_pathsgd.data.vision` -- :class:`TorchvisionDataModule` (files, integrity, cache);
* one module per dataset family: ``mnist``, ``cifar``, ``svhn``, ``digits``, ``addition``.
"""

from .addition import CONSTANT_PREDICTION_MSE, AdditionDataModule
from .base import BaseDataModule
from .cache import CACHE_DIRNAME, CACHE_FORMAT_VERSION
from .cifar import CIFAR10DataModule, CIFAR100DataModule
from .datasets import EpochBatchSampler, EpochShuffleSampler, InMemoryDataset
from .digits import DigitsDataModule
from .errors import (
    CacheWarning,
    CorruptDatasetError,
    DataError,
    DataPermissionError,
    DatasetDownloadError,
    DatasetNotFoundError,
    InvalidDataConfigError,
    MissingDependencyError,
    WrongDatasetError,
)
from .image import ImageDataModule, RawData
from .mnist import MNISTDataModule
from .preprocessing import area_downsample, area_weights, rgb_to_grayscale
from .svhn import SVHNDataModule
from .vision import TorchvisionDataModule

#: DataModule classes by short dataset name.
DATAMODULES = {
    "mnist": MNISTDataModule,
    "cifar10": CIFAR10DataModule,
    "cifar100": CIFAR100DataModule,
    "svhn": SVHNDataModule,
    "digits": DigitsDataModule,
    "addition": AdditionDataModule,
}

__all__ = [
    "AdditionDataModule",
    "BaseDataModule",
    "CACHE_DIRNAME",
    "CACHE_FORMAT_VERSION",
    "CIFAR100DataModule",
    "CIFAR10DataModule",
    "CONSTANT_PREDICTION_MSE",
    "CacheWarning",
    "CorruptDatasetError",
    "DATAMODULES",
    "DataError",
    "DataPermissionError",
    "DatasetDownloadError",
    "DatasetNotFoundError",
    "DigitsDataModule",
    "EpochBatchSampler",
    "EpochShuffleSampler",
    "ImageDataModule",
    "InMemoryDataset",
    "InvalidDataConfigError",
    "MNISTDataModule",
    "MissingDependencyError",
    "RawData",
    "SVHNDataModule",
    "TorchvisionDataModule",
    "WrongDatasetError",
    "area_downsample",
    "area_weights",
    "rgb_to_grayscale",
]
