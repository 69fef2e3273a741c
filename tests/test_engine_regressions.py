"""Networks the engine once computed wrong or refused for the wrong reason: exact answers or clear refusals.

Each network is checked against an independent dense unrolling (``tests/generated.py``) or a
written-out formula, not against the engine's own numbers.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pl_pathsgd as P
from pl_pathsgd.paths import graph as graph_module
from tests.generated import DTYPE, DenseReference, GeneratedNet, Stage


def power(t: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    return t.detach().double().abs().pow(p)


# ------------------------------------------------------------------------------- in-place operations


class InPlaceResidual(nn.Module):
    """``h.add_(...)`` without reassignment: the same function as ``h = h + ...``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.o = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 2)

    def forward(self, x):
        h = self.a(x)
        h.add_(self.b(torch.relu(h)))
        return self.o(torch.relu(h))


def in_place_residual_reference(net: InPlaceResidual, p: float) -> float:
    gamma_h = power(net.a.weight, p).sum(1) + power(net.a.bias, p)
    gamma_h = gamma_h + power(net.b.weight, p) @ gamma_h + power(net.b.bias, p)  # the skip and the branch
    out = power(net.o.weight, p) @ gamma_h + power(net.o.bias, p)
    return float(out.sum()) ** (1 / p)


@pytest.mark.parametrize("p", [1, 2, 3])
def test_in_place_residual_keeps_its_branch(p):
    net = InPlaceResidual().double()
    assert float(P.path_norm(net, p)) == pytest.approx(in_place_residual_reference(net, p), rel=1e-12)
    divisors = P.path_scaling(net, p)
    assert float(divisors["b.weight"].min()) > 1e-3  # the branch's edges are on paths (not the floor `tiny`)
    optimizer = P.PathSGD(net.parameters(), lr=0.01, p=p, model=net)
    F.mse_loss(net(torch.randn(8, 4, dtype=DTYPE)), torch.zeros(8, 2, dtype=DTYPE)).backward()
    before = net.b.weight.detach().clone()
    optimizer.step()
    assert float((net.b.weight - before).abs().max()) < 1.0  # a normal step, not 1e306


def test_writes_into_views_are_followed():
    class SliceWrite(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(1)
            self.a, self.o = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x):
            h = torch.relu(self.a(x))
            h[:, :2] *= 3.0  # a write into a view of h
            return self.o(h)

    net = SliceWrite().double()
    scale = torch.tensor([3.0, 3.0, 1.0, 1.0], dtype=DTYPE)
    gamma_h = (power(net.a.weight) * 1).sum(1) + power(net.a.bias)
    out = power(net.o.weight) @ (gamma_h * scale**2) + power(net.o.bias)
    assert float(P.path_norm(net, 2)) == pytest.approx(float(out.sum()) ** 0.5, rel=1e-12)


# ------------------------------------------------------------------------------- subclasses and hooks


class MaskedLinear(nn.Linear):
    def __init__(self, *args):
        super().__init__(*args)
        self.register_buffer("mask", (torch.rand(self.weight.shape, generator=torch.Generator().manual_seed(3)) > 0.5)
                             .to(self.weight.dtype))

    def forward(self, x):
        return F.linear(x, self.weight * self.mask, self.bias)


def test_a_linear_subclass_with_its_own_forward_is_computed_as_it_runs():
    torch.manual_seed(2)
    net = nn.Sequential(MaskedLinear(4, 3), nn.ReLU(), nn.Linear(3, 2)).double()
    masked = net[0].weight * net[0].mask
    gamma = power(masked).sum(1) + power(net[0].bias)
    expected = float((power(net[2].weight) @ gamma + power(net[2].bias)).sum()) ** 0.5
    assert float(P.path_norm(net, 2)) == pytest.approx(expected, rel=1e-12)
    divisors = P.path_scaling(net)
    masked_out = net[0].mask == 0
    assert bool((divisors["0.weight"][masked_out] == torch.finfo(DTYPE).tiny).all())  # no path uses them
    assert bool((divisors["0.weight"][~masked_out] > 1e-6).all())


def test_a_linear_subclass_that_squashes_is_refused_by_name():
    class SquashedLinear(nn.Linear):
        def forward(self, x):
            return torch.sigmoid(super().forward(x))

    with pytest.raises(P.UnsupportedModelError) as info:
        P.PathSGD(nn.Sequential(SquashedLinear(3, 3), nn.Linear(3, 2)).parameters(), lr=0.1,
                  model=nn.Sequential(SquashedLinear(3, 3), nn.Linear(3, 2)))
    (where, why), = info.value.problems
    assert "module '0' (SquashedLinear)" in where and "test_engine_regressions.py" in where
    assert why.startswith("sigmoid is not positively homogeneous")


def test_hooks_are_part_of_the_network():
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    net[2].register_forward_hook(lambda module, inputs, output: torch.tanh(output))
    with pytest.raises(P.UnsupportedModelError, match="tanh is not positively homogeneous") as info:
        P.path_norm(net, 2)
    assert "module '2' (Linear), which has forward hooks" in info.value.problems[0][0]


