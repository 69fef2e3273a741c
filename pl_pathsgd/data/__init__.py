"""LightningDataModules for the datasets of the Path-SGD experiments.

``MNISTDataModule``, ``CIFAR10DataModule``, ``CIFAR100DataModule`` and
``SVHNDataModule`` read the real files through torchvision;
``DigitsDataModule`` uses scikit-learn's bundled 8x8 digits and needs no
files at all. All of them share :class:`BaseDataModule`: preprocessing
(grayscale, area downsampling) is done once on whole tensors and cached,
and the dataloaders iterate over in-memory tensors.
"""

from .base import (
    CACHE_DIRNAME,
    CACHE_FORMAT_VERSION,
    BaseDataModule,
    CacheWarning,
    CorruptDatasetError,
    DataError,
    DatasetDownloadError,
    DatasetNotFoundError,
    InMemoryDataset,
    InvalidDataConfigError,
    area_downsample,
    area_weights,
    rgb_to_grayscale,
)
from .digits import DigitsDataModule
from .vision import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    MNISTDataModule,
    SVHNDataModule,
    TorchvisionDataModule,
)

#: DataModule classes by short dataset name.
DATAMODULES = {
    "mnist": MNISTDataModule,
    "cifar10": CIFAR10DataModule,
    "cifar100": CIFAR100DataModule,
    "svhn": SVHNDataModule,
    "digits": DigitsDataModule,
}

__all__ = [
    "BaseDataModule",
    "CACHE_DIRNAME",
    "CACHE_FORMAT_VERSION",
    "CIFAR100DataModule",
    "CIFAR10DataModule",
    "CacheWarning",
    "CorruptDatasetError",
    "DATAMODULES",
    "DataError",
    "DatasetDownloadError",
    "DatasetNotFoundError",
    "DigitsDataModule",
    "InMemoryDataset",
    "InvalidDataConfigError",
    "MNISTDataModule",
    "SVHNDataModule",
    "TorchvisionDataModule",
    "area_downsample",
    "area_weights",
    "rgb_to_grayscale",
]
