"""The Lightning callbacks, on a plain LightningModule that uses no pl_pathsgd mixin."""

from __future__ import annotations

import copy
import functools
import csv
import glob
import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pl_pathsgd as P
from pl_pathsgd.callbacks import (
    EpochErrorMonitor,
    InvarianceViolationError,
    PathNormMonitor,
    RescalingInvarianceCheck,
    TensorBoardExtras,
)
from pl_pathsgd.callbacks._common import p_label
from pl_pathsgd.data import DigitsDataModule
from pl_pathsgd.module import PathSGDClassifier

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*(log_every_n_steps|does not have many workers|LeafSpec|litlogger|litmodels|no `validation_step`).*"
)

N, FEATURES, CLASSES = 64, 5, 3


# ----------------------------------------------------------------------------- fixtures


def dataset(seed: int = 0, n: int = N, dtype=torch.float32) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=generator, dtype=dtype)
    y = torch.randint(CLASSES, (n,), generator=generator)
    return TensorDataset(x, y)


def mlp(dropout: float = 0.0) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(FEATURES, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, CLASSES)
    )


class Classifier(pl.LightningModule):
    """A plain LightningModule: forward gives logits, SGD or PathSGD in configure_optimizers."""

    def __init__(self, optimizer: str = "sgd", lr: float = 0.1, weight_decay: float = 0.0, dropout: float = 0.0,
                 network: nn.Module | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["network"])
        torch.manual_seed(0)
        self.net = network if network is not None else mlp(dropout)
        self.train_mode_seen_at_epoch_end: list[bool] = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("step_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_step_loss", nn.functional.cross_entropy(self(x), y))

    def on_train_epoch_end(self):
        self.train_mode_seen_at_epoch_end.append(self.training)

    def configure_optimizers(self):
        if self.hparams.optimizer == "pathsgd":
            return P.PathSGD(self.parameters(), lr=self.hparams.lr, model=self, weight_decay=self.hparams.weight_decay)
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


def trainer(tmp_path, callbacks, logger="csv", max_epochs=2, **kwargs) -> pl.Trainer:
    if logger == "csv":
        logger = CSVLogger(tmp_path, name="csv")
    elif logger == "tb":
        logger = TensorBoardLogger(tmp_path, name="tb")
    options = dict(max_epochs=max_epochs, limit_train_batches=3, default_root_dir=tmp_path, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False, logger=logger, callbacks=callbacks,
                   accelerator="cpu", devices=1)
    options.update(kwargs)
    return pl.Trainer(**options)


def loaders(batch_size: int = 16, shuffle: bool = False, dtype=torch.float32):
    train = DataLoader(dataset(0, dtype=dtype), batch_size=batch_size, shuffle=shuffle)
    val = DataLoader(dataset(1, n=40, dtype=dtype), batch_size=batch_size)
    return train, val


def read_csv(trainer_: pl.Trainer) -> dict[str, list[tuple[int, int, float]]]:
    """metric -> [(epoch, step, value)] from the CSVLogger's metrics.csv."""
    columns: dict[str, list[tuple[int, int, float]]] = {}
    with open(f"{trainer_.logger.log_dir}/metrics.csv") as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                if key not in ("epoch", "step") and value != "":
                    columns.setdefault(key, []).append((int(row["epoch"]), int(row["step"]), float(value)))
    return columns


def zero_one_error(model: nn.Module, data: TensorDataset) -> float:
    model.eval()
    with torch.no_grad():
        x, y = data.tensors
        return int((model(x).argmax(1) != y).sum()) / len(y)


# ----------------------------------------------------------------------------- PathNormMonitor


def test_path_norm_monitor_logs_the_path_norms_of_the_final_weights_each_epoch(tmp_path):
    model = Classifier()
    monitor = PathNormMonitor(p=(1, 2, math.inf, 1.5))
    run = trainer(tmp_path, [monitor])
    run.fit(model, *loaders())
    logged = read_csv(run)
    assert set(monitor.keys.values()) == {"path_norm/p1", "path_norm/p2", "path_norm/pinf", "path_norm/p1.5"}
    for p in (1, 2, math.inf, 1.5):
        values = logged[f"path_norm/{p_label(p)}"]
        assert [epoch for epoch, _, _ in values] == [0, 1]
        assert values[-1][2] == pytest.approx(float(P.path_norm(model.net, p)), rel=1e-9)
    assert logged["path_norm/p2"][0][2] != logged["path_norm/p2"][1][2]  # measured after each epoch, not once
    assert float(run.callback_metrics["path_norm/p2"]) == pytest.approx(float(P.path_norm(model, 2)), rel=1e-9)


