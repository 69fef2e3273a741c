"""SVHN (cropped digits) through torchvision's reader (MATLAB files; needs the ``svhn`` extra, scipy)."""

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchvision import datasets

from .errors import import_extra
from .image import RawData
from .vision import Download, SourceFile, TorchvisionDataModule

__all__ = ["SVHNDataModule"]


# torchvision's SVHN reader checks md5 sums while loading; the DataModule checks them itself (with an
# opt-out for custom files), so it reads through this subclass, whose md5 entries are None.
class _SVHNReader(datasets.SVHN):
    split_list = {split: [url, filename, None] for split, (url, filename, _) in datasets.SVHN.split_list.items()}


class SVHNDataModule(TorchvisionDataModule):
    """SVHN (cropped digits): 32x32 colour images, 73,257 training and 26,032 test images.

    With the defaults the splits are 63,257 train / 10,000 validation / 26,032 test. With
    ``extra=True`` the 531,131 'extra' images are added to the training split; the validation set is
    always carved from ``train_32x32.mat`` alone, so it is the same with and without ``extra``.
    Labels are 0..9 (the files' label 10 stands for the digit 0). Files are read from ``data_dir/``
    directly. Reading the MATLAB files needs scipy: ``pip install 'pl-pathsgd[svhn]'``.

    Args:
        extra: Add the 531,131 images of ``extra_32x32.mat`` to the training split.
    """

    name = "svhn"
    display_name = "SVHN"
    num_classes = 10
    native_shape = (3, 32, 32)
    dataset_class = datasets.SVHN
    reader_class = _SVHNReader
    split_arguments = {"train": {"split": "train"}, "test": {"split": "test"}, "extra": {"split": "extra"}}
    split_sizes = {"train": 73257, "test": 26032, "extra": 531131}

    def __init__(self, *, extra: bool = False, **kwargs: Any) -> None:
        self.extra = bool(extra)
        super().__init__(**kwargs)

    @property
    def splits(self) -> list[str]:
        return ["train", "test", "extra"] if self.extra else ["train", "test"]

    def source_files(self, split: str) -> list[SourceFile]:
        _, filename, md5 = self.dataset_class.split_list[split]
        return [SourceFile(Path(self.data_dir) / filename, md5)]

    def downloads(self) -> list[Download]:
        items = []
        for split in self.splits:
            url, filename, md5 = self.dataset_class.split_list[split]
            target = Path(self.data_dir) / filename
            if not target.is_file():
                items.append(Download([self._join_url(self.mirror, filename) if self.mirror else url], target, md5))
        return items

    def manual_instructions(self) -> str:
        names = ", ".join(self.dataset_class.split_list[split][1] for split in self.splits)
        return f"place these files (from http://ufldl.stanford.edu/housenumbers/) in {self.data_dir}{os.sep}: {names}"

    @staticmethod
    def to_tensors(dataset: Any) -> tuple[Tensor, Tensor]:
        return torch.from_numpy(dataset.data).contiguous(), torch.from_numpy(dataset.labels).to(torch.int64)

    def preprocessing_options(self) -> dict[str, Any]:
        return {**super().preprocessing_options(), "extra": self.extra}

    def read_raw(self) -> RawData:
        import_extra("scipy.io", "svhn", "Reading SVHN's .mat files")
        return super().read_raw()

    def diagnose(self, split: str) -> str | None:
        scipy_io = import_extra("scipy.io", "svhn", "Reading SVHN's .mat files")
        path = self.source_files(split)[0].path
        try:
            mat = scipy_io.loadmat(str(path))
        except Exception as exc:
            return f"{path} is not a readable MATLAB file ({type(exc).__name__}: {exc})"
        if "X" not in mat or "y" not in mat:
            return f"{path} lacks the variables 'X' and 'y'"
        shape, labels = mat["X"].shape, mat["y"].size
        if len(shape) != 4 or shape[:3] != (32, 32, 3) or shape[3] != labels:
            return f"{path} holds X of shape {shape} and {labels} labels; expected 32x32x3xN and N labels"
        return None
