"""Path-norms and the Path-SGD scaling against first-principles references."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import pl_pathsgd as P
from pl_pathsgd.paths import PathGraph
from tests.reference import brute_force_mlp, conv_patterns, layer_matrix

RTOL = 1e-10


def random_mlp(widths: list[int], seed: int, bias: bool = True) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    net = nn.Sequential(*layers).double()
    with torch.no_grad():
        for param in net.parameters():
            param.uniform_(-1.5, 1.5)
    return net


def linear_layers(net: nn.Sequential) -> list[nn.Linear]:
    return [m for m in net if isinstance(m, nn.Linear)]


def position_names(net: nn.Sequential) -> dict[str, str]:
    """Reference names '{k}.weight' (k-th Linear) -> the model's parameter names."""
    names = {}
    for k, (index, module) in enumerate((i, m) for i, m in enumerate(net) if isinstance(m, nn.Linear)):
        names[f"{k}.weight"] = f"{index}.weight"
        names[f"{k}.bias"] = f"{index}.bias"
    return names


MLP_WIDTHS = [[3, 4, 2], [2, 3, 3, 2], [3, 2, 3, 2, 2]]  # depth 2, 3, 4


@pytest.mark.parametrize("widths", MLP_WIDTHS)
@pytest.mark.parametrize("p", [1, 2, 3, math.inf])
def test_path_norm_equals_enumeration_of_every_path(widths, p):
    net = random_mlp(widths, seed=len(widths) * 10 + int(min(p, 9)))
    expected, _ = brute_force_mlp(linear_layers(net), p)
    assert float(P.path_norm(net, p)) == pytest.approx(expected, rel=RTOL)


@pytest.mark.parametrize("widths", MLP_WIDTHS)
@pytest.mark.parametrize("p", [1, 2, 3])
def test_path_scaling_equals_enumeration_of_every_path(widths, p):
    net = random_mlp(widths, seed=len(widths) + p)
    _, expected = brute_force_mlp(linear_layers(net), p)
    scaling = P.path_scaling(net, p)
    names = position_names(net)
    assert set(scaling) == {names[k] for k in expected}
    for ref_name, ref_value in expected.items():
        torch.testing.assert_close(scaling[names[ref_name]], ref_value, rtol=RTOL, atol=0)


def conv_net() -> nn.Sequential:
    torch.manual_seed(3)
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),   # 2x6x6
        nn.ReLU(),
        nn.AvgPool2d(2),                 # 2x3x3
        nn.Conv2d(2, 3, 3, padding=1),   # 3x3x3
        nn.ReLU(),
        nn.MaxPool2d(2, stride=1),       # 3x2x2, overlapping windows
        nn.Flatten(),
        nn.Linear(12, 2),
    ).double()
    with torch.no_grad():
        for param in net.parameters():
            param.uniform_(-1.0, 1.0)
    return net


def max_pool_window_matrix(channels: int, size: int, kernel: int, stride: int) -> torch.Tensor:
    """1 where input (c, i, j) lies in the window of output (c, oi, oj): every input of a window counts."""
    out = (size - kernel) // stride + 1
    matrix = torch.zeros(channels * out * out, channels * size * size, dtype=torch.float64)
    for c in range(channels):
        for oi in range(out):
            for oj in range(out):
                for di in range(kernel):
                    for dj in range(kernel):
                        i, j = oi * stride + di, oj * stride + dj
                        matrix[(c * out + oi) * out + oj, (c * size + i) * size + j] = 1.0
    return matrix


