"""PathSGDMixin, the schedules and the ready classifier, on a real Trainer."""

from __future__ import annotations

import csv
import functools
import math
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import torchmetrics
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pl_pathsgd as P
from pl_pathsgd.module import PathSGDClassifier, PathSGDMixin
from pl_pathsgd.schedules import PaperSchedule, ReduceLROnPlateau

ROOT = Path(__file__).resolve().parents[1]


def tiny_loaders(n: int = 64, features: int = 6, classes: int = 3, batch_size: int = 16):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, features, generator=generator)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return DataLoader(TensorDataset(x, y % classes), batch_size=batch_size)


def image_loaders(n: int = 32, batch_size: int = 8):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 6, 6, generator=generator)
    return DataLoader(TensorDataset(x, (x.mean(dim=(1, 2, 3)) > 0).long()), batch_size=batch_size)


class UserModule(PathSGDMixin, pl.LightningModule):
    """A user's module: its own network, the optimizer and scheduler injected."""

    def __init__(self, optimizer=P.PathSGD, lr_scheduler=None, monitor="val/loss", example=True):
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, monitor=monitor)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
        if example:
            self.example_input_array = torch.zeros(1, 6)

    @property
    def path_network(self):
        return self.net

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("val/loss", loss)
        self.log("val/other", loss)


class ConvModule(UserModule):
    """A conv net: its input shape cannot be inferred from the network."""

    def __init__(self, **kwargs):
        super().__init__(example=False, **kwargs)
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(4, 2))


def trainer(tmp_path, **kwargs) -> pl.Trainer:
    options = dict(max_epochs=1, accelerator="cpu", default_root_dir=tmp_path, enable_progress_bar=False,
                   enable_model_summary=False, logger=False, enable_checkpointing=False)
    options.update(kwargs)
    return pl.Trainer(**options)


def make_pathsgd(params):
    """A plain factory function, as a user would write one."""
    return P.PathSGD(params, lr=0.05, momentum=0.5)


@pytest.mark.parametrize("factory", [
    P.PathSGD,
    functools.partial(P.PathSGD, lr=0.05, momentum=0.9),
    make_pathsgd,
    lambda params: P.PathSGD(params, lr=0.05),
    "pl_pathsgd.PathSGD",
    {"class_path": "pl_pathsgd.PathSGD", "init_args": {"lr": 0.05, "p": 1.5}},
], ids=["class", "partial", "function", "lambda", "import-path", "mapping"])
def test_mixin_binds_pathsgd_however_it_is_built(tmp_path, factory):
    module = UserModule(optimizer=factory)
    before = module.net[0].weight.detach().clone()
    run = trainer(tmp_path, limit_train_batches=2)
    run.fit(module, tiny_loaders())
    optimizer = run.optimizers[0]
    assert type(optimizer) is P.PathSGD and optimizer.is_bound
    assert optimizer.model is module.net  # the network to normalise, not the LightningModule
    assert optimizer.graph.input_shape == (6,)  # from example_input_array
    assert not torch.equal(module.net[0].weight, before)
    if isinstance(factory, dict):
        assert optimizer.p == 1.5 and optimizer.param_groups[0]["lr"] == 0.05


@pytest.mark.parametrize("cls", [torch.optim.SGD, torch.optim.Adagrad, torch.optim.Adam, torch.optim.RMSprop])
def test_mixin_takes_any_torch_optimizer_unchanged(tmp_path, cls):
    module = UserModule(optimizer=functools.partial(cls, lr=0.02))
    run = trainer(tmp_path, limit_train_batches=2)
    run.fit(module, tiny_loaders())
    assert type(run.optimizers[0]) is cls and run.optimizers[0].param_groups[0]["lr"] == 0.02


def test_mixin_binds_with_the_first_batch_when_there_is_no_example_input(tmp_path):
    seen = {}

    class Probe(pl.Callback):
        def on_train_start(self, trainer, pl_module):  # after configure_optimizers, before any batch
            seen["bound at start"] = trainer.optimizers[0].is_bound

    module = ConvModule()
    run = trainer(tmp_path, limit_train_batches=2, callbacks=[Probe()])
    run.fit(module, image_loaders())
    optimizer = run.optimizers[0]
    assert seen["bound at start"] is False
    assert optimizer.is_bound and optimizer.model is module.net and optimizer.graph.input_shape == (1, 6, 6)
    assert run.global_step == 2


