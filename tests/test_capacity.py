"""Capacity measures: the bound's coefficient (hand-computed values), the structure of traced networks,
margins, and the CapacityReport callback."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pl_pathsgd.callbacks import UnreadableBatchError
from pl_pathsgd.callbacks.capacity import CapacityReport
from pl_pathsgd.paths.capacity import (
    NetworkStructure,
    bound_constant,
    classification_margins,
    network_structure,
    percentile,
    rademacher_coefficient,
)

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*(log_every_n_steps|does not have many workers|LeafSpec|litlogger|litmodels|no `validation_step`"
    "|percentile of the training margins).*"
)

FEATURES, HIDDEN, CLASSES, N = 5, 7, 3, 64

# ----------------------------------------------------------------------------- the coefficient


def test_coefficient_of_a_one_hidden_layer_mlp_on_10x10_inputs():
    """D = 2, P = 0, K = 1, M = 0, d_in = 100, d_out = 10, n = 50 000, B = 1, worked out by hand:
    C^2 = 2 ln 3 + ln(3 * 101 * 10) = 2.19722458 + 8.01631790 = 10.21354247, C = 3.19586334;
    C'^2 = 2 ln 3 + 0 * ln 1 + ln(101 * 10) = 2.19722458 + 6.91770561 = 9.11493019, C' = 3.01909427;
    4 B C / sqrt(n) = 4 * 3.19586334 / 223.60679775 = 0.05716934, and with C': 0.05400720."""
    structure = dict(depth=2, pool_kinds=0, max_kernel=1, pools_on_path=0, input_dim=100, output_dim=10)
    assert bound_constant(**structure) == pytest.approx(3.19586334, rel=1e-8)
    assert bound_constant(**structure, sharpened=True) == pytest.approx(3.01909427, rel=1e-8)
    assert rademacher_coefficient(**structure, n=50_000, input_bound=1.0) == pytest.approx(0.05716934, rel=1e-7)
    assert rademacher_coefficient(**structure, n=50_000, input_bound=1.0, sharpened=True) == \
        pytest.approx(0.05400720, rel=1e-7)
    # B and n enter linearly and as 1/sqrt(n)
    assert rademacher_coefficient(**structure, n=12_500, input_bound=3.0) == pytest.approx(6 * 0.05716934, rel=1e-7)


def test_coefficient_with_max_pooling_matches_the_authors_resnet18_imagenet_number():
    """Gonon et al.'s Table 2: ResNet-18 on ImageNet (D = 18, one max-pool of 3x3: P = 1, K = 9, M = 1,
    d_in = 224*224*3, d_out = 1000, n = 1 268 355, B = 2.64): 0.088 (C) and 0.060 (C'); by hand,
    C^2 = 18 ln(5 * 9) + ln(5/2 * 150529 * 1000) = 68.5199 + 19.7459 = 88.2658."""
    structure = dict(depth=18, pool_kinds=1, max_kernel=9, pools_on_path=1, input_dim=224 * 224 * 3, output_dim=1000)
    assert bound_constant(**structure) ** 2 == pytest.approx(18 * math.log(45) + math.log(2.5 * 150529 * 1000))
    assert bound_constant(**structure) ** 2 == pytest.approx(88.2658, abs=1e-3)
    assert rademacher_coefficient(**structure, n=1_268_355, input_bound=2.64) == pytest.approx(0.088093, rel=1e-4)
    assert rademacher_coefficient(**structure, n=1_268_355, input_bound=2.64, sharpened=True) == \
        pytest.approx(0.059894, rel=1e-4)


