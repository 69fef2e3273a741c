"""Rescaling, the paper's initialisations, Lemma 4.1 and Theorem 5.1."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import pl_pathsgd as P


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.0), nn.Linear(16, 12), nn.ReLU(),
                         nn.Linear(12, 3)).double()


def conv_pool_net() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(6 * 2 * 2, 8), nn.LeakyReLU(0.1), nn.Linear(8, 3),
    ).double()


class ResidualNet(nn.Module):
    """conv -> [x + conv(relu(frozen BN(conv(x))))] -> global average pool -> linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.conv1 = nn.Conv2d(4, 5, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(5)
        self.conv2 = nn.Conv2d(5, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(4, 3)
        with torch.no_grad():
            self.bn1.running_mean.uniform_(-0.5, 0.5)
            self.bn1.running_var.uniform_(0.5, 2.0)
        P.freeze_batchnorm(self)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = h + self.conv2(torch.relu(self.bn1(self.conv1(h))))
        return self.head(torch.flatten(self.pool(torch.relu(h)), 1))


CASES = {
    "mlp": (mlp, (6,)),
    "conv_pool": (conv_pool_net, (2, 8, 8)),
    "residual": (lambda: ResidualNet().double(), (2, 6, 6)),
}


def random_rescaling(model: nn.Module, input_shape, seed: int) -> dict[str, torch.Tensor]:
    """Factors spread log-uniformly over 1e-3 ... 1e3 for every rescalable unit."""
    generator = torch.Generator().manual_seed(seed)
    units = P.rescalable_units(model, input_shape)
    assert units, "the network must have rescalable units"
    return {name: 10 ** (6 * torch.rand(n, generator=generator, dtype=torch.float64) - 3) for name, n in units.items()}


def relative_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max() / b.detach().abs().max())


@pytest.mark.parametrize("case", CASES)
def test_rescaling_keeps_function_and_path_norms(case):
    build, shape = CASES[case]
    model = build()
    rescaled = copy.deepcopy(model)
    P.rescale_units(rescaled, random_rescaling(model, shape, seed=5), shape)
    x = torch.randn(16, *shape, dtype=torch.float64)
    assert relative_gap(rescaled(x), model(x)) < 1e-12
    changed = sum(not torch.equal(a, b) for a, b in zip(model.parameters(), rescaled.parameters()))
    assert changed >= 3
    for p in (1, 2, 3, math.inf):
        assert float(P.path_norm(rescaled, p, shape)) == pytest.approx(float(P.path_norm(model, p, shape)), rel=1e-10)


def train(model, shape, optimizer_factory, batches):
    optimizer = optimizer_factory(model)
    probe = batches[0][0]
    outputs = []
    for x, y in batches:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        with torch.no_grad():
            outputs.append(model(probe))
    return outputs


@pytest.mark.parametrize("case", CASES)
def test_theorem_5_1_path_sgd_trajectories_stay_rescalings_and_sgd_does_not(case):
    build, shape = CASES[case]
    model = build()
    rescaled = copy.deepcopy(model)
    P.rescale_units(rescaled, random_rescaling(model, shape, seed=11), shape)
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, *shape, generator=generator, dtype=torch.float64),
                torch.randint(3, (8,), generator=generator)) for _ in range(100)]

    def path_sgd(m):
        return P.PathSGD(m.parameters(), lr=0.05, momentum=0.5, model=m, input_shape=shape)

    a = train(copy.deepcopy(model), shape, path_sgd, batches)
    b = train(copy.deepcopy(rescaled), shape, path_sgd, batches)
    gaps = [relative_gap(out_b, out_a) for out_a, out_b in zip(a, b)]
    assert max(gaps) <= 1e-6
    assert relative_gap(a[-1], a[0]) > 1e-2  # it did train

    def sgd(m):
        return torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.5)

    a = train(copy.deepcopy(model), shape, sgd, batches)
    b = train(copy.deepcopy(rescaled), shape, sgd, batches)
    assert not all(torch.isfinite(out).all() for out in b) or relative_gap(b[-1], a[-1]) > 1e-2


