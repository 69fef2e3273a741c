"""scikit-learn's bundled 8x8 handwritten digits (offline, fast; needs the ``digits`` extra)."""

from typing import Any

import torch

from .errors import InvalidDataConfigError, check_int, import_extra
from .image import ImageDataModule, RawData

__all__ = ["DIGITS_SIZE", "DigitsDataModule", "TEST_SPLIT_SEED"]

#: Number of images in ``sklearn.datasets.load_digits``.
DIGITS_SIZE = 1797
#: Seed of the permutation that picks the test images. It is fixed (independent of the seed of the
#: split and order) so that, as with the official test sets of the other datasets, every run is
#: evaluated on the same test images.
TEST_SPLIT_SEED = 0


class DigitsDataModule(ImageDataModule):
    """scikit-learn's 8x8 handwritten digits: 1,797 grayscale images of 10 classes, pixel values 0..16.

    The data ships with scikit-learn (``pip install 'pl-pathsgd[digits]'``), so this module works
    offline and sets up in milliseconds; it is meant for quick starts, tests and smoke runs. There is
    no official test set, so one is carved off first with a fixed seed (the same test images
    whatever the seed), then the validation set is carved from the rest with the seed. With the
    defaults the splits are 1,197 train / 300 validation / 300 test. Nothing is written to disk.

    Args:
        test_size: Examples set aside as the test set, chosen with a fixed seed (0 for no test set).
        val_size: Examples held out of the remaining images for validation, chosen with the seed
            (0 for no validation set).
    """

    name = "digits"
    display_name = "digits"
    num_classes = 10
    native_shape = (1, 8, 8)
    pixel_scale = 16.0

    def __init__(self, *, test_size: int = 300, val_size: int = 300, **kwargs: Any) -> None:
        self.test_size = check_int("test_size", test_size, 0)
        if self.test_size >= DIGITS_SIZE:
            raise InvalidDataConfigError(
                f"test_size={test_size} leaves no training examples: the digits set has {DIGITS_SIZE} images, "
                "so test_size must be smaller than that",
                "test_size",
            )
        super().__init__(val_size=val_size, **kwargs)

    def available_train_size(self) -> int:
        return DIGITS_SIZE - self.test_size

    def read_raw(self) -> RawData:
        sklearn_datasets = import_extra("sklearn.datasets", "digits", "DigitsDataModule")
        bunch = sklearn_datasets.load_digits()
        images = torch.from_numpy(bunch.images).round().to(torch.uint8).unsqueeze(1)
        labels = torch.from_numpy(bunch.target).to(torch.int64)
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(TEST_SPLIT_SEED))
        test_idx = order[: self.test_size].sort().values
        pool_idx = order[self.test_size :].sort().values
        raw = RawData(
            train_x=images[pool_idx].contiguous(),
            train_y=labels[pool_idx],
            test_x=images[test_idx].contiguous(),
            test_y=labels[test_idx],
        )
        self.check_raw(raw, {"training": "scikit-learn's digits", "test": "scikit-learn's digits"})
        return raw