@pytest.mark.parametrize("bad, match", [
    (dict(depth=0), "depth=0"),
    (dict(depth=2.0), "depth=2.0"),
    (dict(input_dim=True), "input_dim=True"),
    (dict(max_kernel=4), "without max pooling"),
    (dict(pool_kinds=1, max_kernel=4, pools_on_path=0), "pools_on_path >= 1"),
    (dict(pool_kinds=1, max_kernel=4, pools_on_path=3), "cannot exceed depth"),
    (dict(n=0), "n=0"),
    (dict(input_bound=0.0), "input_bound"),
    (dict(input_bound=math.inf), "input_bound"),
])
def test_bad_structural_quantities_are_refused(bad, match):
    arguments = dict(depth=2, pool_kinds=0, max_kernel=1, pools_on_path=0, input_dim=100, output_dim=10, n=100,
                     input_bound=1.0)
    with pytest.raises(ValueError, match=match):
        rademacher_coefficient(**{**arguments, **bad})


# ----------------------------------------------------------------------------- structure of traced networks


def test_structure_of_an_mlp():
    net = nn.Sequential(nn.Flatten(), nn.Linear(100, 32), nn.ReLU(), nn.Linear(32, 10))
    assert network_structure(net, (10, 10)) == NetworkStructure(2, 0, 1, 0, 100, 10)
    deeper = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    assert network_structure(deeper) == NetworkStructure(3, 0, 1, 0, 6, 3)


def test_structure_counts_max_pools_and_their_largest_window_and_folds_batchnorm_and_average_pooling():
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),  # window of 4 inputs
        nn.Conv2d(4, 4, 3), nn.ReLU(), nn.MaxPool2d((1, 3), stride=1),  # window of 3
        nn.AvgPool2d(2, ceil_mode=True), nn.Flatten(), nn.Linear(8, 3),  # 10x10 -> 5x5 -> 3x3 -> 3x1 -> 2x1
    ).eval()
    # layers: conv, max-pool, conv, max-pool, linear (BatchNorm and average pooling fold into neighbours)
    assert network_structure(net, (1, 10, 10)) == NetworkStructure(5, 1, 4, 2, 100, 3)
    adaptive = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.AdaptiveMaxPool2d(2), nn.Flatten(), nn.Linear(12, 2))
    # 7x7 -> 5x5 after the conv; adaptive windows of 5 -> 2 are [0, 3) and [2, 5): 3 x 3 = 9 inputs
    assert network_structure(adaptive, (2, 7, 7)) == NetworkStructure(3, 1, 9, 1, 98, 2)


class Residual(nn.Module):
    """stem -> (x + two-layer branch) -> head: the longest path goes through the branch."""

    def __init__(self):
        super().__init__()
        self.stem, self.a, self.b, self.head = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = torch.relu(h + self.b(torch.relu(self.a(h))))
        return self.head(h)


def test_structure_takes_the_longest_path_of_a_residual_network():
    assert network_structure(Residual()) == NetworkStructure(4, 0, 1, 0, 4, 2)


def test_structure_of_a_relu_rnn_is_its_longest_unrolled_path():
    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.RNN(3, 5, num_layers=2, nonlinearity="relu", batch_first=True)
            self.out = nn.Linear(5, 2)

        def forward(self, x):
            return self.out(self.rnn(x)[0][:, -1])

    # 7 steps, 2 layers: from x_1, one W_ih per layer and 6 W_hh steps; then the read-out
    assert network_structure(Recurrent(), (7, 3)).depth == 2 + 7 - 1 + 1


def test_structure_of_resnet18_counts_its_max_pool():
    torchvision = pytest.importorskip("torchvision")
    net = torchvision.models.resnet18(num_classes=10).eval()
    # conv1, max-pool (3x3), 16 convolutions, fc; Gonon et al. quote D = 18 for it (its nominal depth)
    assert network_structure(net, (3, 32, 32)) == NetworkStructure(19, 1, 9, 1, 3 * 32 * 32, 10)


# ----------------------------------------------------------------------------- margins


