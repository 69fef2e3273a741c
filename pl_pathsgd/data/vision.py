"""DataModules that read the files of a torchvision dataset class.

A subclass is short: it names torchvision's dataset class, the shape of an image, the number of
classes, the official size of each split and the arguments that select a split, and it says which
files make up each split, what to download, and how to turn a torchvision dataset into tensors.
This class does the rest:

1. **Files.** Missing files are downloaded (``download=True``, with a timeout) or reported with
   where to put them; a local archive is unpacked.
2. **Fingerprints.** Every source file is fingerprinted by content; the fingerprints are part of
   the cache key, so replacing a file always rebuilds.
3. **Integrity** (when the cache is built). Unless ``custom_data=True``: the md5 sums of the
   official release (torchvision's lists, checked with torchvision's ``check_integrity``) where the
   files are the canonical ones, and the official number of examples per split, so that files of
   another dataset, or the test files under the training names, are refused by name. Always: the
   files must be readable in their format, with images of the right shape and labels in range.
4. **Cache.** The preprocessed tensors go to ``cache_dir`` (default ``data_dir/pl_pathsgd_cache``),
   or stay in memory when that folder cannot be written.
"""

from abc import abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

from torch import Tensor
from torchvision.datasets.utils import check_integrity, extract_archive

from .cache import CACHE_DIRNAME, TensorCache, file_digest
from .download import fetch
from .errors import (
    CorruptDatasetError,
    DataError,
    DataPermissionError,
    DatasetNotFoundError,
    InvalidDataConfigError,
    WrongDatasetError,
)
from .image import ImageDataModule, RawData

__all__ = ["Download", "SourceFile", "TorchvisionDataModule"]


class SourceFile(NamedTuple):
    """A file read for one split, with the md5 sum of the official release (``None`` where unknown)."""

    path: Path
    md5: str | None = None


