"""Node-wise rescaling, the paper's initialisations and balancing (Lemma 4.1).

A *hidden unit* is an output feature of a Linear layer, or an output channel of a Conv or
BatchNorm layer, whose value reaches the rest of the network only through positively
homogeneous activations, Dropout, pooling and reshaping, into other Linear / Conv / BatchNorm
layers.  Rescaling it by c > 0 multiplies its incoming weights and bias by c and divides its
outgoing weights by c: a ReLU network computes the same function and has the same path-norms.
Units that reach the output or a residual addition directly cannot be rescaled on their own.

For a BatchNorm that *receives* a rescaled unit, "dividing the outgoing weight" divides its
``weight`` and multiplies its ``running_mean`` by c (its eval-mode map a*x + c stays the same
function of the unscaled unit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import Tensor, nn

from pl_pathsgd.paths.errors import PathGeometryError
from pl_pathsgd.paths.graph import (
    BATCHNORMS,
    CONV_MODULES,
    FUNCTIONAL_POOLS,
    PARAMETRIZED_MODULES,
    PASS_THROUGH_FUNCTIONS,
    PASS_THROUGH_METHODS,
    PASS_THROUGH_MODULES,
    SHAPE_FUNCTIONS,
    SHAPE_METHODS,
    SHAPE_MODULES,
    PathGraph,
    TwinPass,
    trace,
)
from pl_pathsgd.paths.norms import check_p, path_norm_of

_POOL_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
                 nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                 nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)


@dataclass
class _Consumer:
    """Where a producer's units are used next: a parametrized module and, per input slot, the unit index."""

    module: nn.Module
    unit_of_input: Tensor  # long; for Linear: per input feature; for Conv/BatchNorm: per input channel


class UnitMap:
    """The rescalable hidden units of a traced network: which layer produces them and who consumes them."""

    def __init__(self, graph: PathGraph, p: float = 1.0):
        self.graph = graph
        self.values = _twin_values(graph, p)  # gamma_in (for this p) of every unit, and every shape
        self.consumers: dict[str, list[_Consumer]] = {}
        self.blocked: dict[str, str] = {}
        for node in graph.parametrized_nodes:
            try:
                self.consumers.setdefault(node.target, []).extend(self._follow(node))
            except _Blocked as why:
                self.blocked[node.target] = str(why)
        for name in self.blocked:
            self.consumers.pop(name, None)

    def units(self) -> dict[str, int]:
        """Layer name -> number of rescalable units, in topological order."""
        return {name: _unit_count(self.graph.model.get_submodule(name)) for name in self.consumers}

    def _follow(self, producer: fx.Node) -> list[_Consumer]:
        module = self.graph.module(producer)
        count = _unit_count(module)
        value = self.values[producer]
        unit_axis = value.dim() - 1 if isinstance(module, nn.Linear) else 1
        shape = [1] * value.dim()
        shape[unit_axis] = count
        index = torch.arange(count, dtype=torch.float64).reshape(shape).expand(value.shape)
        consumers: list[_Consumer] = []
        self._walk(producer, index, consumers)
        return consumers

    def _walk(self, node: fx.Node, index: Tensor, consumers: list[_Consumer]) -> None:
        if not node.users:
            raise _Blocked("its value is not used")
        for user in node.users:
            if user.op == "call_module" and isinstance(self.graph.module(user), PARAMETRIZED_MODULES):
                consumers.append(_consumer(self.graph.module(user), index, user.target))
                continue
            self._walk(user, self._through(user, node, index), consumers)

    def _through(self, user: fx.Node, source: fx.Node, index: Tensor) -> Tensor:
        """Carry the unit index of ``source`` through the operation ``user``, or raise _Blocked."""
        kind = _flow_kind(self.graph, user)
        if kind == "same":
            return index
        if kind == "pool":  # keeps channels, changes positions
            out = self.values[user]
            channels = index[(slice(None), slice(None)) + (0,) * (index.dim() - 2)]
            return channels.reshape(index.shape[:2] + (1,) * (index.dim() - 2)).expand(out.shape)
        if kind == "shape":
            args = fx.node.map_arg(user.args, lambda n: index if n is source else self.values[n])
            kwargs = fx.node.map_arg(user.kwargs, lambda n: index if n is source else self.values[n])
            if user.op == "call_module":
                return self.graph.module(user)(*args, **kwargs)
            if user.op == "call_method":
                return getattr(args[0], user.target)(*args[1:], **kwargs)
            return user.target(*args, **kwargs)
        where = "the network output" if user.op == "output" else f"'{user.name}'"
        raise _Blocked(f"its units reach {where} without passing through a Linear/Conv/BatchNorm layer")


class _Blocked(Exception):
    pass


def _flow_kind(graph: PathGraph, node: fx.Node) -> str:
    if node.op == "call_module":
        module = graph.module(node)
        if isinstance(module, PASS_THROUGH_MODULES):
            return "same"
        if isinstance(module, _POOL_MODULES):
            return "pool"
        if isinstance(module, SHAPE_MODULES):
            return "shape"
    if node.op == "call_function":
        if node.target in PASS_THROUGH_FUNCTIONS:
            return "same"
        if node.target in FUNCTIONAL_POOLS:
            return "pool"
        if node.target in SHAPE_FUNCTIONS:
            return "shape"
    if node.op == "call_method":
        if node.target in PASS_THROUGH_METHODS:
            return "same"
        if node.target in SHAPE_METHODS:
            return "shape"
    return "blocked"


