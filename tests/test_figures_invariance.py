"""Figure 3's invariance claim, checked against a control: PerturbWeights moves the weights by one unit in the
last place (seeded, nothing else touched), figure3 adds a control cell per Path-SGD step size, and the claim
compares Path-SGD's balanced/unbalanced gap with the control's (and is strict in float64)."""

from __future__ import annotations

import json
import math

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from pl_pathsgd.experiments import PerturbWeights
from pl_pathsgd.experiments.callbacks import perturb_
from pl_pathsgd.experiments.cell import read_result
from pl_pathsgd.experiments.claims import CONTROL_MULTIPLE, FLOAT64_GAP, check_claims
from pl_pathsgd.experiments.grids import PERTURB, config_path, figure3_cells
from pl_pathsgd.experiments.runner import run
from pl_pathsgd.experiments.summaries import invariance_gaps
from tests.test_callbacks_contract import (
    ContractModule,
    NoisyDataset,
    Scenario,
    assert_identical,
    fit_and_capture,
)

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*(log_every_n_steps|does not have many workers|LeafSpec|litlogger|litmodels|in eval mode).*"
)


# ----------------------------------------------------------------------------- PerturbWeights


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_nonzero_entry_moves_to_a_neighbour(dtype):
    generator = torch.Generator().manual_seed(0)
    weights, biases = torch.randn(40, 30, generator=generator, dtype=dtype), torch.zeros(40, dtype=dtype)
    before = [weights.clone(), biases.clone()]
    rng = torch.get_rng_state()
    changed, relative = perturb_([weights, biases], None, seed=3)
    up, down = torch.nextafter(before[0], torch.tensor(math.inf, dtype=dtype)), \
        torch.nextafter(before[0], torch.tensor(-math.inf, dtype=dtype))
    moved_up, moved_down = weights == up, weights == down
    assert bool((moved_up | moved_down).all()) and 0.3 < moved_up.double().mean() < 0.7  # both ways, at random
    assert torch.equal(biases, before[1])  # a relative perturbation of 0 is 0
    assert changed == weights.numel()
    eps = torch.finfo(dtype).eps
    assert eps / 4 < relative <= eps
    assert torch.equal(torch.get_rng_state(), rng)  # a private generator

    again = before[0].clone()
    perturb_([again], None, seed=3)
    assert torch.equal(again, weights)  # seeded
    other = before[0].clone()
    perturb_([other], None, seed=4)
    assert not torch.equal(other, weights)


def test_a_relative_perturbation_and_one_below_the_rounding():
    weights = torch.randn(20, 10, dtype=torch.float64)
    before = weights.clone()
    changed, relative = perturb_([weights], 1e-7, seed=0)
    ratio = weights / before
    assert torch.allclose((ratio - 1).abs(), torch.full_like(ratio, 1e-7), rtol=1e-8, atol=0)
    assert changed == weights.numel() and relative == pytest.approx(1e-7, rel=1e-6)
    small = torch.randn(20, 10)
    kept = small.clone()
    with pytest.raises(ValueError, match="changed no weight.*below the rounding"):
        perturb_([small], 1e-12, seed=0)  # float32 cannot hold it
    assert torch.equal(small, kept)


@pytest.mark.parametrize("kwargs, match", [
    ({"relative": 0}, "relative"), ({"relative": 1.5}, "relative"), ({"relative": True}, "relative"),
    ({"relative": "1e-7"}, "relative"), ({"seed": -1}, "seed"), ({"seed": 0.5}, "seed"),
])
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PerturbWeights(**kwargs)