def test_path_norm_monitor_step_interval_logs_every_batch(tmp_path):
    model = Classifier()
    run = trainer(tmp_path, [PathNormMonitor(p=2, logging_interval="step")], max_epochs=1, log_every_n_steps=1)
    run.fit(model, *loaders())
    values = read_csv(run)["path_norm/p2"]
    assert [step for _, step, _ in values] == [0, 1, 2]
    assert len({value for _, _, value in values}) == 3
    assert values[-1][2] == pytest.approx(float(P.path_norm(model, 2)), rel=1e-9)
    assert "path_norm/p1" not in read_csv(run)


class TrainOnly(pl.LightningModule):
    """A minimal LightningModule: no validation_step, no hyper-parameters."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = mlp()

    def forward(self, x):
        return self.body(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class FlattenFirst(TrainOnly):
    """forward flattens (N, 1, 5) inputs: the input shape cannot be inferred, it comes from the first batch."""

    def forward(self, x):
        return self.body(x.flatten(1))


def test_path_norm_monitor_takes_the_input_shape_from_the_first_batch(tmp_path):
    x, y = dataset().tensors
    model = FlattenFirst()
    with pytest.raises(P.PathGeometryError, match="cannot infer the input shape"):
        P.path_norm(model, 2)
    run = trainer(tmp_path, [PathNormMonitor(p=2)], max_epochs=1)
    run.fit(model, DataLoader(TensorDataset(x[:, None, :], y), batch_size=16))
    assert read_csv(run)["path_norm/p2"][-1][2] == pytest.approx(float(P.path_norm(model, 2, (1, FEATURES))), rel=1e-9)


class WithPathNetwork(Classifier):
    """The module's forward ends in log_softmax (no path decomposition); ``path_network`` names the ReLU network."""

    @property
    def path_network(self) -> nn.Module:
        return self.net

    def forward(self, x):
        return torch.log_softmax(self.net(x), dim=1)


def test_callbacks_use_path_network_when_the_module_defines_it(tmp_path):
    model = WithPathNetwork()
    run = trainer(tmp_path, [PathNormMonitor(p=2), RescalingInvarianceCheck()], max_epochs=1)
    run.fit(model, *loaders())
    logged = read_csv(run)
    assert logged["path_norm/p2"][-1][2] == pytest.approx(float(P.path_norm(model.net, 2)), rel=1e-9)
    assert logged["invariance/function"][-1][2] < 1e-5
    with pytest.raises(P.UnsupportedModelError):  # the module itself is not a path network
        P.path_norm(model, 2, (FEATURES,))


def test_unsupported_network_fails_at_fit_start_naming_the_layer(tmp_path):
    network = nn.Sequential(nn.Linear(FEATURES, 8), nn.Sigmoid(), nn.Linear(8, CLASSES))
    model = Classifier(network=network)
    before = copy.deepcopy(model.state_dict())
    run = trainer(tmp_path, [PathNormMonitor()])
    with pytest.raises(P.UnsupportedModelError, match=r"net\.1.*Sigmoid"):
        run.fit(model, *loaders())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # failed before training


# ----------------------------------------------------------------------------- RescalingInvarianceCheck


def fit_with_check(tmp_path, optimizer, dtype=torch.float32, **check_options):
    model = Classifier(optimizer=optimizer, lr=0.05).to(dtype)
    check = RescalingInvarianceCheck(**check_options)
    run = trainer(tmp_path, [check])
    run.fit(model, *loaders(dtype=dtype))
    return model, check, read_csv(run)


