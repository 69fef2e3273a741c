"""Convolutions and transposed convolutions: linear maps whose kernel weights are shared across positions.

The twin of a convolution is the same convolution with |W|^p and |b|^p.  A kernel weight stands for
one edge at every position it is applied at; its Path-SGD divisor is the *sum* over those edges
of gamma_in * gamma_out (the kappa^(1) convention of RNN Path-SGD), which is what the gradient of
the twin with respect to |W|^p gives.  A convolution's units are its output channels (dim 1).
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from pl_pathsgd.paths.ops.linear import _divide_along, _own_parameters, weight_twin
from pl_pathsgd.paths.ops.registry import Call, Consumer, Kind, Producer, Rule, register, same_value_per

aten = torch.ops.aten

_CONVS = (aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution)
_TRANSPOSED = (aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d)


def _options(call: Call) -> dict:
    """stride, padding, dilation, groups and transposed of a convolution call, in one form."""
    packet = call.target.overloadpacket
    args = call.args
    if packet is aten.convolution:
        return dict(stride=args[3], padding=args[4], dilation=args[5], transposed=bool(args[6]), output_padding=args[7],
                    groups=args[8])
    if packet in _TRANSPOSED:
        return dict(stride=call.arg(3, "stride", 1), padding=call.arg(4, "padding", 0),
                    output_padding=call.arg(5, "output_padding", 0), dilation=call.arg(7, "dilation", 1),
                    transposed=True, groups=call.arg(6, "groups", 1))
    return dict(stride=call.arg(3, "stride", 1), padding=call.arg(4, "padding", 0),
                dilation=call.arg(5, "dilation", 1), transposed=False, groups=call.arg(6, "groups", 1))


def _ntuple(value, n: int) -> tuple[int, ...]:
    if isinstance(value, (list, tuple)):
        return tuple(value) * (n if len(value) == 1 else 1)
    return (value,) * n


@register(*_CONVS, *_TRANSPOSED)
class Convolution(Rule):
    """Convolutions (1d/2d/3d, groups, stride, padding, dilation) and transposed convolutions."""

    def check(self, call: Call) -> str | None:
        if call.kind_of(call.args[0]) != Kind.ACT:
            return "convolution of weights only (the input must be the first argument)"
        if call.kind_of(call.args[1]) == Kind.ACT or call.kind_of(call.arg(2, "bias")) == Kind.ACT:
            return "convolution with an activation as kernel multiplies activations, which has no path decomposition"
        return None

    def twin(self, call, run, x, weight, bias=None, *rest, **kwargs):
        weight = weight_twin(call, run, call.args[1], weight)
        bias = weight_twin(call, run, call.arg(2, "bias"), bias)
        if run.mode == "sum":
            return call.target(x, weight, bias, *rest, **kwargs)
        options = _options(call)
        if options["transposed"]:
            return max_conv_transpose(x, weight, bias, options)
        return max_conv(x, weight, bias, options)

    def produces(self, call: Call) -> Producer | str:
        weight, bias = call.args[1], call.arg(2, "bias")
        reason = _own_parameters(call, weight, bias)
        if reason:
            return reason
        options = _options(call)
        shape = call.shape(weight)
        groups = int(options["groups"])
        count = int(shape[1]) * groups if options["transposed"] else int(shape[0])

        def scale(parameters: dict[str, Tensor], factors: Tensor) -> None:
            kernel = parameters[weight.name]
            if options["transposed"]:  # (in, out/groups, *k): output channel g*out_g + j is [g-th block, j]
                kernel.mul_(_per_block(factors.reshape(groups, -1), kernel.shape[0] // groups, kernel))
            else:
                kernel.mul_(factors.to(kernel).reshape((-1,) + (1,) * (kernel.dim() - 1)))
            if bias is not None:
                parameters[bias.name].mul_(factors.to(parameters[bias.name]))

        names = tuple(n.name for n in (weight, bias) if n is not None)
        return Producer(count=count, axis=1, parameters=names, scale=scale)

    def consumes(self, call: Call, ids: Tensor, *rest, **kwargs) -> Consumer | str:
        weight = call.args[1]
        reason = _own_parameters(call, weight, None)
        if reason:
            return reason
        channels = same_value_per(ids, 1)
        if bool(torch.isnan(channels).any()):
            return "its units are mixed with other positions before a convolution reads them"
        options = _options(call)
        groups = int(options["groups"])

        def divide(parameters: dict[str, Tensor], buffers: dict[str, Tensor], factors: Tensor) -> None:
            kernel = parameters[weight.name]
            if options["transposed"]:  # (in, out/groups, *k): input channel c is row c
                _divide_along(kernel, 0, channels, factors)
                return
            # (out, in/groups, *k): input channel c is column c % in_g of group c // in_g
            per_channel = torch.ones(channels.shape, dtype=torch.float64)
            carries = channels >= 0
            per_channel[carries] = factors[channels[carries].long()]
            kernel.div_(_per_block(per_channel.reshape(groups, -1), kernel.shape[0] // groups, kernel))

        return Consumer(parameters=(weight.name,), divide=divide)


def _per_block(values: Tensor, rows_per_group: int, kernel: Tensor) -> Tensor:
    """(groups, n) values as a factor for a (groups * rows_per_group, n, *k) kernel: row r gets group r // rows_per_group."""
    rows = values.repeat_interleave(rows_per_group, dim=0)
    return rows.to(kernel).reshape(rows.shape + (1,) * (kernel.dim() - 2))


