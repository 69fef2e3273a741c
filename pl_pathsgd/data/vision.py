"""DataModules for MNIST, CIFAR-10, CIFAR-100 and SVHN.

The files are read (and, with ``download=True``, downloaded) by torchvision's
own dataset classes.  Two options of ours adjust those classes through plain
subclasses that only change class attributes, never torchvision itself:

* ``verify_checksums=False`` sets every md5 sum of the subclass to ``None``,
  which makes torchvision check only that the files exist (useful for files
  that are not the official release, such as small test files);
* ``mirror`` replaces the download host by another base URL that serves
  the same file names.
"""

import gzip
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, ClassVar
from urllib.error import URLError

import torch
from torch import Tensor
from torchvision import datasets
from torchvision.datasets.utils import check_integrity

from .base import (
    BaseDataModule,
    CorruptDatasetError,
    DataError,
    DatasetDownloadError,
    DatasetNotFoundError,
    InvalidDataConfigError,
    RawData,
)

__all__ = [
    "CIFAR100DataModule",
    "CIFAR10DataModule",
    "MNISTDataModule",
    "SVHNDataModule",
    "TorchvisionDataModule",
]


def _join_url(base: str, filename: str) -> str:
    return base.rstrip("/") + "/" + filename


def _short(exc: BaseException, limit: int = 600) -> str:
    text = re.sub(r"\s+", " ", f"{type(exc).__name__}: {exc}").strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_network_error(exc: BaseException) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (URLError, OSError, TimeoutError)):
            return True
        if "urlopen error" in str(exc) or "Connection refused" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class TorchvisionDataModule(BaseDataModule):
    """Base of the DataModules backed by a torchvision dataset class.

    Adds the options ``verify_checksums`` and ``mirror`` to
    :class:`~pl_pathsgd.data.base.BaseDataModule`; see the concrete classes
    for the full argument list.
    """

    #: Base URL(s) torchvision downloads from, for messages.
    default_urls: ClassVar[tuple[str, ...]] = ()

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
        verify_checksums: bool = True,
        mirror: str | None = None,
    ) -> None:
        if mirror is not None and (not isinstance(mirror, str) or not mirror.strip()):
            raise InvalidDataConfigError(f"mirror must be a non-empty base URL or None, got {mirror!r}")
        self.verify_checksums = bool(verify_checksums)
        self.mirror = mirror
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
        self.save_hyperparameters()  # subclasses without arguments of their own inherit this __init__

    # -- per-dataset hooks -------------------------------------------------

    @property
    def source_dir(self) -> Path:
        """Folder torchvision expects the files in."""
        raise TypeError(f"{type(self).__name__} must define this dataset hook")

    def _required_names(self) -> list[str]:
        """File names (relative to :attr:`source_dir`) torchvision reads."""
        raise TypeError(f"{type(self).__name__} must define this dataset hook")

    def _torchvision_class(self) -> type:
        """The torchvision dataset class, adjusted for ``verify_checksums`` and ``mirror``."""
        raise TypeError(f"{type(self).__name__} must define this dataset hook")

    def _download_urls(self) -> list[str]:
        """URLs the download will try, for messages."""
        raise TypeError(f"{type(self).__name__} must define this dataset hook")

    def _manual_instructions(self) -> str:
        """How to place the files by hand."""
        names = ", ".join(self._required_names())
        return f"place these files in {self.source_dir}{os.sep}: {names}"

    def _download_files(self) -> None:
        """Run torchvision's download."""
        raise TypeError(f"{type(self).__name__} must define this dataset hook")

    def _read_files(self) -> RawData:
        """Read all splits through torchvision."""
        raise TypeError(f"{type(self).__name__} must define this dataset hook")

    def _diagnose(self) -> None:
        """Raise :class:`CorruptDatasetError` naming the first unreadable file, if one is found."""

    def _prepare_files(self) -> None:
        """Hook run before looking for the files (MNIST unpacks ``.gz`` files here)."""

    # -- shared logic ------------------------------------------------------

    @property
    def required_files(self) -> list[Path]:
        """Absolute paths of the files torchvision reads for the current options."""
        return [self.source_dir / name for name in self._required_names()]

    def _source_files(self) -> list[Path]:
        return self.required_files

    def _missing(self) -> list[Path]:
        return [path for path in self.required_files if not path.is_file()]

    def _missing_message(self, missing: list[Path]) -> str:
        listing = "\n".join(f"  {path}" for path in missing)
        return (
            f"{self.display_name} files not found (download=False). Missing:\n{listing}\n"
            f"Either pass download=True on a machine that can reach {self.mirror or ', '.join(self.default_urls)}, "
            f"or {self._manual_instructions()}."
        )

    def _ensure_source(self) -> None:
        self._prepare_files()
        missing = self._missing()
        if not missing:
            return
        if not self.download:
            raise DatasetNotFoundError(self._missing_message(missing))
        try:
            self._download_files()
        except DataError:
            raise
        except Exception as exc:
            if self._missing():
                urls = ", ".join(self._download_urls())
                if _is_network_error(exc):
                    what = f"the host could not be reached ({_short(exc)})"
                else:
                    what = f"the download failed ({_short(exc)})"
                raise DatasetDownloadError(
                    f"Could not download {self.display_name}: {what}. Tried: {urls}. "
                    f"Without network access, {self._manual_instructions()}, and run again with download=False."
                ) from exc
            # The files arrived; a failure to read them is diagnosed in _read_source.
        self._prepare_files()
        missing = self._missing()
        if missing:
            listing = ", ".join(str(path) for path in missing)
            raise DatasetDownloadError(f"The {self.display_name} download finished but these files are still missing: {listing}")

    def _corrupt_hint(self) -> str:
        return "Delete it and run again with download=True, or replace it with an intact copy."

    def _md5_check(self, path: Path, md5: str | None) -> None:
        if self.verify_checksums and md5 is not None and not check_integrity(str(path), md5):
            raise CorruptDatasetError(
                f"{path} does not match the md5 sum of the official {self.display_name} release ({md5}): the file is "
                f"corrupt, truncated or not the official one. {self._corrupt_hint()} "
                "To use files that are deliberately different, pass verify_checksums=False."
            )

    def _read_source(self) -> RawData:
        try:
            raw = self._read_files()
        except DataError:
            raise
        except Exception as exc:
            self._diagnose()
            files = ", ".join(str(path) for path in self.required_files)
            raise CorruptDatasetError(
                f"Could not read the {self.display_name} files ({files}): {_short(exc)}. "
                "One of them is corrupt; delete it and run again with download=True, or replace it."
            ) from exc
        self._check_raw(raw)
        return raw

    def _check_raw(self, raw: RawData) -> None:
        splits = [("training", raw.train_x, raw.train_y), ("test", raw.test_x, raw.test_y)]
        if raw.extra_x is not None:
            splits.append(("extra", raw.extra_x, raw.extra_y))
        for split, images, labels in splits:
            where = ", ".join(str(path) for path in self._split_files(split))
            if tuple(images.shape[1:]) != tuple(self.native_shape) or images.dtype != torch.uint8:
                raise CorruptDatasetError(
                    f"The {self.display_name} {split} images in {where} have shape {tuple(images.shape[1:])} "
                    f"({images.dtype}); expected {tuple(self.native_shape)} uint8 images."
                )
            if len(images) != len(labels):
                raise CorruptDatasetError(
                    f"The {self.display_name} {split} data in {where} has {len(images)} images but {len(labels)} labels."
                )
            if len(images) == 0:
                raise CorruptDatasetError(f"The {self.display_name} {split} data in {where} is empty.")
            low, high = int(labels.min()), int(labels.max())
            if low < 0 or high >= self.num_classes:
                raise CorruptDatasetError(
                    f"The {self.display_name} {split} labels in {where} range over [{low}, {high}]; "
                    f"expected classes 0..{self.num_classes - 1}."
                )

    def _split_files(self, split: str) -> list[Path]:
        return self.required_files


