"""Figure 2a's third curve: SGD with Rebalance (l2, every epoch, and at the start) from the unbalanced init, a
cell of its own whose provenance names the callback; the other cells stay as they were."""

from __future__ import annotations

import json
import shutil

import pytest

from pl_pathsgd.experiments.cell import read_result
from pl_pathsgd.experiments.claims import RECOVERED, check_claims
from pl_pathsgd.experiments.grids import REBALANCE, figure2_cells
from pl_pathsgd.experiments.runner import run

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*(log_every_n_steps|does not have many workers|LeafSpec|litlogger|litmodels|in eval mode).*"
)


def rebalances(cell_dir) -> list[dict]:
    config = read_result(cell_dir)["identity"]["config"]
    return [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("Rebalance")]


def test_the_grid_has_a_rebalanced_cell():
    cells = figure2_cells()
    assert [c.name for c in cells] == ["balanced", "unbalanced", "unbalanced-rebalanced"]
    assert [c.callbacks for c in cells] == [(), (), (REBALANCE,)]
    assert cells[2].meta == {"method": "sgd", "init": "unbalanced", "variant": "rebalanced"}
    assert cells[2].sets == {"model.init_args.init": "unbalanced"}


def test_the_new_cell_joins_finished_cells_without_rerunning_them(tmp_path, capsys):
    """A folder whose balanced and unbalanced cells are finished (as a sweep before this cell existed left it)
    gets the rebalanced cell only; its provenance records Rebalance with its settings, the others' do not."""
    args = ["figure2", "--smoke", "--out", str(tmp_path), "--trainer.max_epochs=2"]
    first = run(args)
    capsys.readouterr()
    rebalanced_dir = tmp_path / "cells" / "unbalanced-rebalanced"
    shutil.rmtree(rebalanced_dir)  # as if that cell had never been part of the sweep
    again = run(args)
    printed = capsys.readouterr().out
    assert printed.count("finished earlier with these settings, reused") == 2
    assert "[figure2 digits unbalanced-rebalanced] cell 1/1 to run" in printed
    assert [{**r, "seconds": None} for r in again] == [{**r, "seconds": None} for r in first]  # the same numbers
    assert rebalances(tmp_path / "cells" / "balanced") == rebalances(tmp_path / "cells" / "unbalanced") == []
    (recorded,) = rebalances(rebalanced_dir)
    assert {k: recorded["init_args"][k] for k in REBALANCE["init_args"]} == REBALANCE["init_args"]
    # Rebalance acted: the rebalanced run leaves the unbalanced one far behind from the first epoch on
    by_cell = {r["cell"]: r for r in first if r["epoch"] == 1}
    assert by_cell["unbalanced-rebalanced"]["train_loss"] < by_cell["unbalanced"]["train_loss"] / 1.2


def test_rebalance_cannot_be_given_to_every_cell_nor_taken_from_its_own(tmp_path, capsys):
    everywhere = json.dumps({"class_path": "pl_pathsgd.callbacks.Rebalance"})
    with pytest.raises(SystemExit) as stop:
        run(["figure2", "--smoke", "--out", str(tmp_path), f"--trainer.callbacks+={everywhere}"])
    assert "cell balanced would run with 1 Rebalance callback(s) where figure2 gives it 0" in str(stop.value.code)
    assert not (tmp_path / "cells").exists()
    # replacing the config's callbacks cannot remove the cell's own: it is appended after every override
    run(["figure2", "--smoke", "--out", str(tmp_path), "--print-commands",
         '--trainer.callbacks=[{"class_path": "pl_pathsgd.callbacks.EpochErrorMonitor"}]'])
    commands = capsys.readouterr().out.splitlines()
    assert ["pl_pathsgd.callbacks.Rebalance" in c for c in commands] == [False, False, True]


def curve_rows(name: str, init: str, variant: str | None, losses: list[float]) -> list[dict]:
    return [{"cell": name, "method": "sgd", "init": init, "variant": variant, "epoch": i + 1, "train_loss": loss}
            for i, loss in enumerate(losses)]


@pytest.mark.parametrize("rebalanced_end, recovered", [(0.17, True), (0.25 * RECOVERED, True), (0.3, False)])
def test_the_recovery_claim(rebalanced_end, recovered):
    rows = curve_rows("balanced", "balanced", None, [1.0, 0.5, 0.25]) + \
        curve_rows("unbalanced", "unbalanced", None, [1.8, 1.6, 1.5]) + \
        curve_rows("unbalanced-rebalanced", "unbalanced", "rebalanced", [0.9, 0.4, rebalanced_end])
    slower, recovery = check_claims("figure2", rows)
    assert slower[1] and recovery[1] is recovered
    assert f"{rebalanced_end:.4g} vs 0.25" in recovery[2]
