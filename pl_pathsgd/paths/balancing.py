"""Rebalancing: node-wise rescalings that keep a network's function, and what they do to optimizer state.

A node-wise rescaling multiplies the incoming weights (and bias) of each hidden unit v by c_v > 0 and
divides its outgoing weights by c_v (:func:`pl_pathsgd.paths.rescale_units`).  Every parameter entry
is then multiplied by a factor r = c_u / c_v, where u is the unit it enters (1 if none) and v the
unit it leaves (1 if none).  Two rescalings are offered:

* :func:`l2_rebalance` minimises ||theta||_2^2 over all node-wise rescalings (in the spirit of
  Equi-normalization, Stock, Graham, Gribonval, Jegou, ICLR 2019).  For one unit, with A the squared
  norm of its incoming weights and bias and B that of its outgoing weights, the squared norm changes
  from A + B to c^2 A + B / c^2, smallest at c = (B / A)^(1/4), where it is 2 sqrt(A B).  The units of
  one layer share no weight, so a whole layer takes its exact minimiser at once; sweeping over the
  layers (block coordinate descent on a convex function of log c) never increases ||theta||_2 and
  converges to the unique minimiser when every unit has non-zero incoming and outgoing weights.
* :func:`pathnorm_rebalance` is Lemma 4.1's balancing (:func:`pl_pathsgd.paths.balance`): each layer's
  largest incoming l_p norm becomes phi_p^(1/d), for layered networks of Linear layers.

Both return the factors c of every layer, so that :func:`rescale_optimizer_state` can carry an
optimizer's state into the new coordinates.  Since r multiplies a weight, the chain rule divides its
gradient by r: state kept in units of the gradient is divided by r (SGD's momentum buffer, Adam's
first moment), state in units of the gradient squared by r^2 (Adam's second moment, Adagrad's sum),
and Path-SGD's momentum buffer, a sum of path-normalised gradients (dL/dw) / gamma whose divisor gamma
scales by 1/r^2, is multiplied by r: it scales like the weights (Theorem 5.1), which is why Path-SGD
keeps the same function trajectory through a rebalancing.  The transformation of a state tensor by
r^k is the engine's own rescaling applied to it with the factors c^k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from pl_pathsgd.paths.errors import PathGeometryError
from pl_pathsgd.paths.graph import PathGraph, trace
from pl_pathsgd.paths.norms import check_p, program_chain
from pl_pathsgd.paths.ops import TwinRun
from pl_pathsgd.paths.rescaling import UnitMap, balance, rescale_units

#: The sweeps :func:`l2_rebalance` makes at most, by default.
DEFAULT_MAX_SWEEPS = 1000


@dataclass
class Rebalanced:
    """The outcome of a rebalancing: the factor of every unit (layer name -> factors), and for
    :func:`l2_rebalance` the sweeps made, whether it converged, and ||theta||_2^2 before and after."""

    factors: dict[str, Tensor]
    sweeps: int = 0
    converged: bool = True
    squared_norm_before: float | None = None
    squared_norm_after: float | None = None

    @property
    def largest_factor(self) -> float:
        """max over units of max(c, 1/c): how far the rebalancing moved the network (1.0: not at all)."""
        logs = [factor.log().abs().max() for factor in self.factors.values() if factor.numel()]
        return math.exp(float(max(logs))) if logs else 1.0


# ----------------------------------------------------------------------------- checks


def rebalance_problem(model: nn.Module | PathGraph, method: str, input_shape: tuple[int, ...] | None = None) -> str | None:
    """Why ``method`` cannot rebalance this network (None if it can); nothing is changed."""
    unit_map = UnitMap(trace(model, input_shape))
    if method == "l2":
        for name, layer in unit_map.layers.items():
            if layer.producer.absorbed_inside:
                return (f"the units of '{name}' are part of a recurrence (nn.RNN: W_hh -> D W_hh D^-1 couples the units "
                        "of a layer with each other), where the per-unit closed form of the l2 rebalancing is not "
                        "exact; Rebalance does not support recurrent layers")
            shared = set(layer.producer.parameters) & {name for c in layer.consumers for name in c.parameters}
            if shared:
                return f"the units of '{name}' enter and leave through the same parameter ({sorted(shared)[0]})"
        return None
    if method == "pathnorm":
        chain = program_chain(unit_map.program)
        if chain is None:
            return ("method='pathnorm' is Lemma 4.1's balancing (pl_pathsgd.balance), defined for layered networks of "
                    "Linear layers and ReLU-like activations; use method='l2' for other networks")
        names = unit_map.graph.parameter_names(unit_map.program)
        for weight, _ in chain[:-1]:
            layer = names[weight].removesuffix(".weight")
            if layer not in unit_map.layers:
                return f"the units of '{layer}' cannot be rescaled: {unit_map.blocked.get(layer, 'they reach no layer')}"
        return None
    return f"unknown method {method!r}: choose 'l2' or 'pathnorm'"


def _check(model: nn.Module | PathGraph, method: str, input_shape: tuple[int, ...] | None) -> None:
    problem = rebalance_problem(model, method, input_shape)
    if problem is not None:
        raise PathGeometryError(problem)


# ----------------------------------------------------------------------------- l2 rebalancing


def l2_rebalance(model: nn.Module | PathGraph, input_shape: tuple[int, ...] | None = None,
                 tolerance: float | None = None, max_sweeps: int = DEFAULT_MAX_SWEEPS) -> Rebalanced:
    """Rescale the hidden units, in place, to minimise the squared l2 norm of all parameters.

    Sweeps over the layers with rescalable units, giving each layer its exact minimiser
    c = (||out||^2 / ||in||^2)^(1/4) per unit, until a sweep moves no unit by more than ``tolerance``
    (|log c| <= tolerance; default: 1e-12 for float64 weights, 16 float32 epsilons ~ 1.9e-6 for float32,
    where rounding keeps every factor away from 1 by about that) or after ``max_sweeps`` sweeps.
    A unit whose incoming or outgoing weights are all zero has no minimiser and keeps c = 1.
    Works for every layer the engine can rescale (Linear, convolutions, transposed convolutions,
    BatchNorm); recurrent layers are refused.  Returns the accumulated factors.
    """
    graph = trace(model, input_shape)
    _check(graph, "l2", None)
    if isinstance(max_sweeps, bool) or not isinstance(max_sweeps, int) or max_sweeps < 1:
        raise ValueError(f"max_sweeps={max_sweeps!r} must be an int >= 1")
    unit_map = UnitMap(graph)
    parameters = graph.parameters(unit_map.program)
    tolerance = _default_tolerance(parameters) if tolerance is None else float(tolerance)
    if not tolerance >= 0:
        raise ValueError(f"tolerance={tolerance!r} must be a number >= 0")
    entries = unit_map.program.cached("l2_rebalance_entries", lambda: _unit_entries(unit_map, parameters))
    total = {name: torch.ones(layer.producer.count, dtype=torch.float64) for name, layer in unit_map.layers.items()}
    result = Rebalanced(total, converged=not total, squared_norm_before=_squared_norm(parameters))
    for _ in range(max_sweeps if total else 0):
        largest_move = 0.0
        for name in unit_map.layers:
            incoming, outgoing = entries[name]
            factor = _closed_form(_sums(incoming, parameters, total[name].numel()),
                                  _sums(outgoing, parameters, total[name].numel()))
            rescale_units(graph, {name: factor})
            total[name] *= factor
            largest_move = max(largest_move, float(factor.log().abs().max()))
        result.sweeps += 1
        if largest_move <= tolerance:
            result.converged = True
            break
    result.squared_norm_after = _squared_norm(parameters)
    return result


def _default_tolerance(parameters: dict[str, Tensor]) -> float:
    dtypes = [t.dtype for t in parameters.values() if t.is_floating_point()]
    coarsest = max((torch.finfo(d).eps for d in dtypes), default=torch.finfo(torch.float64).eps)
    return max(1e-12, 16 * coarsest)


def _closed_form(incoming: Tensor, outgoing: Tensor) -> Tensor:
    """c = (B / A)^(1/4) per unit; 1 where A or B is 0 (no finite minimiser) or the ratio is not finite."""
    factor = (outgoing / incoming).pow(0.25)
    usable = (incoming > 0) & (outgoing > 0) & torch.isfinite(factor) & (factor > 0)
    return torch.where(usable, factor, torch.ones_like(factor))


def _squared_norm(parameters: dict[str, Tensor]) -> float:
    return float(sum(t.detach().to(torch.float64).square().sum() for t in parameters.values()))


# The units an entry belongs to, per parameter: ("axis", dim, ids along dim) when the unit depends on one
# index only (the usual case: rows or columns of a weight), else ("dense", ids of every entry); id -1: none.
_Index = tuple


def _unit_entries(unit_map: UnitMap, parameters: dict[str, Tensor]) -> dict[str, tuple[dict, dict]]:
    """For each layer, which entries of which parameters are incoming (scaled by c) and outgoing (divided by c)
    of which of its units: found by applying the layer's own scalings to ones with factors 2, 3, 4, ..."""
    buffers = unit_map.graph.buffers(unit_map.program)
    layout = {}
    for name, layer in unit_map.layers.items():
        codes = torch.arange(layer.producer.count, dtype=torch.float64) + 2
        ones = {key: _ones_like(parameters[key]) for key in layer.producer.parameters}
        layer.producer.scale(ones, codes)
        incoming = {key: _index(value, lambda v: v) for key, value in ones.items()}
        outgoing: dict[str, _Index] = {}
        for consumer in layer.consumers:
            ones = {key: _ones_like(parameters[key]) for key in consumer.parameters}
            consumer.divide(ones, {key: _ones_like(buffers[key]) for key in consumer.buffers}, codes)
            outgoing.update({key: _index(value, torch.reciprocal) for key, value in ones.items()})
        layout[name] = (incoming, outgoing)
    return layout


