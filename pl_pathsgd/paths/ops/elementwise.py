"""Element-wise operations: ReLU-like activations, copies, scalar and constant multiples, additions."""

from __future__ import annotations

import torch
from torch import Tensor

from pl_pathsgd.paths.errors import PathGeometryError
from pl_pathsgd.paths.ops.registry import (
    only_first_result_used,
    NONE,
    Call,
    Kind,
    Rule,
    is_scalar,
    merge_ids,
    op_name,
    refuse,
    register,
)

aten = torch.ops.aten

_PRODUCT = ("multiplies two activations (products of paths), which has no path decomposition")
_NOT_HOMOGENEOUS = ("is not positively homogeneous (f(c*x) != c*f(x) for c > 0), so the network is no sum over "
                    "paths of weight products")


def _activation_input(call: Call, what: str) -> str | None:
    if call.kind_of(call.args[0]) != Kind.ACT:
        return f"{what} applied to a weight (not to activations) makes the edge weight a non-linear function of a parameter"
    return None


@register(aten.relu, aten.leaky_relu, aten.dropout, aten.feature_dropout)
class PositivelyHomogeneous(Rule):
    """ReLU-like activations (f(c*x) = c*f(x) for c > 0) and dropout: the identity in the twin.

    Dropout is inert: the twin describes the network, not one random draw of it.
    """

    def check(self, call: Call) -> str | None:
        return _activation_input(call, op_name(call.target))

    def twin(self, call, run, x, *rest, **kwargs):
        return x

    def flow(self, call, x, *rest, **kwargs):
        return x


@register(aten.native_dropout)
class NativeDropout(PositivelyHomogeneous):
    """Dropout that also returns its mask: inert, and the mask must not be used."""

    def check(self, call: Call) -> str | None:
        if not only_first_result_used(call):
            return "dropout's random mask is used in forward; the path geometry needs a fixed network"
        return super().check(call)

    def twin(self, call, run, x, *rest, **kwargs):
        return x, None

    def flow(self, call, x, *rest, **kwargs):
        return x, None


@register(aten.clone, aten.alias, aten.detach, aten._to_copy, aten.lift_fresh_copy, aten.contiguous)
class Copy(Rule):
    """Copies and dtype conversions: the same values, so the same twin (activations or weights)."""

    def twin(self, call, run, x, *rest, **kwargs):
        return x

    def flow(self, call, x, *rest, **kwargs):
        return x


@register(aten.neg)
class Negation(Copy):
    """-x: a linear map with weight -1, |-1|^p = 1."""


@register(aten.mul, aten.div)
class ScalarMultiple(Rule):
    """x * c and x / c with c a number, a constant tensor or (for *) a parameter: a linear map of x.

    Edge weight |c|^p in the twin.  A weight may be computed as a parameter times a constant
    (e.g. ``weight * mask``): its twin is |w|^p |mask|^p.
    """

    def check(self, call: Call) -> str | None:
        a, b = call.args[0], call.args[1]
        ka, kb = call.kind_of(a), call.kind_of(b)
        name = op_name(call.target)
        if ka == Kind.ACT and kb == Kind.ACT:
            return f"{name} {_PRODUCT}"
        if call.target.overloadpacket is aten.div:
            if call.node.kwargs.get("rounding_mode") is not None:
                return f"{name} with rounding_mode is not linear"
            if kb in (Kind.ACT, Kind.PARAM):
                return f"{name} divides by a {'parameter' if kb == Kind.PARAM else 'activation'}, which is not linear in it"
            return None
        if Kind.ACT not in (ka, kb) and ka == Kind.PARAM and kb == Kind.PARAM:
            return (f"{name} multiplies two parameters; an edge weight must be one parameter (times constants), "
                    "so Path-SGD knows which parameter each path uses")
        return None

    def twin(self, call, run, a, b, **kwargs):
        divide = call.target.overloadpacket is aten.div
        if is_scalar(b):
            if divide and b == 0:
                raise PathGeometryError(f"{call.where}: divides by zero")
            return a * run.power(1.0 / b if divide else b)
        ka, kb = call.kind_of(call.args[0]), call.kind_of(call.args[1])
        twin_a = run.power(a) if ka == Kind.CONST else a
        if divide:
            if bool((b == 0).any()):
                raise PathGeometryError(f"{call.where}: divides by a constant tensor that has zeros")
            return twin_a * run.power(1.0 / b.to(run.dtype))
        twin_b = run.power(b) if kb == Kind.CONST else b
        return twin_a * twin_b

    def flow(self, call, a, b, **kwargs):
        ids = a if call.kind_of(call.args[0]) == Kind.ACT else b
        return torch.broadcast_to(ids, call_output_shape(call, ids)).clone()


