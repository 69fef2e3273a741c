"""Random networks from the supported vocabulary, and their path geometry from first principles.

``draw_network`` builds a network from a *spec* (a list of stages) and writes its ``forward`` in a
randomly chosen *style* per stage: plain modules, ``Linear`` subclasses with their own ``forward``,
functional calls, in-place operations (``add_``, ``relu_``, ``+=``), forward hooks, scalar
multiples.  ``DenseReference`` computes phi_p and every divisor from the same spec without the
package's engine: every layer is turned into explicit edge matrices by calling the *module itself*
on basis vectors with one parameter entry set to 1 at a time, and gamma_in / gamma_out are swept
through the resulting DAG of edges.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import Tensor, nn

DTYPE = torch.float64


class MaskedLinear(nn.Linear):
    """A Linear subclass whose forward multiplies the weight by a fixed 0/1 mask (pruning)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, generator: torch.Generator):
        super().__init__(in_features, out_features, bias=bias)
        self.register_buffer("mask", (torch.rand(out_features, in_features, generator=generator) > 0.3).to(DTYPE))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class FunctionalLinear(nn.Linear):
    """A Linear subclass with its own forward, written with a keyword argument and a default."""

    def forward(self, x: Tensor, gain: float = 1.0) -> Tensor:
        return F.linear(x, self.weight, bias=self.bias) * gain


@dataclass
class Stage:
    """One step of a generated network: ``kind`` with a module (or none) and how forward writes it."""

    kind: str  # "layer", "act", "pool", "scale", "flatten", "residual"
    module: nn.Module | None = None
    style: str = "plain"
    value: float = 1.0
    inner: list[Stage] = field(default_factory=list)


class GeneratedNet(nn.Module):
    def __init__(self, stages: list[Stage]):
        super().__init__()
        self.stages = stages
        self.layers = nn.ModuleList()
        self._register(stages)

    def _register(self, stages):
        for stage in stages:
            if stage.module is not None:
                self.layers.append(stage.module)
            self._register(stage.inner)

    def forward(self, x: Tensor) -> Tensor:
        return self._run(self.stages, x)

    def _run(self, stages: list[Stage], h: Tensor) -> Tensor:
        for stage in stages:
            h = self._stage(stage, h)
        return h

    def _stage(self, stage: Stage, h: Tensor) -> Tensor:
        if stage.kind in ("layer", "pool"):
            return stage.module(h)
        if stage.kind == "act":
            if stage.style == "inplace":
                return torch.relu_(h.clone()) if h.is_leaf else h.relu_()
            if stage.style == "functional":
                return F.relu(h)
            if stage.style == "leaky":
                return F.leaky_relu(h, 0.1)
            return stage.module(h)
        if stage.kind == "scale":
            if stage.style == "divide":
                return h / stage.value
            if stage.style == "negate":
                return -h
            return h * stage.value
        if stage.kind == "flatten":
            return h.flatten(1) if stage.style == "plain" else h.reshape(h.shape[0], -1)
        if stage.kind == "residual":
            branch = self._run(stage.inner, h)
            if stage.style == "add_":
                h = h.clone()
                h.add_(branch)
                return h
            if stage.style == "iadd":
                h = h + 0.0
                h += branch
                return h
            return h + branch
        raise ValueError(stage.kind)


# ----------------------------------------------------------------------------- drawing networks


@st.composite
def networks(draw, p_values=(1, 1.5, 2, 3, math.inf)):
    """(network, input_shape, p): a random network of the supported vocabulary."""
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    family = draw(st.sampled_from(["mlp", "conv1d", "conv2d", "last_axis"]))
    stages: list[Stage] = []
    if family == "mlp":
        shape: tuple[int, ...] = (draw(st.integers(2, 4)),)
    elif family == "conv1d":
        shape = (draw(st.integers(1, 2)), draw(st.integers(4, 6)))
    elif family == "conv2d":
        shape = (draw(st.integers(1, 2)), 4, 4)
    else:
        shape = (draw(st.integers(2, 3)), draw(st.integers(2, 4)))
    current = shape
    if family in ("conv1d", "conv2d"):
        for _ in range(draw(st.integers(1, 2))):
            current = _draw_conv_stage(draw, stages, current, generator)
        stages.append(Stage("flatten", style=draw(st.sampled_from(["plain", "reshape"]))))
        current = (math.prod(current),)
    elif family == "last_axis":  # Linear layers on the last axis of a (rows, features) input, then flatten
        width = draw(st.integers(2, 4))
        stages.append(Stage("layer", _linear(current[-1], width, draw, generator)))
        stages.append(_activation(draw))
        if draw(st.booleans()):
            stages.append(Stage("pool", nn.AvgPool1d(2, ceil_mode=True) if width > 1 else nn.Identity()))
            width = math.ceil(width / 2)
        stages.append(Stage("flatten"))
        current = (current[0] * width,)
    for _ in range(draw(st.integers(0, 2))):
        current = _draw_dense_stage(draw, stages, current, generator)
    stages.append(Stage("layer", _linear(current[0], draw(st.integers(1, 3)), draw, generator)))
    net = GeneratedNet(stages).to(DTYPE)
    _randomise(net, generator)
    net.eval()
    p = draw(st.sampled_from(p_values))
    return net, shape, p