def test_it_changes_the_weights_at_the_start_and_nothing_else(tmp_path_factory):
    """The control differs from the run it controls by its weights only: the same batches reach the same steps
    in the same modes, and every global random state ends the same."""
    scenario = Scenario("pathsgd")
    reference = fit_and_capture(scenario, [], tmp_path_factory.mktemp("reference"))
    perturbation = PerturbWeights()
    perturbed = fit_and_capture(scenario, [perturbation], tmp_path_factory.mktemp("perturbed"))
    for what in ("steps (modes, batch)", "torch rng", "numpy rng", "python rng"):
        assert_identical(perturbed[what], reference[what], what)
    assert perturbation.changed > 0
    weights = [k for k in reference["weights and buffers"] if k.endswith("weight")]
    assert any(not torch.equal(perturbed["weights and buffers"][k], reference["weights and buffers"][k]) for k in weights)


def test_a_resumed_fit_is_not_perturbed_again(tmp_path):
    def trainer(max_epochs, callbacks):
        return pl.Trainer(max_epochs=max_epochs, limit_train_batches=2, callbacks=callbacks, default_root_dir=tmp_path,
                          logger=CSVLogger(tmp_path), enable_progress_bar=False, enable_model_summary=False)

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt")
    first = PerturbWeights()
    trainer(1, [first, checkpoint]).fit(ContractModule("sgd"), DataLoader(NoisyDataset(), batch_size=8))
    assert first.changed > 0
    resumed, model = PerturbWeights(), ContractModule("sgd")
    trainer(2, [resumed]).fit(model, DataLoader(NoisyDataset(), batch_size=8), ckpt_path=checkpoint.best_model_path)
    assert resumed.changed == 0


# ----------------------------------------------------------------------------- the grid and its guards


def test_a_control_cell_per_pathsgd_step_size_with_both_inits():
    alphas = {"pathsgd": (1, 2), "sgd": (1,)}
    cells = figure3_cells(("pathsgd", "sgd"), ("balanced", "unbalanced"), alphas, 0.0)
    controls = [c for c in cells if c.callbacks]
    assert [c.name for c in controls] == ["pathsgd-balanced-perturbed-lr1e-1", "pathsgd-balanced-perturbed-lr1e-2"]
    assert all(c.callbacks == (PERTURB,) and c.meta["variant"] == "perturbed" and c.meta["init"] == "balanced"
               for c in controls)
    assert not [c for c in figure3_cells(("pathsgd",), ("balanced",), alphas, 0.0) if c.callbacks]
    assert not [c for c in figure3_cells(("pathsgd", "sgd"), ("balanced", "unbalanced"), alphas, 0.0, control=False)
                if c.callbacks]


def test_the_control_is_in_its_command_only_and_cannot_be_added_elsewhere(tmp_path, capsys):
    run(["figure3", "--smoke", "--out", str(tmp_path), "--methods", "pathsgd", "--print-commands"])
    commands = capsys.readouterr().out.splitlines()
    assert len(commands) == 3
    assert [("PerturbWeights" in c) for c in commands] == [False, False, True]
    run(["figure3", "--smoke", "--out", str(tmp_path), "--methods", "pathsgd", "--no-control", "--print-commands"])
    assert len(capsys.readouterr().out.splitlines()) == 2
    perturb_all = json.dumps({"class_path": "pl_pathsgd.experiments.PerturbWeights"})
    with pytest.raises(SystemExit) as stop:
        run(["figure3", "--smoke", "--out", str(tmp_path), "--methods", "pathsgd", f"--trainer.callbacks+={perturb_all}"])
    assert "would run with 1 PerturbWeights callback(s) where figure3 gives it 0" in str(stop.value.code)
    assert not (tmp_path / "cells").exists()


@pytest.mark.parametrize("dataset", ["mnist", "cifar10", "cifar100", "svhn"])
def test_the_paper_configs_of_figure3_run_in_float64(dataset):
    config = yaml.safe_load(config_path("figure3", dataset, False).read_text())
    assert config["trainer"]["precision"] == "64-true"


