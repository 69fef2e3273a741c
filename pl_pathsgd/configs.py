"""The YAML configs that come with pl-pathsgd: found by name, listed, shown and copied.

The repository's top-level ``configs/`` folder is their only copy. A built wheel carries it as
``pl_pathsgd/config_files/`` (``pyproject.toml`` maps the folder there); a clone or an editable
install reads it in place. A config's name is its path below that folder without ``.yaml``:
``quickstart``, ``paper/figure1_mnist``, ``paper/smoke/figure1``.

    pl-pathsgd fit --config quickstart          a packaged config by name (a file path still works)
    pl-pathsgd configs list                     the names, each with its first comment line
    pl-pathsgd configs show quickstart          one config
    pl-pathsgd configs copy quickstart my.yaml  a copy to edit (--all DIR: all of them, as laid out here)
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import shutil
import sys
from pathlib import Path

PACKAGED = Path(__file__).resolve().parent / "config_files"  # where a wheel puts the configs
SOURCE_TREE = Path(__file__).resolve().parents[1]  # the repository, for a clone or an editable install
# a --config value that can only be a file or a name (inline YAML or JSON has spaces or brackets)
_FILE_OR_NAME = re.compile(r"[\w.\-/\\~]+")


class UnknownConfigError(LookupError):
    """A name that names no packaged config."""


def root() -> Path:
    """The folder of the packaged configs: the wheel's copy, else the source tree's ``configs/``."""
    if PACKAGED.is_dir():
        return PACKAGED
    if (SOURCE_TREE / "pyproject.toml").is_file() and (SOURCE_TREE / "configs").is_dir():
        return SOURCE_TREE / "configs"
    raise FileNotFoundError(f"pl-pathsgd's configs are missing from this installation (expected the folder "
                            f"{PACKAGED}); reinstall the package")


def names() -> list[str]:
    """The packaged configs' names, the top-level ones first."""
    base = root()
    found = [file.relative_to(base).with_suffix("").as_posix() for file in base.rglob("*.yaml")]
    return sorted(found, key=lambda name: (name.count("/"), name))


def path(name: str) -> Path:
    """The file of the packaged config ``name`` (given with or without ``.yaml``)."""
    name, known = name.removesuffix(".yaml"), names()
    if name not in known:
        # configs/quickstart.yaml (a clone's path) is the packaged quickstart; quickstrat is probably too
        likely = [k for k in known if name.endswith(f"/{k}")] or difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {likely[0]}?)" if likely else ""
        raise UnknownConfigError(f"no packaged config is named {name!r}{hint}; the packaged configs are: "
                                 f"{', '.join(known)} (`pl-pathsgd configs list` describes them)")
    return root() / f"{name}.yaml"


def description(name: str) -> str:
    """The first line of the config's leading comment, `` …`` where its sentence goes on (empty if none)."""
    first = next(iter(path(name).read_text().splitlines()), "")
    if not first.startswith("#"):
        return ""
    first = first.lstrip("#").strip()
    return first if first.endswith(".") else first.rstrip(",") + " …"


def copy(name: str, destination: Path | str, overwrite: bool = False) -> Path:
    """Copy the packaged config ``name`` to ``destination`` (a file, or a folder to put it in)."""
    source = path(name)
    if Path(destination).is_dir() or str(destination).endswith(("/", os.sep)):
        destination = Path(destination) / source.name
    destination = Path(destination)
    if destination.exists() and not overwrite:
        raise FileExistsError(f"{destination} exists; choose another name or pass --force to overwrite it")
    destination.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, destination)
    return destination


def copy_all(destination: Path | str, overwrite: bool = False) -> list[Path]:
    """Copy every packaged config into the folder ``destination``, keeping the layout (``paper/...``), so that
    it can be edited and given to the runner as ``--configs DESTINATION``. Nothing is written if any target exists
    and ``overwrite`` is false."""
    destination = Path(destination)
    targets = {name: destination / path(name).relative_to(root()) for name in names()}
    clashes = [str(target) for target in targets.values() if target.exists()]
    if clashes and not overwrite:
        raise FileExistsError(f"{len(clashes)} of the files exist already ({', '.join(clashes[:3])}"
                              f"{', ...' if len(clashes) > 3 else ''}); choose another folder or pass --force")
    for name, target in targets.items():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path(name), target)
    return list(targets.values())