def _ones_like(tensor: Tensor) -> Tensor:
    device = tensor.device if tensor.device.type != "mps" else torch.device("cpu")  # float64 codes
    return torch.ones(tensor.shape, dtype=torch.float64, device=device)


def _index(scaled: Tensor, decode) -> _Index:
    """Unit ids of the entries of ``scaled`` (1 where untouched, else the code 2 + id, possibly inverted)."""
    ids = torch.where(scaled == 1, torch.full_like(scaled, -1.0), decode(scaled).round() - 2).long()
    for dim in range(ids.dim()):
        moved = ids.movedim(dim, 0).reshape(ids.shape[dim], -1)
        if bool((moved == moved[:, :1]).all()):
            return ("axis", dim, moved[:, 0].cpu())
    return ("dense", None, ids.cpu())


def _sums(index: dict[str, _Index], parameters: dict[str, Tensor], count: int) -> Tensor:
    """Per unit, the sum of the squared entries that belong to it."""
    sums = torch.zeros(count, dtype=torch.float64)
    for key, (kind, dim, ids) in index.items():
        squares = parameters[key].detach().to(torch.float64).square()
        if kind == "axis":
            others = [d for d in range(squares.dim()) if d != dim]
            squares = squares.sum(dim=others) if others else squares
        squares = squares.reshape(-1).cpu()
        ids = ids.reshape(-1)
        carries = ids >= 0
        sums.index_add_(0, ids[carries], squares[carries])
    return sums