def max_conv(x: Tensor, weight: Tensor, bias: Tensor | None, options: dict) -> Tensor:
    """Max-times convolution: out[o, pos] = max over (i, k) of x[i, pos*stride + k*dilation] * weight[o, i, k]."""
    spatial = x.dim() - 2
    kernel = weight.shape[2:]
    stride, dilation = _ntuple(options["stride"], spatial), _ntuple(options["dilation"], spatial)
    x = F.pad(x, _padding_pairs(options["padding"], kernel, dilation))
    for d in range(spatial):
        span = dilation[d] * (kernel[d] - 1) + 1
        x = x.unfold(2 + d, span, stride[d])[..., :: dilation[d]]
    # x: (1, C_in, *out_positions, *kernel)
    out_shape = x.shape[2: 2 + spatial]
    groups = int(options["groups"])
    cin_g, cout_g = x.shape[1] // groups, weight.shape[0] // groups
    patches = x[0].movedim(0, spatial).reshape(math.prod(out_shape), x.shape[1], -1)
    per_group = []
    for g in range(groups):
        group_patches = patches[:, g * cin_g: (g + 1) * cin_g].reshape(patches.shape[0], -1)
        group_weight = weight[g * cout_g: (g + 1) * cout_g].reshape(cout_g, -1)
        per_group.append((group_patches.unsqueeze(0) * group_weight.unsqueeze(1)).amax(dim=2))
    out = torch.cat(per_group).reshape((1, weight.shape[0]) + tuple(out_shape))
    return out if bias is None else torch.maximum(out, bias.reshape((1, -1) + (1,) * spatial))


def max_conv_transpose(x: Tensor, weight: Tensor, bias: Tensor | None, options: dict) -> Tensor:
    """Max-times transposed convolution: out[o, q] = max over (i, k, p with q = p*stride + k*dilation - padding)
    of x[i, p] * weight[i, o, k], computed one kernel offset at a time."""
    spatial = x.dim() - 2
    kernel = tuple(weight.shape[2:])
    stride, dilation = _ntuple(options["stride"], spatial), _ntuple(options["dilation"], spatial)
    padding, extra = _ntuple(options["padding"], spatial), _ntuple(options["output_padding"], spatial)
    groups = int(options["groups"])
    lengths = x.shape[2:]
    full = [(lengths[d] - 1) * stride[d] + dilation[d] * (kernel[d] - 1) + 1 + extra[d] for d in range(spatial)]
    cin_g, cout_g = weight.shape[0] // groups, weight.shape[1]
    out = x.new_zeros((x.shape[0], cout_g * groups, *full))  # twins are >= 0: 0 is the max's neutral element
    for offset in itertools.product(*(range(k) for k in kernel)):
        parts = []
        for g in range(groups):
            xs = x[:, g * cin_g: (g + 1) * cin_g].unsqueeze(2)  # (n, cin_g, 1, *L)
            ws = weight[(slice(g * cin_g, (g + 1) * cin_g), slice(None), *offset)]  # (cin_g, cout_g)
            parts.append((xs * ws.reshape(cin_g, cout_g, *([1] * spatial))).amax(dim=1))
        contribution = torch.cat(parts, dim=1)  # (n, cout, *L)
        window = tuple(slice(offset[d] * dilation[d], offset[d] * dilation[d] + (lengths[d] - 1) * stride[d] + 1,
                             stride[d]) for d in range(spatial))
        target = out[(slice(None), slice(None), *window)]
        torch.maximum(target, contribution, out=target)
    crop = tuple(slice(padding[d], padding[d] + full[d] - 2 * padding[d]) for d in range(spatial))
    out = out[(slice(None), slice(None), *crop)]
    return out if bias is None else torch.maximum(out, bias.reshape((1, -1) + (1,) * spatial))


def _padding_pairs(padding, kernel, dilation) -> list[int]:
    """F.pad's list (last dimension first) for a convolution's padding (numbers, 'valid' or 'same')."""
    spatial = len(kernel)
    if padding == "valid":
        return [0, 0] * spatial
    if padding == "same":
        pairs = []
        for d in reversed(range(spatial)):
            total = dilation[d] * (kernel[d] - 1)
            pairs += [total // 2, total - total // 2]
        return pairs
    padding = _ntuple(padding, spatial)
    return [p for d in reversed(range(spatial)) for p in (padding[d], padding[d])]