# ---------------------------------------------------------------------------
# MNIST
# ---------------------------------------------------------------------------

_MNIST_FILES = {
    "train-images-idx3-ubyte": (2051, "training"),
    "train-labels-idx1-ubyte": (2049, "training"),
    "t10k-images-idx3-ubyte": (2051, "test"),
    "t10k-labels-idx1-ubyte": (2049, "test"),
}


class MNISTDataModule(TorchvisionDataModule):
    """MNIST: 28x28 grayscale digits, 60,000 training and 10,000 test images.

    With the defaults the splits are 50,000 train / 10,000 validation /
    10,000 test. ``grayscale`` has no effect (the images have one channel).
    Files are read from ``data_dir/MNIST/raw/`` (uncompressed IDX files, or
    the ``.gz`` files, which are unpacked next to themselves).

    Args:
        data_dir: Root folder; torchvision's files live in ``data_dir/MNIST/raw/`` and the
            preprocessed tensors in ``data_dir/pl_pathsgd_cache/``.
        batch_size: Examples per batch for every dataloader.
        val_size: Examples held out of the 60,000 training images for validation,
            chosen by a permutation seeded with ``seed``.
        downsample: Side length ``s`` (1..28) to area-average the images to ``s x s``
            (10 gives the paper's 100-pixel inputs); ``None`` keeps 28x28.
        grayscale: Accepted for a uniform interface; MNIST is already grayscale.
        flatten: Yield flat vectors (for MLPs) instead of ``(1, H, W)`` images.
        normalize: Standardise with the mean/std of the training split.
        download: Download missing files from torchvision's MNIST mirrors.
        num_workers: Worker processes of the dataloaders.
        seed: Seed of the validation split and of the training shuffle order.
        verify_checksums: Check downloaded archives against the official md5 sums.
            (The unpacked files are always checked for a valid IDX header and size.)
        mirror: Base URL serving ``train-images-idx3-ubyte.gz`` and the other three
            archives, used instead of torchvision's mirrors.
    """

    name = "mnist"
    display_name = "MNIST"
    num_classes = 10
    native_shape = (1, 28, 28)
    nominal_train_size = 60000
    nominal_test_size = 10000
    default_urls = tuple(datasets.MNIST.mirrors)

    @property
    def source_dir(self) -> Path:
        return Path(self.data_dir) / "MNIST" / "raw"

    def _required_names(self) -> list[str]:
        return list(_MNIST_FILES)

    def _split_files(self, split: str) -> list[Path]:
        return [self.source_dir / name for name, (_, which) in _MNIST_FILES.items() if which == split]

    def _manual_instructions(self) -> str:
        names = ", ".join(_MNIST_FILES)
        return (
            f"place these four files in {self.source_dir}{os.sep} (uncompressed, or gzipped with "
            f"their .gz suffix): {names}"
        )

    def _download_urls(self) -> list[str]:
        mirrors = [self.mirror] if self.mirror else list(datasets.MNIST.mirrors)
        return [_join_url(mirror, datasets.MNIST.resources[0][0]) for mirror in mirrors]

    def _torchvision_class(self) -> type:
        attrs: dict[str, Any] = {"__module__": __name__}
        if self.mirror:
            attrs["mirrors"] = [self.mirror.rstrip("/") + "/"]
        if not self.verify_checksums:
            attrs["resources"] = [(filename, None) for filename, _ in datasets.MNIST.resources]
        # The class keeps the name MNIST: torchvision derives the folder from it.
        return type("MNIST", (datasets.MNIST,), attrs)

    def _prepare_files(self) -> None:
        for name in _MNIST_FILES:
            target = self.source_dir / name
            packed = target.with_name(name + ".gz")
            if target.is_file() or not packed.is_file():
                continue
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{name}-", suffix=".tmp")
            try:
                with gzip.open(packed, "rb") as src, os.fdopen(fd, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                os.replace(tmp, target)
            except (OSError, EOFError, gzip.BadGzipFile) as exc:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise CorruptDatasetError(f"Could not unpack {packed}: {_short(exc)}. {self._corrupt_hint()}") from exc

    def _download_files(self) -> None:
        self._torchvision_class()(self.data_dir, train=True, download=True)

    def _check_idx(self, path: Path, magic: int) -> tuple[int, ...]:
        kind = "image" if magic == 2051 else "label"
        try:
            size = path.stat().st_size
            with open(path, "rb") as handle:
                header = handle.read(16 if magic == 2051 else 8)
        except OSError as exc:
            raise CorruptDatasetError(f"Could not read {path}: {_short(exc)}") from exc
        found = int.from_bytes(header[:4], "big") if len(header) >= 4 else None
        if found != magic:
            raise CorruptDatasetError(
                f"{path} is not an MNIST IDX {kind} file: its magic number is {found}, expected {magic}. "
                f"{self._corrupt_hint()}"
            )
        ndim = magic & 0xFF
        if len(header) < 4 + 4 * ndim:
            raise CorruptDatasetError(f"{path} is truncated: its IDX header is incomplete. {self._corrupt_hint()}")
        dims = tuple(int.from_bytes(header[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
        if magic == 2051 and dims[1:] != self.native_shape[1:]:
            raise CorruptDatasetError(f"{path} holds {dims[1]}x{dims[2]} images; MNIST images are 28x28.")
        count = 1
        for dim in dims:
            count *= dim
        expected = 4 + 4 * ndim + count
        if size != expected:
            raise CorruptDatasetError(
                f"{path} has {size} bytes but its header announces {dims[0]} {kind}s ({expected} bytes): "
                f"the file is truncated or damaged. {self._corrupt_hint()}"
            )
        return dims

    def _diagnose(self) -> None:
        for split in ("train", "t10k"):
            images = self._check_idx(self.source_dir / f"{split}-images-idx3-ubyte", 2051)
            labels = self._check_idx(self.source_dir / f"{split}-labels-idx1-ubyte", 2049)
            if images[0] != labels[0]:
                raise CorruptDatasetError(
                    f"{self.source_dir / f'{split}-images-idx3-ubyte'} holds {images[0]} images but "
                    f"{self.source_dir / f'{split}-labels-idx1-ubyte'} holds {labels[0]} labels."
                )

    def _read_files(self) -> RawData:
        # The headers are cheap to check and torchvision does not check the sizes.
        self._diagnose()
        cls = self._torchvision_class()
        train = cls(self.data_dir, train=True, download=False)
        test = cls(self.data_dir, train=False, download=False)
        return RawData(
            train_x=train.data.unsqueeze(1).contiguous(),
            train_y=train.targets.to(torch.int64),
            test_x=test.data.unsqueeze(1).contiguous(),
            test_y=test.targets.to(torch.int64),
        )


# ---------------------------------------------------------------------------
# CIFAR
# ---------------------------------------------------------------------------


class _CIFARDataModule(TorchvisionDataModule):
    """Shared code of CIFAR-10 and CIFAR-100."""

    native_shape = (3, 32, 32)
    nominal_train_size = 50000
    nominal_test_size = 10000
    _tv_base: ClassVar[type] = datasets.CIFAR10
    _label_key: ClassVar[str] = "labels"

    @property
    def source_dir(self) -> Path:
        return Path(self.data_dir) / self._tv_base.base_folder

    def _required_names(self) -> list[str]:
        tv = self._tv_base
        return [name for name, _ in tv.train_list + tv.test_list] + [tv.meta["filename"]]

    def _split_files(self, split: str) -> list[Path]:
        tv = self._tv_base
        names = tv.train_list if split == "training" else tv.test_list
        return [self.source_dir / name for name, _ in names]

    def _manual_instructions(self) -> str:
        tv = self._tv_base
        names = ", ".join(self._required_names())
        return (
            f"extract {tv.filename} (from {tv.url}) into {self.data_dir}, so that these files exist in "
            f"{self.source_dir}{os.sep}: {names} (alternatively put {tv.filename} itself in {self.data_dir} "
            "and pass download=True: torchvision then unpacks it without downloading)"
        )

    def _download_urls(self) -> list[str]:
        tv = self._tv_base
        return [_join_url(self.mirror, tv.filename) if self.mirror else tv.url]

    def _torchvision_class(self) -> type:
        tv = self._tv_base
        attrs: dict[str, Any] = {"__module__": __name__}
        if self.mirror:
            attrs["url"] = _join_url(self.mirror, tv.filename)
        if not self.verify_checksums:
            attrs["tgz_md5"] = None
            attrs["train_list"] = [[name, None] for name, _ in tv.train_list]
            attrs["test_list"] = [[name, None] for name, _ in tv.test_list]
            attrs["meta"] = {**tv.meta, "md5": None}
        return type(tv.__name__, (tv,), attrs)

    def _download_files(self) -> None:
        self._torchvision_class()(self.data_dir, train=True, download=True)

    def _diagnose(self) -> None:
        tv = self._tv_base
        for name, md5 in tv.train_list + tv.test_list + [[tv.meta["filename"], tv.meta["md5"]]]:
            path = self.source_dir / name
            self._md5_check(path, md5)
            try:
                with open(path, "rb") as handle:
                    entry = pickle.load(handle, encoding="latin1")
            except Exception as exc:
                raise CorruptDatasetError(
                    f"{path} is not a readable CIFAR pickle file ({_short(exc)}). {self._corrupt_hint()}"
                ) from exc
            if name == tv.meta["filename"]:
                if not isinstance(entry, dict) or tv.meta["key"] not in entry:
                    raise CorruptDatasetError(f"{path} lacks the key {tv.meta['key']!r}. {self._corrupt_hint()}")
                continue
            if not isinstance(entry, dict) or "data" not in entry or self._label_key not in entry:
                raise CorruptDatasetError(
                    f"{path} lacks the keys 'data' and {self._label_key!r}. {self._corrupt_hint()}"
                )
            rows = getattr(entry["data"], "shape", (None, None))
            if len(rows) != 2 or rows[1] != 3072 or rows[0] != len(entry[self._label_key]):
                raise CorruptDatasetError(
                    f"{path} holds data of shape {rows} with {len(entry[self._label_key])} labels; "
                    f"expected N x 3072 with N labels. {self._corrupt_hint()}"
                )

    def _read_files(self) -> RawData:
        cls = self._torchvision_class()
        train = cls(self.data_dir, train=True, download=False)
        test = cls(self.data_dir, train=False, download=False)

        def images(ds: Any) -> Tensor:
            return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()

        return RawData(
            train_x=images(train),
            train_y=torch.as_tensor(train.targets, dtype=torch.int64),
            test_x=images(test),
            test_y=torch.as_tensor(test.targets, dtype=torch.int64),
        )


class CIFAR10DataModule(_CIFARDataModule):
    """CIFAR-10: 32x32 colour images of 10 classes, 50,000 training and 10,000 test images.

    With the defaults the splits are 40,000 train / 10,000 validation /
    10,000 test. Files are read from ``data_dir/cifar-10-batches-py/``.

    Args:
        data_dir: Root folder; torchvision's files live in ``data_dir/cifar-10-batches-py/``
            and the preprocessed tensors in ``data_dir/pl_pathsgd_cache/``.
        batch_size: Examples per batch for every dataloader.
        val_size: Examples held out of the 50,000 training images for validation,
            chosen by a permutation seeded with ``seed``.
        downsample: Side length ``s`` (1..32) to area-average the images to ``s x s``
            (10 gives the paper's 100-pixel inputs); ``None`` keeps 32x32.
        grayscale: Convert to one luma channel (0.299 R + 0.587 G + 0.114 B).
        flatten: Yield flat vectors (for MLPs) instead of ``(C, H, W)`` images.
        normalize: Standardise each channel with the mean/std of the training split.
        download: Download and unpack ``cifar-10-python.tar.gz`` if files are missing.
        num_workers: Worker processes of the dataloaders.
        seed: Seed of the validation split and of the training shuffle order.
        verify_checksums: Check the files (and a downloaded archive) against the official
            md5 sums; ``False`` only checks that they exist.
        mirror: Base URL serving ``cifar-10-python.tar.gz``, used instead of the official host.
    """

    name = "cifar10"
    display_name = "CIFAR-10"
    num_classes = 10
    _tv_base = datasets.CIFAR10
    _label_key = "labels"
    default_urls = (datasets.CIFAR10.url,)


class CIFAR100DataModule(_CIFARDataModule):
    """CIFAR-100: 32x32 colour images of 100 classes (fine labels), 50,000 training and 10,000 test images.

    With the defaults the splits are 40,000 train / 10,000 validation /
    10,000 test. Files are read from ``data_dir/cifar-100-python/``.

    Args:
        data_dir: Root folder; torchvision's files live in ``data_dir/cifar-100-python/``
            and the preprocessed tensors in ``data_dir/pl_pathsgd_cache/``.
        batch_size: Examples per batch for every dataloader.
        val_size: Examples held out of the 50,000 training images for validation,
            chosen by a permutation seeded with ``seed``.
        downsample: Side length ``s`` (1..32) to area-average the images to ``s x s``
            (10 gives the paper's 100-pixel inputs); ``None`` keeps 32x32.
        grayscale: Convert to one luma channel (0.299 R + 0.587 G + 0.114 B).
        flatten: Yield flat vectors (for MLPs) instead of ``(C, H, W)`` images.
        normalize: Standardise each channel with the mean/std of the training split.
        download: Download and unpack ``cifar-100-python.tar.gz`` if files are missing.
        num_workers: Worker processes of the dataloaders.
        seed: Seed of the validation split and of the training shuffle order.
        verify_checksums: Check the files (and a downloaded archive) against the official
            md5 sums; ``False`` only checks that they exist.
        mirror: Base URL serving ``cifar-100-python.tar.gz``, used instead of the official host.
    """

    name = "cifar100"
    display_name = "CIFAR-100"
    num_classes = 100
    _tv_base = datasets.CIFAR100
    _label_key = "fine_labels"
    default_urls = (datasets.CIFAR100.url,)


# ---------------------------------------------------------------------------
# SVHN
# ---------------------------------------------------------------------------


class SVHNDataModule(TorchvisionDataModule):
    """SVHN (cropped digits): 32x32 colour images, 73,257 training and 26,032 test images.

    With the defaults the splits are 63,257 train / 10,000 validation /
    26,032 test. With ``extra=True`` the 531,131 'extra' images are added to
    the training split; the validation set is always carved from
    ``train_32x32.mat`` alone, so it is the same with and without ``extra``.
    Labels are 0..9 (the files' label 10 stands for the digit 0).
    Files are read from ``data_dir/`` directly.

    Args:
        data_dir: Folder holding ``train_32x32.mat``, ``test_32x32.mat`` (and ``extra_32x32.mat``),
            and the preprocessed tensors in ``data_dir/pl_pathsgd_cache/``.
        batch_size: Examples per batch for every dataloader.
        val_size: Examples held out of the 73,257 training images for validation,
            chosen by a permutation seeded with ``seed``.
        downsample: Side length ``s`` (1..32) to area-average the images to ``s x s``
            (10 gives the paper's 100-pixel inputs); ``None`` keeps 32x32.
        grayscale: Convert to one luma channel (0.299 R + 0.587 G + 0.114 B).
        flatten: Yield flat vectors (for MLPs) instead of ``(C, H, W)`` images.
        normalize: Standardise each channel with the mean/std of the training split.
        download: Download the missing ``.mat`` files.
        num_workers: Worker processes of the dataloaders.
        seed: Seed of the validation split and of the training shuffle order.
        verify_checksums: Check the files against the official md5 sums; ``False`` only
            checks that they exist.
        mirror: Base URL serving ``train_32x32.mat`` etc., used instead of the official host.
        extra: Add the 531,131 images of ``extra_32x32.mat`` to the training split.
    """

    name = "svhn"
    display_name = "SVHN"
    num_classes = 10
    native_shape = (3, 32, 32)
    nominal_train_size = 73257
    nominal_test_size = 26032
    nominal_extra_size = 531131
    default_urls = ("http://ufldl.stanford.edu/housenumbers/",)

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
        verify_checksums: bool = True,
        mirror: str | None = None,
        extra: bool = False,
    ) -> None:
        self.extra = bool(extra)
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
            verify_checksums=verify_checksums,
            mirror=mirror,
        )
        self.save_hyperparameters()

    @property
    def _splits(self) -> list[str]:
        return ["train", "test", "extra"] if self.extra else ["train", "test"]

    @property
    def source_dir(self) -> Path:
        return Path(self.data_dir)

    def _required_names(self) -> list[str]:
        return [datasets.SVHN.split_list[split][1] for split in self._splits]

    def _split_files(self, split: str) -> list[Path]:
        key = {"training": "train"}.get(split, split)
        return [self.source_dir / datasets.SVHN.split_list[key][1]]

    def _manual_instructions(self) -> str:
        names = ", ".join(self._required_names())
        return f"place these files (from {self.default_urls[0]}) in {self.source_dir}{os.sep}: {names}"

    def _download_urls(self) -> list[str]:
        names = self._required_names()
        base = self.mirror or self.default_urls[0]
        return [_join_url(base, name) for name in names if not (self.source_dir / name).is_file()]

    def _cache_options(self) -> dict[str, Any]:
        return {**super()._cache_options(), "extra": self.extra}

    def _torchvision_class(self) -> type:
        split_list = {}
        for split, (url, filename, md5) in datasets.SVHN.split_list.items():
            split_list[split] = [
                _join_url(self.mirror, filename) if self.mirror else url,
                filename,
                md5 if self.verify_checksums else None,
            ]
        return type("SVHN", (datasets.SVHN,), {"__module__": __name__, "split_list": split_list})

    def _download_files(self) -> None:
        cls = self._torchvision_class()
        for split in self._splits:
            if not (self.source_dir / datasets.SVHN.split_list[split][1]).is_file():
                cls(self.data_dir, split=split, download=True)

    def _diagnose(self) -> None:
        import scipy.io

        for split in self._splits:
            _, filename, md5 = datasets.SVHN.split_list[split]
            path = self.source_dir / filename
            self._md5_check(path, md5)
            try:
                mat = scipy.io.loadmat(str(path))
            except Exception as exc:
                raise CorruptDatasetError(
                    f"{path} is not a readable MATLAB file ({_short(exc)}). {self._corrupt_hint()}"
                ) from exc
            if "X" not in mat or "y" not in mat:
                raise CorruptDatasetError(f"{path} lacks the variables 'X' and 'y'. {self._corrupt_hint()}")
            shape, labels = mat["X"].shape, mat["y"].size
            if len(shape) != 4 or shape[:3] != (32, 32, 3) or shape[3] != labels:
                raise CorruptDatasetError(
                    f"{path} holds X of shape {shape} and {labels} labels; expected 32x32x3xN and N labels. "
                    f"{self._corrupt_hint()}"
                )

    def _read_files(self) -> RawData:
        cls = self._torchvision_class()
        loaded = {}
        for split in self._splits:
            ds = cls(self.data_dir, split=split, download=False)
            loaded[split] = (torch.from_numpy(ds.data).contiguous(), torch.from_numpy(ds.labels).to(torch.int64))
        extra_x, extra_y = loaded.get("extra", (None, None))
        return RawData(
            train_x=loaded["train"][0],
            train_y=loaded["train"][1],
            test_x=loaded["test"][0],
            test_y=loaded["test"][1],
            extra_x=extra_x,
            extra_y=extra_y,
        )