def _consumer(module: nn.Module, index: Tensor, name: str) -> _Consumer:
    if isinstance(module, nn.Linear):
        rows = index.reshape(-1, module.in_features)
        unit_of_input = rows[0]
    else:
        per_channel = index.movedim(1, -1).reshape(-1, index.shape[1])
        rows, unit_of_input = per_channel, per_channel[0]
    if not bool((rows == unit_of_input).all()):
        raise _Blocked(f"its units are mixed with other positions at '{name}'")
    return _Consumer(module, unit_of_input.long())


def _unit_count(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, CONV_MODULES):
        return module.out_channels
    return module.num_features


def _twin_values(graph: PathGraph, p: float = 1.0) -> dict[fx.Node, object]:
    """The value of every node in one twin evaluation (gamma_in of every unit, and the shapes)."""
    values: dict[fx.Node, object] = {}
    with torch.no_grad():
        graph.evaluate(TwinPass(p=p, mode="sum", dtype=torch.float64), record=values)
    return values


# ----------------------------------------------------------------------------- rescaling


@torch.no_grad()
def _scale_producer(module: nn.Module, factor: Tensor) -> None:
    factor = factor.to(module.weight.dtype if module.weight is not None else torch.float32)
    if isinstance(module, BATCHNORMS):
        if module.weight is None:
            raise PathGeometryError(f"{type(module).__name__} without affine parameters has no incoming weight to rescale")
        module.weight.mul_(factor)
    else:
        module.weight.mul_(factor.reshape((-1,) + (1,) * (module.weight.dim() - 1)))
    if module.bias is not None:
        module.bias.mul_(factor)


@torch.no_grad()
def _scale_consumer(consumer: _Consumer, factor: Tensor) -> None:
    module = consumer.module
    per_input = factor[consumer.unit_of_input].to(module.weight.dtype)
    if isinstance(module, nn.Linear):
        module.weight.div_(per_input)
    elif isinstance(module, CONV_MODULES):
        # weight: (out, in/groups, *k); input channel c sits in group c // (in/groups), column c % (in/groups)
        in_per_group = module.weight.shape[1]
        out_per_group = module.weight.shape[0] // module.groups
        view = module.weight.view(module.groups, out_per_group, in_per_group, -1)
        view.div_(per_input.reshape(module.groups, 1, in_per_group, 1))
    else:  # BatchNorm: a = weight/sqrt(var+eps) must shrink by c, the map's shift must stay
        if module.weight is None:
            raise PathGeometryError(f"{type(module).__name__} without affine parameters cannot absorb a rescaling")
        module.weight.div_(per_input)
        module.running_mean.mul_(per_input.to(module.running_mean.dtype))