def test_invariance_check_path_sgd_is_invariant_and_sgd_is_not(tmp_path):
    model, check, logged = fit_with_check(tmp_path / "path", "pathsgd")
    for key in ("invariance/function", "invariance/path_norm"):
        assert [epoch for epoch, _, _ in logged[key]] == [0, 1]
        assert all(0 <= value < 1e-5 for _, _, value in logged[key])
    assert all(0 <= value < 1e-4 for _, _, value in logged["invariance/update"])
    assert check.checks_done == 2 and check.last["invariance/update"] == logged["invariance/update"][-1][2]

    _, _, logged_sgd = fit_with_check(tmp_path / "sgd", "sgd")
    assert all(value < 1e-5 for _, _, value in logged_sgd["invariance/function"])
    assert all(value > 1e-2 for _, _, value in logged_sgd["invariance/update"])

    # the training model is never touched: the same run without the callback ends on the same weights
    reference = Classifier(optimizer="pathsgd", lr=0.05)
    trainer(tmp_path / "ref", []).fit(reference, *loaders())
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a, b)


def test_invariance_check_in_float64_reaches_round_off(tmp_path):
    _, _, logged = fit_with_check(tmp_path, "pathsgd", dtype=torch.float64, every_n_epochs=2)
    assert [epoch for epoch, _, _ in logged["invariance/update"]] == [1]  # every second epoch only
    assert logged["invariance/function"][0][2] < 1e-12
    assert logged["invariance/path_norm"][0][2] < 1e-12
    assert logged["invariance/update"][0][2] < 1e-10


def test_invariance_check_tolerance_raises_when_path_sgd_is_not_invariant(tmp_path):
    model = Classifier(optimizer="pathsgd", lr=0.05, weight_decay=0.5)  # weight decay breaks Theorem 5.1
    run = trainer(tmp_path, [RescalingInvarianceCheck(tolerance=1e-4)])
    with pytest.raises(InvarianceViolationError, match=r"relative gap .* > tolerance 1\.000e-04") as info:
        run.fit(model, *loaders())
    assert isinstance(info.value, RuntimeError)
    assert "weight_decay" in str(info.value)


def test_invariance_check_tolerance_is_only_for_path_sgd(tmp_path):
    _, check, logged = fit_with_check(tmp_path, "sgd", tolerance=1e-4)
    assert check.checks_done == 2 and logged["invariance/update"][-1][2] > 1e-2  # logged, not raised


def test_invariance_check_warns_and_skips_without_rescalable_units(tmp_path):
    model = Classifier(network=nn.Linear(FEATURES, CLASSES))
    run = trainer(tmp_path, [RescalingInvarianceCheck()])
    with pytest.warns(UserWarning, match="no rescalable hidden units") as record:
        run.fit(model, *loaders())
    assert sum("no rescalable" in str(w.message) for w in record) == 1  # once, not every epoch
    assert not any(key.startswith("invariance/") for key in read_csv(run))


def test_invariance_check_state_round_trips_through_a_checkpoint(tmp_path):
    check = RescalingInvarianceCheck(seed=3)
    model = Classifier(optimizer="pathsgd")
    run = trainer(tmp_path, [check, ModelCheckpoint(dirpath=tmp_path / "ckpt")], enable_checkpointing=True)
    run.fit(model, *loaders())
    saved = torch.load(glob.glob(str(tmp_path / "ckpt" / "*.ckpt"))[0], weights_only=True)["callbacks"]
    state = saved[check.state_key]
    first_x, first_y = loaders()[0].dataset.tensors[0][:16], loaders()[0].dataset.tensors[1][:16]
    assert torch.equal(state["probe"][0], first_x) and torch.equal(state["probe"][1], first_y)
    assert state["checks_done"] == 2 and state["last"] == check.last

    restored = RescalingInvarianceCheck(seed=3)
    assert restored.state_key == check.state_key != RescalingInvarianceCheck(seed=4).state_key
    restored.load_state_dict(state)
    assert torch.equal(restored.probe[0], check.probe[0]) and restored.checks_done == 2
    assert restored.factors({"net.0": 16}, 1)["net.0"].tolist() == check.factors({"net.0": 16}, 1)["net.0"].tolist()
    factors = restored.factors({"net.0": 1000}, 0)["net.0"]
    assert 1e-3 <= float(factors.min()) < 1e-2 and 1e2 < float(factors.max()) <= 1e3  # log-uniform over the range


# ----------------------------------------------------------------------------- EpochErrorMonitor