# ----------------------------------------------------------------------------- Lemma 4.1


def pathnorm_rebalance(model: nn.Module | PathGraph, p: float = 2, input_shape: tuple[int, ...] | None = None) -> Rebalanced:
    """Lemma 4.1's balancing, in place (:func:`pl_pathsgd.paths.balance`), with the factors it applied.

    The factor of a unit v is recovered from gamma_in(v), the sum over paths into v of prod |w|^p, which a
    rescaling multiplies by exactly c_v^p; a unit with gamma_in(v) = 0 is left alone by ``balance``.
    """
    p = check_p(p, allow_inf=False)
    graph = trace(model, input_shape)
    _check(graph, "pathnorm", None)
    unit_map = UnitMap(graph)
    before = _gamma_in(unit_map, p)
    balance(graph, p=p)
    after = _gamma_in(unit_map, p)
    factors = {}
    for name in unit_map.layers:
        ratio = (after[name] / before[name]).pow(1.0 / p)
        factors[name] = torch.where((before[name] > 0) & torch.isfinite(ratio) & (ratio > 0), ratio,
                                    torch.ones_like(ratio))
    return Rebalanced(factors)


def _gamma_in(unit_map: UnitMap, p: float) -> dict[str, Tensor]:
    """Per rescalable unit, the sum of gamma_in over the positions it occupies at its layer's output."""
    values: dict = {}
    with torch.no_grad():
        unit_map.graph.evaluate(TwinRun(p=p, mode="sum", dtype=torch.float64), record=values)
    sums = {}
    for name, layer in unit_map.layers.items():
        value = values[unit_map.nodes[name]]
        value = value[0] if isinstance(value, (list, tuple)) else value
        per_unit = value.detach().movedim(layer.producer.axis % value.dim(), -1).reshape(-1, layer.producer.count)
        sums[name] = per_unit.sum(dim=0).to(torch.float64).cpu()
    return sums