def test_an_optimizer_bound_by_hand_is_left_as_it_is(tmp_path):
    graphs = []

    def bound_by_hand(params):
        optimizer = P.PathSGD(params, lr=0.05, model=module.net, input_shape=(6,))
        graphs.append(optimizer.graph)
        return optimizer

    module = UserModule(optimizer=bound_by_hand, example=False)
    run = trainer(tmp_path, limit_train_batches=2)
    run.fit(module, tiny_loaders())
    assert run.optimizers[0].graph is graphs[0] and run.optimizers[0].model is module.net


def test_mixin_rejects_bad_settings_with_the_replacement_named():
    with pytest.raises(ValueError, match=r"'pathsgd' is an optimizer name.*pl_pathsgd\.PathSGD"):
        UserModule(optimizer="pathsgd")
    with pytest.raises(ValueError, match=r"'sgd' is an optimizer name.*torch\.optim\.SGD"):
        PathSGDClassifier(optimizer="sgd")
    with pytest.raises(ValueError, match="cannot import 'torch.optim.SGDD'"):
        UserModule(optimizer="torch.optim.SGDD")
    with pytest.raises(ValueError, match="class_path"):
        UserModule(optimizer={"init_args": {"lr": 0.1}})
    with pytest.raises(TypeError, match="optimizer must be a callable"):
        UserModule(optimizer=0.1)
    with pytest.raises(ValueError, match="monitor"):
        UserModule(monitor="")
    with pytest.raises(TypeError, match="unexpected keyword argument 'lr'"):
        PathSGDClassifier(lr=0.1)


def test_paper_schedule_decays_lr_and_ramps_momentum(tmp_path):
    module = UserModule(optimizer=functools.partial(torch.optim.SGD, lr=0.1, momentum=0.5), lr_scheduler=PaperSchedule)
    run = trainer(tmp_path, max_epochs=3, limit_train_batches=1)
    run.fit(module, tiny_loaders())
    group = run.optimizers[0].param_groups[0]
    assert group["lr"] == pytest.approx(0.1 * 0.99**3)
    assert group["momentum"] == pytest.approx(0.56)
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0, momentum=0.5)
    schedule = PaperSchedule(optimizer)
    for _ in range(40):
        optimizer.step()
        schedule.step()
    assert optimizer.param_groups[0]["momentum"] == pytest.approx(0.9)  # capped
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.99**40)
    adagrad = torch.optim.Adagrad([nn.Parameter(torch.zeros(1))], lr=1.0)
    adagrad_schedule = PaperSchedule(adagrad)
    adagrad.step()
    adagrad_schedule.step()  # no momentum to ramp
    assert "momentum" not in adagrad.param_groups[0] and adagrad.param_groups[0]["lr"] == pytest.approx(0.99)
    with pytest.raises(ValueError, match="decay"):
        PaperSchedule(optimizer, decay=0.0)


def test_paper_schedule_resumes_exactly_from_its_state():
    def fresh():
        optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.5)
        return optimizer, PaperSchedule(optimizer, decay=0.9, momentum_step=0.1)

    def epochs(optimizer, schedule, count):
        for _ in range(count):
            optimizer.step()
            schedule.step()

    straight = fresh()
    epochs(*straight, 7)
    first = fresh()
    epochs(*first, 3)
    states = first[0].state_dict(), first[1].state_dict()
    # Lightning's way: fresh objects, then both states loaded
    resumed = fresh()
    resumed[0].load_state_dict(states[0])
    resumed[1].load_state_dict(states[1])
    # torch's way: the optimizer's state, then a schedule built with last_epoch (its constructor takes a step)
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.5)
    optimizer.load_state_dict(states[0])
    again = optimizer, PaperSchedule(optimizer, decay=0.9, momentum_step=0.1, last_epoch=2)
    for run in (resumed, again):
        epochs(*run, 4)
        assert run[0].param_groups[0]["lr"] == straight[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.9**7)
        assert run[0].param_groups[0]["momentum"] == straight[0].param_groups[0]["momentum"] == pytest.approx(0.9)


