"""DataModule for scikit-learn's bundled 8x8 handwritten digits (offline, fast)."""

from typing import Any

import torch

from .base import BaseDataModule, InvalidDataConfigError, RawData, _check_int

__all__ = ["DIGITS_SIZE", "DigitsDataModule", "TEST_SPLIT_SEED"]

#: Number of images in ``sklearn.datasets.load_digits``.
DIGITS_SIZE = 1797
#: Seed of the permutation that picks the test images. It is fixed (independent
#: of ``seed``) so that, as with the official test sets of the other datasets,
#: every run is evaluated on the same test images.
TEST_SPLIT_SEED = 0


class DigitsDataModule(BaseDataModule):
    """scikit-learn's 8x8 handwritten digits: 1,797 grayscale images of 10 classes, pixel values 0..16.

    The data ships with scikit-learn, so this module works offline and sets
    up in milliseconds; it is meant for quick starts, tests and smoke runs.
    There is no official test set, so one is carved off first with a fixed
    seed (the same test images whatever ``seed`` is), then the validation
    set is carved from the rest with ``seed``. With the defaults the splits
    are 1,197 train / 300 validation / 300 test. Nothing is cached on disk
    (loading takes about 10 ms); ``data_dir`` and ``download`` are accepted
    for a uniform interface and ignored, and so is ``grayscale`` (the
    images have one channel).

    Args:
        data_dir: Accepted for a uniform interface; unused.
        batch_size: Examples per batch for every dataloader.
        val_size: Examples held out of the non-test images for validation, chosen by a
            permutation seeded with ``seed``.
        test_size: Examples set aside as the test set (chosen with a fixed seed).
        downsample: Side length ``s`` (1..8) to area-average the images to ``s x s``;
            ``None`` keeps 8x8.
        grayscale: Accepted for a uniform interface; the digits are already grayscale.
        flatten: Yield flat vectors (for MLPs) instead of ``(1, H, W)`` images.
        normalize: Standardise with the mean/std of the training split.
        download: Accepted for a uniform interface; the data ships with scikit-learn.
        num_workers: Worker processes of the dataloaders.
        seed: Seed of the validation split and of the training shuffle order.
    """

    name = "digits"
    display_name = "digits"
    num_classes = 10
    native_shape = (1, 8, 8)
    nominal_train_size = DIGITS_SIZE
    nominal_test_size = 300
    pixel_scale = 16.0
    uses_cache = False

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 100,
        val_size: int = 300,
        test_size: int = 300,
        downsample: int | None = None,
        grayscale: bool = False,
        flatten: bool = True,
        normalize: bool = True,
        download: bool = False,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        self.test_size = _check_int("test_size", test_size, 0)
        if self.test_size >= DIGITS_SIZE:
            raise InvalidDataConfigError(
                f"test_size={test_size} leaves no training examples: the digits set has {DIGITS_SIZE} images"
            )
        super().__init__(
            data_dir=data_dir,
            batch_size=batch_size,
            val_size=val_size,
            downsample=downsample,
            grayscale=grayscale,
            flatten=flatten,
            normalize=normalize,
            download=download,
            num_workers=num_workers,
            seed=seed,
        )
        self.save_hyperparameters()

    def _available_train_size(self) -> int:
        return DIGITS_SIZE - self.test_size

    def _cache_options(self) -> dict[str, Any]:
        return {**super()._cache_options(), "test_size": self.test_size}

    def _read_source(self) -> RawData:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images = torch.from_numpy(bunch.images).round().to(torch.uint8).unsqueeze(1)
        labels = torch.from_numpy(bunch.target).to(torch.int64)
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(TEST_SPLIT_SEED))
        test_idx = order[: self.test_size].sort().values
        pool_idx = order[self.test_size :].sort().values
        return RawData(
            train_x=images[pool_idx].contiguous(),
            train_y=labels[pool_idx],
            test_x=images[test_idx].contiguous(),
            test_y=labels[test_idx],
        )