def test_error_monitor_measures_the_full_sets_each_epoch(tmp_path):
    model = Classifier(dropout=0.5)
    train, val = loaders(shuffle=True)
    train = DataLoader(train.dataset, batch_size=16, shuffle=True, drop_last=True)
    test = DataLoader(dataset(2, n=48), batch_size=10)
    run = trainer(tmp_path, [EpochErrorMonitor(val=True, test_dataloader=test, eval_batch_size=7)],
                  limit_train_batches=2)
    run.fit(model, train, val)
    logged = read_csv(run)
    for split in ("train", "val", "test"):
        assert [epoch for epoch, _, _ in logged[f"{split}/error"]] == [0, 1]  # test metrics during fit
        assert [epoch for epoch, _, _ in logged[f"{split}/loss"]] == [0, 1]
    # the whole training set (not the 2 x 16 examples of the epoch), in eval mode, with the final weights
    assert logged["train/error"][-1][2] == pytest.approx(zero_one_error(model, train.dataset), abs=1e-12)
    assert logged["val/error"][-1][2] == pytest.approx(zero_one_error(model, val.dataset), abs=1e-12)
    assert logged["test/error"][-1][2] == pytest.approx(zero_one_error(model, test.dataset), abs=1e-12)
    x, y = test.dataset.tensors
    with torch.no_grad():
        expected_loss = float(nn.functional.cross_entropy(model(x), y))
    assert logged["test/loss"][-1][2] == pytest.approx(expected_loss, rel=1e-6)
    assert model.train_mode_seen_at_epoch_end == [True, True]  # train mode restored after measuring
    assert float(run.callback_metrics["val/error"]) == logged["val/error"][-1][2]


def test_error_monitor_measures_the_validation_data_given_to_fit_without_validation_step(tmp_path):
    model = TrainOnly()
    train, val = loaders()
    run = trainer(tmp_path, [EpochErrorMonitor(test=False)], max_epochs=1)
    run.fit(model, train, val)
    assert run.val_dataloaders is None  # Lightning itself skipped validation
    assert read_csv(run)["val/error"][-1][2] == pytest.approx(zero_one_error(model, val.dataset), abs=1e-12)


class DataModule(pl.LightningDataModule):
    def __init__(self, with_test: bool = True):
        super().__init__()
        self.train_set, self.val_set = dataset(0), dataset(1, n=40)
        self.test_set = dataset(2, n=48) if with_test else None
        self.train_eval_calls = 0

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=16, shuffle=True)

    def train_eval_dataloader(self):
        self.train_eval_calls += 1
        return DataLoader(TensorDataset(*(t[:32] for t in self.train_set.tensors)), batch_size=8)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=16)

    def test_dataloader(self):
        if self.test_set is None:
            raise RuntimeError("no test split in this datamodule")
        return DataLoader(self.test_set, batch_size=16)


def test_error_monitor_uses_the_datamodule_train_eval_and_test_loaders(tmp_path):
    model, data = Classifier(), DataModule()
    run = trainer(tmp_path, [EpochErrorMonitor(val=False)])
    run.fit(model, datamodule=data)
    logged = read_csv(run)
    eval_subset = TensorDataset(*(t[:32] for t in data.train_set.tensors))
    assert logged["train/error"][-1][2] == pytest.approx(zero_one_error(model, eval_subset), abs=1e-12)
    assert data.train_eval_calls == 1  # built once per fit, reused every epoch
    assert logged["test/error"][-1][2] == pytest.approx(zero_one_error(model, data.test_set), abs=1e-12)
    assert "val/error" not in logged


def test_error_monitor_skips_a_missing_test_set_with_one_warning(tmp_path):
    run = trainer(tmp_path, [EpochErrorMonitor()])
    with pytest.warns(UserWarning, match="test_dataloader") as record:
        run.fit(Classifier(), datamodule=DataModule(with_test=False))
    assert sum("test" in str(w.message) and "EpochErrorMonitor" in str(w.message) for w in record) == 1
    logged = read_csv(run)
    assert "test/error" not in logged and len(logged["train/error"]) == 2


# ----------------------------------------------------------------------------- TensorBoardExtras