def test_float32_smoke_run_passes_against_its_control(tmp_path):
    """In float32, Path-SGD's two curves differ by rounding; the control shows how much rounding alone gives."""
    rows = run(["figure3", "--smoke", "--out", str(tmp_path), "--methods", "pathsgd", "sgd", "--alphas", "1",
                "--trainer.precision=32-true", "--trainer.max_epochs=2"])
    (gaps,) = invariance_gaps(rows)
    assert gaps["precision"] == "32-true"
    assert 0 < gaps["control"] < 1e-4 and 0 < gaps["pathsgd"] <= CONTROL_MULTIPLE * gaps["control"]
    assert gaps["sgd"] > 1e-2
    claims = check_claims("figure3", rows)
    assert [ok for _, ok, _ in claims] == [True, True, True], claims
    control = read_result(tmp_path / "cells" / "pathsgd-balanced-perturbed-lr1e-1")
    recorded = [c for c in control["identity"]["config"]["trainer"]["callbacks"]
                if c["class_path"] == PERTURB["class_path"]]
    assert recorded == [{"class_path": PERTURB["class_path"], "init_args": {"relative": None, "seed": 0}}]


# ----------------------------------------------------------------------------- the claim


def rows_of(losses: dict[tuple[str, str, str], list[float]], precision: str = "32-true", alpha: int = 2) -> list[dict]:
    rows = []
    for (method, init, variant), curve in losses.items():
        name = f"{method}-{init}{'-' + variant if variant else ''}-lr1e-{alpha}"
        rows += [{"cell": name, "method": method, "init": init, "variant": variant or None, "alpha": alpha,
                  "lr": 10.0**-alpha, "precision": precision, "epoch": epoch + 1, "train_loss": loss,
                  "val_error": 0.1} for epoch, loss in enumerate(curve)]
    return rows


def curves(pathsgd_gap: float, control_gap: float, sgd_gap: float = 0.5) -> dict:
    base = [1.0, 0.5, 0.25]
    return {("pathsgd", "balanced", ""): base,
            ("pathsgd", "unbalanced", ""): [base[0], base[1], base[2] * (1 + pathsgd_gap)],
            ("pathsgd", "balanced", "perturbed"): [base[0], base[1] * (1 + control_gap), base[2]],
            ("sgd", "balanced", ""): base, ("sgd", "unbalanced", ""): [b * (1 + sgd_gap) for b in base]}


def test_the_claim_compares_with_the_control():
    claim = check_claims("figure3", rows_of(curves(3e-6, 1e-6)))[0]
    assert claim[1] and "Path-SGD 3.00e-06" in claim[2] and "control" in claim[2] and "SGD 5.00e-01" in claim[2]
    assert not check_claims("figure3", rows_of(curves(3e-4, 1e-6)))[0][1]  # 300 times what rounding explains
    # a control that rounding left unmoved: the yardstick is the rounding unit itself
    assert check_claims("figure3", rows_of(curves(5e-7, 0.0)))[0][1]
    assert not check_claims("figure3", rows_of(curves(5e-6, 0.0)))[0][1]
    # SGD's gap must be far beyond rounding: a grid where it is not says so
    assert not check_claims("figure3", rows_of(curves(1e-7, 1e-6, sgd_gap=2e-6)))[1][1]


def test_float64_must_also_be_tiny():
    assert check_claims("figure3", rows_of(curves(4e-16, 3e-16), "64-true"))[0][1]
    # chaos amplifies rounding as much as the control shows, but float64 curves must still agree to 1e-6
    loose = check_claims("figure3", rows_of(curves(2e-5, 1e-5), "64-true"))[0]
    assert not loose[1] and f"<= {FLOAT64_GAP:g} in float64" in loose[2]


def test_without_a_control_only_float64_can_pass():
    no_control = {k: v for k, v in curves(4e-16, 0.0).items() if k[2] != "perturbed"}
    assert check_claims("figure3", rows_of(no_control, "64-true"))[0][1]
    claim = check_claims("figure3", rows_of({k: v for k, v in curves(1e-7, 0.0).items() if k[2] != "perturbed"}))[0]
    assert not claim[1] and "without --no-control" in claim[2]
