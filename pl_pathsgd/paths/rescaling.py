"""Node-wise rescaling, the paper's initialisations and balancing (Lemma 4.1).

A *hidden unit* is an output feature of a Linear layer (its last dimension), an output channel of a
convolution or of a BatchNorm (dimension 1), whose value reaches the rest of the network only
through positively homogeneous activations, dropout and operations that move entries (reshape,
flatten, slicing, concatenation...) into other such layers.  Rescaling it by c > 0 multiplies its
incoming weights and bias by c and divides its outgoing weights by c: a ReLU network computes the
same function and has the same path-norms.

Which units qualify is decided on the traced graph: the unit ids of each layer are carried through
every operation by its rule (:mod:`pl_pathsgd.paths.ops`).  A layer's units cannot be rescaled alone
when they reach the network output, an addition with other values (a residual connection), a
pooling window or a reduction shared with other units, or an operation that does not pass units on;
:func:`rescalable_units` leaves such layers out and ``UnitMap.blocked`` says why.

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
from pl_pathsgd.paths.graph import PathGraph, Program, trace
from pl_pathsgd.paths.norms import check_p, path_norm_of, program_chain
from pl_pathsgd.paths.ops import NONE, Blocked, Consumer, Kind, Producer, Rule, TwinRun
from pl_pathsgd.paths.ops.registry import sizes_at_batch_one


@dataclass
class LayerUnits:
    """The units of one layer: how to scale them at their source and where they are absorbed."""

    producer: Producer
    consumers: list[Consumer]


@dataclass
class _Units:
    layers: dict[str, LayerUnits]
    blocked: dict[str, str]
    nodes: dict[str, fx.Node]  # layer name -> the operation that produces its units


class UnitMap:
    """The rescalable hidden units of a traced network: which layer produces them and who absorbs them.

    ``layers`` maps a layer name (its weight's name without ``.weight``) to its units; ``blocked`` maps
    the layers whose units cannot be rescaled alone to the reason.  Computed once per traced graph.
    """

    def __init__(self, graph: PathGraph):
        self.graph = graph
        program = graph.program()
        self.program = program
        analysis: _Units = program.cached("units", lambda: _analyse_units(program))
        self.layers = analysis.layers
        self.blocked = analysis.blocked
        self.nodes = analysis.nodes

    def units(self) -> dict[str, int]:
        """Layer name -> number of rescalable units, in the order the layers run."""
        return {name: layer.producer.count for name, layer in self.layers.items()}


def _layer_name(program: Program, node: fx.Node) -> str:
    weight = node.args[1] if len(node.args) > 1 else None
    if isinstance(weight, fx.Node) and weight.name in program.traced.parameters:
        fqn = program.traced.parameters[weight.name]
        return fqn[: -len(".weight")] if fqn.endswith(".weight") else fqn
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else node.name


def _analyse_units(program: Program) -> _Units:
    layers: dict[str, LayerUnits] = {}
    blocked: dict[str, str] = {}
    nodes: dict[str, fx.Node] = {}
    for index, step in enumerate(program.steps):
        if step.rule is None or step.kind != Kind.ACT or type(step.rule).produces is Rule.produces:
            continue
        produced = step.rule.produces(step.call)
        if produced is None:
            continue
        if isinstance(produced, str):
            name = _layer_name(program, step.node)
            nodes[name] = step.node
            blocked[name] = produced
            continue
        for producer in produced if isinstance(produced, list) else [produced]:
            name = producer.name or _layer_name(program, step.node)
            nodes[name] = step.node
            try:
                consumers = _follow(program, index, producer)
            except Blocked as why:
                blocked[name] = str(why)
                continue
            layers[name] = LayerUnits(producer, consumers)
    return _Units(layers, blocked, nodes)


def _follow(program: Program, start: int, producer: Producer) -> list[Consumer]:
    """Carry the producer's unit ids through the graph; the layers that absorb them, or Blocked."""
    steps = program.steps
    source = steps[start].node
    ids: dict[fx.Node, object] = {source: _producer_ids(source, producer)}
    literals: dict[fx.Node, object] = {}
    consumers: list[Consumer] = []

    def value(node: fx.Node):
        if node in ids:
            return ids[node]
        if node in literals:
            return literals[node]
        kind = program.kinds[node]
        meta = node.meta.get("val")
        if kind == Kind.LITERAL:
            return meta
        return _placeholder_like(meta, NONE if kind == Kind.ACT else 0.0)

    for step in steps[start + 1:]:
        node = step.node
        if node.op == "output":
            break
        touched = [n for n in node.all_input_nodes if n in ids]
        if not touched:
            continue
        args = fx.node.map_arg(node.args, value)
        kwargs = fx.node.map_arg(node.kwargs, value)
        if step.kind == Kind.LITERAL or step.rule is None:  # sizes of values that carry units
            literals[node] = node.target(*args, **kwargs)
            continue
        rule = step.rule
        if type(rule).consumes is not Rule.consumes and node.args and node.args[0] in ids:
            entering = ids[node.args[0]]
            if bool(torch.isnan(entering).any()):
                raise Blocked(f"its units are mixed with other values before {step.call.where}")
            if not bool((entering >= 0).any()):
                continue
            consumer = rule.consumes(step.call, entering, *args[1:], **kwargs)
            if isinstance(consumer, str):
                raise Blocked(consumer)
            consumers.append(consumer)
            continue
        try:
            ids[node] = rule.flow(step.call, *args, **kwargs)
        except Blocked as why:
            raise Blocked(f"its units reach {step.call.where}: {why}") from None
    final = ids.get(program.output)
    if final is not None and bool((torch.isnan(final) | (final >= 0)).any()):
        raise Blocked("its units reach the network output without passing through another layer")
    if not consumers and not producer.absorbed_inside:
        raise Blocked("its units reach no other layer")
    return consumers


def _producer_ids(node: fx.Node, producer: Producer):
    meta = node.meta["val"]
    if producer.place is not None:
        return producer.place(meta)
    output = meta[0] if isinstance(meta, (list, tuple)) else meta
    shape = sizes_at_batch_one(output.shape)
    axis = producer.axis % len(shape)
    index_shape = [1] * len(shape)
    index_shape[axis] = producer.count
    ids = torch.arange(producer.count, dtype=torch.float64).reshape(index_shape).expand(shape).clone()
    if isinstance(meta, (list, tuple)):
        return (ids, *([None] * (len(meta) - 1)))
    return ids


def _placeholder_like(meta, fill: float):
    if isinstance(meta, Tensor):
        return torch.full(sizes_at_batch_one(meta.shape), fill, dtype=torch.float64)
    if isinstance(meta, (list, tuple)):
        return type(meta)(_placeholder_like(m, fill) for m in meta)
    return meta


def _twin_values(graph: PathGraph, p: float = 1.0) -> dict[fx.Node, object]:
    """The value of every node in one twin evaluation (gamma_in of every unit)."""
    values: dict[fx.Node, object] = {}
    with torch.no_grad():
        graph.evaluate(TwinRun(p=p, mode="sum", dtype=torch.float64), record=values)
    return values


# ----------------------------------------------------------------------------- rescaling


def rescalable_units(model: nn.Module | PathGraph, input_shape: tuple[int, ...] | None = None) -> dict[str, int]:
    """The layers whose output units can be rescaled on their own, with their unit counts."""
    return UnitMap(trace(model, input_shape)).units()


def rescale_units(model: nn.Module | PathGraph, factors: dict[str, Tensor],
                  input_shape: tuple[int, ...] | None = None) -> nn.Module:
    """Node-wise rescaling, in place: for each ``layer name -> factors`` (one positive factor per unit),
    multiply the units' incoming weights and bias by the factor and divide their outgoing weights by it.

    The model computes the same function (ReLU-like activations are positively homogeneous) and keeps
    its path-norms.  Raises if a layer's units cannot be rescaled alone (``UnitMap.blocked`` says why)
    or a factor is not positive and finite.  Returns the network.
    """
    return _rescale(UnitMap(trace(model, input_shape)), factors)


def _rescale(unit_map: UnitMap, factors: dict[str, Tensor]) -> nn.Module:
    model = unit_map.graph.model
    checked = {}
    for name, factor in factors.items():
        if name in unit_map.blocked:
            raise PathGeometryError(f"the units of '{name}' cannot be rescaled alone: {unit_map.blocked[name]}")
        if name not in unit_map.layers:
            raise PathGeometryError(
                f"'{name}' is not a layer with rescalable units; choose among {sorted(unit_map.layers)}"
            )
        factor = torch.as_tensor(factor, dtype=torch.float64).flatten().cpu()
        count = unit_map.layers[name].producer.count
        if factor.numel() == 1:
            factor = factor.expand(count)
        if factor.numel() != count or not bool(torch.isfinite(factor).all() and (factor > 0).all()):
            raise PathGeometryError(f"factors for '{name}' must be {count} positive finite numbers")
        checked[name] = factor
    parameters = unit_map.graph.parameters(unit_map.program)
    buffers = unit_map.graph.buffers(unit_map.program)
    with torch.no_grad():
        for name, factor in checked.items():
            layer = unit_map.layers[name]
            layer.producer.scale(parameters, factor)
            for consumer in layer.consumers:
                consumer.divide(parameters, buffers, factor)
    return model


# ----------------------------------------------------------------------------- initialisations


def _generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(seed if seed is not None else int(torch.seed() % (2**63)))
    return generator


CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


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
    unit_map = UnitMap(graph)
    chain = program_chain(unit_map.program)
    if chain is None:
        raise PathGeometryError("balance() needs a layered network of Linear layers and ReLU-like activations "
                                "(Lemma 4.1's setting)")
    names = graph.parameter_names(unit_map.program)
    layer_names = [names[weight][: -len(".weight")] if names[weight].endswith(".weight") else names[weight]
                   for weight, _ in chain]
    hidden = layer_names[:-1]
    for name in hidden:
        if name not in unit_map.layers:
            raise PathGeometryError(f"balance() needs a layered network; units of '{name}' cannot be rescaled: "
                                    f"{unit_map.blocked.get(name, 'they have no consumer')}")
    values = _twin_values(graph, p)
    t = float(path_norm_of(graph, p)) ** (1.0 / len(layer_names))
    factors = {}
    for level, name in enumerate(hidden, start=1):
        gamma_in = values[unit_map.nodes[name]].reshape(-1)  # the twin at a Linear's output
        factor = (t ** (level * p) / gamma_in).pow(1.0 / p)
        factors[name] = torch.where(torch.isfinite(factor) & (factor > 0), factor, torch.ones_like(factor))
    return _rescale(unit_map, factors)
