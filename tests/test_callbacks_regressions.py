"""The cases reported against the callbacks (each failed before the callbacks became observers)."""

from __future__ import annotations

import copy
import csv
import gc
import weakref

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from pl_pathsgd import PathSGD
from pl_pathsgd.callbacks import EpochErrorMonitor, PathNormMonitor, RescalingInvarianceCheck

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*(log_every_n_steps|does not have many workers|LeafSpec|litlogger|litmodels|in eval mode"
    "|no `validation_step`).*"
)

FEATURES, CLASSES = 5, 3


def tensors(seed: int, n: int):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, FEATURES, generator=generator), torch.randint(CLASSES, (n,), generator=generator)


class Module(pl.LightningModule):
    def __init__(self, dropout: float = 0.0, frozen_batchnorm: bool = False, log_val_error: bool = False):
        super().__init__()
        torch.manual_seed(0)
        norm = nn.BatchNorm1d(16) if frozen_batchnorm else nn.Identity()
        self.net = nn.Sequential(nn.Linear(FEATURES, 16), norm, nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 8),
                                 nn.ReLU(), nn.Linear(8, CLASSES))
        if frozen_batchnorm:
            self.net[1].eval()
        self.log_val_error = log_val_error
        self.batchnorm_training_per_step: list[bool] = []
        self.steps = 0

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        self.steps += 1
        self.batchnorm_training_per_step.append(self.net[1].training)
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        if self.log_val_error:
            x, y = batch
            self.log("val/error", (self(x).argmax(1) != y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(tmp_path, model, callbacks, train=None, val=None, **options):
    settings = dict(max_epochs=2, limit_train_batches=3, default_root_dir=tmp_path, logger=CSVLogger(tmp_path),
                    callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False,
                    enable_checkpointing=False, num_sanity_val_steps=0)
    settings.update(options)
    trainer = pl.Trainer(**settings)
    train = train if train is not None else DataLoader(TensorDataset(*tensors(0, 48)), batch_size=8, shuffle=True)
    val = val if val is not None else DataLoader(TensorDataset(*tensors(1, 24)), batch_size=8)
    trainer.fit(model, train, val)
    return trainer


def logged_rows(trainer, key):
    with open(f"{trainer.logger.log_dir}/metrics.csv") as handle:
        return [(int(row["epoch"]), int(row["step"])) for row in csv.DictReader(handle) if row.get(key)]


def test_error_monitor_keeps_a_submodule_frozen_by_eval(tmp_path):
    without = Module(frozen_batchnorm=True)
    fit(tmp_path / "without", without, [])
    with_monitor = Module(frozen_batchnorm=True)
    fit(tmp_path / "with", with_monitor, [EpochErrorMonitor()])
    assert without.batchnorm_training_per_step == [False] * 6
    assert with_monitor.batchnorm_training_per_step == [False] * 6
    assert torch.equal(with_monitor.net[1].running_mean, without.net[1].running_mean)


def test_error_monitor_leaves_the_global_random_state_alone(tmp_path):
    runs = {}
    for name, callbacks in (("without", []), ("with", [EpochErrorMonitor()])):
        pl.seed_everything(7, verbose=False)
        model = Module(dropout=0.5)
        fit(tmp_path / name, model, callbacks)
        runs[name] = (copy.deepcopy(model.state_dict()), torch.get_rng_state())
    for key, value in runs["without"][0].items():
        assert torch.equal(runs["with"][0][key], value), key
    assert torch.equal(runs["with"][1], runs["without"][1])


@pytest.mark.parametrize("every", [2, 3])
def test_val_error_is_logged_once_per_validation_run_of_the_module(tmp_path, every):
    trainer = fit(tmp_path, Module(log_val_error=True), [EpochErrorMonitor()], max_epochs=4,
                  check_val_every_n_epoch=every)
    epochs = [epoch for epoch, _ in logged_rows(trainer, "val/error")]
    assert epochs == [e for e in range(4) if (e + 1) % every == 0]
    assert [epoch for epoch, _ in logged_rows(trainer, "train/error")] == [0, 1, 2, 3]


class DictBatches(Dataset):
    def __init__(self, keys=("x", "y")):
        self.x, self.y = tensors(0, 32)
        self.keys = keys

    def __len__(self):
        return len(self.y)

    def __getitem__(self, index):
        return {self.keys[0]: self.x[index], self.keys[1]: self.y[index]}


class DictModule(Module):
    def training_step(self, batch, batch_idx):
        self.steps += 1
        inputs = batch["x"] if "x" in batch else batch["pixels"]
        targets = batch["y"] if "y" in batch else batch["digit"]
        return nn.functional.cross_entropy(self(inputs), targets)

    def validation_step(self, batch, batch_idx):
        pass


def test_dict_batches_are_read_by_every_callback(tmp_path):
    loader = DataLoader(DictBatches(), batch_size=8)
    trainer = fit(tmp_path, DictModule(), [EpochErrorMonitor(val=True, test=False), RescalingInvarianceCheck(), PathNormMonitor()],
                  train=loader, val=DataLoader(DictBatches(), batch_size=8), max_epochs=1)
    for key in ("train/error", "val/error", "invariance/update", "invariance/function", "path_norm/p2"):
        assert key in trainer.callback_metrics, key


@pytest.mark.parametrize("make", [lambda: EpochErrorMonitor(test=False), lambda: RescalingInvarianceCheck()],
                         ids=["EpochErrorMonitor", "RescalingInvarianceCheck"])
def test_an_unreadable_batch_fails_before_any_training_step(tmp_path, make):
    model = DictModule()
    before = copy.deepcopy(model.state_dict())
    loader = DataLoader(DictBatches(keys=("pixels", "digit")), batch_size=8)
    with pytest.raises(ValueError, match=r"(?s)cannot read the first .* batch.*'pixels', 'digit'.*unpack_batch="):
        fit(tmp_path, model, [make()], train=loader, val=DataLoader(DictBatches(keys=("pixels", "digit"))))
    assert model.steps == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class CountedNet(nn.Sequential):
    """Records how many copies of the network are alive at once (a deep copy goes through __setstate__)."""

    alive: weakref.WeakSet = weakref.WeakSet()
    most_alive = 0

    def __setstate__(self, state):
        super().__setstate__(state)
        CountedNet.alive.add(self)
        CountedNet.most_alive = max(CountedNet.most_alive, len(CountedNet.alive))


class PathSGDModule(Module):
    def configure_optimizers(self):
        return PathSGD(self.parameters(), lr=0.05, momentum=0.9, model=self.net)


@pytest.mark.parametrize("make", [Module, PathSGDModule], ids=["SGD", "PathSGD"])
def test_invariance_check_holds_at_most_one_copy_of_the_network(tmp_path, make):
    model = make()
    model.net = CountedNet(*model.net)
    CountedNet.alive, CountedNet.most_alive = weakref.WeakSet(), 0
    check = RescalingInvarianceCheck()
    trainer = fit(tmp_path, model, [check], max_epochs=3)
    assert check.checks_done == 3 and "invariance/update" in trainer.callback_metrics
    assert CountedNet.most_alive == 1
    gc.collect()
    # none kept after the fit (an engine that must trace the copy for PathSGD may keep that one copy in its cache)
    assert len(CountedNet.alive) <= (0 if make is Module else 1)


def test_error_monitor_reads_a_plain_dataloader_over_a_tensor_dataset(tmp_path):
    x, y = tensors(3, 70)
    plain = DataLoader(TensorDataset(x, y), batch_size=32)
    model = Module()
    trainer = fit(tmp_path, model, [EpochErrorMonitor(train_dataloader=plain, val=False, test=False)], max_epochs=1)
    model.eval()
    with torch.no_grad():
        expected = int((model(x).argmax(1) != y).sum()) / len(y)
        expected_loss = float(nn.functional.cross_entropy(model(x), y))
    assert float(trainer.callback_metrics["train/error"]) == pytest.approx(expected, abs=1e-12)
    assert float(trainer.callback_metrics["train/loss"]) == pytest.approx(expected_loss, rel=1e-6)