def test_tensorboard_extras_without_tensorboard_logger_warns_and_does_nothing(tmp_path):
    extras = TensorBoardExtras()
    run = trainer(tmp_path, [EpochErrorMonitor(test=False), extras], max_epochs=1)
    with pytest.warns(UserWarning, match="needs a TensorBoardLogger"):
        run.fit(Classifier(), *loaders())
    assert read_csv(run)["train/error"]  # the run itself went on


@pytest.mark.parametrize(
    "make", [PathNormMonitor, RescalingInvarianceCheck, EpochErrorMonitor, TensorBoardExtras], ids=lambda c: c.__name__
)
def test_callbacks_require_a_logger(tmp_path, make):
    run = trainer(tmp_path, [make()], logger=False, max_epochs=1)
    with pytest.raises(MisconfigurationException, match=f"{make.__name__}.*logger"):
        run.fit(Classifier(), *loaders())


# ----------------------------------------------------------------------------- argument checks


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: PathNormMonitor(p=0.5), "p must be a number >= 1"),
        (lambda: PathNormMonitor(p=(2, 2.0)), "repeats"),
        (lambda: PathNormMonitor(p=()), "at least one"),
        (lambda: PathNormMonitor(p="2"), "p must be a number"),
        (lambda: PathNormMonitor(p=-math.inf), "p must be a number"),
        (lambda: PathNormMonitor(logging_interval="batch"), "'epoch' or 'step'"),
        (lambda: PathNormMonitor(input_shape=(0, 3)), "input_shape"),
        (lambda: RescalingInvarianceCheck(every_n_epochs=0), "every_n_epochs"),
        (lambda: RescalingInvarianceCheck(min_factor=0), "min_factor"),
        (lambda: RescalingInvarianceCheck(max_factor=math.inf), "max_factor"),
        (lambda: RescalingInvarianceCheck(min_factor=10, max_factor=1), "must not exceed"),
        (lambda: RescalingInvarianceCheck(tolerance=-1), "tolerance"),
        (lambda: RescalingInvarianceCheck(seed=1.5), "seed"),
        (lambda: RescalingInvarianceCheck(loss_fn="ce"), "loss_fn"),
        (lambda: EpochErrorMonitor(train=False, val=False, test=False), "measure nothing"),
        (lambda: EpochErrorMonitor(test_dataloader=3), "test_dataloader"),
        (lambda: EpochErrorMonitor(loss_fn=1), "loss_fn"),
        (lambda: TensorBoardExtras(curves=[""]), "curves"),
        (lambda: TensorBoardExtras(layout={"a": {"b": ["Pie", []]}}), "layout"),
    ],
)
def test_bad_arguments_raise_clear_value_errors(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_p_labels():
    assert [p_label(p) for p in (1, 2.0, 3, 1.5, math.inf)] == ["p1", "p2", "p3", "p1.5", "pinf"]


def test_error_monitor_leaves_validation_to_a_module_that_logs_it(tmp_path):
    """val=None (default): a module whose validation loop logs val/error is not measured twice."""
    def fit(monitor):
        module = PathSGDClassifier(input_shape=(64,), hidden=[16], optimizer=functools.partial(P.PathSGD, lr=0.01))
        trainer = pl.Trainer(max_epochs=2, logger=CSVLogger(tmp_path), callbacks=[monitor], limit_train_batches=2,
                             enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)
        trainer.fit(module, datamodule=DigitsDataModule())
        rows = list(csv.DictReader(open(f"{trainer.logger.log_dir}/metrics.csv")))
        return [r for r in rows if r.get("val/error")], [r for r in rows if r.get("train/error")], trainer

    val_rows, train_rows, _ = fit(EpochErrorMonitor())
    assert len(val_rows) == 2 and len(train_rows) == 2  # one val/error per epoch, from the validation loop
    val_rows, _, run = fit(EpochErrorMonitor(val=True))
    assert len(val_rows) == 2  # asked for explicitly: still one value per validation run
    assert float(run.callback_metrics["val/error"]) == pytest.approx(  # the module's float32 mean, logged last
        zero_one_error(run.lightning_module, run.datamodule.val_dataset), abs=1e-6)


# ----------------------------------------------------------------------------- one graph per network and shape


def test_invariance_path_norm_gap_is_measured_on_the_rescaled_copy(tmp_path, monkeypatch):
    """A transformation that is not a rescaling (it doubles every weight of the copy) must show in the gap."""
    import pl_pathsgd.callbacks.invariance as invariance

    def doubling(graph, factors):
        with torch.no_grad():
            for parameter in graph.model.parameters():
                parameter.mul_(2)

    monkeypatch.setattr(invariance, "rescale_units", doubling)
    check = RescalingInvarianceCheck()
    network = nn.Sequential(nn.Linear(FEATURES, 8, bias=False), nn.ReLU(), nn.Linear(8, 8, bias=False), nn.ReLU(),
                            nn.Linear(8, CLASSES, bias=False))
    trainer(tmp_path, [check], max_epochs=1).fit(Classifier(network=network), *loaders())
    assert check.last["invariance/path_norm"] == pytest.approx(2**3 - 1, rel=1e-6)  # every path x 8
    assert check.last["invariance/function"] > 1


def test_path_sgd_and_the_callbacks_trace_the_network_once(tmp_path):
    model = Classifier(optimizer="pathsgd")  # PathSGD(model=self): traced in configure_optimizers
    monitor, check = PathNormMonitor(), RescalingInvarianceCheck()
    before = P.paths.graph.TRACE_COUNT
    run = trainer(tmp_path, [monitor, check])
    run.fit(model, *loaders())
    assert check.checks_done == 2
    assert P.paths.graph.TRACE_COUNT - before == 1


def test_the_callbacks_share_the_optimizers_graph(tmp_path):
    model = Classifier(optimizer="pathsgd")
    monitor, check = PathNormMonitor(), RescalingInvarianceCheck()
    run = trainer(tmp_path, [monitor, check])
    run.fit(model, *loaders())
    assert monitor.graph is check.graph is run.optimizers[0].graph


def test_example_input_array_gives_the_shape_and_one_trace_serves_all(tmp_path):
    x, y = dataset().tensors
    model = FlattenFirst()
    model.example_input_array = torch.zeros(2, 1, FEATURES)
    monitor, check = PathNormMonitor(p=2), RescalingInvarianceCheck()
    before = P.paths.graph.TRACE_COUNT
    run = trainer(tmp_path, [monitor, check], max_epochs=1)
    run.fit(model, DataLoader(TensorDataset(x[:, None, :], y), batch_size=16))
    assert P.paths.graph.TRACE_COUNT - before == 1  # SGD here: the check's copy is bound, not traced
    assert monitor.graph is check.graph and tuple(monitor.graph.input_shape) == (1, FEATURES)
    assert check.last["invariance/function"] < 1e-5


def test_path_input_shape_is_not_consulted(tmp_path):
    model = TrainOnly()
    model.path_input_shape = (999,)  # the attribute the mixin used to have: ignored
    monitor = PathNormMonitor(p=2)
    trainer(tmp_path, [monitor], max_epochs=1).fit(model, loaders()[0])
    assert tuple(monitor.graph.input_shape) == (FEATURES,)


def test_an_input_shape_the_network_cannot_run_on_is_reported_with_its_source(tmp_path):
    model = TrainOnly()
    model.example_input_array = torch.zeros(2, FEATURES + 1)
    with pytest.raises(P.PathGeometryError, match=r"PathNormMonitor.*\(6,\).*example_input_array.*input_shape="):
        trainer(tmp_path, [PathNormMonitor()], max_epochs=1).fit(model, loaders()[0])


# ----------------------------------------------------------------------------- batches of any structure


class Pair:
    def __init__(self, pixels, digit):
        self.pixels, self.digit = pixels, digit


class PairModule(TrainOnly):
    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch.pixels), batch.digit)


