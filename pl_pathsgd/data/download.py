"""Downloading dataset files with a timeout.

torchvision's own download has no timeout, so a host that accepts the connection and then sends
nothing hangs a run forever. :func:`fetch` gives up on a URL after ``timeout`` seconds without data
(an inactivity timeout: a slow but steady download is not cut off), tries the next mirror, checks
the file against its md5 sum with torchvision's ``check_integrity`` and moves it into place only
when it is complete.
"""

import shutil
import urllib.request
from pathlib import Path
from urllib.error import HTTPError, URLError

from lightning.pytorch.utilities import rank_zero_info
from torchvision.datasets.utils import check_integrity

from .cache import atomic_file
from .errors import DataPermissionError, DatasetDownloadError

__all__ = ["fetch"]


def _reason(exc: BaseException, timeout: float) -> str:
    """Why a download failed, in a few words."""
    cause = exc.reason if isinstance(exc, URLError) and not isinstance(exc, HTTPError) else exc
    if isinstance(cause, TimeoutError):
        return f"the host sent nothing for {timeout:g} s (download_timeout={timeout:g})"
    if isinstance(exc, HTTPError):
        return f"the server answered HTTP {exc.code} {exc.reason}"
    detail = getattr(cause, "strerror", None) or str(cause) or type(cause).__name__
    return f"the host could not be reached ({detail})"


def fetch(urls: list[str], target: Path, *, md5: str | None, timeout: float, instructions: str) -> None:
    """Download the first of ``urls`` that works into ``target``, checked against ``md5`` if given.

    Raises :class:`DatasetDownloadError` naming every URL tried and why it failed, followed by
    ``instructions`` (how to place the file by hand).
    """
    failures = []
    for url in urls:
        rank_zero_info(f"Downloading {url} to {target}")
        request = urllib.request.Request(url, headers={"User-Agent": "pl-pathsgd"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response, atomic_file(target) as out:
                shutil.copyfileobj(response, out, 1 << 20)
        except PermissionError as exc:
            raise DataPermissionError(
                f"Cannot write {target}: this user may not write to {target.parent}; download into a folder of your "
                "own (data_dir=...) or ask the folder's owner to place the files"
            ) from exc
        except (URLError, OSError) as exc:  # TimeoutError and ConnectionError are OSErrors
            failures.append(f"{url}: {_reason(exc, timeout)}")
            continue
        if md5 is not None and not check_integrity(str(target), md5):
            target.unlink()
            failures.append(f"{url}: the file does not match the official md5 sum {md5}")
            continue
        return
    raise DatasetDownloadError(f"Could not download {target.name}: {'; '.join(failures)}. {instructions}")