def rescalable_units(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> dict[str, int]:
    """The layers whose output units can be rescaled on their own, with their unit counts."""
    return UnitMap(trace(model, input_shape)).units()


def rescale_units(model: nn.Module, factors: dict[str, Tensor], input_shape: tuple[int, ...] | None = None) -> nn.Module:
    """Node-wise rescaling, in place: for each ``layer name -> factors`` (one positive factor per unit),
    multiply the units' incoming weights and bias by the factor and divide their outgoing weights by it.

    The model computes the same function (ReLU-like activations are positively homogeneous) and keeps
    its path-norms.  Raises if a layer's units cannot be rescaled alone (they reach the output or a
    residual addition) or a factor is not positive and finite.
    """
    return _rescale(UnitMap(trace(model, input_shape)), factors)


def _rescale(unit_map: UnitMap, factors: dict[str, Tensor]) -> nn.Module:
    model = unit_map.graph.model
    checked = {}
    for name, factor in factors.items():
        if name in unit_map.blocked:
            raise PathGeometryError(f"the units of '{name}' cannot be rescaled alone: {unit_map.blocked[name]}")
        if name not in unit_map.consumers:
            raise PathGeometryError(
                f"'{name}' is not a layer with rescalable units; choose among {sorted(unit_map.consumers)}"
            )
        factor = torch.as_tensor(factor, dtype=torch.float64).flatten()
        count = _unit_count(model.get_submodule(name))
        if factor.numel() == 1:
            factor = factor.expand(count)
        if factor.numel() != count or not bool(torch.isfinite(factor).all() and (factor > 0).all()):
            raise PathGeometryError(f"factors for '{name}' must be {count} positive finite numbers")
        checked[name] = factor
    for name, factor in checked.items():
        _scale_producer(model.get_submodule(name), factor)
        for consumer in unit_map.consumers[name]:
            _scale_consumer(consumer, factor)
    return model


# ----------------------------------------------------------------------------- initialisations


def _generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(seed if seed is not None else int(torch.seed() % (2**63)))
    return generator


@torch.no_grad()
def balanced_init_(model: nn.Module, seed: int | None = None) -> nn.Module:
    """The paper's balanced initialisation, in place: every Linear/Conv weight i.i.d. N(0, 1/fan_in),
    biases 0 (fan_in = in_features, or in_channels/groups * kernel size). Other layers are untouched."""
    generator = _generator(seed)
    for module in model.modules():
        if isinstance(module, (nn.Linear, *CONV_MODULES)):
            fan_in = module.weight[0].numel()
            sample = torch.randn(module.weight.shape, generator=generator, dtype=torch.float64) / math.sqrt(fan_in)
            module.weight.copy_(sample)
            if module.bias is not None:
                module.bias.zero_()
    return model


def unbalanced_init_(
    model: nn.Module,
    num_draws: int | None = None,
    scale: float = 10.0,
    seed: int | None = None,
    input_shape: tuple[int, ...] | None = None,
) -> nn.Module:
    """The paper's unbalanced rescaling, in place (Figure 3; the authors' ``makeUnbalanced``).

    Start from the current (e.g. balanced) weights, draw ``num_draws`` hidden units uniformly *with
    replacement* among all rescalable units (default: a quarter of them, e.g. 2000 for two hidden
    layers of 4000), and for each draw multiply the unit's incoming weights and bias by ``scale * c``
    and divide its outgoing weights by it, with c ~ LogNormal(0, 1). The function and the path-norms
    do not change; SGD's progress does.
    """
    unit_map = UnitMap(trace(model, input_shape))
    counts = unit_map.units()
    total = sum(counts.values())
    if total == 0:
        raise PathGeometryError(f"{type(model).__name__} has no hidden units that can be rescaled")
    draws = total // 4 if num_draws is None else int(num_draws)
    if draws < 0 or scale <= 0:
        raise ValueError("num_draws must be >= 0 and scale > 0")
    generator = _generator(seed)
    picks = torch.randint(total, (draws,), generator=generator)
    multipliers = scale * torch.exp(torch.randn(draws, generator=generator, dtype=torch.float64))
    flat = torch.ones(total, dtype=torch.float64)
    for unit, multiplier in zip(picks.tolist(), multipliers):
        flat[unit] *= multiplier
    factors, start = {}, 0
    for name, count in counts.items():
        factors[name] = flat[start : start + count]
        start += count
    return _rescale(unit_map, factors)


# ----------------------------------------------------------------------------- Lemma 4.1


def max_unit_norm(model: nn.Module, p: float = 2) -> Tensor:
    """mu_{p,inf}(w): the largest l_p norm of the incoming weights (bias included) of any unit of a
    Linear or Conv layer."""
    p = check_p(p, allow_inf=True)
    largest = torch.zeros((), dtype=torch.float64)
    for module in model.modules():
        if isinstance(module, (nn.Linear, *CONV_MODULES)):
            rows = module.weight.detach().to(torch.float64).flatten(1)
            if module.bias is not None:
                rows = torch.cat([rows, module.bias.detach().to(torch.float64)[:, None]], dim=1)
            largest = torch.maximum(largest, torch.linalg.vector_norm(rows, ord=p, dim=1).max())
    return largest


def balance(model: nn.Module, p: float = 2, input_shape: tuple[int, ...] | None = None) -> nn.Module:
    """Rescale a layered network of Linear layers, in place, to minimise mu_{p,inf} (Lemma 4.1).

    Each hidden unit v of layer l (1-based) is rescaled so that gamma_in(v) = t^(l*p) with
    t = phi_p^(1/d), d the number of layers.  For a network without biases every layer's incoming
    norms are then exactly t, so mu_{p,inf}(balanced)^d = phi_p(w) — Lemma 4.1's minimum — when
    there is a single output (with several outputs, the largest output's norm is at most t).
    With biases the identity still holds at depth 2 when the output layer has no bias; deeper, or
    with an output bias, bias paths are shorter than d and the minimum of mu^d can exceed phi_p
    (phi_p <= mu^d still holds whenever mu >= 1).
    """
    p = check_p(p, allow_inf=False)
    graph = trace(model, input_shape)
    model = graph.model
    unit_map = UnitMap(graph, p)
    layers = graph.parametrized_nodes
    if not layers or not all(isinstance(graph.module(n), nn.Linear) for n in layers):
        raise PathGeometryError("balance() needs a layered network of Linear layers (Lemma 4.1's setting)")
    hidden = layers[:-1]
    for node in hidden:
        if node.target not in unit_map.consumers:
            raise PathGeometryError(f"balance() needs a layered network; units of '{node.target}' cannot be rescaled: "
                                    f"{unit_map.blocked.get(node.target, 'they have no consumer')}")
    t = float(path_norm_of(graph, p)) ** (1.0 / len(layers))
    factors = {}
    for level, node in enumerate(hidden, start=1):
        gamma_in = unit_map.values[node].reshape(-1)  # the twin at a Linear's output
        factor = (t ** (level * p) / gamma_in).pow(1.0 / p)
        factors[node.target] = torch.where(torch.isfinite(factor) & (factor > 0), factor, torch.ones_like(factor))
    return _rescale(unit_map, factors)
