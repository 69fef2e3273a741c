"""List and check the built wheel and sdist against the repository (run by .ci/package).

The wheel must hold exactly the package's tracked files plus configs/ as pl_pathsgd/config_files, and
metadata a registry accepts; the sdist must hold every tracked file (so that the suite runs from it) and
nothing but setuptools' generated metadata besides.

    python .ci/check_dist.py dist
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from collections import Counter
from email.parser import HeaderParser
from pathlib import Path

from trove_classifiers import classifiers as known_classifiers
from trove_classifiers import deprecated_classifiers

NOT_IN_SDIST = {".gitignore"}  # tracked files a source distribution does without
SDIST_GENERATED = {"PKG-INFO", "setup.cfg"}  # and the *.egg-info/ folder


def main(dist: Path) -> int:
    tracked = set(subprocess.run(["git", "ls-files"], capture_output=True, text=True, check=True).stdout.split())
    [wheel], [sdist] = sorted(dist.glob("*.whl")), sorted(dist.glob("*.tar.gz"))
    problems = check_wheel(wheel, tracked) + check_sdist(sdist, tracked)
    for problem in problems:
        print(f"FAIL: {problem}")
    return 1 if problems else 0


def check_wheel(wheel: Path, tracked: set[str]) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = next(name.split("/")[0] for name in names if name.endswith(".dist-info/METADATA"))
        metadata = HeaderParser().parsestr(archive.read(f"{info}/METADATA").decode())
        entry_points = archive.read(f"{info}/entry_points.txt").decode()
    files = {name for name in names if not name.startswith(f"{info}/")}
    expected = {name for name in tracked if name.startswith("pl_pathsgd/")}
    expected |= {"pl_pathsgd/config_files/" + name.removeprefix("configs/") for name in tracked
                 if name.startswith("configs/")}
    _list(wheel, files | {name for name in names if name.startswith(f"{info}/")})
    problems = [f"{wheel.name} lacks {name}" for name in sorted(expected - files)]
    problems += [f"{wheel.name} holds {name}, which is not a tracked file of the package" for name in sorted(files - expected)]
    if f"{info}/licenses/LICENSE" not in names:
        problems.append(f"{wheel.name} lacks the LICENSE file")
    problems += _check_metadata(metadata)
    if "pl-pathsgd = pl_pathsgd.cli:main" not in entry_points:
        problems.append(f"{wheel.name} lacks the pl-pathsgd command")
    return problems


def check_sdist(sdist: Path, tracked: set[str]) -> list[str]:
    with tarfile.open(sdist) as archive:
        top = archive.getnames()[0].split("/")[0]
        files = {member.name.removeprefix(f"{top}/") for member in archive.getmembers() if member.isfile()}
    _list(sdist, files)
    generated = {name for name in files if name in SDIST_GENERATED or name.split("/")[0].endswith(".egg-info")}
    problems = [f"{sdist.name} lacks {name} (add it to MANIFEST.in)" for name in sorted(tracked - NOT_IN_SDIST - files)]
    problems += [f"{sdist.name} holds {name}, which is not a tracked file" for name in sorted(files - tracked - generated)]
    return problems


def _check_metadata(metadata) -> list[str]:
    problems = []
    if metadata["License-Expression"] != "Apache-2.0":
        problems.append(f"License-Expression is {metadata['License-Expression']!r}, not 'Apache-2.0'")
    if metadata["Description-Content-Type"] != "text/markdown" or "## Quick start" not in metadata.get_payload():
        problems.append("the long description is not README.md as markdown")
    for classifier in metadata.get_all("Classifier") or []:
        if classifier not in known_classifiers or classifier in deprecated_classifiers:
            problems.append(f"classifier {classifier!r} is unknown or deprecated")
        if classifier.startswith("License ::"):
            problems.append(f"classifier {classifier!r}: the license is given as an SPDX expression instead")
    if metadata.get_all("Project-URL") or metadata["Home-page"]:
        problems.append("project URLs are set; there are none to give yet")
    print(f"  metadata: {metadata['Name']} {metadata['Version']}, License-Expression {metadata['License-Expression']}, "
          f"{len(metadata.get_all('Classifier') or [])} classifiers, Requires-Python {metadata['Requires-Python']}, "
          f"extras {', '.join(metadata.get_all('Provides-Extra') or [])}")
    return problems


def _list(archive: Path, files: set[str]) -> None:
    """Print the archive's files, grouped by folder."""
    print(f"{archive.name} ({archive.stat().st_size / 1024:.0f} KiB, {len(files)} files):")
    folders = Counter(str(Path(name).parent) for name in files)
    for folder, count in sorted(folders.items()):
        names = sorted(Path(name).name for name in files if str(Path(name).parent) == folder)
        shown = ", ".join(names) if count <= 6 else f"{', '.join(names[:4])}, ... ({count} files)"
        print(f"  {folder}/: {shown}")


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
