"""The observer contract: a callback leaves a training run exactly as it would be without it.

With the callbacks on, a seeded fit must end with bit-identical weights and buffers, optimizer state and
global random states (torch CPU, CUDA when present, numpy, ``random``), and every training step must see
the same batch with every submodule in the same mode, as the same fit without them.

``OBSERVERS`` lists every callback of :mod:`pl_pathsgd.callbacks` (a test fails when an exported callback
is missing from it), and :func:`assert_observes_without_changing` is the check: a new callback joins the
list and must pass it too.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import pl_pathsgd.callbacks as callbacks_package
from pl_pathsgd import PathSGD
from pl_pathsgd.callbacks import (
    CapacityReport,
    EpochErrorMonitor,
    PathNormMonitor,
    RescalingInvarianceCheck,
    TensorBoardExtras,
)

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*(log_every_n_steps|does not have many workers|LeafSpec|litlogger|litmodels|in eval mode).*"
)

FEATURES, CLASSES = 6, 3


class NoisyDataset(Dataset):
    """Training examples with augmentation noise drawn from torch, numpy and ``random``: reading them
    outside the training loop moves all three global generators unless the reader restores them."""

    def __init__(self, n: int = 48):
        generator = torch.Generator().manual_seed(11)
        self.x = torch.randn(n, FEATURES, generator=generator)
        self.y = torch.randint(CLASSES, (n,), generator=generator)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int):
        noise = 0.01 * (torch.rand(FEATURES) + float(np.random.rand()) + random.random())
        return self.x[index] + noise, self.y[index]


def tensor_data(seed: int, n: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, FEATURES, generator=generator), torch.randint(CLASSES, (n,), generator=generator))


class ContractModule(pl.LightningModule):
    """Dropout, a BatchNorm frozen by ``.eval()``, momentum; records the modes and batch of every step."""

    def __init__(self, optimizer: str):
        super().__init__()
        self.optimizer_name = optimizer
        self.net = nn.Sequential(
            nn.Linear(FEATURES, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, CLASSES),
        )
        self.net[1].eval()  # frozen: normalises with its running statistics, which must not change
        self.steps: list[tuple] = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        modes = tuple(module.training for module in self.modules())
        self.steps.append((modes, x.sum().item(), tuple(y.tolist())))
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        if self.optimizer_name == "pathsgd":
            return PathSGD(self.parameters(), lr=0.05, momentum=0.9, model=self)
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


@dataclass(frozen=True)
class Scenario:
    optimizer: str
    accumulate: int = 1
    accelerator: str = "cpu"

    def __str__(self) -> str:
        return f"{self.optimizer}-accumulate{self.accumulate}-{self.accelerator}"


SCENARIOS = [Scenario("sgd"), Scenario("pathsgd"), Scenario("sgd", accumulate=2), Scenario("pathsgd", accumulate=2)]
if torch.cuda.is_available():
    SCENARIOS += [Scenario("sgd", accelerator="gpu"), Scenario("pathsgd", accumulate=2, accelerator="gpu")]


def make_test_loader() -> DataLoader:
    return DataLoader(tensor_data(2, 40), batch_size=16)


#: every callback of the package, as it is typically configured; the last entry runs them all together
OBSERVERS: dict[str, Callable[[], list[Callback]]] = {
    "PathNormMonitor": lambda: [PathNormMonitor(p=(1, 2, math.inf)), PathNormMonitor(p=2, logging_interval="step")],
    "RescalingInvarianceCheck": lambda: [RescalingInvarianceCheck(every_n_epochs=1)],
    "EpochErrorMonitor": lambda: [EpochErrorMonitor(val=True, test_dataloader=make_test_loader(), eval_batch_size=7)],
    "TensorBoardExtras": lambda: [TensorBoardExtras()],
    "CapacityReport": lambda: [CapacityReport(percentile=50, eval_batch_size=5)],
    "all": lambda: [PathNormMonitor(), RescalingInvarianceCheck(), EpochErrorMonitor(val=True, test_dataloader=make_test_loader()),
                    TensorBoardExtras(), CapacityReport()],
}


def fit_and_capture(scenario: Scenario, callbacks: list[Callback], root) -> dict[str, Any]:
    """Run the seeded fit of ``scenario`` with ``callbacks``; return everything the contract compares."""
    pl.seed_everything(1234, verbose=False)
    model = ContractModule(scenario.optimizer)
    train = DataLoader(NoisyDataset(), batch_size=8, shuffle=True)
    val = DataLoader(tensor_data(1, 24), batch_size=8)
    trainer = pl.Trainer(
        max_epochs=2, limit_train_batches=4, accumulate_grad_batches=scenario.accumulate, default_root_dir=root,
        logger=TensorBoardLogger(root, name="tb"), callbacks=callbacks, accelerator=scenario.accelerator, devices=1,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=1,
    )
    trainer.fit(model, train, val)
    return {
        "steps (modes, batch)": model.steps,
        "weights and buffers": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "optimizer state": trainer.optimizers[0].state_dict(),
        "torch rng": torch.get_rng_state(),
        "cuda rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy rng": np.random.get_state(),
        "python rng": random.getstate(),
        "trainer": trainer,
    }


def assert_identical(with_callbacks: Any, without: Any, what: str) -> None:
    if isinstance(without, torch.Tensor):
        assert isinstance(with_callbacks, torch.Tensor) and with_callbacks.dtype == without.dtype, what
        assert torch.equal(with_callbacks.cpu(), without.cpu()), f"{what} differs"
    elif isinstance(without, np.ndarray):
        assert np.array_equal(with_callbacks, without), f"{what} differs"
    elif isinstance(without, dict):
        assert with_callbacks.keys() == without.keys(), f"{what}: keys differ"
        for key in without:
            assert_identical(with_callbacks[key], without[key], f"{what}[{key!r}]")
    elif isinstance(without, (list, tuple)):
        assert len(with_callbacks) == len(without), f"{what}: lengths differ"
        for index, (a, b) in enumerate(zip(with_callbacks, without)):
            assert_identical(a, b, f"{what}[{index}]")
    else:
        assert with_callbacks == without, f"{what}: {with_callbacks!r} != {without!r}"


_REFERENCES: dict[Scenario, dict[str, Any]] = {}


def assert_observes_without_changing(make_callbacks: Callable[[], list[Callback]], scenario: Scenario,
                                     tmp_path_factory) -> pl.Trainer:
    """The contract: the fit with ``make_callbacks()`` ends exactly as the same fit without them."""
    if scenario not in _REFERENCES:
        _REFERENCES[scenario] = fit_and_capture(scenario, [], tmp_path_factory.mktemp("reference"))
    reference = _REFERENCES[scenario]
    observed = fit_and_capture(scenario, make_callbacks(), tmp_path_factory.mktemp("observed"))
    for what in reference:
        if what != "trainer":
            assert_identical(observed[what], reference[what], what)
    return observed["trainer"]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=str)
def test_all_callbacks_together_leave_the_run_unchanged(scenario, tmp_path_factory):
    trainer = assert_observes_without_changing(OBSERVERS["all"], scenario, tmp_path_factory)
    # and they did their work in that run
    for key in ("path_norm/p2", "invariance/update", "train/error", "val/error", "test/error", "capacity/rademacher"):
        assert key in trainer.callback_metrics, key


@pytest.mark.parametrize("name", [name for name in OBSERVERS if name != "all"])
def test_each_callback_leaves_the_run_unchanged(name, tmp_path_factory):
    assert_observes_without_changing(OBSERVERS[name], Scenario("pathsgd", accumulate=2), tmp_path_factory)


#: Callbacks that change the weights by design, by a rescaling that keeps the function: their contract is that
#: nothing else of the run changes (the batches, every module's mode, every random state) and that Path-SGD's
#: function trajectory stays the same; checked by ``tests/test_rebalance.py``.
RESCALERS = {"Rebalance"}


def test_every_callback_of_the_package_is_under_the_contract():
    exported = {name for name in callbacks_package.__all__
                if isinstance(getattr(callbacks_package, name), type) and issubclass(getattr(callbacks_package, name), Callback)}
    observers = exported - RESCALERS
    assert observers and observers <= set(OBSERVERS), f"add {sorted(observers - set(OBSERVERS))} to OBSERVERS"
    covered = {type(callback).__name__ for callback in OBSERVERS["all"]()}
    assert observers <= covered, f"add {sorted(observers - covered)} to OBSERVERS['all']"


def test_the_contract_catches_a_callback_that_changes_the_run(tmp_path_factory):
    """The check can fail: each way of disturbing a run is caught."""

    class ResetsModes(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            pl_module.eval()
            pl_module.train()

    class DrawsRandomNumbers(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            np.random.rand()

    class TouchesWeights(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            with torch.no_grad():
                pl_module.net[0].weight.mul_(1.0 + 1e-7)

    for disturbing, what in ((ResetsModes, "steps"), (DrawsRandomNumbers, "steps"), (TouchesWeights, "weights")):
        with pytest.raises(AssertionError, match=what):
            assert_observes_without_changing(lambda: [disturbing()], Scenario("sgd"), tmp_path_factory)
