"""Run a figure's grid cell by cell through ``pl-pathsgd fit``, resumably, then tabulate and plot it.

    python -m pl_pathsgd.experiments figure3 --dataset mnist --out runs/figure3-mnist [--jobs 2]
    python -m pl_pathsgd.experiments figure1 --smoke --out runs/smoke
    python -m pl_pathsgd.experiments figure1 --dataset mnist --out runs/f1 --print-commands > cells.sh
    python -m pl_pathsgd.experiments figure1 --dataset mnist --out runs/f1 --collect
    python -m pl_pathsgd.experiments figure2b [--out DIR] [--no-figure]   # Figures 2(b) and 2(c), one step each

Every cell is one ``pl-pathsgd fit`` run (the same LightningCLI and Trainer as ``pl-pathsgd fit
--config ...``); anything after the runner's own options is passed on to it (e.g.
``--trainer.max_epochs=50``), except the options the figure sweeps. A finished cell leaves
``DIR/cells/<cell>/cell.json`` with its per-epoch metrics and its identity: the resolved config,
the content of the data and the versions of pl-pathsgd, PyTorch and Lightning. A restarted sweep
reuses a finished cell only if all of that matches; if a setting changed, it stops and names it
(``--rerun-changed`` reruns those cells, a new ``--out`` keeps them). The leftovers of an
interrupted cell are removed before it runs again. SIGTERM stops a sweep cleanly with exit status
143, keeping the finished cells.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import os
import shlex
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pl_pathsgd.experiments import grids
from pl_pathsgd.experiments.cell import CAPACITY, read_result
from pl_pathsgd.experiments.claims import check_claims
from pl_pathsgd.experiments.provenance import (
    data_fingerprint,
    differences,
    lookup,
    result_config,
    same_value,
    versions,
)

COLUMNS = ("figure", "dataset", "cell", "method", "init", "variant", "width", "alpha", "lr", "dropout", "precision",
           "parameters", "epoch", "train_loss", "train_error", "val_loss", "val_error", "test_loss", "test_error",
           *CAPACITY, "seconds")
PROG = "python -m pl_pathsgd.experiments"
#: the worked examples of Figures 2(b) and 2(c): not a sweep, run by :func:`worked_examples.main`
WORKED_EXAMPLES = "figure2b"
SIGTERM_STATUS = 143  # 128 + SIGTERM, what shells and schedulers report for a terminated job


@dataclass
class Sweep:
    """A figure's grid on one dataset, the config its cells start from and the folder they go to."""

    figure: str
    dataset: str
    smoke: bool
    config: Path
    out: Path
    overrides: list[str]
    cells: list[grids.Cell]

    @property
    def title(self) -> str:
        return f"{self.figure} on {self.dataset}{' (smoke)' if self.smoke else ''}"

    def cell_dir(self, cell: grids.Cell) -> Path:
        return self.out / "cells" / cell.name

    def label(self, cell: grids.Cell) -> str:
        return f"[{self.figure} {self.dataset} {cell.name}]"

    def fit_args(self, cell: grids.Cell, replace: bool = False) -> list[str]:
        """The arguments of ``pl-pathsgd fit`` that run ``cell`` (after the word ``fit``)."""
        cell_dir = self.cell_dir(cell)
        loggers = [
            {"class_path": "lightning.pytorch.loggers.CSVLogger",
             "init_args": {"save_dir": str(cell_dir), "name": "", "version": "csv"}},
            {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
             "init_args": {"save_dir": str(cell_dir), "name": "", "version": "tb", "default_hp_metric": False}},
        ]
        recorder = {"class_path": "pl_pathsgd.experiments.CellRecorder",
                    "init_args": {"cell_dir": str(cell_dir), "label": self.label(cell), "replace": replace}}
        return ["--config", str(self.config), *cell.args, f"--trainer.logger={json.dumps(loggers)}",
                f"--trainer.default_root_dir={cell_dir}", *self.overrides,
                *(f"--trainer.callbacks+={json.dumps(callback)}" for callback in cell.callbacks),
                f"--trainer.callbacks+={json.dumps(recorder)}"]


