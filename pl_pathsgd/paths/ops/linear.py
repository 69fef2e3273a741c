"""Linear layers and matrix products with weights.

``linear(x, W, b)`` is the workhorse: its twin is x (|W|^p)^T + |b|^p.  When W is a parameter used
only as the weight of ``linear`` calls, the twin reads W blockwise and never builds |W|^p
(:mod:`pl_pathsgd.paths.fast_linear`), and the Path-SGD scaling of W is the outer product of the
twin's gradient at the output and its value at the input (never materialised for one call).
A Linear layer's units are the last dimension of its output, whatever the shape of its input.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import Tensor

from pl_pathsgd.paths.errors import PathGeometryError
from pl_pathsgd.paths.fast_linear import max_linear, power_linear
from pl_pathsgd.paths.ops.registry import (
    Call,
    Consumer,
    Kind,
    Producer,
    Rule,
    TwinRun,
    op_name,
    register,
    same_value_per,
)

aten = torch.ops.aten

_PRODUCT = "multiplies two activations (products of paths), which has no path decomposition"


def parameter_name(node, call: Call) -> str | None:
    """The placeholder name of a parameter used directly as an argument, else None."""
    if isinstance(node, fx.Node) and node.op == "placeholder" and call.kind_of(node) == Kind.PARAM:
        return node.name
    return None


def sole_use(node: fx.Node, call: Call) -> bool:
    return list(node.users) == [call.node]


def weight_twin(call: Call, run: TwinRun, arg, value):
    """The twin of a weight argument: a parameter's twin as given, a constant's |c|^p, None stays None."""
    if value is None:
        return None
    return run.power(value) if call.kind_of(arg) <= Kind.CONST else value


@register(aten.linear)
class Linear(Rule):
    """y = x W^T + b: edges from each input feature to each output unit with weight W[o, i]."""

    def check(self, call: Call) -> str | None:
        x, weight = call.args[0], call.args[1]
        if call.kind_of(x) == Kind.PARAM:
            return "linear of weights only (the input must be the first argument)"
        if call.kind_of(weight) == Kind.ACT or call.kind_of(call.arg(2, "bias")) == Kind.ACT:
            return f"linear {_PRODUCT}"
        return None

    def plan(self, call: Call, uses) -> None:
        weight = call.args[1]
        name = parameter_name(weight, call)
        if name and all(user.target is aten.linear.default and user.args[1] is weight
                        and call.kinds[user.args[0]] in (Kind.ACT, Kind.CONST) for user in weight.users):
            call.actual_args = frozenset({1})

    def twin(self, call, run, x, weight, bias=None):
        x = weight_twin(call, run, call.args[0], x)  # a constant input (e.g. a zero initial state) as |c|^p
        bias = weight_twin(call, run, call.arg(2, "bias"), bias)
        if 1 in call.actual_args and run.fast_linear:  # weight is the parameter itself: read it blockwise
            out = power_linear(x, weight, bias, run.p) if run.mode == "sum" else max_linear(x, weight, bias)
            if run.track:
                run.linear_calls.setdefault(call.args[1].name, []).append((x.detach(), out))
            return out
        if 1 in call.actual_args:  # asked for the parameter itself, but building |W|^p here
            weight = run.param_twin(call.args[1].name, weight)
        else:
            weight = weight_twin(call, run, call.args[1], weight)
        if run.mode == "sum":
            return torch.nn.functional.linear(x, weight, bias)
        out = (x.unsqueeze(-2) * weight).amax(dim=-1)
        return out if bias is None else torch.maximum(out, bias)

    def produces(self, call: Call) -> Producer | str:
        weight, bias = call.args[1], call.arg(2, "bias")
        reason = _own_parameters(call, weight, bias)
        if reason:
            return reason
        names = tuple(n.name for n in (weight, bias) if n is not None)

        def scale(parameters: dict[str, Tensor], factors: Tensor) -> None:
            parameters[weight.name].mul_(factors.to(parameters[weight.name])[:, None])
            if bias is not None:
                parameters[bias.name].mul_(factors.to(parameters[bias.name]))

        return Producer(count=int(call.shape(weight)[0]), axis=-1, parameters=names, scale=scale)

    def consumes(self, call: Call, ids: Tensor, *rest) -> Consumer | str:
        weight = call.args[1]
        reason = _own_parameters(call, weight, None)
        if reason:
            return reason
        columns = same_value_per(ids, -1)
        if bool(torch.isnan(columns).any()):
            return "its units are mixed with other positions before a Linear layer reads them"

        def divide(parameters: dict[str, Tensor], buffers: dict[str, Tensor], factors: Tensor) -> None:
            _divide_along(parameters[weight.name], 1, columns, factors)

        return Consumer(parameters=(weight.name,), divide=divide)


def _own_parameters(call: Call, weight, bias) -> str | None:
    """Why the units of a layer cannot be rescaled through its parameters (None: they can)."""
    for role, node in (("weight", weight), ("bias", bias)):
        if node is None:
            continue
        if parameter_name(node, call) is None:
            return f"its {role} is computed in forward (not a parameter used as it is)"
        if not sole_use(node, call):
            return f"its {role} is shared with other operations"
    return None


def _divide_along(tensor: Tensor, axis: int, unit_of_index: Tensor, factors: Tensor) -> None:
    """Divide the slices of ``tensor`` along ``axis`` that carry a unit (id >= 0) by that unit's factor."""
    carries = unit_of_index >= 0
    if not bool(carries.any()):
        return
    per_index = torch.ones(unit_of_index.shape, dtype=torch.float64)
    per_index[carries] = factors[unit_of_index[carries].long()]
    shape = [1] * tensor.dim()
    shape[axis] = -1
    tensor.div_(per_index.to(tensor).reshape(shape))