def test_pre_hook_scaling_keeps_bias_paths_apart():
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    net[0].register_forward_pre_hook(lambda module, inputs: (inputs[0] * 3.0,))
    gamma = 9.0 * power(net[0].weight).sum(1) + power(net[0].bias)  # only input paths get |3|^2
    expected = float((power(net[2].weight) @ gamma + power(net[2].bias)).sum()) ** 0.5
    assert float(P.path_norm(net, 2, (3,))) == pytest.approx(expected, rel=1e-12)


# ------------------------------------------------------------------------------- units on the right axis


def test_units_of_a_linear_on_the_last_axis_mixed_by_pooling_are_not_offered():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.AvgPool1d(7), nn.Flatten(), nn.Linear(2, 3)).double()
    graph = P.trace(net, (2, 5))
    assert P.rescalable_units(graph) == {}  # the pool averages the 7 units together
    with pytest.raises(P.PathGeometryError, match="cannot be rescaled alone: its units are mixed"):
        P.rescale_units(graph, {"0": torch.full((7,), 2.0)})
    with pytest.raises(P.PathGeometryError, match="no hidden units"):
        P.unbalanced_init_(net, input_shape=(2, 5))


def test_units_of_a_linear_on_the_last_axis_are_rescaled_on_that_axis():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4, 2)).double()
    graph = P.trace(net, (3, 5))
    assert P.rescalable_units(graph) == {"0": 4}
    x = torch.randn(6, 3, 5, dtype=DTYPE)
    with torch.no_grad():
        before, phi = net(x), float(P.path_norm(graph, 2))
    P.rescale_units(graph, {"0": torch.tensor([10.0, 0.1, 3.0, 0.5], dtype=DTYPE)})
    with torch.no_grad():
        torch.testing.assert_close(net(x), before, rtol=1e-12, atol=1e-12)
    assert float(P.path_norm(graph, 2)) == pytest.approx(phi, rel=1e-12)


# ------------------------------------------------------------------------------- low precision


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_update_equals_the_float64_reference_within_rounding(dtype):
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(256, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        net[0].weight.mul_(800.0)  # gamma_in of the hidden units about 2e5: above float16's largest number
    net = net.to(dtype)
    reference = copy.deepcopy(net).double()
    x = torch.randn(8, 256)
    optimizer = P.PathSGD(net.parameters(), lr=0.1, model=net)
    F.mse_loss(net(x.to(dtype)).float(), torch.zeros(8, 2)).backward()
    divisors = P.path_scaling(reference)  # float64
    assert float(divisors["2.weight"].max()) > 65504
    expected = {name: param.detach().double() - 0.1 * param.grad.double() / divisors[name]
                for name, param in net.named_parameters()}
    optimizer.step()
    assert optimizer.last_geometry_dtype == torch.float32
    for name, param in net.named_parameters():
        want = expected[name]
        rounding = torch.finfo(dtype).eps * want.abs() + torch.finfo(dtype).tiny
        assert bool(((param.double() - want).abs() <= rounding).all()), name
        assert bool((param.double() != reference.get_parameter(name).double()).any()), f"{name} did not move"


# ------------------------------------------------------------------------------- models refused for wrong reasons


def test_a_bare_layer_is_a_network():
    torch.manual_seed(6)
    linear = nn.Linear(3, 2).double()
    expected = float((power(linear.weight).sum(1) + power(linear.bias)).sum()) ** 0.5
    assert float(P.path_norm(linear, 2)) == pytest.approx(expected, rel=1e-12)
    optimizer = P.PathSGD(linear.parameters(), lr=0.1, model=linear)
    F.mse_loss(linear(torch.randn(4, 3, dtype=DTYPE)), torch.zeros(4, 2, dtype=DTYPE)).backward()
    optimizer.step()
    conv = nn.Conv2d(1, 2, 3).double()
    reference = DenseReference(GeneratedNet([Stage("layer", conv)]), (1, 5, 5))
    assert float(P.path_norm(conv, 2, (1, 5, 5))) == pytest.approx(reference.phi(2), rel=1e-12)


def test_scalar_multiples_and_keyword_arguments():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(7)
            self.a, self.o = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x, gain: float = 0.5, *, flip: bool = True):
            h = torch.relu(self.a(x) * 2) / 4
            out = self.o(h) * gain
            return -out if flip else out

    net = Scaled().double()
    gamma = (power(net.a.weight).sum(1) + power(net.a.bias)) * 2.0**2 / 4.0**2
    expected = float(((power(net.o.weight) @ gamma + power(net.o.bias)) * 0.5**2).sum()) ** 0.5
    assert float(P.path_norm(net, 2)) == pytest.approx(expected, rel=1e-12)