@dataclass
class Planned:
    """A cell, the arguments that run it and where it stands: ``finished`` (with the current settings),
    ``changed`` (finished with other settings, listed in ``changes``), ``partial`` (leftovers of an
    interrupted run) or ``new``."""

    cell: grids.Cell
    args: list[str]
    state: str
    changes: list[str] = field(default_factory=list)
    processes: int = 1  # of the cell's trainer (several under DDP)


class StopRequested:
    """Set by SIGTERM. With ``on_signal`` the handler calls it; without, outside a Trainer (which stops itself
    cleanly at its next step) the handler raises ``SystemExit(143)`` at once, since nothing is lost there."""

    def __init__(self, on_signal: Callable[[], None] | None = None) -> None:
        self.requested = False
        self.on_signal = on_signal

    def handle(self, signum, frame) -> None:
        self.requested = True
        if self.on_signal is not None:
            self.on_signal()
        elif signal.getsignal(signal.SIGTERM) == self.handle:  # not composed into a running Trainer's handler
            raise SystemExit(SIGTERM_STATUS)


@contextlib.contextmanager
def stop_on_sigterm(on_signal: Callable[[], None] | None = None):
    """Within the block, SIGTERM sets the returned flag (see :class:`StopRequested`)."""
    stop = StopRequested(on_signal)
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = signal.signal(signal.SIGTERM, stop.handle)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, previous)


# ------------------------------------------------------------------------------------------- options


def parse(argv=None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, allow_abbrev=False,  # --config is an override
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("figure", choices=(*grids.FIGURES, WORKED_EXAMPLES),
                        help=f"the figure; {WORKED_EXAMPLES} (Figures 2(b) and 2(c)) takes its own options: "
                             f"{PROG} {WORKED_EXAMPLES} --help")
    parser.add_argument("--dataset", help="mnist, cifar10, cifar100 or svhn (digits with --smoke)")
    parser.add_argument("--out", required=True, type=Path, help="folder for cells, CSV, figure")
    parser.add_argument("--smoke", action="store_true", help="small offline run on the bundled digits")
    parser.add_argument("--configs", type=Path, help="the configs/ folder (default: ./configs)")
    parser.add_argument("--widths", type=int, nargs="+", help="figure1: hidden widths (default 4 ... 4096)")
    parser.add_argument("--methods", nargs="+", choices=grids.METHODS, help="figure3: optimizers")
    parser.add_argument("--inits", nargs="+", choices=grids.INITS, help="figure3: initialisations")
    parser.add_argument("--alphas", type=int, nargs="+", help="figure3: step sizes 10^-alpha to choose from")
    parser.add_argument("--dropout", type=float, default=0.0, help="figure3: drop probability (paper: 0 or 0.5)")
    parser.add_argument("--no-control", action="store_true",
                        help="figure3: leave out the control cells (Path-SGD from the balanced init perturbed at the "
                             "rounding level); the invariance claim is then checked in float64 only")
    parser.add_argument("--jobs", type=int, default=1,
                        help="cells run at once, each in its own process with its share of the CPU cores")
    parser.add_argument("--threads", type=int,
                        help="PyTorch threads per cell (default: the CPU cores shared among --jobs; with --jobs 1, "
                             "PyTorch's default); CPU kernels round sums differently with other thread counts")
    parser.add_argument("--rerun-changed", action="store_true",
                        help="rerun finished cells whose settings changed, replacing their results")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--print-commands", action="store_true",
                        help="print one pl-pathsgd fit command per unfinished cell and run nothing")
    action.add_argument("--collect", action="store_true",
                        help="write the CSV, figure and claims from the finished cells and run nothing")
    own, dotted = _dotted_options(list(sys.argv[1:] if argv is None else argv))
    args, overrides = parser.parse_known_args(own)
    overrides = dotted + overrides
    if args.smoke:
        args.dataset = args.dataset or "digits"
        if args.dataset != "digits":
            parser.error("--smoke runs on the bundled digits; leave out --dataset")
    else:
        args.dataset = args.dataset or grids.DATASETS[args.figure][0]
        if args.dataset not in grids.DATASETS[args.figure]:
            parser.error(f"{args.figure} uses {', '.join(grids.DATASETS[args.figure])}, not {args.dataset}")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file; give a folder for the cells, the CSV and the figure "
                     "(it is created if missing)")
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: give the number of cells to run at once, 1 or more")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads {args.threads}: give the number of PyTorch threads per cell, 1 or more")
    overrides = _joined(overrides)
    bad = [o for o in overrides if not o.startswith("--")]
    if bad:
        parser.error(f"unexpected arguments {bad}; pass overrides as --trainer.max_epochs=5 and the like")
    for option in overrides:
        swept = grids.swept_override(args.figure, option)
        if swept:
            parser.error(f"{option} overrides {swept[0]}, which {args.figure} sweeps; set it with {swept[1]}")
    return args, overrides