def unrolled_conv_reference(net: nn.Sequential, p: float):
    """phi_p and the divisors of the conv net from its dense unrolling."""
    conv1, _, pool1, conv2, _, _, _, linear = net
    a1 = layer_matrix(nn.Sequential(*[copy.deepcopy(conv1)]).apply(_drop_bias), (1, 6, 6))
    avg = layer_matrix(pool1, (2, 6, 6))
    a2 = layer_matrix(nn.Sequential(copy.deepcopy(conv2)).apply(_drop_bias), (2, 3, 3))
    maxp = max_pool_window_matrix(3, 3, 2, 1)
    w = linear.weight.detach()
    b1 = conv1.bias.detach().repeat_interleave(36)
    b2 = conv2.bias.detach().repeat_interleave(9)
    b3 = linear.bias.detach()
    if math.isinf(p):
        def step(matrix, h, bias=None):
            out = (matrix.abs() * h[None, :]).amax(dim=1)
            return out if bias is None else torch.maximum(out, bias.abs())
        h = torch.ones(36, dtype=torch.float64)
        h = step(w, step(maxp, step(a2, step(avg, step(a1, h, b1)), b2)), b3)
        return float(h.max()), None
    pw = lambda m: m.abs() ** p  # noqa: E731
    h0 = torch.ones(36, dtype=torch.float64)
    h1 = pw(a1) @ h0 + pw(b1)
    h2 = pw(avg) @ h1
    h3 = pw(a2) @ h2 + pw(b2)
    h4 = maxp @ h3
    h5 = pw(w) @ h4 + pw(b3)
    g5 = torch.ones(2, dtype=torch.float64)
    g4 = pw(w).T @ g5
    g3 = maxp.T @ g4
    g2 = pw(a2).T @ g3
    g1 = pw(avg).T @ g2
    kappa = {
        "0.weight": _kernel_kappa(conv1, (1, 6, 6), g1, h0),
        "0.bias": g1.reshape(2, 36).sum(1),
        "3.weight": _kernel_kappa(conv2, (2, 3, 3), g3, h2),
        "3.bias": g3.reshape(3, 9).sum(1),
        "7.weight": torch.outer(g5, h4),
        "7.bias": g5,
    }
    return float(h5.sum()) ** (1 / p), {k: v ** (2 / p) for k, v in kappa.items()}


def _drop_bias(module):
    if isinstance(module, nn.Conv2d):
        module.bias = None


def _kernel_kappa(conv, in_shape, gamma_out, gamma_in):
    kappa = torch.zeros(conv.weight.shape, dtype=torch.float64)
    for index, pattern in conv_patterns(conv, in_shape).items():
        kappa[index] = gamma_out @ pattern @ gamma_in  # summed over every position the weight is used at
    return kappa


@pytest.mark.parametrize("p", [1, 2, 3, math.inf])
def test_conv_net_with_pooling_matches_dense_unrolling(p):
    net = conv_net()
    expected_norm, expected_scaling = unrolled_conv_reference(net, p)
    assert float(P.path_norm(net, p, input_shape=(1, 6, 6))) == pytest.approx(expected_norm, rel=RTOL)
    if expected_scaling is None:
        return
    scaling = P.path_scaling(net, p, input_shape=(1, 6, 6))
    assert set(scaling) == set(expected_scaling)
    for name, value in expected_scaling.items():
        torch.testing.assert_close(scaling[name], value, rtol=RTOL, atol=0)


# ------------------------------------------------------------------------------------ numerics


def test_deep_float32_mlp_gets_finite_positive_divisors():
    torch.manual_seed(0)
    layers = []
    for _ in range(49):
        layers += [nn.Linear(64, 64), nn.ReLU()]
    net = nn.Sequential(*layers, nn.Linear(64, 10))  # 50 layers, float32, PyTorch's default init
    scaling = P.path_scaling(net)
    assert len(scaling) == 100
    for name, divisor in scaling.items():
        assert divisor.dtype == torch.float32
        assert bool(torch.isfinite(divisor).all()), name
        assert bool((divisor > 0).all()), name
    # the products really are tiny: the first layer's divisors are far below 1
    assert float(scaling["0.weight"].max()) < 1e-6


def test_dead_unit_gives_no_inf_or_nan():
    net = random_mlp([4, 5, 3], seed=2).float()
    with torch.no_grad():
        net[2].weight[:, 1] = 0.0  # unit 1 of the hidden layer has no path to an output
    scaling = P.path_scaling(net)
    assert bool(torch.isfinite(scaling["0.weight"]).all()) and bool((scaling["0.weight"] > 0).all())
    before = net[0].weight.detach().clone()
    optimizer = P.PathSGD(net.parameters(), lr=0.1, model=net)
    net(torch.randn(8, 4)).square().sum().backward()
    optimizer.step()
    for param in net.parameters():
        assert bool(torch.isfinite(param).all())
    assert torch.equal(net[0].weight[1], before[1])  # the dead unit's incoming weights do not move


# ------------------------------------------------------------------------------------ support


def test_input_shape_inferred_from_leading_linear_and_required_otherwise():
    net = random_mlp([3, 4, 2], seed=0)
    assert PathGraph(net).input_shape == (3,)
    with pytest.raises(P.PathGeometryError, match="input_shape"):
        P.path_norm(conv_net())
    with pytest.raises(P.PathGeometryError, match="input_shape"):
        P.path_norm(conv_net(), input_shape=(1, 2, 2))  # too small for the layers


