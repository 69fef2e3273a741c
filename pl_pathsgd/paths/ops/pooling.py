"""Pooling and reductions: fixed linear maps over windows of positions.

Conventions (shared with the ICLR 2024 path-norm toolkit of Gonon et al.):

* average pooling (and ``mean``) is linear with weight 1/d on each input of a window, d the divisor
  PyTorch uses at that window (padding and ``count_include_pad`` included);
* max pooling counts *every* input of its window with weight 1: the path-norm does not depend on
  which input wins, so it is the norm of the sum-pool; in the max semiring (p = inf) it is max-pool;
* ``sum`` has weight 1.

Units that are pooled together are mixed: none of them can be rescaled alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from pl_pathsgd.paths.ops.registry import Call, Kind, Rule, only_first_result_used, op_name, register, window_ids

aten = torch.ops.aten


def _ntuple(value, n: int) -> tuple:
    if isinstance(value, (tuple, list)):
        return tuple(value) * (n if len(value) == 1 else 1)
    return (value,) * n


def sum_pool(x: Tensor, kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int], ceil_mode: bool) -> Tensor:
    """Sum over each pooling window (padding counts as zero), via average pooling with divisor 1."""
    if len(kernel) == 1:
        out = F.avg_pool2d(x.unsqueeze(-2), (1, *kernel), (1, *stride), (0, *padding), ceil_mode, True, 1)
        return out.squeeze(-2)
    pool = F.avg_pool2d if len(kernel) == 2 else F.avg_pool3d
    return pool(x, tuple(kernel), tuple(stride), tuple(padding), ceil_mode, True, 1)


def max_pool(x: Tensor, kernel, stride, padding, ceil_mode: bool) -> Tensor:
    pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[len(kernel) - 1]
    return pool(x, tuple(kernel), tuple(stride), tuple(padding), 1, ceil_mode)


def _windows(call: Call, spatial: int) -> tuple[tuple, tuple, tuple, bool]:
    kernel = _ntuple(call.arg(1, "kernel_size"), spatial)
    stride = call.arg(2, "stride") or kernel
    stride = _ntuple(stride, spatial)
    padding = _ntuple(call.arg(3, "padding", 0), spatial)
    is_max = call.target.overloadpacket in _MAX_POOLS
    ceil_mode = bool(call.arg(5 if is_max else 4, "ceil_mode", False))
    return kernel, stride, padding, ceil_mode


def _spatial(call: Call) -> int:
    return int(op_name(call.target).split("pool")[1][0])


_AVG_POOLS = (aten.avg_pool1d, aten.avg_pool2d, aten.avg_pool3d)
_MAX_POOLS = (aten.max_pool1d, aten.max_pool2d, aten.max_pool3d, aten.max_pool2d_with_indices,
              aten.max_pool3d_with_indices)


@register(*_AVG_POOLS)
class AvgPool(Rule):
    """Average pooling: weight 1/d per input of a window (d: PyTorch's divisor at that window)."""

    def check(self, call: Call) -> str | None:
        return _activation_only(call)

    def twin(self, call, run, x, *args, **kwargs):
        kernel, stride, padding, ceil_mode = _windows(call, _spatial(call))
        ones = torch.ones_like(x[:, :1])
        divisor = sum_pool(ones, kernel, stride, padding, ceil_mode) / call.target(ones, *args, **kwargs)
        if run.mode == "sum":
            return sum_pool(x, kernel, stride, padding, ceil_mode) * divisor.pow(-run.p)
        return max_pool(x, kernel, stride, padding, ceil_mode) / divisor

    def flow(self, call, ids, *args, **kwargs):
        kernel, stride, padding, ceil_mode = _windows(call, _spatial(call))
        return window_ids(ids, lambda t: max_pool(t, kernel, stride, padding, ceil_mode))


@register(*_MAX_POOLS)
class MaxPool(Rule):
    """Max pooling: every input of a window counts with weight 1 (sum-pool); max-pool for p = inf."""

    def check(self, call: Call) -> str | None:
        dilation = _ntuple(call.arg(4, "dilation", 1), _spatial(call))
        if any(d != 1 for d in dilation):
            return f"{op_name(call.target)} with dilation != 1 is not supported; use dilation=1"
        if call.target.overloadpacket in (aten.max_pool2d_with_indices, aten.max_pool3d_with_indices):
            if not only_first_result_used(call):
                return f"{op_name(call.target)}: the indices of the maxima are used in forward"
        return _activation_only(call)

    def twin(self, call, run, x, *args, **kwargs):
        kernel, stride, padding, ceil_mode = _windows(call, _spatial(call))
        out = sum_pool(x, kernel, stride, padding, ceil_mode) if run.mode == "sum" else \
            max_pool(x, kernel, stride, padding, ceil_mode)
        return (out, None) if _with_indices(call) else out

    def flow(self, call, ids, *args, **kwargs):
        kernel, stride, padding, ceil_mode = _windows(call, _spatial(call))
        out = window_ids(ids, lambda t: max_pool(t, kernel, stride, padding, ceil_mode))
        return (out, None) if _with_indices(call) else out


def _with_indices(call: Call) -> bool:
    return call.target.overloadpacket in (aten.max_pool2d_with_indices, aten.max_pool3d_with_indices)


def _activation_only(call: Call) -> str | None:
    if call.kind_of(call.args[0]) != Kind.ACT:
        return f"{op_name(call.target)} of a weight is not an edge weight"
    return None


# --------------------------------------------------------------------------- adaptive pooling


def _adaptive_window_sizes(in_size: int, out_size: int, like: Tensor) -> Tensor:
    """Window lengths PyTorch's adaptive pooling uses: [floor(i*L/n), ceil((i+1)*L/n))."""
    i = torch.arange(out_size)
    start = torch.div(i * in_size, out_size, rounding_mode="floor")
    end = torch.div((i + 1) * in_size + out_size - 1, out_size, rounding_mode="floor")
    return (end - start).to(like)


def adaptive_counts(x: Tensor, output_size) -> tuple[Tensor, tuple[int, ...]]:
    """Number of inputs in each adaptive-pooling window, and the output size."""
    spatial = x.dim() - 2
    sizes = tuple(x.shape[2 + d] if o is None else int(o) for d, o in enumerate(_ntuple(output_size, spatial)))
    count = torch.ones((), dtype=x.dtype, device=x.device)
    for d in range(spatial):
        shape = [1] * spatial
        shape[d] = sizes[d]
        count = count * _adaptive_window_sizes(x.shape[2 + d], sizes[d], x).reshape(shape)
    return count, sizes


def _adaptive(x: Tensor, sizes: tuple[int, ...], maximum: bool) -> Tensor:
    spatial = len(sizes)
    if maximum:
        return (F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d)[spatial - 1](x, sizes)
    return (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)[spatial - 1](x, sizes)


_ADAPTIVE_AVG = (aten.adaptive_avg_pool1d, aten.adaptive_avg_pool2d, aten.adaptive_avg_pool3d,
                 aten._adaptive_avg_pool2d, aten._adaptive_avg_pool3d)
_ADAPTIVE_MAX = (aten.adaptive_max_pool1d, aten.adaptive_max_pool2d, aten.adaptive_max_pool3d)


@register(*_ADAPTIVE_AVG, *_ADAPTIVE_MAX)
class AdaptivePool(Rule):
    """Adaptive pooling: average (weights 1/count) or max (every input counts) over PyTorch's windows."""

    def check(self, call: Call) -> str | None:
        if call.target.overloadpacket in _ADAPTIVE_MAX and not only_first_result_used(call):
            return f"{op_name(call.target)}: the indices of the maxima are used in forward"
        return _activation_only(call)

    def twin(self, call, run, x, output_size, *rest):
        is_max = call.target.overloadpacket in _ADAPTIVE_MAX
        count, sizes = adaptive_counts(x, output_size)
        if run.mode == "sum":
            out = _adaptive(x, sizes, False) * (count if is_max else count.pow(1 - run.p))
        else:
            out = _adaptive(x, sizes, True) / (1 if is_max else count)
        return (out, None) if is_max else out

    def flow(self, call, ids, output_size, *rest):
        _, sizes = adaptive_counts(ids, output_size)
        out = window_ids(ids, lambda t: _adaptive(t, sizes, True))
        return (out, None) if call.target.overloadpacket in _ADAPTIVE_MAX else out


@register(aten.mean, aten.sum)
class Reduction(Rule):
    """``mean`` (weight 1/n on each reduced entry) and ``sum`` (weight 1) over dimensions other than the batch."""

    def check(self, call: Call) -> str | None:
        return _activation_only(call)

    def twin(self, call, run, x, dims=None, keepdim=False, **kwargs):
        dims = _dims(x, dims)
        count = math.prod(x.shape[d] for d in dims)
        weight = 1.0 / count if call.target.overloadpacket is aten.mean else 1.0
        if run.mode == "sum":
            return x.sum(dims, keepdim=keepdim) * weight**run.p
        return x.amax(dims, keepdim=keepdim) * weight

    def flow(self, call, ids, dims=None, keepdim=False, **kwargs):
        dims = _dims(ids, dims)
        return window_ids(ids, lambda t: t.amax(dims, keepdim=keepdim))


def _dims(x: Tensor, dims) -> list[int]:
    if dims is None or (isinstance(dims, (list, tuple)) and not dims):
        return list(range(x.dim()))
    return [d % x.dim() for d in ([dims] if isinstance(dims, int) else dims)]
