"""MNIST through torchvision's reader, from the ``.gz`` files as served or from unpacked IDX files."""

import gzip
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchvision import datasets

from .cache import file_digest
from .errors import CorruptDatasetError
from .vision import Download, SourceFile, TorchvisionDataModule

__all__ = ["MNISTDataModule"]

#: File names per split, as torchvision reads them (unpacked); the ``.gz`` files add ``.gz``.
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IMAGES, _LABELS = 2051, 2049  # IDX magic numbers: unsigned bytes, 3 and 1 dimensions


class MNISTDataModule(TorchvisionDataModule):
    """MNIST: 28x28 grayscale digits, 60,000 training and 10,000 test images.

    The datasets of the same format (torchvision's ``FashionMNIST``, ``KMNIST``) are subclasses that
    set ``name``, ``display_name`` and ``dataset_class``.

    With the defaults the splits are 50,000 train / 10,000 validation / 10,000 test. Files are read
    from ``data_dir/MNIST/raw/``: the ``.gz`` files as served (their md5 sums are checked), or the
    unpacked IDX files (checked by format and size only: no official md5 sums exist for them). When
    both are there, the ``.gz`` file is read and the unpacked copy must hold the same data. Nothing
    is written next to the files (``.gz`` files are unpacked into a temporary folder).
    """

    name = "mnist"
    display_name = "MNIST"
    num_classes = 10
    native_shape = (1, 28, 28)
    dataset_class = datasets.MNIST
    split_arguments = {"train": {"train": True}, "test": {"train": False}}
    split_sizes = {"train": 60000, "test": 10000}

    @property
    def raw_folder(self) -> Path:
        """``data_dir/MNIST/raw``, where torchvision keeps the files (named after the dataset class)."""
        return Path(self.data_dir) / self.dataset_class.__name__ / "raw"

    def _gz_md5(self, name: str) -> str:
        """md5 sum of the official ``name.gz`` (torchvision's list; it has none for the unpacked files)."""
        return dict(self.dataset_class.resources)[f"{name}.gz"]

    def source_files(self, split: str) -> list[SourceFile]:
        files = []
        for name in FILES[split]:
            unpacked, packed = self.raw_folder / name, self.raw_folder / f"{name}.gz"
            if packed.is_file():
                files.append(SourceFile(packed, self._gz_md5(name)))
                if unpacked.is_file():
                    files.append(SourceFile(unpacked))  # compared with the .gz when read
            else:
                files.append(SourceFile(unpacked))
        return files

    def downloads(self) -> list[Download]:
        mirrors = [self.mirror] if self.mirror else list(self.dataset_class.mirrors)
        return [
            Download([self._join_url(m, f"{name}.gz") for m in mirrors], self.raw_folder / f"{name}.gz", self._gz_md5(name))
            for split in self.splits
            for name in FILES[split]
            if not (self.raw_folder / name).is_file() and not (self.raw_folder / f"{name}.gz").is_file()
        ]

    def manual_instructions(self) -> str:
        names = ", ".join(name for split in self.splits for name in FILES[split])
        return f"place these files in {self.raw_folder}{os.sep} (gzipped with their .gz suffix, or unpacked): {names}"

    @staticmethod
    def to_tensors(dataset: Any) -> tuple[Tensor, Tensor]:
        return dataset.data.unsqueeze(1).contiguous(), dataset.targets.to(torch.int64)

    @contextmanager
    def reader_root(self) -> Iterator[Path]:
        """A temporary ``MNIST/raw`` folder holding the unpacked ``.gz`` files and links to the others.

        torchvision then reads exactly the source files (and never a stale unpacked copy, nor the
        legacy ``processed/`` folder of old torchvision versions).
        """
        with tempfile.TemporaryDirectory(prefix="pl_pathsgd-mnist-") as tmp:
            folder = Path(tmp) / self.dataset_class.__name__ / "raw"
            folder.mkdir(parents=True)
            for split in self.splits:
                for name in FILES[split]:
                    self._stage(name, folder / name)
            yield Path(tmp)

    def _stage(self, name: str, target: Path) -> None:
        unpacked, packed = self.raw_folder / name, self.raw_folder / f"{name}.gz"
        if not packed.is_file():
            try:
                os.symlink(unpacked.resolve(), target)
            except OSError:  # no symlinks here (e.g. Windows without the privilege)
                shutil.copyfile(unpacked, target)
            return
        try:
            with gzip.open(packed, "rb") as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (OSError, EOFError) as exc:
            raise CorruptDatasetError(
                f"Could not unpack {packed} ({type(exc).__name__}: {exc}): delete it and download it again"
            ) from exc
        if unpacked.is_file() and file_digest(unpacked) != file_digest(target):
            raise CorruptDatasetError(
                f"{unpacked} and {packed} hold different data; the .gz file is read when both exist, so delete "
                "the one you do not want to use"
            )

    def check_files(self, root: Path) -> None:
        """Check every IDX header (magic number, image size, file size) and that images and labels pair up."""
        folder = root / self.dataset_class.__name__ / "raw"
        for split in self.splits:
            images_name, labels_name = FILES[split]
            images = self._check_idx(folder / images_name, self._shown(images_name), _IMAGES)
            labels = self._check_idx(folder / labels_name, self._shown(labels_name), _LABELS)
            if images[0] != labels[0]:
                raise CorruptDatasetError(
                    f"{self._shown(images_name)} holds {images[0]} images but {self._shown(labels_name)} holds "
                    f"{labels[0]} labels: they are not a matching pair"
                )

    def _shown(self, name: str) -> Path:
        """The source file behind ``name``, for messages."""
        packed = self.raw_folder / f"{name}.gz"
        return packed if packed.is_file() else self.raw_folder / name

    def _check_idx(self, path: Path, shown: Path, magic: int) -> tuple[int, ...]:
        kind = "image" if magic == _IMAGES else "label"
        hint = "delete it and download it again, or replace it with an intact copy"
        size = path.stat().st_size
        with open(path, "rb") as handle:
            header = handle.read(16 if magic == _IMAGES else 8)
        found = int.from_bytes(header[:4], "big") if len(header) >= 4 else None
        if found != magic:
            raise CorruptDatasetError(
                f"{shown} is not an MNIST IDX {kind} file: its magic number is {found}, expected {magic}; {hint}"
            )
        ndim = magic & 0xFF
        if len(header) < 4 + 4 * ndim:
            raise CorruptDatasetError(f"{shown} is truncated: its IDX header is incomplete; {hint}")
        dims = tuple(int.from_bytes(header[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
        if magic == _IMAGES and dims[1:] != self.native_shape[1:]:
            raise CorruptDatasetError(f"{shown} holds {dims[1]}x{dims[2]} images; MNIST images are 28x28")
        expected = 4 + 4 * ndim + int(torch.tensor(dims).prod())
        if size != expected:
            raise CorruptDatasetError(
                f"{shown} has {size} bytes (unpacked) but its header announces {dims[0]} {kind}s ({expected} bytes): "
                f"the file is truncated or damaged; {hint}"
            )
        return dims
