"""How each supported operation acts in the path twin of a network.

The *path twin* replaces every edge weight w by |w|^p and every positively homogeneous
activation by the identity, then runs on an all-ones input.  On a non-negative input the
twin's value at a unit is gamma_in(unit): the sum over all paths from an input or a
constant (bias) unit to that unit of the product of |w|^p.  Summed over the outputs it is
phi_p^p, the p-th power of the l_p path-norm.

Two semirings are used:

* ``"sum"`` (finite p): sums of products of |w|^p.
* ``"max"`` (p = inf): maxima of products of |w|, so the output is the largest path product.

Conventions (shared with the ICLR 2024 path-norm toolkit of Gonon et al.):

* a bias is an edge from a constant unit of value 1;
* average pooling is linear with weights 1/k (k = the divisor PyTorch uses at that window);
* max pooling counts *every* input of its window, with weight 1 (a sum-pool in the twin);
* BatchNorm in eval mode is the per-channel affine map a*x + c with a = weight/sqrt(var+eps)
  and c = bias - a*running_mean;
* a residual addition x + f(x) (or a subtraction) adds the twins.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pl_pathsgd.paths.errors import PathGeometryError


def _ntuple(value, n: int) -> tuple:
    if isinstance(value, (tuple, list)):
        return tuple(value)
    return (value,) * n


def channel_view(vector: Tensor, ndim: int) -> Tensor:
    """Reshape a per-channel vector to broadcast along dim 1 of an ``ndim``-dim tensor."""
    return vector.reshape((1, -1) + (1,) * (ndim - 2))


# --------------------------------------------------------------------------- linear, conv


def linear_twin(x: Tensor, weight: Tensor, bias: Tensor | None, mode: str) -> Tensor:
    """``weight``/``bias`` are already |w|^p (sum mode) or |w| (max mode)."""
    if mode == "sum":
        return F.linear(x, weight, bias)
    out = (x.unsqueeze(-2) * weight).amax(dim=-1)
    return out if bias is None else torch.maximum(out, bias)


def conv_twin(module: nn.modules.conv._ConvNd, x: Tensor, weight: Tensor, bias: Tensor | None, mode: str) -> Tensor:
    if mode == "sum":
        return module._conv_forward(x, weight, bias)
    return _conv_max(module, x, weight, bias)


def _conv_max(module: nn.modules.conv._ConvNd, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Max-times convolution: out[o, pos] = max over (i, k) of x[i, pos*stride + k*dil] * weight[o, i, k]."""
    spatial = x.dim() - 2
    pad_mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    x = F.pad(x, list(module._reversed_padding_repeated_twice), mode=pad_mode)
    kernel = weight.shape[2:]
    for d in range(spatial):
        span = module.dilation[d] * (kernel[d] - 1) + 1
        x = x.unfold(2 + d, span, module.stride[d])[..., :: module.dilation[d]]
    # x: (1, C_in, *out_positions, *kernel)
    out_shape = x.shape[2 : 2 + spatial]
    groups = module.groups
    cin_g = x.shape[1] // groups
    cout_g = weight.shape[0] // groups
    patches = x[0].movedim(0, spatial)  # (*out_positions, C_in, *kernel)
    patches = patches.reshape(math.prod(out_shape), x.shape[1], -1)
    per_group = []
    for g in range(groups):
        group_patches = patches[:, g * cin_g : (g + 1) * cin_g].reshape(patches.shape[0], -1)
        group_weight = weight[g * cout_g : (g + 1) * cout_g].reshape(cout_g, -1)
        per_group.append(torch.stack([(group_patches * w).amax(dim=1) for w in group_weight]))
    out = torch.cat(per_group).reshape((1, weight.shape[0]) + tuple(out_shape))
    return out if bias is None else torch.maximum(out, channel_view(bias, out.dim()))


# --------------------------------------------------------------------------- batchnorm


def batchnorm_affine(module: nn.modules.batchnorm._BatchNorm) -> tuple[Tensor, Tensor, Tensor]:
    """The eval-mode affine map of a BatchNorm: (a, c, s) with a = weight*s, c = bias - a*mean, s = 1/sqrt(var+eps)."""
    if module.training:
        raise PathGeometryError(
            f"{type(module).__name__} is in training mode, where it normalises with batch statistics and is "
            "not a fixed map; the path geometry treats BatchNorm as the affine map of eval mode. Freeze it "
            "with pl_pathsgd.freeze_batchnorm(model) (keeps BatchNorm layers in eval mode)."
        )
    var = module.running_var.detach()
    mean = module.running_mean.detach()
    s = torch.rsqrt(var + module.eps)
    weight = module.weight.detach() if module.weight is not None else torch.ones_like(var)
    bias = module.bias.detach() if module.bias is not None else torch.zeros_like(var)
    a = weight * s
    return a, bias - a * mean, s