def test_schedules_and_engine_import_without_lightning():
    code = ("import sys\nfrom pl_pathsgd import PaperSchedule, PathSGD, path_norm\n"
            "from pl_pathsgd.schedules import ReduceLROnPlateau\n"
            "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning'))\n"
            "assert not loaded, loaded\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("scheduler, monitor", [
    (functools.partial(torch.optim.lr_scheduler.ReduceLROnPlateau, mode="max", patience=0), "val/loss"),
    (functools.partial(ReduceLROnPlateau, monitor="val/other", mode="max", patience=0), "val/other"),
    ("lightning.pytorch.cli.ReduceLROnPlateau", "val/other"),
], ids=["torch", "pl_pathsgd", "lightning"])
def test_schedulers_that_need_a_metric_get_one(tmp_path, scheduler, monitor):
    if isinstance(scheduler, str):
        scheduler = {"class_path": scheduler, "init_args": {"monitor": monitor, "mode": "max", "patience": 0}}
    module = UserModule(optimizer=functools.partial(torch.optim.SGD, lr=0.1), lr_scheduler=scheduler)
    run = trainer(tmp_path, max_epochs=3, limit_train_batches=2, limit_val_batches=2)
    loaders = tiny_loaders()
    run.fit(module, loaders, loaders)
    assert run.lr_scheduler_configs[0].monitor == monitor
    # mode="max" on a falling loss: no improvement after the first epoch, so the rate drops at each later one
    assert run.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.1**2)


def test_unsupported_network_fails_before_training_with_the_module_named(tmp_path):
    class Sigmoidal(UserModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 16), nn.Sigmoid(), nn.Linear(16, 3))

    module = Sigmoidal()
    before = module.net[0].weight.detach().clone()
    with pytest.raises(P.UnsupportedModelError, match=r"'1' \(Sigmoid\)"):
        trainer(tmp_path).fit(module, tiny_loaders())
    assert torch.equal(module.net[0].weight, before)


# ------------------------------------------------------------------------------------ classifier