class CustomForward(nn.Module):
    """A model with its own forward: functional ReLU, view and a residual addition."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3, padding=1)
        self.inner = nn.Conv1d(3, 3, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool1d(2)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        h = h + self.inner(h)
        h = self.pool(h)
        return self.head(h.view(h.size(0), -1))


@pytest.mark.parametrize("p", [1, 2, 3])
def test_custom_forward_with_residual_matches_dense_unrolling(p):
    """Functional ReLU, view, adaptive pooling and x + f(x): the residual addition adds the branches' paths."""
    net = CustomForward().double()
    with torch.no_grad():
        for param in net.parameters():
            param.uniform_(-1.0, 1.0)
    shape = (2, 5)
    conv, inner = copy.deepcopy(net.conv), copy.deepcopy(net.inner)
    conv.bias, inner.bias = None, None
    pw = lambda m: m.abs() ** p  # noqa: E731
    a1, a2 = pw(layer_matrix(conv, (2, 5))), pw(layer_matrix(inner, (3, 5)))
    pool = pw(layer_matrix(net.pool, (3, 5)))  # adaptive windows of 3 and 3 inputs (overlapping), weights 1/3
    h1 = a1 @ torch.ones(10, dtype=torch.float64) + pw(net.conv.bias.detach()).repeat_interleave(5)
    h2 = h1 + a2 @ h1 + pw(net.inner.bias.detach()).repeat_interleave(5)  # skip path + residual branch
    out = pw(net.head.weight.detach()) @ (pool @ h2) + pw(net.head.bias.detach())
    assert float(P.path_norm(net, p, shape)) == pytest.approx(float(out.sum()) ** (1 / p), rel=RTOL)


def test_units_feeding_a_residual_addition_cannot_be_rescaled_alone():
    net = CustomForward().double()
    assert P.rescalable_units(net, (2, 5)) == {}  # every unit reaches the addition or the output
    with pytest.raises(P.PathGeometryError, match="cannot be rescaled"):
        P.rescale_units(net, {"conv": torch.full((3,), 2.0)}, (2, 5))


class Bad(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.squash = nn.Sigmoid()
        self.smooth = nn.GELU()
        self.norm = nn.LayerNorm(4)
        self.attn = nn.MultiheadAttention(4, 1)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        h = self.fc(x)
        h = self.squash(h) + torch.tanh(h) + self.smooth(h)
        h = self.norm(h)
        h = h * torch.relu(h)
        h = torch.softmax(h, dim=-1)
        return self.out(h)


def test_unsupported_constructs_are_all_named_before_any_step():
    with pytest.raises(P.UnsupportedModelError) as info:
        P.PathSGD(Bad().parameters(), lr=0.1, model=Bad())
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    for name in ("'squash' (Sigmoid)", "tanh", "'smooth' (GELU)", "'norm' (LayerNorm)", "mul", "softmax"):
        assert name in message, name
    assert "not positively homogeneous" in message and "products of paths" in message
    assert len(info.value.problems) == 6


def test_attention_and_untraceable_forward_are_reported():
    attention = nn.Sequential(nn.Linear(4, 4), nn.MultiheadAttention(4, 1))
    with pytest.raises(P.UnsupportedModelError, match="MultiheadAttention"):
        P.path_norm(attention)

    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else x

    with pytest.raises(P.UnsupportedModelError, match="could not be traced"):
        P.path_norm(DataDependent())


def test_batchnorm_in_training_mode_is_refused_and_frozen_batchnorm_folds():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2)).double()
    net.train()
    with pytest.raises(P.PathGeometryError, match="training mode"):
        P.path_norm(net, input_shape=(1, 4, 4))
    P.freeze_batchnorm(net)
    net.train()  # what Lightning does every epoch
    assert not net[1].training
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
        net[1].weight.uniform_(-2, 2)
        net[1].bias.uniform_(-1, 1)
    # the folded network: a conv with weight a*W and bias a*b + c has the same paths
    bn = net[1]
    s = (bn.running_var + bn.eps).rsqrt()
    a = bn.weight * s
    folded = copy.deepcopy(nn.Sequential(net[0], nn.ReLU(), nn.Flatten(), net[4]))
    with torch.no_grad():
        folded[0].weight.mul_(a[:, None, None, None])
    # the conv bias and BN shift are two edges in series/parallel: |a b|^p + ... differs from one folded bias,
    # so compare the p=1 norm after removing the conv bias (then the folded bias is exactly c)
    with torch.no_grad():
        net[0].bias.zero_()
        folded[0].bias.copy_(bn.bias - a * bn.running_mean)
    for p in (1, 2, 3):
        assert float(P.path_norm(net, p, (1, 4, 4))) == pytest.approx(float(P.path_norm(folded, p, (1, 4, 4))), rel=RTOL)