def test_forward_needing_a_second_input_is_refused_with_the_fix():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 2)

        def forward(self, x, mask):
            return self.a(x) * mask

    with pytest.raises(P.UnsupportedModelError, match=r"needs inputs besides the batch \(mask\).*defaults"):
        P.path_norm(TwoInputs(), 2, (3,))


def test_a_model_on_the_meta_device_gets_a_clear_message():
    with torch.device("meta"):
        net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(P.PathGeometryError, match="meta device.*to_empty"):
        P.path_norm(net)
    with pytest.raises(P.PathGeometryError, match="meta device"):
        P.PathSGD(net.parameters(), lr=0.1, model=net)


def test_examples_are_computed_one_by_one():
    class MixesTheBatch(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 2)

        def forward(self, x):
            h = self.a(x)
            return h - h.mean(0, keepdim=True)

    with pytest.raises(P.UnsupportedModelError, match="batch as a dimension of its own"):
        P.path_norm(MixesTheBatch())


# ------------------------------------------------------------------------------- one trace, and when to trace again


def test_one_trace_per_network_and_input_shape():
    torch.manual_seed(8)
    net = nn.Sequential(nn.Conv1d(1, 2, 3), nn.ReLU(), nn.AdaptiveAvgPool1d(4), nn.Flatten(), nn.Linear(8, 2)).double()
    before = graph_module.TRACE_COUNT
    graph = P.trace(net, (1, 10))
    P.path_norm(net, 2, (1, 10))
    P.path_scaling(net, 2, (1, 10))
    P.rescalable_units(net, (1, 10))
    optimizer = P.PathSGD(net.parameters(), lr=0.1, model=net, input_shape=(1, 10))
    assert optimizer.graph is graph and P.trace(net) is graph
    P.path_norm(graph.bind(copy.deepcopy(net)), 2)
    assert graph_module.TRACE_COUNT - before == 1
    P.trace(net, (1, 12))  # another input shape is another graph
    assert graph_module.TRACE_COUNT - before == 2


def test_a_changed_mode_or_hook_is_traced_again():
    torch.manual_seed(9)
    net = nn.Sequential(nn.Conv1d(1, 2, 3), nn.BatchNorm1d(2), nn.ReLU(), nn.Flatten(), nn.Linear(16, 2)).double().eval()
    graph = P.trace(net, (1, 10))
    first = float(P.path_norm(graph, 2))
    net.train()  # the BatchNorm now normalises with batch statistics: refused at the next use
    with pytest.raises(P.UnsupportedModelError, match="training mode"):
        P.path_norm(graph, 2)
    net.eval()
    assert float(P.path_norm(graph, 2)) == first
    net[4].register_forward_hook(lambda module, inputs, output: output * 2.0)  # every path ends there
    assert float(P.path_norm(graph, 2)) == pytest.approx(2.0 * first, rel=1e-12)


# ------------------------------------------------------------------------------- cost: one twin pass at batch size 1


def test_the_general_route_evaluates_the_twin_once_per_step_at_batch_size_one(monkeypatch):
    torch.manual_seed(10)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 2)).double()
    optimizer = P.PathSGD(net.parameters(), lr=0.01, model=net, input_shape=(1, 4, 4))
    shapes = []
    evaluate = graph_module.PathGraph.evaluate

    def counting(self, run, record=None):
        values = {} if record is None else record
        out = evaluate(self, run, values)
        shapes.append(tuple(values[self.program().input].shape))
        return out

    monkeypatch.setattr(graph_module.PathGraph, "evaluate", counting)
    for batch in (1, 500):
        shapes.clear()
        optimizer.zero_grad()
        F.cross_entropy(net(torch.randn(batch, 1, 4, 4, dtype=DTYPE)), torch.zeros(batch, dtype=torch.long)).backward()
        optimizer.step()
        assert shapes == [(1, 1, 4, 4)]


def test_the_mlp_route_reads_vectors_only(monkeypatch):
    from pl_pathsgd.paths import chain

    torch.manual_seed(11)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    optimizer = P.PathSGD(net.parameters(), lr=0.01, model=net)
    sweeps = []
    original = chain._Sweeps.__init__

    def recording(self, *args, **kwargs):
        original(self, *args, **kwargs)
        sweeps.append(self)

    monkeypatch.setattr(chain._Sweeps, "__init__", recording)
    monkeypatch.setattr(graph_module.PathGraph, "evaluate", lambda *a, **k: pytest.fail("no twin pass for an MLP"))
    for batch in (300, 7):  # the first step computes the geometry, the second fuses it with the update
        optimizer.zero_grad()
        F.cross_entropy(net(torch.randn(batch, 6, dtype=DTYPE)), torch.zeros(batch, dtype=torch.long)).backward()
        optimizer.step()
    assert len(sweeps) == 2
    for sweep in sweeps:
        assert [tuple(v.shape) for v in sweep.v] == [(6,), (8,), (8,)]
        assert [tuple(g.shape) for g in sweep.g] == [(8,), (8,), (3,)]