def test_classifier_inits_share_weights_and_function():
    balanced = PathSGDClassifier(input_shape=(10,), num_classes=3, hidden=[32, 32], init="balanced", init_seed=4)
    unbalanced = PathSGDClassifier(input_shape=(10,), num_classes=3, hidden=[32, 32], init="unbalanced", init_seed=4)
    assert balanced.network is None  # built by configure_model, or on first use
    x = torch.randn(20, 10)
    torch.testing.assert_close(balanced(x), unbalanced(x), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(balanced.network[0].weight, unbalanced.network[0].weight)
    assert float(P.path_norm(unbalanced.network)) == pytest.approx(float(P.path_norm(balanced.network)), rel=1e-5)
    assert float(balanced.network[0].weight.detach().std()) == pytest.approx(1 / math.sqrt(10), rel=0.15)
    assert not balanced.network[0].bias.any()
    network = balanced.network
    balanced.configure_model()
    assert balanced.network is network  # idempotent


def test_classifier_conv_and_dropout_variants():
    conv = PathSGDClassifier(input_shape=(1, 8, 8), num_classes=10, network="conv", channels=[4, 8])
    assert conv(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert tuple(conv.example_input_array.shape) == (1, 1, 8, 8)
    assert P.path_norm(conv.path_network, input_shape=(1, 8, 8)) > 0
    dropout = PathSGDClassifier(input_shape=(64,), hidden=[16], dropout=0.5)
    assert any(isinstance(m, nn.Dropout) for m in dropout.path_network)
    with pytest.raises(ValueError, match="flatten: false"):
        PathSGDClassifier(input_shape=(64,), network="conv")  # checked at construction, before any data
    with pytest.raises(ValueError, match="dropout"):
        PathSGDClassifier(input_shape=(64,), dropout=1.5)


def test_classifier_trains_logs_and_predicts(tmp_path):
    module = PathSGDClassifier(input_shape=(6,), num_classes=3, hidden=[16], optimizer=functools.partial(P.PathSGD, lr=0.05))
    run = trainer(tmp_path, max_epochs=2, logger=CSVLogger(tmp_path, name="csv"), log_every_n_steps=3)
    loaders = tiny_loaders()  # 4 batches an epoch, 8 steps
    run.fit(module, loaders, loaders)
    x, y = loaders.dataset.tensors
    with torch.no_grad():
        logits = module(x)
    expected = logits.argmax(1)
    # validation ran after the last epoch, with these weights: means over the whole split
    assert float(run.callback_metrics["val/error"]) == pytest.approx(float((expected != y).float().mean()))
    assert float(run.callback_metrics["val/loss"]) == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-5)
    rows = list(csv.DictReader((Path(run.logger.log_dir) / "metrics.csv").open()))
    logged = [r for r in rows if r.get("batch/loss")]
    assert len(logged) == 2, "the mini-batch loss is logged at the logging steps only (steps 3 and 6 of 8)"
    assert all(float(r["batch/loss"]) > 0 and 0 <= float(r["batch/error"]) <= 1 for r in logged)
    assert "batch/loss_epoch" not in run.callback_metrics  # no per-step accumulation
    run.test(module, loaders, verbose=False)
    assert float(run.callback_metrics["test/error"]) == pytest.approx(float((expected != y).float().mean()))
    predictions = torch.cat(run.predict(module, loaders))
    assert predictions.dtype == torch.int64 and torch.equal(predictions, expected)


def test_training_step_logs_nothing_between_logging_steps(tmp_path, monkeypatch):
    """The hot path: between logging steps the classifier calls neither self.log nor any metric."""
    calls = []
    original = PathSGDClassifier.log
    monkeypatch.setattr(PathSGDClassifier, "log", lambda self, name, *a, **k: (calls.append(name), original(self, name, *a, **k)))
    module = PathSGDClassifier(input_shape=(6,), num_classes=3, hidden=[8], optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    run = trainer(tmp_path, max_epochs=1, logger=CSVLogger(tmp_path, name="csv"), log_every_n_steps=50,
                  limit_val_batches=0)
    run.fit(module, tiny_loaders())
    assert calls == []  # 4 steps, none of them a logging step
    assert not any(isinstance(m, torchmetrics.Metric) for m in module.modules())


def test_classifier_records_the_optimizer_it_used_as_plain_data(tmp_path):
    optimizer = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9)
    module = PathSGDClassifier(input_shape=(6,), num_classes=3, hidden=[8], optimizer=optimizer,
                               lr_scheduler=functools.partial(PaperSchedule, decay=0.5))
    run = trainer(tmp_path, logger=CSVLogger(tmp_path, name="csv"), limit_train_batches=2, enable_checkpointing=True,
                  callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)])
    run.fit(module, tiny_loaders())
    logged = yaml.safe_load((Path(run.logger.log_dir) / "hparams.yaml").read_text())
    assert logged["optimizer"]["class_path"] == "torch.optim.SGD"
    assert logged["optimizer"]["init_args"]["lr"] == 0.05 and logged["optimizer"]["init_args"]["momentum"] == 0.9
    assert logged["optimizer"]["init_args"]["nesterov"] is False  # defaults included: what the class really got
    assert logged["lr_scheduler"] == {"class_path": "pl_pathsgd.PaperSchedule", "init_args": {
        "decay": 0.5, "momentum_step": 0.02, "max_momentum": 0.9, "last_epoch": -1}}
    assert "lr" not in logged and "custom_optimizer" not in logged
    checkpoint = tmp_path / "ckpt" / "last.ckpt"
    torch.load(checkpoint, weights_only=True)  # plain data only
    loaded = PathSGDClassifier.load_from_checkpoint(checkpoint)
    for key, value in module.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    rebuilt = loaded.optimizer_factory([nn.Parameter(torch.zeros(1))])
    assert type(rebuilt) is torch.optim.SGD and rebuilt.defaults["lr"] == 0.05 and rebuilt.defaults["momentum"] == 0.9