def resolve_config_args(args):
    """``args`` of the ``pl-pathsgd`` command line with each ``--config``/``-c`` value that is not an existing file
    but a packaged config's name replaced by that config's file. A value that is neither (nor inline YAML or JSON)
    raises :class:`UnknownConfigError` naming the packaged configs. Anything but a list or tuple is returned as is."""
    if not isinstance(args, (list, tuple)):
        return args
    resolved = [str(arg) for arg in args]
    for index, arg in enumerate(resolved):
        option, equals, value = arg.partition("=")
        if option in ("--config", "-c") and equals:
            resolved[index] = f"{option}={_config_file(option, value)}"
        elif arg in ("--config", "-c") and index + 1 < len(resolved):
            resolved[index + 1] = _config_file(arg, resolved[index + 1])
    return resolved


def _config_file(option: str, value: str) -> str:
    """A ``--config`` value, a packaged config's name replaced by its file."""
    if value.startswith("-") or Path(value).expanduser().is_file() or not _FILE_OR_NAME.fullmatch(value):
        return value  # an option, a file, or inline YAML/JSON: the parser takes it from here
    try:
        return str(path(value))
    except UnknownConfigError as error:
        raise UnknownConfigError(f"{option} {value}: there is no such file, and {error}") from None


def main(argv: list[str] | None = None) -> int:
    """``pl-pathsgd configs list|show|copy``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="pl-pathsgd configs",
        description="The configs that come with pl-pathsgd. Run one by name: pl-pathsgd fit --config quickstart")
    actions = parser.add_subparsers(dest="action", metavar="{list,show,copy}")
    actions.add_parser("list", help="the configs' names and descriptions (the default)")
    show = actions.add_parser("show", help="print a config")
    show.add_argument("name")
    copy_parser = actions.add_parser("copy", help="copy a config (or --all of them) to edit it")
    copy_parser.add_argument("name", nargs="?", help="a config name, e.g. quickstart")
    copy_parser.add_argument("destination", nargs="?", help="a file or folder (default: the current folder)")
    copy_parser.add_argument("--all", action="store_true", help="copy every config into the folder DESTINATION "
                             "(for python -m pl_pathsgd.experiments --configs DESTINATION)")
    copy_parser.add_argument("--force", action="store_true", help="overwrite existing files")
    args = parser.parse_args(argv)
    try:
        if args.action in (None, "list"):
            _print_list()
        elif args.action == "show":
            sys.stdout.write(path(args.name).read_text())
        elif args.all:
            if args.destination is not None or args.name is None:
                copy_parser.error("with --all give only the destination folder: pl-pathsgd configs copy --all DIR")
            written = copy_all(args.name, overwrite=args.force)
            print(f"copied {len(written)} configs into {args.name}")
        elif args.name is None:
            copy_parser.error("give a config name (pl-pathsgd configs list shows them) or --all")
        else:
            written = copy(args.name, args.destination or Path(), overwrite=args.force)
            print(f"copied {args.name} to {written}; run it with: pl-pathsgd fit --config {written}")
    except (UnknownConfigError, FileExistsError, FileNotFoundError) as error:
        parser.exit(2, f"pl-pathsgd configs: error: {error.args[0]}\n")
    return 0


def _print_list() -> None:
    listed = names()
    width = max(map(len, listed))
    print(f"Configs that come with pl-pathsgd (in {root()}):")
    for name in listed:
        print(f"  {name:<{width}}  {description(name)}")
    print("Run one with `pl-pathsgd fit --config NAME`; copy one to edit it with `pl-pathsgd configs copy NAME FILE`.")