def rebalance(model: nn.Module | PathGraph, method: str = "l2", *, p: float = 2,
              input_shape: tuple[int, ...] | None = None, tolerance: float | None = None,
              max_sweeps: int = DEFAULT_MAX_SWEEPS) -> Rebalanced:
    """``method="l2"``: :func:`l2_rebalance`; ``method="pathnorm"``: :func:`pathnorm_rebalance` with ``p``."""
    if method == "l2":
        return l2_rebalance(model, input_shape, tolerance, max_sweeps)
    if method == "pathnorm":
        return pathnorm_rebalance(model, p, input_shape)
    raise ValueError(f"unknown method {method!r}: choose 'l2' or 'pathnorm'")


# ----------------------------------------------------------------------------- optimizer state


def parameter_factors(model: nn.Module | PathGraph, factors: dict[str, Tensor],
                      input_shape: tuple[int, ...] | None = None) -> dict[str, Tensor]:
    """For a rescaling by ``factors`` (layer name -> one factor per unit), the factor r by which it multiplies
    each entry of each parameter: ``{parameter name: tensor of r}`` (float64, only parameters it changes)."""
    graph = trace(model, input_shape)
    unit_map = UnitMap(graph)
    names = graph.parameter_names(unit_map.program)
    parameters = graph.parameters(unit_map.program)
    touched = _touched(unit_map, factors)
    ones = {key: _ones_like(parameters[key]) for key in touched}
    _apply(unit_map, factors, ones, power=1)
    return {names[key]: value for key, value in ones.items()}


def _touched(unit_map: UnitMap, factors: dict[str, Tensor]) -> set[str]:
    touched: set[str] = set()
    for name in factors:
        layer = unit_map.layers[name]
        touched.update(layer.producer.parameters)
        for consumer in layer.consumers:
            touched.update(consumer.parameters)
    return touched


def _apply(unit_map: UnitMap, factors: dict[str, Tensor], tensors: dict[str, Tensor], power: float) -> None:
    """Multiply every entry of ``tensors`` (by parameter placeholder) by r^power, r the rescaling's entry factor."""
    buffers = unit_map.graph.buffers(unit_map.program)
    for name, factor in factors.items():
        layer = unit_map.layers[name]
        factor = factor.to(torch.float64).pow(power)
        layer.producer.scale(tensors, factor)
        for consumer in layer.consumers:
            consumer.divide(tensors, {key: buffers[key].detach().clone() for key in consumer.buffers}, factor)


#: For each supported optimizer class (matched by name along the class's MRO): the state entries that
#: follow a rescaling, with the power of r by which each is multiplied.
STATE_POWERS: dict[str, dict[str, int]] = {
    "PathSGD": {"momentum_buffer": 1},  # a sum of path-normalised gradients: scales like the weights
    "SGD": {"momentum_buffer": -1},  # a sum of gradients
    "Adagrad": {"sum": -2},  # a sum of squared gradients
    "Adam": {"exp_avg": -1, "exp_avg_sq": -2, "max_exp_avg_sq": -2},
}