def _linear(fan_in: int, fan_out: int, draw, generator) -> nn.Module:
    bias = draw(st.booleans())
    kind = draw(st.sampled_from(["plain", "plain", "masked", "functional", "hooked"]))
    if kind == "masked":
        return MaskedLinear(fan_in, fan_out, bias, generator)
    if kind == "functional":
        return FunctionalLinear(fan_in, fan_out, bias=bias)
    layer = nn.Linear(fan_in, fan_out, bias=bias)
    if kind == "hooked":  # a hook that rescales the output: a scalar multiple after the layer
        layer.register_forward_hook(lambda module, inputs, output: output * -2.0)
    return layer


def _activation(draw) -> Stage:
    style = draw(st.sampled_from(["plain", "inplace", "functional", "leaky", "module_inplace"]))
    if style == "module_inplace":
        return Stage("act", nn.ReLU(inplace=True), style="plain")
    return Stage("act", nn.ReLU() if style == "plain" else None, style=style)


def _draw_conv_stage(draw, stages, current, generator):
    spatial = len(current) - 1
    channels = current[0]
    conv = (nn.Conv1d, nn.Conv2d)[spatial - 1]
    out_channels = draw(st.integers(1, 3))
    kind = draw(st.sampled_from(["conv", "conv", "transposed", "residual", "grouped"]))
    if kind == "residual":  # x + conv(relu(BN(conv(x)))) with matching shapes, written in some style
        inner = [Stage("layer", conv(channels, channels, 3, padding=1, bias=draw(st.booleans()))), _activation(draw)]
        if draw(st.booleans()):
            inner.append(Stage("layer", (nn.BatchNorm1d, nn.BatchNorm2d)[spatial - 1](channels)))
        inner.append(Stage("layer", conv(channels, channels, 3, padding=1, bias=draw(st.booleans()))))
        stages.append(Stage("residual", style=draw(st.sampled_from(["plain", "add_", "iadd"])), inner=inner))
        stages.append(_activation(draw))
        return current
    if kind == "transposed":
        layer = (nn.ConvTranspose1d, nn.ConvTranspose2d)[spatial - 1](channels, out_channels, 2, stride=2,
                                                                      bias=draw(st.booleans()))
        stages.append(Stage("layer", layer))
        stages.append(_activation(draw))
        new = (out_channels, *(2 * s for s in current[1:]))
    else:
        groups = channels if kind == "grouped" and channels > 1 else 1
        out_channels = out_channels * groups
        stride = draw(st.sampled_from([1, 2]))
        dilation = draw(st.sampled_from([1, 2])) if stride == 1 else 1
        padding = dilation
        layer = conv(channels, out_channels, 3, stride=stride, padding=padding, dilation=dilation, groups=groups,
                     bias=draw(st.booleans()))
        stages.append(Stage("layer", layer))
        if draw(st.booleans()):
            stages.append(Stage("layer", (nn.BatchNorm1d, nn.BatchNorm2d)[spatial - 1](out_channels)))
        stages.append(_activation(draw))
        new = (out_channels, *((s + 2 * padding - dilation * 2 - 1) // stride + 1 for s in current[1:]))
    if draw(st.booleans()) and all(s >= 2 for s in new[1:]):
        pool = draw(st.sampled_from(["avg", "max", "adaptive_avg", "adaptive_max"]))
        if pool == "avg":
            module = (nn.AvgPool1d, nn.AvgPool2d)[spatial - 1](2, ceil_mode=True, padding=draw(st.sampled_from([0, 1])))
        elif pool == "max":
            module = (nn.MaxPool1d, nn.MaxPool2d)[spatial - 1](2, ceil_mode=draw(st.booleans()))
        elif pool == "adaptive_avg":
            module = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)[spatial - 1](2)
        else:
            module = (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)[spatial - 1](2)
        stages.append(Stage("pool", module))
        with torch.no_grad():
            new = tuple(module(torch.zeros(1, *new)).shape[1:])
    if draw(st.booleans()):
        stages.append(Stage("scale", value=draw(st.sampled_from([0.5, -1.5, 2.0])),
                            style=draw(st.sampled_from(["multiply", "divide", "negate"]))))
    return new


def _draw_dense_stage(draw, stages, current, generator):
    width = draw(st.integers(1, 4))
    if draw(st.integers(0, 3)) == 0:  # a residual MLP block: h + W2 relu(W1 h)
        inner = [Stage("layer", _linear(current[0], width, draw, generator)), _activation(draw),
                 Stage("layer", _linear(width, current[0], draw, generator))]
        stages.append(Stage("residual", style=draw(st.sampled_from(["plain", "add_", "iadd"])), inner=inner))
        stages.append(_activation(draw))
        return current
    stages.append(Stage("layer", _linear(current[0], width, draw, generator)))
    stages.append(_activation(draw))
    if draw(st.booleans()):
        stages.append(Stage("scale", value=draw(st.sampled_from([0.5, -1.5, 2.0])),
                            style=draw(st.sampled_from(["multiply", "divide", "negate"]))))
    return (width,)


def _randomise(net: nn.Module, generator: torch.Generator) -> None:
    with torch.no_grad():
        for name, parameter in net.named_parameters():
            parameter.copy_(torch.empty_like(parameter).uniform_(-1.5, 1.5, generator=generator))
        for module in net.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.5, 0.5, generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)


