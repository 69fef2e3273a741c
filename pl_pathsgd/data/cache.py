"""Fingerprints of source files and the validated, atomically written cache of preprocessed tensors.

* A source file is fingerprinted by the SHA-1 of its content (about 1.5 GB/s), so a file rewritten
  with the same size and modification time is noticed.
* A cache file is named after everything that determines its content: the dataset, the
  preprocessing options, a format version and the fingerprints of the source files. A changed
  source file therefore leads to a new cache file, never to a stale one being used.
* A cache file records the shape, dtype and SHA-1 of each tensor and is checked on every load; a
  damaged file is ignored (with a :class:`~pl_pathsgd.data.errors.CacheWarning`) and rebuilt.
* Files are written to a temporary name and moved into place with ``os.replace``, so a crash or a
  concurrent reader never sees half a file. They are created with the mode ``0o666`` minus the
  user's umask, like any file the user writes, so that other users who may read the folder may read
  the cache too.
* When the cache folder cannot be written (a read-only data folder), the data is kept in memory for
  the run and a warning says how to keep it (``cache_dir=``).
"""

import errno
import hashlib
import json
import os
import secrets
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor

from .errors import CacheWarning, DataPermissionError

__all__ = [
    "CACHE_DIRNAME",
    "CACHE_FORMAT_VERSION",
    "TensorCache",
    "atomic_file",
    "file_digest",
    "tensor_digest",
]

#: Bump when the layout or the meaning of the cached tensors changes; caches written with another
#: version are not used.
CACHE_FORMAT_VERSION = 2
#: Default cache folder, inside ``data_dir``.
CACHE_DIRNAME = "pl_pathsgd_cache"

_READ_BLOCK = 1 << 20


def file_digest(path: Path) -> str:
    """SHA-1 of a file's content."""
    digest = hashlib.sha1(usedforsecurity=False)
    try:
        with open(path, "rb") as handle:
            while block := handle.read(_READ_BLOCK):
                digest.update(block)
    except PermissionError as exc:
        raise DataPermissionError(
            f"{path} exists but this user may not read it: ask its owner to make it readable (chmod a+r)"
        ) from exc
    return digest.hexdigest()


def tensor_digest(tensor: Tensor) -> str:
    """SHA-1 of a tensor's bytes."""
    data = tensor.detach().contiguous().cpu()
    view = memoryview(data.view(torch.uint8).numpy()) if data.numel() else memoryview(b"")
    return hashlib.sha1(view, usedforsecurity=False).hexdigest()


@contextmanager
def atomic_file(path: Path) -> Iterator[IO[bytes]]:
    """Write ``path`` through a temporary file in the same folder, moved into place when complete.

    The temporary file is created with mode ``0o666`` (the kernel applies the umask), not the
    ``0o600`` of :func:`tempfile.mkstemp`, so the result has the user's normal permissions.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _is_unwritable(exc: OSError) -> bool:
    return isinstance(exc, PermissionError) or exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM)


class TensorCache:
    """One cache file of preprocessed tensors, identified by ``key`` (a JSON-serialisable dict).

    Args:
        folder: where the file lives.
        prefix: start of the file name (the dataset's short name).
        key: everything that determines the tensors (options, source fingerprints); its hash
            completes the file name and it is stored in the file and compared on load.
    """

    def __init__(self, folder: Path, prefix: str, key: dict[str, Any]) -> None:
        self.key = {**key, "format_version": CACHE_FORMAT_VERSION}
        text = json.dumps(self.key, sort_keys=True)
        self.path = Path(folder) / f"{prefix}-{hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()[:16]}.pt"

    def load(self) -> dict[str, Tensor] | None:
        """The cached tensors, or ``None`` (with a warning if a file exists but cannot be used)."""
        try:
            if not self.path.is_file():
                return None
            payload = torch.load(self.path, map_location="cpu", weights_only=True)
        except PermissionError:
            self._warn(
                "this user may not read it (it was probably written by another user with a private umask); "
                "ask its owner to make it readable, or pass cache_dir= a folder of your own"
            )
            return None
        except Exception as exc:  # a truncated or garbage file: any unpickling error
            self._warn(f"it could not be read ({type(exc).__name__}: {exc}); rebuilding it")
            return None
        problem = self._problem(payload)
        if problem is not None:
            self._warn(f"{problem}; rebuilding it")
            return None
        return payload["tensors"]

    def save(self, tensors: dict[str, Tensor]) -> bool:
        """Write the tensors; if the folder cannot be written, warn and return ``False``."""
        payload = {
            "key": self.key,
            "tensors": tensors,
            "meta": {
                name: {"shape": list(t.shape), "dtype": str(t.dtype), "sha1": tensor_digest(t)}
                for name, t in tensors.items()
            },
        }
        try:
            with atomic_file(self.path) as handle:
                torch.save(payload, handle)
        except OSError as exc:
            if not _is_unwritable(exc):
                raise
            warnings.warn(
                f"Cannot write the cache file {self.path} ({exc.strerror or exc}); the preprocessed data is kept in "
                "memory for this run only. Pass cache_dir= a writable folder to keep it between runs.",
                CacheWarning,
                stacklevel=3,
            )
            return False
        return True

    def _problem(self, payload: Any) -> str | None:
        """Why ``payload`` must not be used, or ``None`` if it is valid."""
        if not isinstance(payload, dict):
            return "it does not hold a dict"
        if payload.get("key") != self.key:
            return "it was built from other options, files or a format version"
        tensors, meta = payload.get("tensors"), payload.get("meta")
        if not isinstance(tensors, dict) or not isinstance(meta, dict) or set(tensors) != set(meta):
            return "its tensor table is incomplete"
        for name, tensor in tensors.items():
            info = meta[name]
            if not isinstance(tensor, Tensor):
                return f"{name} is not a tensor"
            if list(tensor.shape) != info.get("shape") or str(tensor.dtype) != info.get("dtype"):
                return f"{name} has shape {tuple(tensor.shape)}/{tensor.dtype}, recorded {info.get('shape')}/{info.get('dtype')}"
            if tensor_digest(tensor) != info.get("sha1"):
                return f"the checksum of {name} does not match"
        return None

    def _warn(self, why: str) -> None:
        warnings.warn(f"Ignoring the cache file {self.path}: {why}.", CacheWarning, stacklevel=4)
