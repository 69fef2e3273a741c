"""Sweep cells carry their provenance: a finished cell is reused only with the settings, data and versions
that made it; an override of a swept option is refused; bad output folders are named (issue: runs you can
trust)."""

from __future__ import annotations

import inspect
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from pl_pathsgd.experiments.runner import run

SMALL = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=3"]


def figure1(out: Path, *extra: str, widths=("4",)) -> list[dict]:
    return run(["figure1", "--smoke", "--out", str(out), "--widths", *widths, *SMALL, *extra])


def record(cell_dir: Path) -> dict:
    """What a finished cell recorded (``cell.json``)."""
    return json.loads((cell_dir / "cell.json").read_text())


def epochs_per_cell(rows: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["cell"]] = counts.get(row["cell"], 0) + 1
    return counts


def test_changed_settings_stop_the_sweep_and_name_each_change(tmp_path):
    out = tmp_path / "r1"
    figure1(out, widths=("4", "16"))
    table = (out / "figure1.csv").read_text()
    with pytest.raises(SystemExit) as stop:
        figure1(out, "--trainer.max_epochs=2", "--model.init_args.optimizer.lr=0.5", widths=("4", "16", "64"))
    message = str(stop.value.code)
    for expected in ("width00004:", "width00016:", "trainer.max_epochs: 1 -> 2",
                     "model.init_args.optimizer.init_args.lr: 0.1 -> 0.5", "--rerun-changed", "new --out"):
        assert expected in message
    assert "width00064" not in message  # not finished: nothing to compare
    assert (out / "figure1.csv").read_text() == table, "nothing is rewritten"
    assert not (out / "cells" / "width00064").exists(), "nothing runs before the changes are settled"

    rows = figure1(out, "--trainer.max_epochs=2", "--model.init_args.optimizer.lr=0.5", "--rerun-changed",
                   widths=("4", "16", "64"))
    assert epochs_per_cell(rows) == {"width00004": 2, "width00016": 2, "width00064": 2}
    for cell in ("width00004", "width00016", "width00064"):
        config = record(out / "cells" / cell)["identity"]["config"]
        assert config["model"]["init_args"]["optimizer"]["init_args"]["lr"] == 0.5
    assert figure1(out, "--trainer.max_epochs=2", "--model.init_args.optimizer.lr=0.5",
                   widths=("4", "16", "64")) == rows, "the same settings reuse every cell"


def test_another_dataset_is_not_taken_from_a_folder_of_digits_cells(tmp_path):
    out = tmp_path / "r3"
    figure1(out)
    table = (out / "figure1.csv").read_text()
    with pytest.raises(SystemExit) as stop:
        run(["figure1", "--dataset", "mnist", "--out", str(out), "--widths", "4", *SMALL])
    assert "data.class_path: pl_pathsgd.data.DigitsDataModule -> pl_pathsgd.data.MNISTDataModule" in str(stop.value.code)
    assert (out / "figure1.csv").read_text() == table


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">I", 0x800 | array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def _mnist_files(root: Path, label_shift: int = 0) -> None:
    rng = np.random.default_rng(0)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, count in (("train", 200), ("t10k", 50)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (count, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", (rng.integers(0, 10, count) + label_shift) % 10)


def _custom_data_option() -> list[str]:
    """Files that are not the official release need ``custom_data`` where the DataModule checks them."""
    from pl_pathsgd.data import MNISTDataModule

    names = {name for cls in MNISTDataModule.__mro__ if "__init__" in vars(cls)
             for name in inspect.signature(cls.__init__).parameters}
    return ["--data.init_args.custom_data=true"] if "custom_data" in names else []


def test_a_changed_data_file_is_noticed_although_every_option_is_the_same(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    _mnist_files(data)
    args = ["figure1", "--dataset", "mnist", "--out", str(out), "--widths", "4", *SMALL,
            f"--data.init_args.data_dir={data}", "--data.init_args.val_size=50", *_custom_data_option()]
    run(args)
    assert run(args), "the same files: reused"
    _mnist_files(data, label_shift=1)  # relabelled files, same names and sizes
    with pytest.raises(SystemExit) as stop:
        run(args)
    assert "data files (MNIST/raw/t" in str(stop.value.code)


@pytest.mark.parametrize("figure, option, key", [
    ("figure1", "--model.init_args.hidden=[8]", "model.hidden"),
    ("figure1", "--model.hidden=[8]", "model.hidden"),
    ("figure2", "--model.init_args.init=unbalanced", "model.init"),
    ("figure3", "--model.init_args.optimizer=SGD", "model.optimizer"),
    ("figure3", "--model.init_args.optimizer.lr=0.5", "model.optimizer.lr"),
    ("figure3", "--model.init_args.optimizer.init_args.lr=0.5", "model.optimizer.lr"),
    ("figure3", "--model.init_args.init=balanced", "model.init"),
    ("figure3", "--model.init_args.dropout=0.5", "model.dropout"),
])
def test_an_override_of_a_swept_option_is_refused_by_name(tmp_path, capsys, figure, option, key):
    with pytest.raises(SystemExit):
        run([figure, "--smoke", "--out", str(tmp_path), *SMALL, option])
    error = capsys.readouterr().err
    assert f"overrides {key}, which {figure} sweeps" in error
    assert not (tmp_path / "cells").exists()


def test_a_config_that_replaces_a_swept_value_is_refused_before_any_cell_runs(tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text("model:\n  init_args:\n    hidden: [8]\n")
    with pytest.raises(SystemExit) as stop:
        figure1(tmp_path / "out", "--config", str(extra), widths=("4", "256"))
    message = str(stop.value.code)
    assert "model.init_args.hidden is [8] in cell width00004, which the sweep sets to [4]" in message
    assert not (tmp_path / "out" / "cells").exists()


def test_out_pointing_at_a_file_gets_a_one_line_message(tmp_path, capsys):
    target = tmp_path / "results.csv"
    target.write_text("not a folder")
    with pytest.raises(SystemExit):
        figure1(target)
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"--out {target} is a file; give a folder" in error
    assert target.read_text() == "not a folder"


def test_a_cell_records_what_determines_its_result(tmp_path):
    figure1(tmp_path)
    recorded = record(tmp_path / "cells" / "width00004")
    identity = recorded["identity"]
    assert identity["config"]["model"]["init_args"]["hidden"] == [4]
    assert identity["config"]["seed_everything"] == 0
    assert "logger" not in identity["config"]["trainer"], "where results are written is not part of them"
    assert identity["data"] is None  # the digits ship with scikit-learn: the options identify them
    assert set(identity["versions"]) == {"pl_pathsgd", "torch", "lightning"}
    assert json.dumps(recorded["config"])  # the full resolved config is kept beside it
    assert len(recorded["epochs"]) == 1


def test_a_cell_folder_with_other_files_is_not_emptied(tmp_path, capsys):
    cell = tmp_path / "cells" / "width00004"
    cell.mkdir(parents=True)
    (cell / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        figure1(tmp_path)
    assert "holds files that no cell writes (notes.txt)" in capsys.readouterr().err
    assert (cell / "notes.txt").read_text() == "mine"