def batchnorm_twin(x: Tensor, scale: Tensor, shift: Tensor, mode: str) -> Tensor:
    """``scale``/``shift`` are |a|^p, |c|^p (sum) or |a|, |c| (max)."""
    scale, shift = channel_view(scale, x.dim()), channel_view(shift, x.dim())
    if mode == "sum":
        return x * scale + shift
    return torch.maximum(x * scale, shift)


# --------------------------------------------------------------------------- pooling


def _sum_pool(x: Tensor, kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int], ceil_mode: bool) -> Tensor:
    """Sum over each pooling window (padding counts as zero), via avg-pool with divisor 1."""
    if len(kernel) == 1:
        out = F.avg_pool2d(x.unsqueeze(-2), (1, *kernel), (1, *stride), (0, *padding), ceil_mode, True, 1)
        return out.squeeze(-2)
    pool = F.avg_pool2d if len(kernel) == 2 else F.avg_pool3d
    return pool(x, tuple(kernel), tuple(stride), tuple(padding), ceil_mode, True, 1)


def _window_geometry(module: nn.Module, spatial: int) -> tuple[tuple, tuple, tuple]:
    kernel = _ntuple(module.kernel_size, spatial)
    stride = _ntuple(module.stride if module.stride is not None else module.kernel_size, spatial)
    padding = _ntuple(module.padding, spatial)
    return kernel, stride, padding


def avg_pool_twin(module: nn.Module, x: Tensor, p: float, mode: str) -> Tensor:
    """Average pooling: weights 1/d per window, d the divisor PyTorch applies there."""
    spatial = x.dim() - 2
    kernel, stride, padding = _window_geometry(module, spatial)
    ones = torch.ones_like(x[:, :1])
    divisor = _sum_pool(ones, kernel, stride, padding, module.ceil_mode) / module(ones)
    if mode == "sum":
        return _sum_pool(x, kernel, stride, padding, module.ceil_mode) * divisor.pow(-p)
    max_pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[spatial - 1]
    return max_pool(x, kernel, stride, padding, 1, module.ceil_mode) / divisor


def max_pool_twin(module: nn.Module, x: Tensor, mode: str) -> Tensor:
    """Max pooling: every input of a window counts with weight 1 (a sum-pool in the twin)."""
    if mode == "max":
        return module(x)
    kernel, stride, padding = _window_geometry(module, x.dim() - 2)
    return _sum_pool(x, kernel, stride, padding, module.ceil_mode)


def _adaptive_window_sizes(in_size: int, out_size: int, like: Tensor) -> Tensor:
    """Window lengths PyTorch's adaptive pooling uses: [floor(i*L/n), ceil((i+1)*L/n))."""
    i = torch.arange(out_size)
    start = torch.div(i * in_size, out_size, rounding_mode="floor")
    end = torch.div((i + 1) * in_size + out_size - 1, out_size, rounding_mode="floor")
    return (end - start).to(like)


def _adaptive_counts(x: Tensor, output_size) -> tuple[Tensor, tuple[int, ...]]:
    spatial = x.dim() - 2
    sizes = tuple(
        x.shape[2 + d] if o is None else o for d, o in enumerate(_ntuple(output_size, spatial))
    )
    count = torch.ones((), dtype=x.dtype, device=x.device)
    for d in range(spatial):
        shape = [1] * spatial
        shape[d] = sizes[d]
        count = count * _adaptive_window_sizes(x.shape[2 + d], sizes[d], x).reshape(shape)
    return count, sizes


def adaptive_pool_twin(module: nn.Module, x: Tensor, p: float, mode: str, is_max: bool) -> Tensor:
    spatial = x.dim() - 2
    count, sizes = _adaptive_counts(x, module.output_size)
    avg = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)[spatial - 1]
    amax = (F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d)[spatial - 1]
    if is_max:  # every input of the window counts with weight 1
        return avg(x, sizes) * count if mode == "sum" else amax(x, sizes)
    # average: weights 1/count
    return avg(x, sizes) * count.pow(1 - p) if mode == "sum" else amax(x, sizes) / count