class Download(NamedTuple):
    """A file to fetch (from the first URL that works), optionally an archive to unpack into ``extract_to``."""

    urls: list[str]
    target: Path
    md5: str | None
    extract_to: Path | None = None


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class TorchvisionDataModule(ImageDataModule):
    """Base class of the DataModules backed by a torchvision dataset class.

    Args:
        data_dir: Folder of the dataset files (the layout torchvision uses; see each dataset).
        cache_dir: Folder of the preprocessed-tensor cache; ``None`` means
            ``data_dir/pl_pathsgd_cache``. If it cannot be written (a read-only data folder), the
            data is preprocessed in memory on every run, with a warning.
        download: Download missing files (needs access to the dataset's host or ``mirror``).
        download_timeout: Seconds without data after which a download gives up on a host.
        mirror: Base URL serving the dataset's files under their usual names, used instead of the
            official host.
        custom_data: Accept files that are not the official release (a subset, relabelled or
            re-packed files): skip the md5 sums and the official split sizes, keep the format checks.
    """

    #: torchvision's dataset class: its file names, md5 sums and URLs.
    dataset_class: ClassVar[type]
    #: The class that reads the files (default :attr:`dataset_class`); for classes that check md5
    #: sums while loading, a subclass without them, since this DataModule checks them itself.
    reader_class: ClassVar[type | None] = None
    #: Keyword arguments of the reader that select each split.
    split_arguments: ClassVar[dict[str, dict[str, Any]]]
    #: Official number of examples per split.
    split_sizes: ClassVar[dict[str, int]]

    def __init__(
        self,
        *,
        data_dir: str = "data",
        cache_dir: str | None = None,
        download: bool = False,
        download_timeout: float = 60.0,
        mirror: str | None = None,
        custom_data: bool = False,
        **kwargs: Any,
    ) -> None:
        if mirror is not None and (not isinstance(mirror, str) or not mirror.strip()):
            raise InvalidDataConfigError(f"mirror={mirror!r} is invalid: give a base URL or None", "mirror")
        if isinstance(download_timeout, bool) or not isinstance(download_timeout, (int, float)) or not download_timeout > 0:
            raise InvalidDataConfigError(
                f"download_timeout={download_timeout!r} is invalid: give a number of seconds > 0", "download_timeout"
            )
        self.data_dir = data_dir
        self.cache_dir = Path(cache_dir) if cache_dir is not None else Path(data_dir) / CACHE_DIRNAME
        self.download = bool(download)
        self.download_timeout = float(download_timeout)
        self.mirror = mirror
        self.custom_data = bool(custom_data)
        super().__init__(**kwargs)
        #: The cache file of the current data; set when the data is prepared.
        self.cache_path: Path | None = None
        #: SHA-1 of each source file (relative to ``data_dir``); set when the data is prepared.
        self.source_digests: dict[str, str] | None = None

    def available_train_size(self) -> int | None:
        return None if self.custom_data else self.split_sizes["train"]

    # ------------------------------------------------------------------ what a subclass provides

    @abstractmethod
    def source_files(self, split: str) -> list[SourceFile]:
        """The files read for ``split`` (existing or not), with their official md5 sums."""

    @abstractmethod
    def downloads(self) -> list[Download]:
        """What to fetch (or unpack from a local archive) to obtain the missing source files."""

    @abstractmethod
    def manual_instructions(self) -> str:
        """How to put the files in place by hand."""

    @staticmethod
    @abstractmethod
    def to_tensors(dataset: Any) -> tuple[Tensor, Tensor]:
        """uint8 images ``(N, C, H, W)`` and int64 labels ``(N,)`` of a loaded torchvision dataset."""

    @property
    def splits(self) -> list[str]:
        """The splits read with the current options."""
        return list(self.split_arguments)

    @contextmanager
    def reader_root(self) -> Iterator[Path]:
        """The root folder given to the reader (MNIST unpacks ``.gz`` files into a temporary one)."""
        yield Path(self.data_dir)

    def check_files(self, root: Path) -> None:
        """Cheap checks of the files under ``root`` before they are read (MNIST: IDX headers)."""

    def diagnose(self, split: str) -> str | None:
        """After the reader failed on ``split``: which file is unreadable and why, if that can be found."""
        return None

    # ------------------------------------------------------------------ files

    def _all_sources(self) -> list[SourceFile]:
        sources = {source.path: source for split in self.splits for source in self.source_files(split)}
        return list(sources.values())

    def _missing(self) -> list[Path]:
        return [source.path for source in self._all_sources() if not source.path.is_file()]

    def _not_found(self, missing: list[Path]) -> DatasetNotFoundError:
        urls = ", ".join(url for item in self.downloads() for url in item.urls[:1])
        return DatasetNotFoundError(
            f"{self.display_name} files not found (download=False); missing: {', '.join(map(str, missing))}. "
            f"Either pass download=True on a machine that can reach {urls}, or {self.manual_instructions()}"
        )

    def _ensure_sources(self) -> None:
        """Make sure every source file exists: unpack local archives, download if allowed, or raise."""
        if not self._missing():
            return
        for item in self.downloads():
            if not item.target.is_file():
                if not self.download:
                    continue
                md5 = None if self.custom_data else item.md5
                fetch(item.urls, item.target, md5=md5, timeout=self.download_timeout,
                      instructions=f"Without network access, {self.manual_instructions()}, and run with download=False")
            if item.extract_to is not None:
                self._extract(item)
        missing = self._missing()
        if missing:
            raise self._not_found(missing)

    def _extract(self, item: Download) -> None:
        if not self.custom_data and item.md5 is not None and not check_integrity(str(item.target), item.md5):
            raise WrongDatasetError(
                f"{item.target} does not match the md5 sum of the official {self.display_name} archive ({item.md5}): "
                "it is damaged or another file; delete it and download it again, or pass custom_data=True to use it"
            )
        try:
            extract_archive(str(item.target), str(item.extract_to))
        except PermissionError as exc:
            raise DataPermissionError(
                f"Cannot unpack {item.target} into {item.extract_to}: this user may not write there; "
                "unpack it somewhere writable and point data_dir there"
            ) from exc
        except Exception as exc:
            raise CorruptDatasetError(
                f"Could not unpack {item.target} ({_short(exc)}): delete it and download it again"
            ) from exc

    def _relative(self, path: Path) -> str:
        root = Path(self.data_dir)
        return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)

    def _verify_md5(self) -> None:
        for source in self._all_sources():
            if source.md5 is not None and not check_integrity(str(source.path), source.md5):
                raise WrongDatasetError(
                    f"{source.path} does not match the md5 sum of the official {self.display_name} release "
                    f"({source.md5}): it is damaged, or a file of another dataset or split; put the official file "
                    "there (delete it and use download=True), or pass custom_data=True to use your own files"
                )

    def _check_sizes(self, raw: RawData) -> None:
        counts = {"train": len(raw.train_y), "test": len(raw.test_y)}
        if raw.extra_y is not None:
            counts["extra"] = len(raw.extra_y)
        for split, count in counts.items():
            expected = self.split_sizes[split]
            if count != expected:
                others = [name for name, size in self.split_sizes.items() if size == count and name != split]
                hint = f" (the size of the {others[0]} split: its files under the {split} names?)" if others else ""
                files = ", ".join(str(s.path) for s in self.source_files(split))
                raise WrongDatasetError(
                    f"The {self.display_name} {split} files ({files}) hold {count} examples, but the official "
                    f"{split} split has {expected}{hint}: these are not the expected files; put the official "
                    "files there, or pass custom_data=True to use your own files"
                )

    # ------------------------------------------------------------------ reading

    def read_raw(self) -> RawData:
        if not self.custom_data:
            self._verify_md5()
        reader = self.reader_class or self.dataset_class
        loaded = {}
        with self.reader_root() as root:
            self.check_files(root)
            for split in self.splits:
                try:
                    dataset = reader(str(root), download=False, **self.split_arguments[split])
                    loaded[split] = self.to_tensors(dataset)
                except DataError:
                    raise
                except Exception as exc:
                    files = ", ".join(str(s.path) for s in self.source_files(split))
                    problem = self.diagnose(split) or (
                        f"Could not read the {self.display_name} {split} files ({files}): {_short(exc)}; one of them is damaged"
                    )
                    raise CorruptDatasetError(f"{problem}: delete it and download it again, or replace it") from exc
        extra_x, extra_y = loaded.get("extra", (None, None))
        raw = RawData(*loaded["train"], *loaded["test"], extra_x, extra_y)
        where = {name: ", ".join(str(s.path) for s in self.source_files(split))
                 for name, split in (("training", "train"), ("test", "test"), ("extra", "extra")) if split in loaded}
        self.check_raw(raw, where)
        if not self.custom_data:
            self._check_sizes(raw)
        return raw

    def preprocessing_options(self) -> dict[str, Any]:
        return {**super().preprocessing_options(), "custom_data": self.custom_data}

    def preprocessed_tensors(self) -> dict[str, Tensor]:
        """The preprocessed splits, from the cache if it holds them for these exact source files."""
        self._ensure_sources()
        digests = {self._relative(source.path): file_digest(source.path) for source in self._all_sources()}
        cache = TensorCache(self.cache_dir, self.name, {**self.preprocessing_options(), "sources": digests})
        self.cache_path, self.source_digests = cache.path, digests
        tensors = cache.load()
        if tensors is None:
            tensors = super().preprocessed_tensors()
            cache.save(tensors)
        return tensors

    @staticmethod
    def _join_url(base: str, filename: str) -> str:
        return base.rstrip("/") + "/" + filename