# ----------------------------------------------------------------------------- the reference


@dataclass
class Edges:
    """One layer as explicit edges: per parameter entry, its |edge matrix|^p; the constant part (pooling,
    scalar multiples, fixed weights) and the bias edges (from the constant unit)."""

    parametrized: list[tuple[str, tuple, Tensor]]  # (parameter name, index, (out, in) matrix of coefficients)
    constant: Tensor | None  # (out, in) coefficients not tied to a parameter
    bias: Tensor  # (out,) value of each output at input 0
    bias_patterns: list[tuple[str, tuple, Tensor]]  # (parameter name, index, (out,) 0/1 positions it feeds)


def _basis(shape: tuple[int, ...]) -> Tensor:
    size = math.prod(shape)
    return torch.eye(size, dtype=DTYPE).reshape(size, *shape)


@torch.no_grad()
def layer_edges(module: nn.Module, names: dict[int, str], in_shape: tuple[int, ...]) -> Edges:
    """Edges of a parametrized layer, by calling the layer with one parameter entry set to 1 at a time."""
    basis = _basis(in_shape)
    zero = torch.zeros(1, *in_shape, dtype=DTYPE)
    bias = module(zero).reshape(-1).clone()
    params = dict(module.named_parameters(recurse=False))
    saved = {n: t.clone() for n, t in params.items()}
    weight_names = [n for n in params if n != "bias"]
    parametrized, patterns = [], []
    for n, t in params.items():
        t.zero_()
    for n in weight_names:
        tensor = params[n]
        for index in _indices(tensor.shape):
            tensor[index] = 1.0
            matrix = (module(basis) - module(zero)).reshape(basis.shape[0], -1).T
            tensor[index] = 0.0
            parametrized.append((names[id(tensor)], index, matrix))
    if "bias" in params:
        tensor = params["bias"]
        for index in _indices(tensor.shape):
            tensor[index] = 1.0
            patterns.append((names[id(tensor)], index, module(zero).reshape(-1).clone()))
            tensor[index] = 0.0
    for n, t in params.items():
        t.copy_(saved[n])
    return Edges(parametrized, None, bias, patterns)


@torch.no_grad()
def fixed_edges(function, in_shape: tuple[int, ...]) -> Edges:
    """Edges of a fixed linear map (pooling, reshape, scalar multiple), from its values on basis vectors."""
    basis = _basis(in_shape)
    matrix = function(basis).reshape(basis.shape[0], -1).T
    return Edges([], matrix, torch.zeros(matrix.shape[0], dtype=DTYPE), [])


def _indices(shape):
    return [tuple(int(i) for i in idx) for idx in torch.cartesian_prod(*[torch.arange(s) for s in shape]).reshape(-1, len(shape))] \
        if len(shape) > 1 else [(i,) for i in range(shape[0])]