def _supported_class(optimizer: Optimizer) -> str | None:
    """The name of the supported optimizer class ``optimizer`` is (or derives from), or None."""
    for cls in type(optimizer).__mro__:
        if cls.__name__ in STATE_POWERS and cls.__module__.startswith(("torch.optim", "pl_pathsgd")):
            return cls.__name__
    return None


def optimizer_problem(optimizer: Optimizer) -> str | None:
    """Why the state of ``optimizer`` cannot follow a rescaling exactly (None if it can)."""
    name = _supported_class(optimizer)
    if name is None:
        return (f"{type(optimizer).__name__} is not supported: Rebalance cannot carry its state through a rescaling. "
                "Supported: pl_pathsgd.PathSGD, torch.optim.SGD, Adagrad, Adam and AdamW")
    for group in optimizer.param_groups:
        keeps_gradient_state = name not in ("SGD", "PathSGD") or group.get("momentum", 0) != 0
        decoupled = bool(group.get("decoupled_weight_decay", False))  # AdamW: decay applied to the weights directly
        if group.get("weight_decay", 0) and keeps_gradient_state and not decoupled:
            return (f"{name} with weight_decay={group['weight_decay']} keeps state that mixes gradient units (scaled "
                    "by 1/r) with weight-decay terms (scaled by r), which no rescaling of the state can follow; use "
                    "weight_decay=0 (or momentum=0 for SGD, or AdamW's decoupled weight decay)")
        if group.get("initial_accumulator_value", 0):
            return (f"{name} with initial_accumulator_value={group['initial_accumulator_value']} keeps a sum that "
                    "mixes that constant with squared gradients; use initial_accumulator_value=0")
    return None


def rescale_optimizer_state(optimizer: Optimizer, model: nn.Module | PathGraph, factors: dict[str, Tensor],
                            input_shape: tuple[int, ...] | None = None) -> None:
    """Carry ``optimizer``'s state into the coordinates of a rescaling by ``factors`` (layer -> per-unit factors)
    already applied to ``model``'s weights: each state entry of a parameter entry with factor r is multiplied by
    r^k (k from :data:`STATE_POWERS`).  Raises ``ValueError`` for an optimizer whose state cannot follow."""
    problem = optimizer_problem(optimizer)
    if problem is not None:
        raise ValueError(problem)
    graph = trace(model, input_shape)
    unit_map = UnitMap(graph)
    parameters = graph.parameters(unit_map.program)
    touched = _touched(unit_map, factors)
    for key, power in STATE_POWERS[_supported_class(optimizer)].items():
        held = {name: optimizer.state[parameters[name]].get(key) for name in touched if parameters[name] in optimizer.state}
        held = {name: value for name, value in held.items() if isinstance(value, Tensor) and value.shape == parameters[name].shape}
        if held:
            _apply(unit_map, factors, _with_scratch(held, parameters, touched), power)


def rescale_gradients(model: nn.Module | PathGraph, factors: dict[str, Tensor],
                      input_shape: tuple[int, ...] | None = None) -> None:
    """Divide the ``.grad`` of every parameter entry by its factor r (the chain rule), e.g. between two
    micro-batches of an accumulated step."""
    graph = trace(model, input_shape)
    unit_map = UnitMap(graph)
    parameters = graph.parameters(unit_map.program)
    touched = _touched(unit_map, factors)
    held = {name: parameters[name].grad for name in touched if parameters[name].grad is not None}
    if held:
        _apply(unit_map, factors, _with_scratch(held, parameters, touched), -1)


def _with_scratch(held: dict[str, Tensor], parameters: dict[str, Tensor], touched: set[str]) -> dict[str, Tensor]:
    """The tensors to transform, plus throw-away ones for the parameters of the rescaling that hold none."""
    return {name: held[name] if name in held else torch.empty_like(parameters[name]) for name in touched}


__all__ = [
    "DEFAULT_MAX_SWEEPS",
    "STATE_POWERS",
    "Rebalanced",
    "l2_rebalance",
    "optimizer_problem",
    "parameter_factors",
    "pathnorm_rebalance",
    "rebalance",
    "rebalance_problem",
    "rescale_gradients",
    "rescale_optimizer_state",
]
