"""BatchNorm in eval mode: the per-channel affine map a*x + c.

a = weight / sqrt(running_var + eps) is an edge weight and c = bias - a * running_mean a bias.
The Path-SGD divisor of ``weight`` is kappa_a^(2/p) * s^2 with s = 1/sqrt(var + eps) (the chain
rule through a = weight * s) and that of ``bias`` is kappa_c^(2/p): together they keep the update
invariant to rescaling the units on both sides.  In training mode BatchNorm normalises with the
statistics of the batch, which is no fixed map: it is refused (``pl_pathsgd.freeze_batchnorm``).

Units reaching a BatchNorm are absorbed by dividing its ``weight`` and multiplying its
``running_mean`` by the factor; its own units are rescaled through ``weight`` and ``bias``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pl_pathsgd.paths.ops.linear import _own_parameters, parameter_name
from pl_pathsgd.paths.ops.registry import Call, Consumer, Kind, Producer, Rule, refuse, register, same_value_per, only_first_result_used

aten = torch.ops.aten


def _channels(vector: Tensor, ndim: int) -> Tensor:
    return vector.reshape((1, -1) + (1,) * (ndim - 2))


_TRAINING_MODE = ("is BatchNorm in training mode, which normalises with the statistics of each batch and is not a "
                  "fixed map; freeze it (pl_pathsgd.freeze_batchnorm(model) keeps BatchNorm layers in eval mode) or "
                  "call .eval() on it")


def _composite(call: Call) -> bool:
    """``batch_norm(x, weight, bias, mean, var, training, momentum, eps, cudnn)`` (one result) rather than
    ``_native_batch_norm_legit_no_training(x, weight, bias, mean, var, momentum, eps)`` (three)."""
    return call.target.overloadpacket is aten.batch_norm


@register(aten._native_batch_norm_legit_no_training, aten.batch_norm)
class BatchNormEval(Rule):
    """BatchNorm with running statistics (eval mode): ``batch_norm(..., training=False, ...)`` or its
    functional form ``_native_batch_norm_legit_no_training``."""

    def check(self, call: Call) -> str | None:
        x, weight, bias, mean, var = call.args[:5]
        if _composite(call) and call.args[5]:
            return f"batch_norm {_TRAINING_MODE}"
        if mean is None or var is None:
            return f"batch_norm without running statistics {_TRAINING_MODE}"
        if call.kind_of(x) != Kind.ACT:
            return "BatchNorm of weights only"
        for role, node in (("weight", weight), ("bias", bias)):
            if node is not None and call.kind_of(node) == Kind.PARAM and parameter_name(node, call) is None:
                return f"BatchNorm's {role} is computed in forward; pass the parameter itself"
            if node is not None and call.kind_of(node) == Kind.ACT:
                return f"BatchNorm's {role} depends on the input"
        if call.kind_of(mean) > Kind.CONST or call.kind_of(var) > Kind.CONST:
            return "BatchNorm's running statistics depend on parameters or on the input"
        if not _composite(call) and not only_first_result_used(call):
            return "BatchNorm's saved statistics are used in forward"
        return None

    def plan(self, call: Call, uses) -> None:
        call.actual_args = frozenset(i for i in (1, 2) if parameter_name(call.args[i], call) is not None)

    def twin(self, call, run, x, weight, bias, mean, var, *rest):
        eps = rest[2] if _composite(call) else rest[1]
        s = torch.rsqrt(var.detach().to(run.dtype) + eps)
        a = s if weight is None else weight.detach().to(run.dtype) * s
        c = -a * mean.detach().to(run.dtype)
        if bias is not None:
            c = c + bias.detach().to(run.dtype)
        # The weight's twin |weight|^p |s|^p and the bias's |c|^p carry the gradients that define their divisors.
        if weight is not None and parameter_name(call.args[1], call) is not None:
            twin_a = run.param_twin(call.args[1].name, weight) * run.power(s)
        else:
            twin_a = run.power(a)
        twin_c = run.power(c)
        if bias is not None and parameter_name(call.args[2], call) is not None and run.track:
            leaf = run.param_twin(call.args[2].name, bias)
            twin_c = leaf + (twin_c - leaf).detach()  # value |c|^p, derivative 1 with respect to |bias|^p
        twin_a, twin_c = _channels(twin_a, x.dim()), _channels(twin_c, x.dim())
        out = x * twin_a + twin_c if run.mode == "sum" else torch.maximum(x * twin_a, twin_c)
        return out if _composite(call) else (out, None, None)

    def produces(self, call: Call) -> Producer | str:
        weight, bias = call.args[1], call.args[2]
        if weight is None:
            return "BatchNorm without affine parameters has no weight to rescale its units with"
        reason = _own_parameters(call, weight, bias)
        if reason:
            return reason
        names = tuple(n.name for n in (weight, bias) if n is not None)

        def scale(parameters: dict[str, Tensor], factors: Tensor) -> None:
            for name in names:
                parameters[name].mul_(factors.to(parameters[name]))

        return Producer(count=int(call.shape(weight)[0]), axis=1, parameters=names, scale=scale)

    def consumes(self, call: Call, ids: Tensor, *rest) -> Consumer | str:
        weight, mean = call.args[1], call.args[3]
        if weight is None:
            return "a BatchNorm without affine parameters cannot absorb a rescaling of its input"
        reason = _own_parameters(call, weight, None)
        if reason:
            return reason
        if mean.op != "placeholder":
            return "BatchNorm's running mean is computed in forward"
        channels = same_value_per(ids, 1)
        if bool(torch.isnan(channels).any()):
            return "its units are mixed with other positions before a BatchNorm reads them"

        def divide(parameters: dict[str, Tensor], buffers: dict[str, Tensor], factors: Tensor) -> None:
            per_channel = torch.ones(channels.shape, dtype=torch.float64)
            carries = channels >= 0
            per_channel[carries] = factors[channels[carries].long()]
            parameters[weight.name].div_(per_channel.to(parameters[weight.name]))
            buffers[mean.name].mul_(per_channel.to(buffers[mean.name]))

        return Consumer(parameters=(weight.name,), divide=divide, buffers=(mean.name,))


refuse(_TRAINING_MODE, aten._native_batch_norm_legit_functional, aten._native_batch_norm_legit, aten.native_batch_norm,
       aten._batch_norm_with_update, aten._batch_norm_with_update_functional)
refuse("normalises by statistics of each example, which divides paths by other paths", aten.layer_norm,
       aten.native_layer_norm, aten.group_norm, aten.native_group_norm, aten.instance_norm, aten.rms_norm,
       aten._fused_rms_norm)
