"""One cell of a sweep: a ``pl-pathsgd fit`` run that records its per-epoch metrics and its identity.

The sweep runner adds :class:`CellRecorder` to every cell's ``pl-pathsgd fit`` command. When the run
finishes, the recorder writes ``<cell_dir>/cell.json``: the per-epoch metrics, the run's identity
(:mod:`pl_pathsgd.experiments.provenance`) and its resolved config. A cell folder without that file
holds the leftovers of an interrupted run, which are removed before the cell runs again.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from pl_pathsgd.callbacks.capacity import CapacityReport
from pl_pathsgd.experiments.provenance import identity

#: the file a finished cell leaves in its folder
RESULT_FILE = "cell.json"
RESULT_FORMAT = 1
#: per-epoch columns and the logged metric each comes from
METRICS = {"train_loss": "train/loss", "train_error": "train/error", "val_loss": "val/loss",
           "val_error": "val/error", "test_loss": "test/loss", "test_error": "test/error"}
#: per-epoch columns taken from the run's CapacityReport, in the epochs it measured (empty in the others)
CAPACITY = {"path_norm_l2": "capacity/path_norm_l2", "margin": "capacity/margin",
            "normalized_path_norm_l2": "capacity/normalized_path_norm_l2"}


#: what a cell's run writes into its folder (loggers, checkpoints, configs, records): only these are removed
CELL_ENTRIES = ("csv", "tb", "checkpoints", "lightning_logs", RESULT_FILE, "epochs.json", "config*.yaml",
                f".{RESULT_FILE}.*.tmp")


class CellError(RuntimeError):
    """A cell cannot run as asked (its folder holds a finished cell, or it is not run by pl-pathsgd fit)."""


class CellRecorder(Callback):
    """Record one cell of a sweep: per-epoch metrics, progress lines, and at the end ``cell.json``.

    Used by ``python -m pl_pathsgd.experiments`` (and the commands its ``--print-commands`` prints) through
    ``pl-pathsgd fit``, which hands the recorder the run's resolved config before training starts.

    Args:
        cell_dir: The cell's folder (its loggers write there too).
        label: Prefix of the progress lines, e.g. ``[figure1 mnist width00016]``.
        replace: Replace a finished cell in ``cell_dir`` (the runner's ``--rerun-changed``); without it a
            finished cell there is an error, so that no result is overwritten by accident.
    """

    def __init__(self, cell_dir: str, label: str = "", replace: bool = False):
        self.cell_dir = Path(cell_dir)
        self.label = label or f"[{self.cell_dir.name}]"
        self.replace = replace
        self.config: dict[str, Any] | None = None
        self.identity: dict[str, Any] | None = None
        self.epochs: list[dict[str, Any]] = []
        self.started = time.perf_counter()
        self._capacity_seen: dict[int, Any] = {}

    @property
    def result_path(self) -> Path:
        return self.cell_dir / RESULT_FILE

    def prepare(self, config: dict[str, Any]) -> None:
        """Take the run's resolved config and clear the cell's folder; pl-pathsgd fit calls this after
        building the model, data and trainer and before any of them writes a file."""
        self.config = config
        if rank_zero_only.rank != 0:  # the other processes of a distributed run leave the folder to rank zero
            return
        strangers = [e.name for e in self.cell_dir.iterdir() if not any(e.match(p) for p in CELL_ENTRIES)] \
            if self.cell_dir.is_dir() else []
        if strangers:
            raise CellError(f"{self.cell_dir} holds files that no cell writes ({', '.join(sorted(strangers)[:5])}); "
                            "give the cell a folder of its own")
        if self.result_path.is_file():
            if not self.replace:
                raise CellError(f"{self.cell_dir} holds a finished cell ({RESULT_FILE}); the sweep runner reuses it, "
                                "or replaces it with --rerun-changed; delete the folder to rerun it by hand")
            print(f"{self.label} replacing the result computed with other settings", flush=True)
            _empty(self.cell_dir)
        elif self.cell_dir.is_dir() and any(self.cell_dir.iterdir()):
            print(f"{self.label} removing the leftovers of an interrupted run from {self.cell_dir} before "
                  "running the cell again", flush=True)
            _empty(self.cell_dir)
        self.started = time.perf_counter()

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.config is None:
            raise CellError("CellRecorder records a cell of a sweep run by `pl-pathsgd fit`, which hands it the "
                            "run's config; use it through python -m pl_pathsgd.experiments or its --print-commands")
        self.identity = identity(self.config, trainer.datamodule)  # the data module is set up by now
        self.epochs = []
        self._capacity_seen = {id(c): c.last for c in trainer.callbacks if isinstance(c, CapacityReport)}

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        row: dict[str, Any] = {"epoch": trainer.current_epoch + 1,
                               "seconds": round(time.perf_counter() - self.started, 3)}
        for column, key in METRICS.items():
            row[column] = float(metrics[key]) if key in metrics else None
        row.update(self._new_capacity(trainer))
        self.epochs.append(row)
        if trainer.is_global_zero:
            done, total = row["epoch"], trainer.max_epochs
            left = row["seconds"] / done * (total - done) if total and total > 0 else 0.0
            print(f"{self.label} epoch {done}/{total}: train error {_fmt(row['train_error'])}, "
                  f"test error {_fmt(row['test_error'])}, loss {_fmt(row['train_loss'])} "
                  f"[{row['seconds']:.0f}s, about {left / 60:.1f} min left]", flush=True)

    def _new_capacity(self, trainer: pl.Trainer) -> dict[str, float | None]:
        """The capacity columns of this epoch: a CapacityReport's measurement if it made one in this epoch (the
        runner appends the recorder after every other callback, so it sees it), else empty. The logged values
        stay in ``trainer.callback_metrics`` after their epoch; the report's ``last``, a new dict per
        measurement, tells a new measurement from an old one."""
        values: dict[str, float | None] = dict.fromkeys(CAPACITY)
        for report in (c for c in trainer.callbacks if isinstance(c, CapacityReport)):
            if report.last and report.last is not self._capacity_seen.get(id(report)):
                self._capacity_seen[id(report)] = report.last
                values = {column: report.last.get(key) for column, key in CAPACITY.items()}
        return values

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Training ended normally (not by an exception or a signal): the cell is finished."""
        if not trainer.is_global_zero:
            return
        record = {"format": RESULT_FORMAT, "identity": self.identity, "epochs": self.epochs,
                  "seconds": round(time.perf_counter() - self.started, 3), "threads": torch.get_num_threads(),
                  "parameters": sum(p.numel() for p in pl_module.parameters()), "precision": str(trainer.precision),
                  "config": self.config}
        write_atomic(self.result_path, json.dumps(record, indent=1, default=str))


def read_result(cell_dir: Path) -> dict[str, Any] | None:
    """The record of a finished cell, or None if there is none; an unreadable record counts as none."""
    path = Path(cell_dir) / RESULT_FILE
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("epochs"), list) else None


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def _empty(folder: Path) -> None:
    for entry in folder.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"