def test_unpack_batch_reads_any_batch_structure(tmp_path):
    x, y = dataset().tensors
    loader = DataLoader(TensorDataset(x, y), batch_size=16, collate_fn=lambda rows: Pair(
        torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])))
    unpack = lambda batch: (batch.pixels, batch.digit)  # noqa: E731
    callbacks = [PathNormMonitor(unpack_batch=unpack), RescalingInvarianceCheck(unpack_batch=unpack),
                 EpochErrorMonitor(unpack_batch=unpack, test=False)]
    run = trainer(tmp_path, callbacks, max_epochs=1)
    run.fit(PairModule(), loader)
    assert read_csv(run)["train/error"][-1][2] == pytest.approx(zero_one_error(run.lightning_module, dataset()), abs=1e-12)
    assert "invariance/update" in read_csv(run) and "path_norm/p2" in read_csv(run)


def test_a_bad_unpack_batch_fails_before_training_saying_what_it_returned(tmp_path):
    model = TrainOnly()
    run = trainer(tmp_path, [EpochErrorMonitor(test=False, unpack_batch=lambda batch: batch[0])], max_epochs=1)
    with pytest.raises(P.callbacks.UnreadableBatchError, match=r"returned a tensor of shape \(64, 5\), not a pair"):
        run.fit(model, loaders()[0])
    assert run.global_step == 0