def test_balanced_init_statistics():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(400, 300), nn.ReLU(), nn.Conv1d(3, 200, 5))
    P.balanced_init_(net, seed=3)
    weight = net[0].weight.detach()
    assert float(weight.std() * math.sqrt(400)) == pytest.approx(1.0, abs=0.02)
    assert float(net[2].weight.std() * math.sqrt(3 * 5)) == pytest.approx(1.0, abs=0.03)
    assert float(weight.mean()) == pytest.approx(0.0, abs=0.01)
    assert not net[0].bias.any() and not net[2].bias.any()
    again = copy.deepcopy(net)
    P.balanced_init_(again, seed=3)
    assert torch.equal(again[0].weight, net[0].weight)


def test_unbalanced_init_changes_weights_not_function_or_path_norm():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 3)).double()
    P.balanced_init_(net, seed=0)
    before = copy.deepcopy(net)
    P.unbalanced_init_(net, seed=1)  # default: a quarter of the 80 hidden units, i.e. 20 draws
    x = torch.randn(32, 10, dtype=torch.float64)
    assert relative_gap(net(x), before(x)) < 1e-12
    assert float(P.path_norm(net)) == pytest.approx(float(P.path_norm(before)), rel=1e-10)
    ratios = (net[0].weight / before[0].weight).abs().amax(dim=1)
    scaled_units = int((ratios > 1.5).sum()) + int((ratios < 0.67).sum())
    assert 5 <= scaled_units <= 20
    assert float(ratios.max()) > 5  # factors are 10 * LogNormal(0, 1)
    assert float(P.max_unit_norm(net)) > 3 * float(P.max_unit_norm(before))
    repeat = copy.deepcopy(before)
    P.unbalanced_init_(repeat, seed=1)
    assert torch.equal(repeat[0].weight, net[0].weight)


def test_unbalanced_init_draw_count_default_is_a_quarter_of_hidden_units(monkeypatch):
    net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    assert sum(P.rescalable_units(net).values()) == 16
    drawn = []
    original = torch.randint
    monkeypatch.setattr(torch, "randint", lambda high, size, **kw: drawn.append(size) or original(high, size, **kw))
    P.unbalanced_init_(net, seed=0)
    assert drawn == [(4,)]


@pytest.mark.parametrize("p", [1, 2, 3])
@pytest.mark.parametrize("widths", [[4, 6, 1], [3, 5, 4, 1], [3, 4, 5, 3, 1]])
def test_balance_attains_lemma_4_1_without_biases(widths, p):
    torch.manual_seed(len(widths) + p)
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers += [nn.Linear(a, b, bias=False), nn.ReLU()]
    net = nn.Sequential(*layers[:-1]).double()
    depth = len(widths) - 1
    phi = float(P.path_norm(net, p))
    # any rescaling has mu^d >= phi ...
    for seed in range(3):
        other = copy.deepcopy(net)
        P.rescale_units(other, random_rescaling(other, (widths[0],), seed))
        assert float(P.max_unit_norm(other, p)) ** depth >= phi * (1 - 1e-12)
    # ... and the balanced one attains it, with every layer at phi^(1/d)
    x = torch.randn(5, widths[0], dtype=torch.float64)
    before = net(x)
    P.balance(net, p)
    assert float(P.max_unit_norm(net, p)) ** depth == pytest.approx(phi, rel=1e-10)
    for layer in (m for m in net if isinstance(m, nn.Linear)):
        norms = torch.linalg.vector_norm(layer.weight, ord=p, dim=1)
        torch.testing.assert_close(norms, torch.full_like(norms, phi ** (1 / depth)), rtol=1e-10, atol=0)
    assert relative_gap(net(x), before) < 1e-12


def test_balance_with_hidden_biases_at_depth_two():
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 1, bias=False)).double()
    phi = float(P.path_norm(net))
    P.balance(net)
    assert float(P.max_unit_norm(net)) ** 2 == pytest.approx(phi, rel=1e-10)


def test_balance_refuses_non_layered_networks():
    with pytest.raises(P.PathGeometryError, match="Linear layers"):
        P.balance(conv_pool_net(), input_shape=(2, 8, 8))


def test_rescale_units_checks_its_factors():
    net = mlp()
    with pytest.raises(P.PathGeometryError, match="positive finite"):
        P.rescale_units(net, {"0": torch.zeros(16)})
    with pytest.raises(P.PathGeometryError, match="16 positive"):
        P.rescale_units(net, {"0": torch.ones(3)})
    with pytest.raises(P.PathGeometryError, match="cannot be rescaled alone"):
        P.rescale_units(net, {"5": torch.ones(3)})  # the output layer
    with pytest.raises(P.PathGeometryError, match="choose among"):
        P.rescale_units(net, {"1": torch.ones(3)})
