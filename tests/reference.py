"""Path geometry from first principles, independent of the package's code.

* ``enumerate_mlp_paths``: every path of a Linear/ReLU MLP listed one by one.
* ``dense_unrolling``: a conv/pool network written as explicit matrices (column k = the layer
  applied to the k-th basis vector), whose entrywise |.|^p products sum over all paths.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn


def enumerate_mlp_paths(layers: list[nn.Linear]):
    """Yield every path as a list of (parameter name, index, value) edges.

    A path starts at an input unit or at the bias of some unit, and ends at an output unit.
    Parameters are named ``"{layer}.weight"`` / ``"{layer}.bias"`` by position in ``layers``.
    """
    widths = [layers[0].in_features] + [layer.out_features for layer in layers]

    def continue_from(level: int, unit: int, edges: list):
        if level == len(layers):
            yield edges
            return
        weight = layers[level].weight.detach()
        for nxt in range(widths[level + 1]):
            edge = (f"{level}.weight", (nxt, unit), float(weight[nxt, unit]))
            yield from continue_from(level + 1, nxt, edges + [edge])

    for unit in range(widths[0]):
        yield from continue_from(0, unit, [])
    for level, layer in enumerate(layers):
        if layer.bias is None:
            continue
        for unit in range(layer.out_features):
            edge = (f"{level}.bias", (unit,), float(layer.bias.detach()[unit]))
            yield from continue_from(level + 1, unit, [edge])


def brute_force_mlp(layers: list[nn.Linear], p: float):
    """(phi_p, {param name: divisor tensor}) by enumerating every path."""
    paths = list(enumerate_mlp_paths(layers))
    if math.isinf(p):
        return max(math.prod(abs(v) for _, _, v in path) for path in paths), None
    total = sum(math.prod(abs(v) ** p for _, _, v in path) for path in paths)
    kappa = {}
    for level, layer in enumerate(layers):
        kappa[f"{level}.weight"] = torch.zeros(layer.weight.shape, dtype=torch.float64)
        if layer.bias is not None:
            kappa[f"{level}.bias"] = torch.zeros(layer.bias.shape, dtype=torch.float64)
    for path in paths:
        for i, (name, index, _) in enumerate(path):  # derivative of the path's term w.r.t. |w_e|^p
            kappa[name][index] += math.prod(abs(v) ** p for j, (_, _, v) in enumerate(path) if j != i)
    return total ** (1 / p), {name: k ** (2 / p) for name, k in kappa.items()}


def layer_matrix(layer, in_shape: tuple[int, ...], no_bias: bool = True) -> torch.Tensor:
    """The dense matrix of a linear map (bias removed): column k is the layer applied to basis vector k."""
    size = math.prod(in_shape)
    basis = torch.eye(size, dtype=torch.float64).reshape(size, *in_shape)
    with torch.no_grad():
        out = layer(basis)
    return out.reshape(size, -1).T


def conv_patterns(conv: nn.Conv2d, in_shape: tuple[int, ...]):
    """For every kernel weight, its 0/1 pattern in the dense matrix of the convolution."""
    patterns = {}
    for index in itertools.product(*(range(s) for s in conv.weight.shape)):
        probe = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                          bias=False).double()
        with torch.no_grad():
            probe.weight.zero_()
            probe.weight[index] = 1.0
        patterns[index] = layer_matrix(probe, in_shape)
    return patterns
