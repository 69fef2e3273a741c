"""Image classification DataModules: preprocessing, validation split, normalisation and layout.

A subclass reads its source into uint8 tensors (:meth:`ImageDataModule.read_raw`); this class
converts and downsamples them once, as whole tensors, carves the validation set out of the
training set with the seed, standardises every channel with the statistics of what is left for
training, and lays the examples out as the model wants them: flat vectors, ``(C, H, W)`` images,
or sequences of rows or pixels.
"""

from abc import abstractmethod
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from .base import BaseDataModule
from .datasets import InMemoryDataset
from .errors import CorruptDatasetError, InvalidDataConfigError, check_int
from .preprocessing import SequenceLayout, channel_stats, layout_images, preprocess, to_float

__all__ = ["ImageDataModule", "RawData"]


class RawData(NamedTuple):
    """Decoded source data: uint8 images ``(N, C, H, W)`` and int64 labels ``(N,)`` per split."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    #: Additional training images (SVHN's 'extra'); never used for validation.
    extra_x: Tensor | None = None
    extra_y: Tensor | None = None


class ImageDataModule(BaseDataModule):
    """Base class of the image classification DataModules.

    Args:
        val_size: Examples held out of the training set for validation, chosen with the seed
            (0 for no validation set).
        downsample: Side length ``s`` to area-average the images down to (``s x s``), between 1
            and the image side; ``None`` keeps the native resolution.
        grayscale: Convert colour images to one luma channel (0.299 R + 0.587 G + 0.114 B); no
            effect on single-channel images.
        flatten: Yield flat vectors of ``C*H*W`` values (for MLPs) instead of ``(C, H, W)`` images.
        as_sequence: Yield each image as a sequence (for recurrent networks): ``rows`` gives ``H``
            steps of ``W*C`` features, ``pixels`` gives ``H*W`` steps of ``C`` features (row-major).
            Takes precedence over ``flatten``; ``None`` yields images or vectors.
        normalize: Standardise every channel with the mean and standard deviation of the training
            split (after the validation set is removed); ``False`` keeps pixel values in [0, 1].
    """

    #: Short dataset name (cache file names).
    name: ClassVar[str]
    #: Dataset name for messages.
    display_name: ClassVar[str]
    #: Number of classes.
    num_classes: ClassVar[int]
    #: Shape ``(C, H, W)`` of one image as stored in the source.
    native_shape: ClassVar[tuple[int, int, int]]
    #: Pixel value mapped to 1.0.
    pixel_scale: ClassVar[float] = 255.0

    def __init__(
        self,
        *,
        val_size: int = 10000,
        downsample: int | None = None,
        grayscale: bool = False,
        flatten: bool = True,
        as_sequence: SequenceLayout | None = None,
        normalize: bool = True,
        **kwargs: Any,
    ) -> None:
        self.val_size = check_int("val_size", val_size, 0)
        if downsample is not None:
            side = min(self.native_shape[1:])
            check_int("downsample", downsample, 1)
            if downsample > side:
                raise InvalidDataConfigError(
                    f"downsample={downsample} is invalid for the {side}x{side} images of {self.display_name}: "
                    f"it must be between 1 and {side}, or None",
                    "downsample",
                )
        if as_sequence not in (None, "rows", "pixels"):
            raise InvalidDataConfigError(
                f"as_sequence={as_sequence!r} is invalid: it must be 'rows', 'pixels' or None", "as_sequence"
            )
        self.downsample = downsample
        self.grayscale = bool(grayscale)
        self.flatten = bool(flatten)
        self.as_sequence = as_sequence
        self.normalize = bool(normalize)
        super().__init__(**kwargs)
        available = self.available_train_size()
        if available is not None:
            self._check_val_size(available)
        #: Sorted positions, in the source training set, of the training and validation examples
        #: (SVHN's 'extra' images are appended after the training ones and are not listed); set by setup.
        self.train_indices: Tensor | None = None
        self.val_indices: Tensor | None = None
        #: Per-channel mean and std used for normalisation (``None`` when ``normalize=False``); set by setup.
        self.mean: Tensor | None = None
        self.std: Tensor | None = None
        self._prepared: dict[str, Tensor] | None = None

    def _check_val_size(self, available: int) -> None:
        if self.val_size >= available:
            raise InvalidDataConfigError(
                f"val_size={self.val_size} leaves no training examples: the {self.display_name} training set has "
                f"{available} examples, so val_size must be smaller than that",
                "val_size",
            )

    def available_train_size(self) -> int | None:
        """Examples the validation set is carved from, if known before loading (else checked in setup)."""
        return None

    # ------------------------------------------------------------------ shapes, known before loading

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one preprocessed image."""
        channels, height, width = self.native_shape
        if self.grayscale:
            channels = 1
        if self.downsample is not None:
            height = width = self.downsample
        return (channels, height, width)

    @property
    def dims(self) -> tuple[int, int, int]:
        """Alias of :attr:`image_shape` (the ``dims`` of older Lightning DataModules)."""
        return self.image_shape

    @property
    def input_dim(self) -> int:
        """Number of input values per example, ``C * H * W``."""
        channels, height, width = self.image_shape
        return channels * height * width

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example: ``(T, features)`` for sequences, ``(C*H*W,)`` if flattened, else ``(C, H, W)``."""
        channels, height, width = self.image_shape
        if self.as_sequence == "rows":
            return (height, width * channels)
        if self.as_sequence == "pixels":
            return (height * width, channels)
        return (self.input_dim,) if self.flatten else self.image_shape

    @property
    def num_outputs(self) -> int:
        """The number of classes."""
        return self.num_classes

    # ------------------------------------------------------------------ reading and preprocessing

    @abstractmethod
    def read_raw(self) -> RawData:
        """Read the source into uint8 tensors (checked: shapes, label range)."""

    def preprocessing_options(self) -> dict[str, Any]:
        """The options that change the preprocessed tensors."""
        downsample = self.downsample
        if downsample is not None and (downsample, downsample) == tuple(self.native_shape[1:]):
            downsample = None
        return {
            "dataset": self.name,
            "downsample": downsample,
            "grayscale": self.grayscale and self.native_shape[0] == 3,
        }

    def preprocessed_tensors(self) -> dict[str, Tensor]:
        """Converted and downsampled splits: ``train_x``, ``train_y``, ``test_x``, ``test_y`` (``extra_*``)."""
        raw = self.read_raw()
        opts = self.preprocessing_options()
        tensors: dict[str, Tensor] = {}
        for prefix in ("train", "test", "extra"):
            images = getattr(raw, f"{prefix}_x")
            if images is None:
                continue
            tensors[f"{prefix}_x"] = preprocess(
                images, scale=self.pixel_scale, grayscale=opts["grayscale"], downsample=opts["downsample"]
            )
            tensors[f"{prefix}_y"] = getattr(raw, f"{prefix}_y").to(torch.int64).contiguous()
        return tensors

    def prepare_data(self) -> None:
        """Read (and, where the subclass caches, cache) the preprocessed data once.

        Lightning calls this on one process per node before :meth:`setup`; the data is kept so that
        :meth:`setup` on the same process does not read it again.
        """
        if self.train_dataset is None and self._prepared is None:
            self._prepared = self.preprocessed_tensors()

    def build_splits(self, seed: int) -> tuple[InMemoryDataset, InMemoryDataset, InMemoryDataset]:
        tensors = self._prepared if self._prepared is not None else self.preprocessed_tensors()
        self._prepared = None

        pool_x, pool_y = tensors["train_x"], tensors["train_y"]
        self._check_val_size(len(pool_x))
        order = torch.randperm(len(pool_x), generator=torch.Generator().manual_seed(seed))
        is_val = torch.zeros(len(pool_x), dtype=torch.bool)
        is_val[order[: self.val_size]] = True
        val_idx = is_val.nonzero().squeeze(1)  # sorted positions
        train_idx = (~is_val).nonzero().squeeze(1)

        train_x = to_float(pool_x.index_select(0, train_idx), self.pixel_scale)
        train_y = pool_y.index_select(0, train_idx)
        val_x = to_float(pool_x.index_select(0, val_idx), self.pixel_scale)
        val_y = pool_y.index_select(0, val_idx)
        if "extra_x" in tensors:
            train_x = torch.cat([train_x, to_float(tensors["extra_x"], self.pixel_scale)])
            train_y = torch.cat([train_y, tensors["extra_y"]])
        test_x = to_float(tensors["test_x"], self.pixel_scale)
        test_y = tensors["test_y"]
        del pool_x, pool_y, tensors

        if self.normalize:
            mean, std = channel_stats(train_x)
            shift = mean.to(torch.float32).view(1, -1, 1, 1)
            scale = std.to(torch.float32).view(1, -1, 1, 1)
            for images in (train_x, val_x, test_x):
                images.sub_(shift).div_(scale)
            self.mean, self.std = mean.to(torch.float32), std.to(torch.float32)

        def finish(images: Tensor, labels: Tensor) -> InMemoryDataset:
            inputs = layout_images(images, self.flatten, self.as_sequence)
            return InMemoryDataset(inputs.contiguous(), labels.contiguous())

        self.train_indices, self.val_indices = train_idx, val_idx
        return finish(train_x, train_y), finish(val_x, val_y), finish(test_x, test_y)

    def check_raw(self, raw: RawData, where: dict[str, str]) -> None:
        """Check decoded splits: uint8 images of :attr:`native_shape`, one label each, labels in range.

        ``where`` names the files of each split (``training``, ``test``, ``extra``) for messages.
        """
        splits = [("training", raw.train_x, raw.train_y), ("test", raw.test_x, raw.test_y)]
        if raw.extra_x is not None:
            splits.append(("extra", raw.extra_x, raw.extra_y))
        for split, images, labels in splits:
            files = where.get(split, self.display_name)
            if tuple(images.shape[1:]) != tuple(self.native_shape) or images.dtype != torch.uint8:
                raise CorruptDatasetError(
                    f"The {self.display_name} {split} images in {files} have shape {tuple(images.shape[1:])} "
                    f"({images.dtype}); expected {tuple(self.native_shape)} uint8 images"
                )
            if len(images) != len(labels):
                raise CorruptDatasetError(
                    f"The {self.display_name} {split} data in {files} has {len(images)} images but {len(labels)} labels"
                )
            if split == "training" and len(images) == 0:
                raise CorruptDatasetError(f"The {self.display_name} training data in {files} is empty")
            if len(labels):
                low, high = int(labels.min()), int(labels.max())
                if low < 0 or high >= self.num_classes:
                    raise CorruptDatasetError(
                        f"The {self.display_name} {split} labels in {files} range over [{low}, {high}]; "
                        f"expected classes 0..{self.num_classes - 1}"
                    )