def test_default_unpack_batch():
    from pl_pathsgd.callbacks import default_unpack_batch

    x, y = torch.zeros(2, 3), torch.zeros(2)
    assert default_unpack_batch((x, y, "extra")) == (x, y)
    assert default_unpack_batch({"image": x, "label": y, "id": 3}) == (x, y)
    assert default_unpack_batch({"x": x}) == (x, None)
    assert default_unpack_batch(x) == (x, None)
    with pytest.raises(P.callbacks.UnreadableBatchError, match="keys"):
        default_unpack_batch({"pixels": x})


# ----------------------------------------------------------------------------- EpochErrorMonitor: data and validation


def test_error_monitor_slices_in_memory_tensors_and_reads_other_data_in_large_batches(tmp_path):
    from pl_pathsgd.callbacks._datasets import LoaderBatches, TensorSlices, whole_dataset_reader

    data = dataset()
    sliced = whole_dataset_reader(DataLoader(data, batch_size=8, shuffle=True), batch_size=50)
    assert isinstance(sliced, TensorSlices)
    assert [len(b[0]) for b in sliced.batches()] == [50, 14]
    assert torch.equal(torch.cat([b[0] for b in sliced.batches()]), data.tensors[0])  # every example, in order

    # a collate_fn that changes the batch: read through a DataLoader, still in batches of 50
    doubled = DataLoader(data, batch_size=8, collate_fn=lambda rows: (torch.stack([2 * r[0] for r in rows]),
                                                                      torch.stack([r[1] for r in rows])))
    reader = whole_dataset_reader(doubled, batch_size=50)
    assert isinstance(reader, LoaderBatches)
    assert [len(b[0]) for b in reader.batches()] == [50, 14]
    assert torch.equal(torch.cat([b[0] for b in reader.batches()]), 2 * data.tensors[0])

    # the package's DataModules: batch_size=None, a sampler of index batches, the dataset gathers: sliced too
    from pl_pathsgd.data.datasets import EpochBatchSampler, InMemoryDataset

    in_memory = InMemoryDataset(*data.tensors)
    module_loader = DataLoader(in_memory, batch_size=None, sampler=EpochBatchSampler(len(in_memory), 8, 3))
    sliced = whole_dataset_reader(module_loader, batch_size=50)
    assert isinstance(sliced, TensorSlices)
    assert torch.equal(torch.cat([b[0] for b in sliced.batches()]), data.tensors[0])

    # under DDP each rank reads every world-size-th example
    shares = [torch.cat([b[1] for b in whole_dataset_reader(DataLoader(data), 10, rank, 3).batches()])
              for rank in range(3)]
    assert torch.equal(torch.sort(torch.cat(shares)).values, torch.sort(data.tensors[1]).values)
    assert torch.equal(shares[1], data.tensors[1][1::3])


class EpochOrderSampler(torch.utils.data.Sampler):
    """A sampler with state of its own: each pass moves on to the next epoch's order."""

    def __init__(self, size):
        self.size, self.epoch = size, 0

    def __len__(self):
        return self.size

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.epoch)).tolist()
        self.epoch += 1
        return iter(order)


