"""Shared machinery of the in-memory image DataModules.

Every DataModule of :mod:`pl_pathsgd.data` follows the same plan:

1. ``prepare_data`` makes sure the source files are there (downloading them if
   asked to), reads them once, converts them to tensors, applies the
   image-level preprocessing (grayscale conversion, area downsampling) to the
   whole tensor at once and stores the result in a cache file under
   ``data_dir/pl_pathsgd_cache``.  A later run with the same options only
   loads that file.
2. ``setup`` loads the cache, carves the validation set out of the training
   set with a seeded permutation, computes per-channel normalisation
   statistics on what is left for training and applies them to all splits.
3. The dataloaders iterate over in-memory tensors; a batch is gathered with
   one indexing operation instead of one ``__getitem__`` call per example.
"""

import hashlib
import json
import os
import tempfile
import warnings
from fractions import Fraction
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler, TensorDataset, default_collate

__all__ = [
    "BaseDataModule",
    "CACHE_DIRNAME",
    "CACHE_FORMAT_VERSION",
    "CacheWarning",
    "CorruptDatasetError",
    "DataError",
    "DatasetDownloadError",
    "DatasetNotFoundError",
    "InMemoryDataset",
    "InvalidDataConfigError",
    "RawData",
    "area_downsample",
    "area_weights",
    "collate_batch",
    "rgb_to_grayscale",
]

#: Bump when the layout or the meaning of the cached tensors changes; caches
#: written with another version are rebuilt.
CACHE_FORMAT_VERSION = 1
#: Sub-directory of ``data_dir`` holding the preprocessed tensors.
CACHE_DIRNAME = "pl_pathsgd_cache"

# Images are converted and downsampled in chunks of this many images, which
# bounds the temporary float32 memory for large sets (SVHN with 'extra').
_CHUNK = 8192

# ITU-R BT.601 luma weights, the ones PIL's ``convert("L")`` and
# torchvision's ``rgb_to_grayscale`` use.
_LUMA = (0.299, 0.587, 0.114)


# --------------------------------------------------------------------------
# Errors and warnings
# --------------------------------------------------------------------------


class DataError(Exception):
    """Base class of every error raised by :mod:`pl_pathsgd.data`."""


class DatasetNotFoundError(DataError, FileNotFoundError):
    """The dataset files are not on disk and ``download`` is off."""


class DatasetDownloadError(DataError, RuntimeError):
    """Downloading the dataset failed (host unreachable or bad file)."""


class CorruptDatasetError(DataError, RuntimeError):
    """A dataset file exists but cannot be read or has unexpected content."""


class InvalidDataConfigError(DataError, ValueError):
    """An argument of a DataModule has an invalid value."""


class CacheWarning(UserWarning):
    """A cache file was stale or unreadable and is being rebuilt."""


# --------------------------------------------------------------------------
# Vectorised preprocessing
# --------------------------------------------------------------------------


