"""CIFAR-10 and CIFAR-100 through torchvision's readers (the Python pickle batches)."""

import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchvision import datasets

from .vision import Download, SourceFile, TorchvisionDataModule

__all__ = ["CIFAR100DataModule", "CIFAR10DataModule"]


def _without_md5(entries: list[list[str]]) -> list[list[str | None]]:
    return [[name, None] for name, _ in entries]


# torchvision's CIFAR readers check md5 sums while loading. The DataModule checks the same sums itself
# (once, when it builds its cache, with an opt-out for custom files), so it reads through these
# subclasses, whose md5 entries are None: torchvision's check_integrity then only checks existence.
class _CIFAR10Reader(datasets.CIFAR10):
    tgz_md5 = None
    train_list = _without_md5(datasets.CIFAR10.train_list)
    test_list = _without_md5(datasets.CIFAR10.test_list)
    meta = {**datasets.CIFAR10.meta, "md5": None}


class _CIFAR100Reader(datasets.CIFAR100):
    tgz_md5 = None
    train_list = _without_md5(datasets.CIFAR100.train_list)
    test_list = _without_md5(datasets.CIFAR100.test_list)
    meta = {**datasets.CIFAR100.meta, "md5": None}


class CIFAR10DataModule(TorchvisionDataModule):
    """CIFAR-10: 32x32 colour images of 10 classes, 50,000 training and 10,000 test images.

    With the defaults the splits are 40,000 train / 10,000 validation / 10,000 test. Files are read
    from ``data_dir/cifar-10-batches-py/``; if that folder is missing and the archive
    ``data_dir/cifar-10-python.tar.gz`` is there, the archive is checked and unpacked.
    """

    name = "cifar10"
    display_name = "CIFAR-10"
    num_classes = 10
    native_shape = (3, 32, 32)
    dataset_class = datasets.CIFAR10
    reader_class = _CIFAR10Reader
    split_arguments = {"train": {"train": True}, "test": {"train": False}}
    split_sizes = {"train": 50000, "test": 10000}

    @property
    def folder(self) -> Path:
        """The folder of the pickle batches, e.g. ``data_dir/cifar-10-batches-py``."""
        return Path(self.data_dir) / self.dataset_class.base_folder

    def source_files(self, split: str) -> list[SourceFile]:
        tv = self.dataset_class
        batches = tv.train_list if split == "train" else tv.test_list
        files = [SourceFile(self.folder / name, md5) for name, md5 in batches]
        return files + [SourceFile(self.folder / tv.meta["filename"], tv.meta["md5"])]

    def downloads(self) -> list[Download]:
        tv = self.dataset_class
        url = self._join_url(self.mirror, tv.filename) if self.mirror else tv.url
        return [Download([url], Path(self.data_dir) / tv.filename, tv.tgz_md5, extract_to=Path(self.data_dir))]

    def manual_instructions(self) -> str:
        tv = self.dataset_class
        names = ", ".join(source.path.name for split in self.splits for source in self.source_files(split))
        return (
            f"put {tv.filename} (from {tv.url}) in {self.data_dir} to have it unpacked, or unpack it yourself so that "
            f"these files exist in {self.folder}{os.sep}: {names}"
        )

    @staticmethod
    def to_tensors(dataset: Any) -> tuple[Tensor, Tensor]:
        images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()  # torchvision gives N, H, W, C
        return images, torch.as_tensor(dataset.targets, dtype=torch.int64)

    def diagnose(self, split: str) -> str | None:
        for source in self.source_files(split):
            try:
                with open(source.path, "rb") as handle:
                    pickle.load(handle, encoding="latin1")
            except Exception as exc:
                return f"{source.path} is not a readable CIFAR pickle file ({type(exc).__name__}: {exc})"
        return None


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100: 32x32 colour images of 100 classes (fine labels), 50,000 training and 10,000 test images.

    With the defaults the splits are 40,000 train / 10,000 validation / 10,000 test. Files are read
    from ``data_dir/cifar-100-python/``; if that folder is missing and the archive
    ``data_dir/cifar-100-python.tar.gz`` is there, the archive is checked and unpacked.
    """

    name = "cifar100"
    display_name = "CIFAR-100"
    num_classes = 100
    dataset_class = datasets.CIFAR100
    reader_class = _CIFAR100Reader