def test_error_monitor_never_advances_the_training_sampler_and_measures_what_it_draws(tmp_path):
    x, y = dataset().tensors
    sampler = EpochOrderSampler(len(y))
    run = trainer(tmp_path, [EpochErrorMonitor(val=False, test=False)], max_epochs=2)
    run.fit(TrainOnly(), DataLoader(TensorDataset(x, y), batch_size=16, sampler=sampler))
    assert sampler.epoch == 2  # one pass per training epoch, none for the measurements

    subset = list(range(10, 40))
    model = TrainOnly()
    run = trainer(tmp_path / "subset", [EpochErrorMonitor(val=False, test=False)], max_epochs=1)
    run.fit(model, DataLoader(TensorDataset(x, y), batch_size=16, sampler=torch.utils.data.SubsetRandomSampler(subset)))
    expected = zero_one_error(model, TensorDataset(x[subset], y[subset]))
    assert read_csv(run)["train/error"][-1][2] == pytest.approx(expected, abs=1e-12)


def val_epochs(run) -> list[tuple[int, int]]:
    return [(epoch, step) for epoch, step, _ in read_csv(run).get("val/error", [])]


def test_val_error_once_per_validation_run_whatever_the_trainer_says(tmp_path):
    def fit(name, **options):
        model = Classifier()
        run = trainer(tmp_path / name, [EpochErrorMonitor(val=True, test=False)], **options)
        run.fit(model, *loaders())
        return run, model

    run, _ = fit("interval", max_epochs=2, limit_train_batches=4, val_check_interval=0.5)
    assert val_epochs(run) == [(0, 1), (0, 3), (1, 5), (1, 7)]  # two validation runs per epoch
    run, model = fit("limited", max_epochs=2, limit_val_batches=1)
    assert [epoch for epoch, _ in val_epochs(run)] == [0, 1]
    # a limited validation run still gets the whole validation set measured
    assert read_csv(run)["val/error"][-1][2] == pytest.approx(zero_one_error(model, loaders()[1].dataset), abs=1e-12)
    run, _ = fit("every3", max_epochs=3, check_val_every_n_epoch=3)
    assert [epoch for epoch, _ in val_epochs(run)] == [2]
    run, _ = fit("off", max_epochs=1, limit_val_batches=0)
    assert val_epochs(run) == []


def test_without_validation_step_the_monitor_validates_on_lightnings_schedule(tmp_path):
    run = trainer(tmp_path, [EpochErrorMonitor(test=False)], max_epochs=4, check_val_every_n_epoch=2)
    run.fit(TrainOnly(), *loaders())
    assert [epoch for epoch, _ in val_epochs(run)] == [1, 3]
    assert [epoch for epoch, _, _ in read_csv(run)["train/error"]] == [0, 1, 2, 3]


def test_error_monitor_warns_when_the_module_validates_without_val_error(tmp_path):
    run = trainer(tmp_path, [EpochErrorMonitor(test=False)], max_epochs=1)
    with pytest.warns(UserWarning, match=r"validation_step does not log val/error; pass val=True"):
        run.fit(Classifier(), *loaders())
    assert val_epochs(run) == []


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_invariance_check_runs_on_the_device_asked_for(tmp_path, device):
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    results = {}
    for name, check in (("default", RescalingInvarianceCheck()), ("asked", RescalingInvarianceCheck(device=device))):
        model = Classifier(optimizer="pathsgd", lr=0.05)
        trainer(tmp_path / name, [check], max_epochs=1, accelerator=accelerator).fit(model, *loaders())
        results[name] = check.last
    assert results["asked"].keys() == results["default"].keys() == {
        "invariance/function", "invariance/path_norm", "invariance/update"}
    assert results["asked"]["invariance/update"] < 1e-3 and results["default"]["invariance/update"] < 1e-3


def test_error_monitor_without_validation_data_or_request_leaves_val_out_quietly(tmp_path, recwarn):
    run = trainer(tmp_path, [EpochErrorMonitor(test=False)], max_epochs=1)
    run.fit(TrainOnly(), loaders()[0])
    assert val_epochs(run) == [] and "train/error" in read_csv(run)
    assert not [w for w in recwarn if "EpochErrorMonitor" in str(w.message)]
    run = trainer(tmp_path / "asked", [EpochErrorMonitor(val=True, test=False)], max_epochs=1)
    with pytest.warns(UserWarning, match="no val data found"):
        run.fit(TrainOnly(), loaders()[0])