def test_margins_and_percentile():
    outputs = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 1.0, 0.0], [0.0, 0.5, 4.0]])
    margins = classification_margins(outputs, torch.tensor([0, 2, 0, 2]))
    assert margins.tolist() == [1.0, -2.0, 0.0, 3.5]
    one_hot = torch.eye(3)[[0, 2, 0, 2]]
    assert torch.equal(classification_margins(outputs, one_hot), margins)
    values = torch.randn(1001, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for q in (0, 5, 37.5, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values.numpy(), q)), rel=1e-12)
    with pytest.raises(ValueError, match="at least 2 classes"):
        classification_margins(torch.zeros(4, 1), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="do not match"):
        classification_margins(outputs, torch.tensor([0, 1]))


# ----------------------------------------------------------------------------- the callback


def tensor_data(n: int = N, seed: int = 0, scale: float = 3.0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(scale * torch.randn(n, FEATURES, generator=generator),
                         torch.randint(CLASSES, (n,), generator=generator))


class Classifier(pl.LightningModule):
    def __init__(self, outputs: int = CLASSES):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, outputs))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def fit(tmp_path, callbacks, module=None, data=None, **trainer_args) -> tuple[pl.Trainer, pl.LightningModule]:
    pl.seed_everything(0, verbose=False)
    module = module or Classifier()
    arguments = dict(max_epochs=1, limit_train_batches=2, enable_progress_bar=False, enable_model_summary=False,
                     enable_checkpointing=False)
    trainer = pl.Trainer(default_root_dir=tmp_path, callbacks=callbacks, logger=CSVLogger(tmp_path),
                         **{**arguments, **trainer_args})
    trainer.fit(module, DataLoader(data or tensor_data(), batch_size=16, shuffle=True))
    return trainer, module


def path_norm_by_hand(net: nn.Sequential, p: float) -> float:
    """Every path of Linear -> ReLU -> Linear: input i -> hidden j -> output k, bias b1_j -> k, and b2_k."""
    w1, b1, w2, b2 = (t.detach().double().abs() ** p for t in (net[0].weight, net[0].bias, net[2].weight, net[2].bias))
    return float((w2 @ w1).sum() + (w2 @ b1).sum() + b2.sum()) ** (1 / p)


def test_capacity_report_logs_the_measures_of_the_whole_training_set(tmp_path):
    data = tensor_data()
    report = CapacityReport(percentile=10)
    trainer, module = fit(tmp_path, [report], data=data)  # 2 of 4 batches trained; all 64 examples measured
    metrics = {key: float(value) for key, value in trainer.callback_metrics.items() if key.startswith("capacity/")}
    net = module.net
    for p in (1, 2, 4):
        assert metrics[f"capacity/path_norm_l{p}"] == pytest.approx(path_norm_by_hand(net, p), rel=1e-9)
    with torch.no_grad():
        outputs = net(data.tensors[0]).double()
    labels = data.tensors[1]
    correct = outputs[torch.arange(N), labels]
    others = outputs.clone()
    others[torch.arange(N), labels] = -math.inf
    margin = float(np.percentile((correct - others.max(dim=1).values).numpy(), 10))
    assert metrics["capacity/margin"] == pytest.approx(margin, rel=1e-6)
    bound = max(1.0, float(data.tensors[0].abs().max()))
    assert bound > 1  # inputs of scale 3: B is the data's, not the floor of 1
    constant = math.sqrt(2 * math.log(3) + math.log(3 * (FEATURES + 1) * CLASSES))
    sharpened = math.sqrt(2 * math.log(3) + math.log((FEATURES + 1) * CLASSES))
    phi1 = path_norm_by_hand(net, 1)
    assert metrics["capacity/rademacher"] == pytest.approx(4 * bound * constant / math.sqrt(N) * phi1, rel=1e-6)
    assert metrics["capacity/rademacher_sharpened"] == pytest.approx(4 * bound * sharpened / math.sqrt(N) * phi1,
                                                                     rel=1e-6)
    if margin > 0:
        assert metrics["capacity/normalized_path_norm_l2"] == pytest.approx(path_norm_by_hand(net, 2) / margin, rel=1e-6)
    else:
        assert "capacity/normalized_path_norm_l2" not in metrics
    assert report.structure == NetworkStructure(2, 0, 1, 0, FEATURES, CLASSES)
    logged = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "capacity/rademacher_sharpened" in logged