@register(aten.add, aten.sub, aten.rsub)
class Addition(Rule):
    """x + y of activations (a residual connection; paths of both sides reach the sum) and x + c with c a
    constant or a parameter (a bias: an edge from a constant unit of value 1, weight c).

    ``alpha`` scales the second operand: weight |alpha|^p.  Subtraction is addition with weight -1.
    In the max semiring the larger twin wins.
    """

    def check(self, call: Call) -> str | None:
        ka, kb = call.kind_of(call.args[0]), call.kind_of(call.args[1])
        if Kind.ACT not in (ka, kb):
            return (f"{op_name(call.target)} computes a weight as a sum of parameters or constants; an edge weight "
                    "must be one parameter (times constants)")
        return None

    def twin(self, call, run, a, b, alpha=1, **kwargs):
        ka, kb = call.kind_of(call.args[0]), call.kind_of(call.args[1])
        twin_a = run.power(a) if ka <= Kind.CONST else a
        twin_b = run.power(b) if kb <= Kind.CONST else b
        weight = run.power(alpha)
        if not isinstance(twin_b, Tensor):
            twin_b = torch.as_tensor(twin_b, dtype=run.dtype, device=run.device)
        if not isinstance(twin_a, Tensor):
            twin_a = torch.as_tensor(twin_a, dtype=run.dtype, device=run.device)
        if weight != 1:
            if call.target.overloadpacket is aten.rsub:
                twin_a = twin_a * weight
            else:
                twin_b = twin_b * weight
        if run.mode == "sum":
            return twin_a + twin_b
        return torch.maximum(twin_a, twin_b)

    def flow(self, call, a, b, **kwargs):
        ka, kb = call.kind_of(call.args[0]), call.kind_of(call.args[1])
        shape = call_output_shape(call, a if ka == Kind.ACT else b)
        other = torch.full(shape, NONE, dtype=torch.float64)
        ids_a = a if ka == Kind.ACT else other
        ids_b = b if kb == Kind.ACT else other
        return merge_ids(ids_a, ids_b)


def call_output_shape(call: Call, like: Tensor) -> tuple[int, ...]:
    """The call's output shape at the batch size of ``like`` (the twin's: 1)."""
    return tuple(like.shape[0] if isinstance(s, torch.SymInt) else int(s) for s in call.shape())


refuse(_NOT_HOMOGENEOUS, aten.sigmoid, aten.tanh, aten.gelu, aten.silu, aten.elu, aten.selu, aten.celu, aten.softplus,
       aten.exp, aten.log, aten.hardtanh, aten.hardsigmoid, aten.hardswish, aten.mish, aten.log_sigmoid,
       aten.sqrt, aten.rsqrt, aten.pow, aten.clamp, aten.clamp_min, aten.clamp_max, aten.abs, aten.sign,
       aten.threshold, aten.rrelu_with_noise, aten.sin, aten.cos, aten.reciprocal, aten.erf)
refuse(f"{_NOT_HOMOGENEOUS}; leave it to the loss (cross-entropy takes logits)", aten._softmax, aten.softmax,
       aten._log_softmax, aten.log_softmax)
refuse("has a learnable slope that is not an edge weight; use nn.LeakyReLU with a fixed slope", aten.prelu,
       aten._prelu_kernel)
refuse("picks between values by their size, which is no sum over paths; use nn.ReLU or max pooling",
       aten.maximum, aten.minimum, aten.where, aten.max, aten.min, aten.amax, aten.amin, aten.sort, aten.topk)
refuse("adds a noise draw in forward; the path geometry needs a fixed network", aten.alpha_dropout,
       aten.feature_alpha_dropout)
