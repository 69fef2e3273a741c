"""The path engine against first principles on generated networks (property-based, with hypothesis).

Every network is drawn from the supported vocabulary (Linear, Linear subclasses with their own
forward, masked weights, hooks, Conv1d/2d with stride, dilation and groups, ConvTranspose, BatchNorm
in eval mode, average / max / adaptive pooling, residual blocks written out of place or in place,
scalar multiples, ReLU in every spelling, biases on or off) and checked against an independent dense
unrolling of its edges (``tests/generated.py``).  ``--hypothesis-profile=thorough`` runs many more.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import pl_pathsgd as P
from tests.generated import DTYPE, DenseReference, networks

TINY = torch.finfo(DTYPE).tiny


@given(networks())
def test_path_norm_and_every_divisor_equal_the_dense_unrolling(case):
    net, shape, p = case
    reference = DenseReference(net, shape)
    assert float(P.path_norm(net, p, shape)) == pytest.approx(reference.phi(p), rel=1e-9, abs=1e-300)
    if math.isinf(p):
        return
    divisors = P.path_scaling(net, p, shape)
    expected = reference.divisors(p)
    assert set(divisors) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(divisors[name], value.clamp_min(TINY), rtol=1e-9, atol=0, msg=name)


def random_factors(units: dict[str, int], seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: 10 ** (4 * torch.rand(n, generator=generator, dtype=DTYPE) - 2) for name, n in units.items()}


@given(networks(p_values=(1, 2, 3, math.inf)), st.integers(0, 2**31 - 1))
def test_random_rescaling_keeps_the_function_and_the_path_norm(case, seed):
    net, shape, p = case
    graph = P.trace(net, shape)
    units = P.rescalable_units(graph)
    rescaled = copy.deepcopy(net)
    P.rescale_units(graph.bind(rescaled), random_factors(units, seed))
    x = torch.randn(5, *shape, dtype=DTYPE, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        torch.testing.assert_close(rescaled(x), net(x), rtol=1e-9, atol=1e-12)
    assert float(P.path_norm(graph.bind(rescaled), p)) == pytest.approx(float(P.path_norm(graph, p)), rel=1e-9)


@given(networks(p_values=(1, 1.5, 2, 3)), st.integers(0, 2**31 - 1))
def test_one_path_sgd_step_commutes_with_rescaling(case, seed):
    net, shape, p = case
    graph = P.trace(net, shape)
    units = P.rescalable_units(graph)
    factors = random_factors(units, seed)
    rescaled = copy.deepcopy(net)
    P.rescale_units(graph.bind(rescaled), factors)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(6, *shape, dtype=DTYPE, generator=generator)
    with torch.no_grad():
        target = torch.randn(net(x).shape, dtype=DTYPE, generator=generator)
    for model in (net, rescaled):
        optimizer = P.PathSGD(model.parameters(), lr=0.01, p=p, model=model, input_shape=shape)
        torch.nn.functional.mse_loss(model(x), target).backward()
        optimizer.step()
    with torch.no_grad():
        torch.testing.assert_close(rescaled(x), net(x), rtol=1e-8, atol=1e-10)
    P.rescale_units(graph, factors)  # T(w after the step) is the step from T(w)
    for (name, a), b in zip(net.named_parameters(), rescaled.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12, msg=name)


@given(networks(p_values=(2,)))
def test_the_in_place_rewrite_equals_the_general_functionalization(case):
    """Simple in-place operations are rewritten without torch's functionalization; both give the same geometry."""
    from pl_pathsgd.paths import tracing

    net, shape, p = case
    rewritten = P.paths.PathGraph(net, shape)
    original = tracing._functionalize_in_place
    tracing._functionalize_in_place = lambda graph: False
    try:
        general = P.paths.PathGraph(net, shape)
    finally:
        tracing._functionalize_in_place = original
    assert float(P.path_norm(rewritten, p)) == pytest.approx(float(P.path_norm(general, p)), rel=1e-12)
    a, b = P.path_scaling(rewritten, p), P.path_scaling(general, p)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-12, atol=0)