def _dotted_options(argv: list[str]) -> tuple[list[str], list[str]]:
    """Split off the options of ``pl-pathsgd fit`` with a dotted name (``--trainer.max_epochs=5``, or with its value
    as the next argument): the runner's options have none, and argparse would take a value that holds a space (a
    JSON callback) for an argument of the runner option before it."""
    own: list[str] = []
    dotted: list[str] = []
    index = 0
    while index < len(argv):
        arg = argv[index]
        if arg.startswith("--") and "." in arg.split("=", 1)[0]:
            if "=" not in arg and index + 1 < len(argv) and not argv[index + 1].startswith("--"):
                arg = f"{arg}={argv[index + 1]}"
                index += 1
            dotted.append(arg)
        else:
            own.append(arg)
        index += 1
    return own, dotted


def _joined(overrides: list[str]) -> list[str]:
    """``--name value`` pairs as ``--name=value`` (one argument per option, as the cells' commands hold them)."""
    joined: list[str] = []
    for arg in overrides:
        if joined and joined[-1].startswith("--") and "=" not in joined[-1] and not arg.startswith("--"):
            joined[-1] = f"{joined[-1]}={arg}"
        else:
            joined.append(arg)
    return joined


def _cells(args) -> list[grids.Cell]:
    if args.figure == "figure1":
        widths = args.widths or (grids.SMOKE_WIDTHS if args.smoke else grids.DEFAULT_WIDTHS)
        return grids.figure1_cells(widths)
    if args.figure == "figure2":
        return grids.figure2_cells()
    methods = tuple(args.methods or grids.METHODS)
    inits = tuple(args.inits or grids.INITS)
    if args.alphas:
        alphas = {m: tuple(args.alphas) for m in methods}
    elif args.smoke:
        alphas = {m: grids.SMOKE_ALPHAS[m] for m in methods}
    else:
        alphas = {m: grids.DEFAULT_ALPHAS for m in methods}
    return grids.figure3_cells(methods, inits, alphas, args.dropout, control=not args.no_control)


# ------------------------------------------------------------------------------------------- planning


