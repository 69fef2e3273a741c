"""PathSGDMixin, the paper's schedule and the ready classifier, on a real Trainer."""

from __future__ import annotations

import functools
import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pl_pathsgd as P
from pl_pathsgd.module import PaperSchedule, PathSGDClassifier, PathSGDMixin


def tiny_loaders(n: int = 64, features: int = 6, classes: int = 3, batch_size: int = 16):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, features, generator=generator)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return DataLoader(TensorDataset(x, y % classes), batch_size=batch_size)


class UserModule(PathSGDMixin, pl.LightningModule):
    def __init__(self, optimizer="pathsgd", **kwargs):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
        self.set_optimizer(optimizer, **kwargs)

    @property
    def path_network(self):
        return self.net

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)


def trainer(tmp_path, **kwargs) -> pl.Trainer:
    options = dict(max_epochs=1, accelerator="cpu", default_root_dir=tmp_path, enable_progress_bar=False,
                   enable_model_summary=False, logger=False, enable_checkpointing=False)
    options.update(kwargs)
    return pl.Trainer(**options)


@pytest.mark.parametrize("name, cls", [("pathsgd", P.PathSGD), ("sgd", torch.optim.SGD),
                                        ("adagrad", torch.optim.Adagrad), ("adam", torch.optim.Adam)])
def test_mixin_builds_each_optimizer_by_name(tmp_path, name, cls):
    module = UserModule(name, lr=0.05)
    before = module.net[0].weight.detach().clone()
    run = trainer(tmp_path, max_epochs=1, limit_train_batches=2)
    run.fit(module, tiny_loaders())
    optimizer = run.optimizers[0]
    assert type(optimizer) is cls
    assert optimizer.param_groups[0]["lr"] == 0.05
    if cls is P.PathSGD:
        assert optimizer.model is module.net  # the network to normalise, not the LightningModule
    assert not torch.equal(module.net[0].weight, before)


def test_mixin_takes_an_injected_optimizer_callable(tmp_path):
    module = UserModule(functools.partial(P.PathSGD, lr=0.02, momentum=0.9))
    run = trainer(tmp_path, limit_train_batches=2)
    run.fit(module, tiny_loaders())
    optimizer = run.optimizers[0]
    assert isinstance(optimizer, P.PathSGD) and optimizer.model is module.net
    assert optimizer.param_groups[0]["momentum"] == 0.9
    module = UserModule(functools.partial(torch.optim.RMSprop, lr=0.01))
    run = trainer(tmp_path, limit_train_batches=2)
    run.fit(module, tiny_loaders())
    assert isinstance(run.optimizers[0], torch.optim.RMSprop)


def test_mixin_rejects_bad_settings():
    with pytest.raises(ValueError, match="unknown optimizer 'sgdd'"):
        UserModule("sgdd")
    with pytest.raises(ValueError, match="lr > 0"):
        UserModule("sgd", lr=0.0)


def test_paper_schedule_decays_lr_and_ramps_momentum(tmp_path):
    module = UserModule("sgd", lr=0.1, momentum=0.5, paper_schedule=True)
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
    x = torch.randn(20, 10)
    torch.testing.assert_close(balanced(x), unbalanced(x), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(balanced.network[0].weight, unbalanced.network[0].weight)
    assert float(P.path_norm(unbalanced.network)) == pytest.approx(float(P.path_norm(balanced.network)), rel=1e-5)
    assert float(balanced.network[0].weight.detach().std()) == pytest.approx(1 / math.sqrt(10), rel=0.15)
    assert not balanced.network[0].bias.any()


def test_classifier_conv_and_dropout_variants():
    conv = PathSGDClassifier(input_shape=(1, 8, 8), num_classes=10, network="conv", channels=[4, 8])
    assert conv(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert P.path_norm(conv.path_network, input_shape=conv.path_input_shape) > 0
    dropout = PathSGDClassifier(input_shape=(64,), hidden=[16], dropout=0.5)
    assert any(isinstance(m, nn.Dropout) for m in dropout.network)
    with pytest.raises(ValueError, match="flatten: false"):
        PathSGDClassifier(input_shape=(64,), network="conv")


def test_classifier_trains_and_logs(tmp_path):
    module = PathSGDClassifier(input_shape=(6,), num_classes=3, hidden=[16], lr=0.05)
    run = trainer(tmp_path, max_epochs=2, logger=CSVLogger(tmp_path, name="csv"), log_every_n_steps=1)
    loaders = tiny_loaders()
    run.fit(module, loaders, loaders)
    for key in ("batch/loss_epoch", "batch/error_epoch", "val/loss", "val/error"):
        assert key in run.callback_metrics, key
    run.test(module, loaders, verbose=False)
    metrics = run.callback_metrics
    with torch.no_grad():
        x, y = loaders.dataset.tensors
        expected = (module(x).argmax(1) != y).float().mean()
    assert float(metrics["test/error"]) == pytest.approx(float(expected))


def test_path_sgd_under_mixed_precision_and_gradient_clipping(tmp_path):
    """Lightning runs the closure itself under mixed precision and calls step() without one."""
    module = UserModule("pathsgd", lr=0.05, momentum=0.9)
    before = module.net[0].weight.detach().clone()
    run = trainer(tmp_path, max_epochs=1, limit_train_batches=3, precision="bf16-mixed", gradient_clip_val=1.0)
    run.fit(module, tiny_loaders())
    assert run.global_step == 3
    weight = module.net[0].weight.detach()
    assert weight.dtype == torch.float32 and bool(torch.isfinite(weight).all())
    assert not torch.equal(weight, before)