def _max_matmul(a: Tensor, b: Tensor) -> Tensor:
    """Max-times matrix product over the last dimension of ``a`` and the second-to-last of ``b``."""
    if b.dim() == 1:
        return (a * b).amax(dim=-1)
    if a.dim() == 1:
        return (a.unsqueeze(-1) * b).amax(dim=-2)
    return (a.unsqueeze(-1) * b.unsqueeze(-3)).amax(dim=-2)


@register(aten.matmul, aten.mm, aten.bmm, aten.addmm, aten.einsum)
class MatrixProduct(Rule):
    """Matrix products where exactly one operand is an activation and the others are weights or constants:
    a linear map of the activation (e.g. ``x @ self.weight.T``).  Its units cannot be rescaled through it;
    use ``nn.Linear`` for that."""

    def check(self, call: Call) -> str | None:
        operands = call.args[1] if call.target.overloadpacket is aten.einsum else call.args
        if call.target.overloadpacket is aten.addmm:
            if call.kind_of(operands[0]) == Kind.ACT:
                return "addmm adds an activation as a bias"
            operands = operands[1:3]
        kinds = [call.kind_of(o) for o in operands]
        if kinds.count(Kind.ACT) > 1:
            return f"{op_name(call.target)} {_PRODUCT}"
        if Kind.ACT not in kinds and kinds.count(Kind.PARAM) > 1:
            return f"{op_name(call.target)} computes a weight as a product of parameters"
        return None

    def twin(self, call, run, *args, **kwargs):
        packet = call.target.overloadpacket
        if packet is aten.einsum:
            equation, operands = args[0], args[1]
            twins = [weight_twin(call, run, node, value) for node, value in zip(call.args[1], operands)]
            if run.mode == "max":
                raise PathGeometryError(f"{call.where}: the p = inf path-norm is not implemented for einsum")
            return torch.einsum(equation, *twins)
        twins = [weight_twin(call, run, node, value) for node, value in zip(call.args, args)]
        if packet is aten.addmm:
            bias, a, b = twins[:3]
            if run.mode == "sum":
                return torch.addmm(bias, a, b)
            return torch.maximum(_max_matmul(a, b), bias)
        if run.mode == "sum":
            return call.target(*twins, **kwargs)
        return _max_matmul(twins[0], twins[1])