def test_normalized_path_norm_needs_a_positive_margin(tmp_path):
    """A separable training set that a trained network classifies: the margin is positive and the normalized
    path-norm is logged; at the 100th percentile of an untrained one's margins it is too, at the 0th it is not."""
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(CLASSES, (N,), generator=generator)
    inputs = torch.randn(N, FEATURES, generator=generator) * 0.1 + 4 * nn.functional.one_hot(labels, FEATURES)
    data = TensorDataset(inputs, labels)
    trainer, _ = fit(tmp_path / "a", [CapacityReport()], data=data, max_epochs=30, limit_train_batches=None)
    assert float(trainer.callback_metrics["capacity/margin"]) > 0
    assert "capacity/normalized_path_norm_l2" in trainer.callback_metrics
    with pytest.warns(UserWarning, match="percentile of the training margins"):
        trainer, _ = fit(tmp_path / "b", [CapacityReport(percentile=0)], data=tensor_data())
    assert float(trainer.callback_metrics["capacity/margin"]) <= 0
    assert "capacity/normalized_path_norm_l2" not in trainer.callback_metrics


def test_capacity_report_every_n_epochs(tmp_path):
    report = CapacityReport(every_n_epochs=2)
    measured = []
    original = report.measure
    report.measure = lambda trainer, module: measured.append(trainer.current_epoch) or original(trainer, module)
    fit(tmp_path, [report], max_epochs=4)
    assert measured == [1, 3]


def test_capacity_report_refuses_what_it_cannot_measure_before_training(tmp_path):
    with pytest.raises(ValueError, match="percentile"):
        CapacityReport(percentile=101)
    with pytest.raises(ValueError, match="eval_batch_size"):
        CapacityReport(eval_batch_size=0)
    with pytest.raises(MisconfigurationException, match="logger"):
        pl.Trainer(logger=False, callbacks=[CapacityReport()], max_epochs=1, default_root_dir=tmp_path).fit(
            Classifier(), DataLoader(tensor_data(), batch_size=16))
    steps = []

    class Counting(Classifier):
        def training_step(self, batch, batch_idx):
            steps.append(batch_idx)
            return super().training_step(batch, batch_idx)

    with pytest.raises(ValueError, match="at least 2 classes"):  # one output: no margin
        fit(tmp_path, [CapacityReport()], module=Counting(outputs=1))
    dict_batches = [{"pixels": x, "digit": y} for x, y in DataLoader(tensor_data(), batch_size=16)]
    with pytest.raises(UnreadableBatchError, match="unpack_batch"):
        fit(tmp_path, [CapacityReport(train_dataloader=dict_batches)], module=Counting())
    with pytest.raises(ValueError, match="several training dataloaders"):
        pl.Trainer(max_epochs=1, callbacks=[CapacityReport()], logger=CSVLogger(tmp_path), default_root_dir=tmp_path,
                   enable_progress_bar=False).fit(Counting(), {"a": DataLoader(tensor_data(), batch_size=16),
                                                              "b": DataLoader(tensor_data(), batch_size=16)})
    assert steps == []  # all failed before the first step


def test_capacity_report_reads_any_batch_structure_with_unpack_batch(tmp_path):
    dict_batches = [{"pixels": x, "digit": y} for x, y in DataLoader(tensor_data(), batch_size=16)]
    report = CapacityReport(train_dataloader=dict_batches, unpack_batch=lambda b: (b["pixels"], b["digit"])
                            if isinstance(b, dict) else (b[0], b[1]))
    trainer, _ = fit(tmp_path, [report])
    assert "capacity/margin" in trainer.callback_metrics