@pytest.mark.parametrize("accelerator", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_float64_by_precision_builds_the_network_in_float64_and_leaves_the_default_dtype(tmp_path, accelerator):
    class InitialWeights(pl.Callback):
        def on_train_start(self, trainer, pl_module):  # after configure_model and the precision's conversion
            self.weight = pl_module.network[0].weight.detach().clone()

    initial = InitialWeights()
    module = PathSGDClassifier(input_shape=(6,), num_classes=3, hidden=[16], init="unbalanced",
                               optimizer=functools.partial(P.PathSGD, lr=0.05))
    run = trainer(tmp_path, precision="64-true", limit_train_batches=2, enable_model_summary=True, callbacks=[initial],
                  accelerator=accelerator, devices=1)
    run.fit(module, tiny_loaders())
    weight = module.network[0].weight
    assert weight.dtype == torch.float64 and weight.device.type == accelerator
    assert run.optimizers[0].last_geometry_dtype == torch.float64
    assert torch.get_default_dtype() == torch.float32
    # built and initialised in float64, not initialised in float32 and cast: not all float32 numbers
    assert initial.weight.dtype == torch.float64 and not torch.equal(initial.weight, initial.weight.float().double())


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
MIXED_PRECISIONS = [("cpu", "bf16-mixed"), pytest.param("cuda", "bf16-mixed", marks=CUDA),
                    pytest.param("cuda", "16-mixed", marks=CUDA)]


@pytest.mark.parametrize("accelerator, precision", MIXED_PRECISIONS)
def test_path_sgd_under_mixed_precision_and_gradient_clipping_makes_the_clipped_normalised_step(
        tmp_path, accelerator, precision):
    """Lightning runs the closure itself under mixed precision (16-mixed: unscales the gradients), clips them,
    then calls step() without a closure. Each step must be w <- w - lr * buffer with
    buffer <- momentum * buffer + clip * grad / gamma(w); a step that the 16-bit gradient scaler skips
    (overflow) leaves everything as it was."""
    lr, momentum, max_norm = 0.05, 0.9, 0.05

    class CheckStep(pl.Callback):
        def __init__(self):
            self.buffers, self.pending, self.expected, self.clip_factors, self.checked = {}, {}, {}, [], 0

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # true gradients, before clipping
            net = pl_module.net
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            self.scale = None if scaler is None else scaler.get_scale()
            self.before = {name: p.detach().clone() for name, p in net.named_parameters()}
            grads = {name: p.grad.detach().clone() for name, p in net.named_parameters()}
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
            clip = min(1.0, max_norm / (float(norm) + 1e-6))
            self.clip_factors.append(clip)
            divisors = P.path_scaling(net, p=2)
            for name, param in net.named_parameters():
                direction = grads[name].double() * clip / divisors[name].double()
                buffer = self.buffers.get(name)
                self.pending[name] = direction if buffer is None else momentum * buffer + direction
                self.expected[name] = param.detach().double() - lr * self.pending[name]

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            if scaler is not None and scaler.get_scale() < self.scale:  # inf/NaN gradients: step skipped
                for name, param in pl_module.net.named_parameters():
                    assert torch.equal(param.detach(), self.before[name]), name
                return
            for name, param in pl_module.net.named_parameters():
                torch.testing.assert_close(param.detach().double(), self.expected[name], rtol=1e-5, atol=1e-7)
            self.buffers, self.pending = self.pending, {}
            self.checked += 1

    check = CheckStep()
    module = UserModule(optimizer=functools.partial(P.PathSGD, lr=lr, momentum=momentum))
    run = trainer(tmp_path, limit_train_batches=6, precision=precision, gradient_clip_val=max_norm,
                  accelerator=accelerator, devices=1, callbacks=[check])
    run.fit(module, tiny_loaders(n=96))
    assert check.checked >= 3
    assert all(factor < 0.5 for factor in check.clip_factors)  # clipping was active at every step
    assert module.net[0].weight.dtype == torch.float32