def resolve(fit_args: list[str]) -> tuple[dict, Any, int]:
    """The resolved config of ``pl-pathsgd fit <fit_args>``, its (not yet set up) DataModule and the number
    of processes its trainer runs on."""
    from pl_pathsgd.cli import make_cli

    with _quiet_lightning(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")  # args= is deliberate
        cli = make_cli(list(fit_args), run=False)
    return cli.resolved_config(), cli.datamodule, cli.trainer.world_size


def plan(sweep: Sweep, rerun_changed: bool = False) -> list[Planned]:
    """Resolve every cell (so that a bad option fails before any training) and find where it stands."""
    fingerprints: dict[str, Any] = {}
    planned = []
    for cell in sweep.cells:
        config, datamodule, processes = resolve(sweep.fit_args(cell))
        _check_sweep_settings(sweep, cell, config)
        state, changes = _state(sweep.cell_dir(cell), config, datamodule, fingerprints)
        args = sweep.fit_args(cell, replace=state == "changed" and rerun_changed)
        data_dir = lookup(config, "data.init_args.data_dir")
        if isinstance(data_dir, str) and not Path(data_dir).is_absolute():
            args.append(f"--data.init_args.data_dir={Path(data_dir).resolve()}")  # commands run from anywhere
        planned.append(Planned(cell, args, state, changes, processes))
    return planned


def _check_sweep_settings(sweep: Sweep, cell: grids.Cell, config: dict) -> None:
    """Refuse a config or override that replaced a value the sweep sets (e.g. ``--config`` with ``hidden``), or
    that added a callback the sweep gives to some cells only (e.g. ``Rebalance`` to every cell of figure2)."""
    for key, expected in cell.sets.items():
        actual = lookup(config, key)
        if not same_value(key, expected, actual):
            raise SystemExit(f"{PROG}: error: {key} is {json.dumps(actual)} in cell {cell.name}, which the sweep sets "
                             f"to {json.dumps(expected)}: a config or option given to the runner replaced a value "
                             f"that {sweep.figure} sweeps; leave it out")
    callbacks = lookup(config, "trainer.callbacks") or []
    for class_path, cells_with_it in grids.CELL_CALLBACKS[sweep.figure].items():
        found = [c for c in callbacks if isinstance(c, dict) and same_value("class_path", c.get("class_path"), class_path)]
        wanted = [c for c in cell.callbacks if c["class_path"] == class_path]
        if len(found) != len(wanted) or not all(_has_arguments(f, w) for f, w in zip(found, wanted)):
            name = class_path.rsplit(".", 1)[-1]
            raise SystemExit(f"{PROG}: error: cell {cell.name} would run with {len(found)} {name} callback(s) where "
                             f"{sweep.figure} gives it {len(wanted)}: {sweep.figure} adds {name} to {cells_with_it} "
                             "only, and a config or option given to the runner added or changed one; leave it out")


def _has_arguments(resolved: dict, wanted: dict) -> bool:
    arguments = resolved.get("init_args") or {}
    return all(same_value(key, value, arguments.get(key)) for key, value in wanted.get("init_args", {}).items())


def _state(cell_dir: Path, config: dict, datamodule: Any, fingerprints: dict) -> tuple[str, list[str]]:
    record = read_result(cell_dir)
    if record is None:
        if (cell_dir / "epochs.json").is_file():  # finished by the runner before cells recorded their settings
            return "changed", ["finished by an earlier pl-pathsgd, which did not record the settings it used"]
        return ("partial" if cell_dir.is_dir() and any(cell_dir.iterdir()) else "new"), []
    recorded = dict(record.get("identity") or {})
    recorded["config"] = result_config(recorded.get("config") or {})  # as this version leaves options out
    current = {"config": result_config(config), "versions": versions()}
    if recorded.get("config") == current["config"] and recorded.get("versions") == current["versions"]:
        current["data"] = _data_fingerprint_once(config, datamodule, fingerprints)  # only now: it reads the data
        if recorded.get("data") == current["data"]:
            return "finished", []
    else:
        current["data"] = recorded.get("data")  # the data is compared once the settings agree
    return "changed", differences(recorded, current)


def _data_fingerprint_once(config: dict, datamodule: Any, fingerprints: dict) -> Any:
    """The data fingerprint, computed once per data configuration."""
    key = json.dumps(config.get("data"), sort_keys=True, default=str)
    if key not in fingerprints:
        with _quiet_lightning():
            datamodule.prepare_data()
        fingerprints[key] = data_fingerprint(datamodule)
    return fingerprints[key]


@contextlib.contextmanager
def _quiet_lightning():
    """Lightning's informational lines (seed set, GPU available, ...) are noise when resolving many cells."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _stop_if_changed(sweep: Sweep, planned: list[Planned], rerun_changed: bool) -> None:
    changed = [p for p in planned if p.state == "changed"]
    if not changed or rerun_changed:
        return
    lines = [f"{PROG}: error: {sweep.out} holds finished cells computed with other settings than these:"]
    lines += [f"  {p.cell.name}: {'; '.join(p.changes)}" for p in changed]
    lines.append("Add --rerun-changed to rerun them with these settings (their results are replaced), or give a new "
                 "--out to keep them.")
    raise SystemExit("\n".join(lines))


# ------------------------------------------------------------------------------------------- running


def fit_cell(fit_args: list[str]) -> None:
    """``pl-pathsgd fit <fit_args>`` in this process."""
    from pl_pathsgd.cli import make_cli

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")  # args= is deliberate
        make_cli(["fit", *fit_args])


def command(fit_args: list[str]) -> str:
    """The shell command that runs a cell: ``pl-pathsgd fit`` with every argument quoted."""
    return shlex.join(["pl-pathsgd", "fit", *fit_args])


def _run_here(sweep: Sweep, todo: list[Planned], threads: int | None) -> None:
    """Run the cells one after the other in this process; SIGTERM stops after a clean stop of the current one."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    with stop_on_sigterm() as stop, _finally(lambda: torch.set_num_threads(before)):
        for index, planned in enumerate(todo):
            if stop.requested:
                break
            if _rank_zero():
                print(f"{sweep.label(planned.cell)} cell {index + 1}/{len(todo)} to run", flush=True)
            try:
                fit_cell(planned.args)
            except SystemExit as error:
                if error.code != SIGTERM_STATUS:
                    raise
                stop.requested = True
                break
            if _rank_zero() and read_result(sweep.cell_dir(planned.cell)) is None:
                raise SystemExit(f"{PROG}: error: {sweep.label(planned.cell)} ended without finishing (no "
                                 f"{sweep.cell_dir(planned.cell) / 'cell.json'}); see the messages above")
    if stop.requested:
        raise SystemExit(SIGTERM_STATUS)


@contextlib.contextmanager
def _finally(action: Callable[[], Any]):
    try:
        yield
    finally:
        action()


def _run_in_workers(sweep: Sweep, todo: list[Planned], jobs: int, threads: int | None) -> None:
    from pl_pathsgd.experiments.parallel import run_in_workers

    outcome = run_in_workers([(p.cell.name, p.args) for p in todo], jobs, threads)
    for name, detail in outcome.failed:
        print(f"[{sweep.figure} {sweep.dataset} {name}] failed: {detail}", flush=True)
    if outcome.stopped:
        raise SystemExit(SIGTERM_STATUS)
    if outcome.failed:
        raise SystemExit(f"{PROG}: error: {len(outcome.failed)} cell(s) failed ({', '.join(n for n, _ in outcome.failed)}); "
                         "the finished ones are kept: fix the cause and run the same command again")


# ------------------------------------------------------------------------------------------- results


def collect(sweep: Sweep, plots) -> list[dict]:
    """The CSV, figure and claims from the cells' records (all of them must be finished)."""
    rows = []
    for cell in sweep.cells:
        record = read_result(sweep.cell_dir(cell))
        if not record["epochs"]:
            raise SystemExit(f"{PROG}: error: {sweep.label(cell)} finished without training a single epoch "
                             "(trainer.max_epochs=0?); a figure needs at least one")
        base = {"figure": sweep.figure, "dataset": sweep.dataset, "cell": cell.name, **cell.meta,
                "precision": record.get("precision"), "parameters": record.get("parameters")}
        rows += [{column: {**base, **epoch}.get(column) for column in COLUMNS} for epoch in record["epochs"]]
    out = sweep.out
    _write_csv(out / f"{sweep.figure}.csv", rows)
    figure = plots.render(sweep.figure, rows, sweep.title)
    figure.savefig(out / f"{sweep.figure}.png", dpi=120, bbox_inches="tight")
    plots.to_tensorboard(out / "tensorboard", sweep.figure, figure)
    print(f"wrote {out / f'{sweep.figure}.csv'} and {out / f'{sweep.figure}.png'}", flush=True)
    for claim, ok, detail in check_claims(sweep.figure, rows):
        print(f"{'PASS' if ok else 'FAIL'}: {claim} ({detail})", flush=True)
    return rows


def run(argv=None) -> list[dict]:
    """Run (or resume, print the commands of, or collect) a figure; returns the per-epoch rows of every cell
    (none for ``--print-commands`` and for the worked examples of ``figure2b``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == [WORKED_EXAMPLES]:
        from pl_pathsgd.experiments import worked_examples

        worked_examples.main(argv[1:], prog=f"{PROG} {WORKED_EXAMPLES}")
        return []
    args, overrides = parse(argv)
    plots = None if args.print_commands else _plots()  # before any cell runs: a missing library costs nothing
    config = grids.config_path(args.figure, args.dataset, args.smoke, args.configs).resolve()
    sweep = Sweep(args.figure, args.dataset, args.smoke, config, args.out.resolve(), overrides, _cells(args))
    with stop_on_sigterm():  # while resolving, SIGTERM ends the command at once (nothing to keep yet)
        planned = plan(sweep, args.rerun_changed)
    _stop_if_changed(sweep, planned, args.rerun_changed)
    for p in planned:
        if p.state == "finished" and not args.print_commands and _rank_zero():
            print(f"{sweep.label(p.cell)} finished earlier with these settings, reused", flush=True)
    todo = [p for p in planned if p.state != "finished"]
    if args.print_commands:
        for p in todo:
            print(command(p.args), flush=True)
        return []
    if args.collect:
        if todo:
            raise SystemExit(f"{PROG}: error: {len(todo)} of {len(planned)} cells are not finished "
                             f"({', '.join(p.cell.name for p in todo)}); run them first (this command without "
                             "--collect, or the commands of --print-commands)")
    elif todo:
        if args.jobs > 1 and any(p.processes > 1 for p in todo):
            raise SystemExit(f"{PROG}: error: the cells run on {max(p.processes for p in todo)} processes each "
                             "(a distributed strategy), which --jobs workers cannot host; run them one at a time "
                             "(--jobs 1) or through --print-commands")
        sweep.out.mkdir(parents=True, exist_ok=True)
        try:
            if args.jobs == 1:
                _run_here(sweep, todo, args.threads)
            else:
                _run_in_workers(sweep, todo, args.jobs, args.threads)
        except SystemExit as error:
            if error.code == SIGTERM_STATUS:
                finished = sum(read_result(sweep.cell_dir(c)) is not None for c in sweep.cells)
                print(f"{PROG}: stopped by SIGTERM; {finished} of {len(sweep.cells)} cells are finished and kept in "
                      f"{sweep.out}; run the same command again to go on", flush=True)
            raise
    if not _rank_zero():
        # a process that a distributed cell's launcher started by running this command again: it has taken
        # part in every cell; the tables and figures are rank zero's
        return []
    return collect(sweep, plots)


def _rank_zero() -> bool:
    from lightning.pytorch.utilities import rank_zero_only

    return rank_zero_only.rank == 0


def _plots():
    try:
        from pl_pathsgd.experiments import plots
    except ModuleNotFoundError as error:
        if error.name != "matplotlib":
            raise
        raise SystemExit("python -m pl_pathsgd.experiments draws the paper's figures with matplotlib, which is not "
                         "installed: pip install 'pl-pathsgd[figures]'") from None
    return plots


def _write_csv(path: Path, rows: list[dict]) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with temporary.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
    os.replace(temporary, path)


def main(argv=None) -> None:
    run(argv)


__all__ = ["Sweep", "collect", "command", "fit_cell", "main", "parse", "plan", "run"]
