"""Errors and warnings of :mod:`pl_pathsgd.data`, and the checks of DataModule arguments.

Every error derives from :class:`DataError` and from the built-in exception a caller would expect
(``FileNotFoundError`` for missing files, ``ValueError`` for a bad argument, ...), and its message is
one line that names the file or argument and says how to fix it.
"""

import importlib
from types import ModuleType
from typing import Any

__all__ = [
    "CacheWarning",
    "CorruptDatasetError",
    "DataError",
    "DataPermissionError",
    "DatasetDownloadError",
    "DatasetNotFoundError",
    "InvalidDataConfigError",
    "MissingDependencyError",
    "WrongDatasetError",
    "check_int",
    "import_extra",
]


class DataError(Exception):
    """Base class of every error raised by :mod:`pl_pathsgd.data`."""


class DatasetNotFoundError(DataError, FileNotFoundError):
    """The dataset files are not on disk and ``download`` is off."""


class DatasetDownloadError(DataError, RuntimeError):
    """Downloading the dataset failed (host unreachable or stalled, or a bad file)."""


class CorruptDatasetError(DataError, RuntimeError):
    """A dataset file exists but cannot be read or has unexpected content."""


class WrongDatasetError(CorruptDatasetError):
    """The files are readable but are not the expected dataset (wrong md5 sum or wrong size)."""


class DataPermissionError(DataError, PermissionError):
    """A dataset file or folder exists but this user may not read or write it."""


class MissingDependencyError(DataError, ImportError):
    """An optional dependency (an extra of pl-pathsgd) is not installed."""


class InvalidDataConfigError(DataError, ValueError):
    """An argument of a DataModule has an invalid value; ``argument`` names it."""

    def __init__(self, message: str, argument: str | None = None) -> None:
        super().__init__(message)
        self.argument = argument


class CacheWarning(UserWarning):
    """A cache file could not be used or written; the data is rebuilt or kept in memory."""


def check_int(name: str, value: Any, minimum: int) -> int:
    """Return ``value`` if it is an int >= ``minimum``, else raise :class:`InvalidDataConfigError`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidDataConfigError(f"{name}={value!r} is invalid: {name} must be an integer >= {minimum}", name)
    if value < minimum:
        raise InvalidDataConfigError(f"{name}={value} is invalid: {name} must be an integer >= {minimum}", name)
    return value


def import_extra(module: str, extra: str, purpose: str) -> ModuleType:
    """Import an optional dependency, or say which extra of pl-pathsgd installs it."""
    try:
        importlib.import_module(module.split(".")[0])
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{purpose} needs {module.split('.')[0]}, which is not installed: pip install 'pl-pathsgd[{extra}]'"
        ) from exc