class DenseReference:
    """phi_p and the Path-SGD divisors of a generated network, swept over its explicit edges.

    The edges are computed once from the network's structure; their weights are read from the network's
    current parameters at every sweep.
    """

    def __init__(self, net: GeneratedNet, input_shape: tuple[int, ...]):
        self.net = net
        self.names = {id(t): n for n, t in net.named_parameters()}
        self.input_size = math.prod(input_shape)
        self.program, self.out_shape = self._compile(net.stages, input_shape)

    def _compile(self, stages, shape):
        program = []  # ("edges", Edges) or ("residual", inner program)
        for stage in stages:
            if stage.kind == "residual":
                inner, inner_shape = self._compile(stage.inner, shape)
                assert inner_shape == shape
                program.append(("residual", inner))
                continue
            function = _stage_function(stage)
            if stage.kind == "layer":
                program.append(("edges", layer_edges(stage.module, self.names, shape)))
            elif stage.kind in ("pool", "scale"):  # max pooling on basis vectors: 1 on every input of a window
                program.append(("edges", fixed_edges(function, shape)))
            with torch.no_grad():
                shape = tuple(function(torch.zeros(1, *shape, dtype=DTYPE)).shape[1:])
        return program, shape

    def _parameters(self) -> dict[str, Tensor]:
        return {n: t.detach() for n, t in self.net.named_parameters()}

    def gammas(self, p: float) -> tuple[dict[int, Tensor], Tensor]:
        """gamma_in at the input of every layer of edges, and at the output (sum or max semiring)."""
        maximum = math.isinf(p)
        parameters = self._parameters()
        inputs: dict[int, Tensor] = {}

        def run(program, g):
            for kind, item in program:
                if kind == "residual":
                    branch = run(item, g)
                    g = torch.maximum(g, branch) if maximum else g + branch
                    continue
                inputs[id(item)] = g
                matrix = edge_weights(item, parameters, p)
                bias = item.bias.abs() if maximum else item.bias.abs().pow(p)
                g = torch.maximum((matrix * g).amax(dim=1), bias) if maximum else matrix @ g + bias
            return g

        return inputs, run(self.program, torch.ones(self.input_size, dtype=DTYPE))

    def phi(self, p: float) -> float:
        _, out = self.gammas(p)
        return float(out.max()) if math.isinf(p) else float(out.sum()) ** (1 / p)

    def divisors(self, p: float) -> dict[str, Tensor]:
        """kappa^(2/p) per parameter entry: over the entry's edges u -> v, the sum of
        gamma_in(u) * gamma_out(v) * |coefficient|^p (the coefficient: what multiplies the parameter)."""
        inputs, out = self.gammas(p)
        parameters = self._parameters()
        kappa = {n: torch.zeros_like(t) for n, t in parameters.items()}

        def back(program, g_out):
            for kind, item in reversed(program):
                if kind == "residual":
                    g_out = g_out + back(item, g_out)
                    continue
                g_in = inputs[id(item)]
                for name, index, coefficients in item.parametrized:
                    kappa[name][index] += g_out @ coefficients.abs().pow(p) @ g_in
                for name, index, pattern in item.bias_patterns:
                    kappa[name][index] += g_out @ pattern.abs().pow(p)
                g_out = edge_weights(item, parameters, p).T @ g_out
            return g_out

        back(self.program, torch.ones_like(out))
        return {name: k.pow(2 / p) for name, k in kappa.items()}


def _stage_function(stage: Stage):
    """The stage as a function of a batch, with activations as the identity (the twin's view)."""
    if stage.kind in ("layer", "pool"):
        return stage.module
    if stage.kind == "scale":
        factor = -1.0 if stage.style == "negate" else (1 / stage.value if stage.style == "divide" else stage.value)
        return lambda t: t * factor
    if stage.kind == "flatten":
        return lambda t: t.reshape(t.shape[0], -1)
    return lambda t: t  # activations


def edge_weights(edges: Edges, parameters: dict[str, Tensor], p: float) -> Tensor:
    """|edge weight|^p (|.| for p = inf) of every edge of a layer, as one (out, in) matrix.

    Two parameter entries never share an edge, so the matrix is the sum of their separate terms.
    """
    maximum = math.isinf(p)

    def power(t):
        return t.abs() if maximum else t.abs().pow(p)

    total = None if edges.constant is None else power(edges.constant)
    for name, index, coefficients in edges.parametrized:
        term = power(coefficients * parameters[name][index])
        total = term if total is None else total + term
    return total