def area_weights(n_in: int, n_out: int) -> Tensor:
    """Return the ``(n_out, n_in)`` matrix of exact 1-D area-averaging weights.

    Output cell ``i`` covers the interval ``[i * n_in / n_out, (i + 1) * n_in / n_out)``
    of the input axis; input pixel ``j`` covers ``[j, j + 1)``. The weight is the
    length of their overlap divided by the length of the output cell, so every
    row sums to one and, when ``n_out`` divides ``n_in``, the weights are the
    plain block means of ``adaptive_avg_pool2d``. For other sizes (28 -> 10)
    pixels that straddle two output cells are split between them in
    proportion to the area they share (box filter / "INTER_AREA").
    """
    if not 1 <= n_out <= n_in:
        raise InvalidDataConfigError(f"area downsampling needs 1 <= n_out <= n_in, got n_in={n_in}, n_out={n_out}")
    weights = torch.zeros(n_out, n_in, dtype=torch.float64)
    cell = Fraction(n_in, n_out)
    for i in range(n_out):
        start, end = i * cell, (i + 1) * cell
        for j in range(int(start), min(n_in, -(-end.numerator // end.denominator))):
            overlap = min(end, Fraction(j + 1)) - max(start, Fraction(j))
            if overlap > 0:
                weights[i, j] = float(overlap / cell)
    return weights


def area_downsample(images: Tensor, size: int) -> Tensor:
    """Downsample ``(..., H, W)`` float images to ``(..., size, size)`` by exact area averaging.

    Each output pixel is the mean of the input image over the square region
    it covers (see :func:`area_weights`); the operation is separable, so it
    is computed as two small matrix products over the whole batch.
    """
    height, width = images.shape[-2:]
    rows = area_weights(height, size).to(images.dtype)
    cols = area_weights(width, size).to(images.dtype)
    return torch.matmul(torch.matmul(rows, images), cols.T)


def rgb_to_grayscale(images: Tensor) -> Tensor:
    """Convert ``(N, 3, H, W)`` float RGB images to ``(N, 1, H, W)`` luma (BT.601 weights)."""
    weights = torch.tensor(_LUMA, dtype=images.dtype).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


def _preprocess(raw: Tensor, *, scale: float, grayscale: bool, downsample: int | None) -> Tensor:
    """Apply grayscale conversion and downsampling to a ``(N, C, H, W)`` uint8 tensor.

    Returns ``raw`` itself (still uint8) when there is nothing to do, so that
    full-resolution data is cached in its compact form; otherwise a float32
    tensor with values in ``[0, 1]``.
    """
    n, channels, height, width = raw.shape
    to_gray = grayscale and channels == 3
    if not to_gray and downsample is None:
        return raw
    out_c = 1 if to_gray else channels
    out_h, out_w = (downsample, downsample) if downsample is not None else (height, width)
    out = torch.empty(n, out_c, out_h, out_w, dtype=torch.float32)
    for start in range(0, n, _CHUNK):
        chunk = raw[start : start + _CHUNK].to(torch.float32).div_(scale)
        if to_gray:
            chunk = rgb_to_grayscale(chunk)
        if downsample is not None:
            chunk = area_downsample(chunk, downsample)
        out[start : start + _CHUNK] = chunk
    return out


def _to_float(images: Tensor, scale: float) -> Tensor:
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(scale)
    return images.to(torch.float32)


def _channel_stats(images: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and (population) standard deviation of ``(N, C, H, W)`` float32 images.

    Two passes over chunks; each chunk is summed in float32 (torch's pairwise
    summation keeps that accurate) and the chunk sums are accumulated in
    float64.
    """
    channels = images.shape[1]
    count = images.numel() // channels
    total = torch.zeros(channels, dtype=torch.float64)
    for start in range(0, images.shape[0], _CHUNK):
        total += images[start : start + _CHUNK].sum(dim=(0, 2, 3)).to(torch.float64)
    mean = total / count
    sq = torch.zeros(channels, dtype=torch.float64)
    centre = mean.to(images.dtype).view(1, channels, 1, 1)
    for start in range(0, images.shape[0], _CHUNK):
        sq += (images[start : start + _CHUNK] - centre).square_().sum(dim=(0, 2, 3)).to(torch.float64)
    std = (sq / count).sqrt()
    # A constant channel would divide by zero; leave its scale alone.
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    return mean, std


def _tensor_digest(tensor: Tensor) -> str:
    data = tensor.detach().contiguous().cpu()
    view = memoryview(data.view(torch.uint8).numpy()) if data.numel() else memoryview(b"")
    return hashlib.sha1(view, usedforsecurity=False).hexdigest()


# --------------------------------------------------------------------------
# In-memory dataset with batched indexing
# --------------------------------------------------------------------------


class _Batch(tuple):
    """Marker for a batch that :class:`InMemoryDataset` already gathered."""

    __slots__ = ()


def collate_batch(batch: Any) -> Any:
    """Collate function of the DataModules' loaders.

    Batches gathered by :meth:`InMemoryDataset.__getitems__` are returned as
    a ``[inputs, targets]`` list (the form ``default_collate`` gives);
    anything else goes through ``default_collate``.
    """
    if isinstance(batch, _Batch):
        return list(batch)
    return default_collate(batch)


class InMemoryDataset(TensorDataset):
    """A :class:`~torch.utils.data.TensorDataset` that gathers whole batches at once.

    ``DataLoader`` calls ``__getitems__`` with the indices of one batch; the
    batch is then a single fancy-indexing operation per tensor, which makes
    an epoch over a small-image dataset cost milliseconds instead of one
    Python call per example.
    """

    def __getitems__(self, indices: list[int]) -> _Batch:
        index = np.asarray(indices, dtype=np.int64)
        return _Batch(_gather_rows(tensor, index) for tensor in self.tensors)


def _gather_rows(tensor: Tensor, index: np.ndarray) -> Tensor:
    """``tensor[index]`` for a batch of row indices.

    On the CPU this goes through ``numpy.take``: a single-threaded row copy
    that is several times faster than torch's indexing kernels for batches of
    about a hundred rows, whose multi-threaded dispatch costs more than the
    copy and stalls badly when the cores are busy.
    """
    if tensor.device.type == "cpu":
        return torch.from_numpy(np.take(tensor.numpy(), index, axis=0))
    return tensor.index_select(0, torch.as_tensor(index, device=tensor.device))


class EpochShuffleSampler(Sampler[int]):
    """A random order per epoch that depends only on ``(seed, epoch)``.

    Lightning calls :meth:`set_epoch` before every epoch, so a run resumed from a checkpoint sees
    exactly the orders an uninterrupted run would; outside Lightning each new iteration moves on
    to the next epoch's order.
    """

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed
        self.epoch = 0
        self._epoch_set = False

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._epoch_set = epoch, True

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        if not self._epoch_set:
            self.epoch += 1
        self._epoch_set = False
        return iter(order)


class RawData(NamedTuple):
    """Decoded source data: uint8 images ``(N, C, H, W)`` and int64 labels ``(N,)``."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    #: Additional training images (SVHN's 'extra'); never used for validation.
    extra_x: Tensor | None = None
    extra_y: Tensor | None = None


# --------------------------------------------------------------------------
# Base DataModule
# --------------------------------------------------------------------------


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidDataConfigError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise InvalidDataConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


class BaseDataModule(pl.LightningDataModule):
    """Base class of the pl_pathsgd DataModules (see :mod:`pl_pathsgd.data.base`).

    Subclasses set the class attributes below and implement
    :meth:`_read_source`; file-backed subclasses also implement
    :meth:`_ensure_source` and :meth:`_source_files`.

    Args:
        data_dir: Folder holding the dataset files and the ``pl_pathsgd_cache`` folder.
        batch_size: Examples per batch for every dataloader.
        val_size: Examples held out from the training set for validation.
        downsample: Side length ``s`` to area-average the images down to (``s x s``),
            or ``None`` to keep the native resolution.
        grayscale: Convert colour images to one luma channel.
        flatten: Yield flat vectors (for MLPs) instead of ``(C, H, W)`` images.
        normalize: Standardise every channel with the mean and standard deviation
            of the training split (after the validation set is removed).
        download: Download missing files.
        num_workers: Worker processes of the dataloaders.
        seed: Seed of the train/validation split and of the training shuffle order.
    """

    #: Short dataset name, used for cache file names.
    name: ClassVar[str] = "base"
    #: Dataset name for messages.
    display_name: ClassVar[str] = "base"
    #: Number of classes.
    num_classes: ClassVar[int] = 10
    #: Shape ``(C, H, W)`` of one image as stored in the source files.
    native_shape: ClassVar[tuple[int, int, int]] = (1, 1, 1)
    #: Size of the set the validation examples are carved from (the official training set).
    nominal_train_size: ClassVar[int] = 0
    #: Size of the official test set.
    nominal_test_size: ClassVar[int] = 0
    #: Pixel value mapped to 1.0 before normalisation.
    pixel_scale: ClassVar[float] = 255.0
    #: Whether the preprocessed tensors are cached on disk.
    uses_cache: ClassVar[bool] = True

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 100,
        val_size: int = 10000,
        downsample: int | None = None,
        grayscale: bool = False,
        flatten: bool = True,
        normalize: bool = True,
        download: bool = False,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(data_dir, (str, os.PathLike)):
            raise InvalidDataConfigError(f"data_dir must be a path, got {data_dir!r}")
        self.data_dir = os.fspath(data_dir)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.val_size = _check_int("val_size", val_size, 0)
        self.num_workers = _check_int("num_workers", num_workers, 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise InvalidDataConfigError(f"seed must be an int, got {seed!r}")
        self.seed = seed
        side = self.native_shape[1]
        if downsample is not None:
            _check_int("downsample", downsample, 1)
            if downsample > min(self.native_shape[1:]):
                raise InvalidDataConfigError(
                    f"downsample={downsample} is larger than the {self.native_shape[1]}x{self.native_shape[2]} "
                    f"images of {self.display_name}; it must be between 1 and {side} (or None)"
                )
        self.downsample = downsample
        self.grayscale = bool(grayscale)
        self.flatten = bool(flatten)
        self.normalize = bool(normalize)
        self.download = bool(download)
        if self.val_size >= self._available_train_size():
            raise InvalidDataConfigError(
                f"val_size={self.val_size} leaves no training examples: the {self.display_name} training set "
                f"has {self._available_train_size()} examples, so val_size must be smaller than that"
            )

        #: Training split (after the validation examples are removed); set by :meth:`setup`.
        self.train_dataset: InMemoryDataset | None = None
        #: Validation split carved from the training set; set by :meth:`setup`.
        self.val_dataset: InMemoryDataset | None = None
        #: Official test split; set by :meth:`setup`.
        self.test_dataset: InMemoryDataset | None = None
        #: Per-channel mean/std used for normalisation (``None`` when ``normalize=False``).
        self.mean: Tensor | None = None
        self.std: Tensor | None = None
        #: Sorted positions, in the source training set, of the training and validation
        #: examples (SVHN's 'extra' images are appended after the training ones and are
        #: not listed); set by :meth:`setup`.
        self.train_indices: Tensor | None = None
        self.val_indices: Tensor | None = None
        self._payload: dict[str, Any] | None = None
        self._is_setup = False

    # ------------------------------------------------------------------
    # Shapes, known before any data is loaded
    # ------------------------------------------------------------------

    def _available_train_size(self) -> int:
        """Examples the validation set can be carved from, as far as known before loading."""
        return self.nominal_train_size

    @property
    def _effective_downsample(self) -> int | None:
        if self.downsample is None or (self.downsample,) * 2 == tuple(self.native_shape[1:]):
            return None
        return self.downsample

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one preprocessed image (before flattening)."""
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
        """Number of input features, ``C * H * W``."""
        channels, height, width = self.image_shape
        return channels * height * width

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example as the model receives it: ``(C*H*W,)`` if ``flatten`` else ``(C, H, W)``."""
        return (self.input_dim,) if self.flatten else self.image_shape

    # ------------------------------------------------------------------
    # Subclass hooks
    # ------------------------------------------------------------------

    def _ensure_source(self) -> None:
        """Make sure the source files are on disk (download them or raise)."""

    def _source_files(self) -> list[Path]:
        """Files whose size and modification time key the cache's freshness."""
        return []

    def _read_source(self) -> RawData:
        """Read the source files into uint8 tensors."""
        raise TypeError(f"{type(self).__name__} has no data source: use one of MNISTDataModule, CIFAR10DataModule, "
                        "CIFAR100DataModule, SVHNDataModule, DigitsDataModule, or define _read_source")

    def _cache_options(self) -> dict[str, Any]:
        """Options that change the content of the cache file."""
        return {
            "dataset": self.name,
            "downsample": self._effective_downsample,
            "grayscale": self.grayscale and self.native_shape[0] == 3,
        }

    # ------------------------------------------------------------------
    # Cache
    # ------------------------------------------------------------------

    @property
    def cache_dir(self) -> Path:
        """Folder of the cache files: ``data_dir/pl_pathsgd_cache``."""
        return Path(self.data_dir) / CACHE_DIRNAME

    @property
    def cache_path(self) -> Path:
        """Cache file for the current options: ``<name>-<hash of the options and format version>.pt``."""
        key = json.dumps({**self._cache_options(), "format_version": CACHE_FORMAT_VERSION}, sort_keys=True)
        digest = hashlib.sha1(key.encode(), usedforsecurity=False).hexdigest()[:16]
        return self.cache_dir / f"{self.name}-{digest}.pt"

    def _fingerprint(self) -> dict[str, list[int]]:
        prints = {}
        for path in self._source_files():
            try:
                stat = path.stat()
            except OSError:
                continue
            prints[str(path.relative_to(self.data_dir)) if path.is_relative_to(self.data_dir) else str(path)] = [
                stat.st_size,
                stat.st_mtime_ns,
            ]
        return prints

    def _build_payload(self) -> dict[str, Any]:
        raw = self._read_source()
        opts = self._cache_options()
        tensors: dict[str, Tensor] = {}
        for prefix in ("train", "test", "extra"):
            images = getattr(raw, f"{prefix}_x")
            if images is None:
                continue
            tensors[f"{prefix}_x"] = _preprocess(
                images, scale=self.pixel_scale, grayscale=opts["grayscale"], downsample=opts["downsample"]
            )
            tensors[f"{prefix}_y"] = getattr(raw, f"{prefix}_y").to(torch.int64).contiguous()
        return {
            "format_version": CACHE_FORMAT_VERSION,
            "options": opts,
            "pixel_scale": self.pixel_scale,
            "sources": self._fingerprint(),
            "tensors": tensors,
            "meta": {
                key: {"shape": list(t.shape), "dtype": str(t.dtype), "sha1": _tensor_digest(t)}
                for key, t in tensors.items()
            },
        }

    def _write_cache(self, payload: dict[str, Any]) -> None:
        path = self.cache_path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                torch.save(payload, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def _cache_problem(self, payload: Any) -> str | None:
        """Why ``payload`` must not be used, or ``None`` if it is valid."""
        if not isinstance(payload, dict):
            return "it does not hold a dict"
        if payload.get("format_version") != CACHE_FORMAT_VERSION:
            return f"it has format version {payload.get('format_version')!r}, expected {CACHE_FORMAT_VERSION}"
        if payload.get("options") != self._cache_options():
            return f"it was built with options {payload.get('options')!r}, expected {self._cache_options()!r}"
        if payload.get("pixel_scale") != self.pixel_scale:
            return "its pixel scale differs"
        recorded = payload.get("sources") or {}
        current = self._fingerprint()
        for name, stamp in current.items():
            if recorded.get(name) != stamp:
                return f"the source file {name} changed since the cache was built"
        tensors, meta = payload.get("tensors"), payload.get("meta")
        if not isinstance(tensors, dict) or not isinstance(meta, dict) or set(tensors) != set(meta):
            return "its tensor table is incomplete"
        for key in ("train_x", "train_y", "test_x", "test_y"):
            if key not in tensors:
                return f"it lacks {key}"
        for key, tensor in tensors.items():
            info = meta[key]
            if not isinstance(tensor, Tensor):
                return f"{key} is not a tensor"
            if list(tensor.shape) != info.get("shape") or str(tensor.dtype) != info.get("dtype"):
                return f"{key} has shape {tuple(tensor.shape)}/{tensor.dtype}, recorded {info.get('shape')}/{info.get('dtype')}"
            if _tensor_digest(tensor) != info.get("sha1"):
                return f"the checksum of {key} does not match"
        if len(tensors["train_x"]) != len(tensors["train_y"]) or len(tensors["test_x"]) != len(tensors["test_y"]):
            return "its image and label counts differ"
        return None

    def _load_cache(self) -> dict[str, Any] | None:
        """Load and check the cache; warn and return ``None`` if it is stale or corrupt."""
        path = self.cache_path
        if not path.is_file():
            return None
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated or garbage file: any unpickling error
            problem = f"it could not be read ({type(exc).__name__}: {exc})"
        else:
            problem = self._cache_problem(payload)
            if problem is None:
                return payload
        warnings.warn(f"Ignoring the cache file {path}: {problem}. Rebuilding it.", CacheWarning, stacklevel=3)
        return None

    def _get_payload(self) -> dict[str, Any]:
        if self._payload is not None:
            return self._payload
        if not self.uses_cache:
            return self._build_payload()
        payload = self._load_cache()
        if payload is None:
            self._ensure_source()
            payload = self._build_payload()
            self._write_cache(payload)
        return payload

    # ------------------------------------------------------------------
    # Lightning hooks
    # ------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Download (if asked to) and build the cache; a valid cache is reused.

        Lightning calls this on one process per node before :meth:`setup`.
        The checked data is kept in memory so that :meth:`setup` on the same
        process does not read the cache a second time.
        """
        if self._is_setup:
            return
        self._payload = self._get_payload()

    def setup(self, stage: str | None = None) -> None:
        """Load the preprocessed data, split off validation and normalise (idempotent).

        All three splits are prepared whatever ``stage`` is; doing so is a
        matter of milliseconds to a second once the cache exists.
        """
        if self._is_setup:
            return
        payload = self._get_payload()
        self._payload = None
        tensors = payload["tensors"]
        scale = payload["pixel_scale"]

        pool_x, pool_y = tensors["train_x"], tensors["train_y"]
        if self.val_size >= len(pool_x):
            raise InvalidDataConfigError(
                f"val_size={self.val_size} leaves no training examples: the {self.display_name} training set "
                f"in {self.data_dir} has {len(pool_x)} examples, so val_size must be smaller than that"
            )
        generator = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(len(pool_x), generator=generator)
        is_val = torch.zeros(len(pool_x), dtype=torch.bool)
        is_val[order[: self.val_size]] = True
        val_idx = is_val.nonzero().squeeze(1)  # sorted positions
        train_idx = (~is_val).nonzero().squeeze(1)

        train_x = _to_float(pool_x.index_select(0, train_idx), scale)
        train_y = pool_y.index_select(0, train_idx)
        val_x = _to_float(pool_x.index_select(0, val_idx), scale)
        val_y = pool_y.index_select(0, val_idx)
        if "extra_x" in tensors:
            train_x = torch.cat([train_x, _to_float(tensors["extra_x"], scale)])
            train_y = torch.cat([train_y, tensors["extra_y"]])
        test_x = _to_float(tensors["test_x"], scale)
        test_y = tensors["test_y"]
        del pool_x, pool_y, tensors, payload

        if self.normalize:
            mean, std = _channel_stats(train_x)
            shift = mean.to(torch.float32).view(1, -1, 1, 1)
            scale_ = std.to(torch.float32).view(1, -1, 1, 1)
            for images in (train_x, val_x, test_x):
                images.sub_(shift).div_(scale_)
            self.mean, self.std = mean.to(torch.float32), std.to(torch.float32)

        def finish(images: Tensor, labels: Tensor) -> InMemoryDataset:
            if self.flatten:
                images = images.reshape(len(images), -1)
            return InMemoryDataset(images.contiguous(), labels.contiguous())

        self.train_indices, self.val_indices = train_idx, val_idx
        self.train_dataset = finish(train_x, train_y)
        self.val_dataset = finish(val_x, val_y)
        self.test_dataset = finish(test_x, test_y)
        self._is_setup = True

    def _loader(self, dataset: InMemoryDataset | None, split: str, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(
                f"{type(self).__name__}.{split}_dataloader() was called before setup(); "
                "call prepare_data() and setup() first (a Lightning Trainer does this for you)"
            )
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochShuffleSampler(len(dataset), self.seed) if shuffle else None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_batch,
        )

    def train_dataloader(self) -> DataLoader:
        """Training split, reshuffled every epoch; the order depends only on ``seed`` and the epoch."""
        return self._loader(self.train_dataset, "train", shuffle=True)

    def train_eval_dataloader(self) -> DataLoader:
        """The full training split in a fixed order, for measuring the training error."""
        return self._loader(self.train_dataset, "train_eval", shuffle=False)

    def val_dataloader(self) -> DataLoader:
        """Validation split (carved from the training set), in a fixed order."""
        return self._loader(self.val_dataset, "val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test split, in a fixed order."""
        return self._loader(self.test_dataset, "test", shuffle=False)

    def teardown(self, stage: str | None = None) -> None:
        """Keep the in-memory splits: they are cheap to hold and slow to rebuild."""
