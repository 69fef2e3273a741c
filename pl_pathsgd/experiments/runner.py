"""Run a figure's grid cell by cell through ``pl-pathsgd fit``, resumably, then tabulate and plot it.

    python -m pl_pathsgd.experiments figure3 --dataset mnist --out runs/figure3-mnist
    python -m pl_pathsgd.experiments figure1 --smoke --out runs/smoke

Every cell runs the same LightningCLI and Trainer as ``pl-pathsgd fit --config ...``; anything
after the known options is passed on to it (e.g. ``--trainer.max_epochs=50``).  A finished cell
leaves ``DIR/cells/<cell>/epochs.json`` and is skipped next time, so an interrupted sweep resumes.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl

from pl_pathsgd.experiments import grids
from pl_pathsgd.experiments.claims import check_claims

COLUMNS = ("figure", "dataset", "cell", "method", "init", "width", "alpha", "lr", "dropout", "epoch",
           "train_loss", "train_error", "val_loss", "val_error", "test_loss", "test_error", "seconds")
_METRICS = {"train_loss": "train/loss", "train_error": "train/error", "val_loss": "val/loss",
            "val_error": "val/error", "test_loss": "test/loss", "test_error": "test/error"}


class EpochRecorder(pl.Callback):
    """Keeps the per-epoch metrics of a cell and prints progress (cell, epoch, time left)."""

    def __init__(self, label: str, started: float, cells_left: int):
        self.label, self.started, self.cells_left = label, started, cells_left
        self.epochs: list[dict] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = trainer.callback_metrics
        row = {"epoch": trainer.current_epoch + 1, "seconds": round(time.perf_counter() - self.started, 3)}
        for column, key in _METRICS.items():
            row[column] = float(metrics[key]) if key in metrics else None
        self.epochs.append(row)
        done, total = trainer.current_epoch + 1, trainer.max_epochs
        per_epoch = row["seconds"] / done
        left = per_epoch * (total - done) + per_epoch * total * self.cells_left
        print(f"{self.label} epoch {done}/{total}: train error {_fmt(row['train_error'])}, "
              f"test error {_fmt(row['test_error'])}, loss {_fmt(row['train_loss'])} "
              f"[{row['seconds']:.0f}s, about {left / 60:.1f} min left]", flush=True)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def run_cell(cell: grids.Cell, config: Path, cell_dir: Path, overrides: list[str], label: str,
             cells_left: int) -> list[dict]:
    from pl_pathsgd.cli import make_cli

    loggers = [
        {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(cell_dir), "name": "", "version": "csv"}},
        {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
         "init_args": {"save_dir": str(cell_dir), "name": "", "version": "tb", "default_hp_metric": False}},
    ]
    args = ["--config", str(config), *cell.args, f"--trainer.logger={json.dumps(loggers)}",
            f"--trainer.default_root_dir={cell_dir}", *overrides]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")  # args= is deliberate
        cli = make_cli(args, run=False)
    recorder = EpochRecorder(label, time.perf_counter(), cells_left)
    cli.trainer.callbacks.append(recorder)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return recorder.epochs


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
    return grids.figure3_cells(methods, inits, alphas, args.dropout)


def parse(argv=None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m pl_pathsgd.experiments", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("figure", choices=grids.FIGURES)
    parser.add_argument("--dataset", help="mnist, cifar10, cifar100 or svhn (digits with --smoke)")
    parser.add_argument("--out", required=True, type=Path, help="folder for cells, CSV, figure")
    parser.add_argument("--smoke", action="store_true", help="small offline run on the bundled digits")
    parser.add_argument("--configs", type=Path, help="the configs/ folder (default: ./configs)")
    parser.add_argument("--widths", type=int, nargs="+", help="figure1: hidden widths (default 4 ... 4096)")
    parser.add_argument("--methods", nargs="+", choices=grids.METHODS, help="figure3: optimizers")
    parser.add_argument("--inits", nargs="+", choices=grids.INITS, help="figure3: initialisations")
    parser.add_argument("--alphas", type=int, nargs="+", help="figure3: step sizes 10^-alpha to choose from")
    parser.add_argument("--dropout", type=float, default=0.0, help="figure3: drop probability (paper: 0 or 0.5)")
    args, overrides = parser.parse_known_args(argv)
    if args.smoke:
        args.dataset = args.dataset or "digits"
        if args.dataset != "digits":
            parser.error("--smoke runs on the bundled digits; leave out --dataset")
    else:
        args.dataset = args.dataset or grids.DATASETS[args.figure][0]
        if args.dataset not in grids.DATASETS[args.figure]:
            parser.error(f"{args.figure} uses {', '.join(grids.DATASETS[args.figure])}, not {args.dataset}")
    bad = [o for o in overrides if not o.startswith("--")]
    if bad:
        parser.error(f"unexpected arguments {bad}; pass overrides as --trainer.max_epochs=5 and the like")
    return args, overrides


def run(argv=None) -> list[dict]:
    """Run (or resume) a figure; returns the per-epoch rows of every cell."""
    args, overrides = parse(argv)
    plots = _plots()  # before any cell runs, so that a missing library costs no training time
    config = grids.config_path(args.figure, args.dataset, args.smoke, args.configs)
    cells = _cells(args)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, cell in enumerate(cells):
        cell_dir = out / "cells" / cell.name
        done_file = cell_dir / "epochs.json"
        label = f"[{args.figure} {args.dataset} cell {index + 1}/{len(cells)} {cell.name}]"
        if done_file.is_file():
            epochs = json.loads(done_file.read_text())
            print(f"{label} finished earlier, skipped", flush=True)
        else:
            epochs = run_cell(cell, config, cell_dir, overrides, label, len(cells) - index - 1)
            _write_atomic(done_file, json.dumps(epochs))
        base = {"figure": args.figure, "dataset": args.dataset, "cell": cell.name, **cell.meta}
        rows += [{column: {**base, **epoch}.get(column) for column in COLUMNS} for epoch in epochs]
    _write_csv(out / f"{args.figure}.csv", rows)
    title = f"{args.figure} on {args.dataset}{' (smoke)' if args.smoke else ''}"
    figure = plots.render(args.figure, rows, title)
    figure.savefig(out / f"{args.figure}.png", dpi=120, bbox_inches="tight")
    plots.to_tensorboard(out / "tensorboard", args.figure, figure)
    print(f"wrote {out / f'{args.figure}.csv'} and {out / f'{args.figure}.png'}", flush=True)
    for claim, ok, detail in check_claims(args.figure, rows):
        print(f"{'PASS' if ok else 'FAIL'}: {claim} ({detail})", flush=True)
    return rows


def _plots():
    try:
        from pl_pathsgd.experiments import plots
    except ModuleNotFoundError as error:
        if error.name != "matplotlib":
            raise
        raise SystemExit("python -m pl_pathsgd.experiments draws the paper's figures with matplotlib, which is not "
                         "installed: pip install 'pl-pathsgd[figures]'") from None
    return plots


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def _write_csv(path: Path, rows: list[dict]) -> None:
    temporary = path.with_suffix(".tmp")
    with temporary.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
    os.replace(temporary, path)


def main(argv=None) -> None:
    run(argv)
