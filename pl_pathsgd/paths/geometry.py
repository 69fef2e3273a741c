"""The Path-SGD divisors of one optimizer step, in a working precision with a float64 safety net.

:func:`step_divisors` is what :class:`~pl_pathsgd.PathSGD` asks for at every step: the divisors of
every parameter for the current weights, computed by :func:`~pl_pathsgd.paths.norms.scaling_of`.

Precision: by default the twin runs in the parameters' dtype, at least float32 (float16 and
bfloat16 models get a float32 geometry).  The twin's sums have only non-negative terms, so float32
loses nothing to cancellation; what it can lose is *range*: over many layers the path products
can overflow, or underflow to zero or into the subnormal numbers, where they keep fewer bits.  So
every result is checked: if any factor is infinite or NaN, or comes from a gamma below
``tiny / eps`` of that dtype (2^-103, about 1e-31, in float32), the geometry is recomputed in
float64 and the float64 divisors are used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pl_pathsgd.paths.graph import PathGraph
from pl_pathsgd.paths.norms import OuterScaling, Scaling, scaling_of

_SMALL = 1 << 16  # factors up to this size are range-checked together, larger ones one by one


@dataclass
class StepGeometry:
    """The divisors of one step (by parameter name), the dtype they were computed in, and whether that
    took the float64 fallback."""

    scalings: dict[str, Scaling]
    dtype: torch.dtype
    fell_back: bool = False
    #: every factor far inside the normal range (see :data:`FUSED_MARGIN`)
    comfortable: bool = False


def working_dtype(parameters) -> torch.dtype:
    """The parameters' floating dtype promoted with float32: float32 for float16/bfloat16/float32, float64 for float64."""
    dtype = torch.float32
    for parameter in parameters:
        if parameter.dtype.is_floating_point:
            dtype = torch.promote_types(dtype, parameter.dtype)
    return dtype if dtype in (torch.float32, torch.float64) else torch.float64


def step_divisors(graph: PathGraph, p: float, dtype: torch.dtype | None = None,
                  recurrent: str = "kappa1") -> StepGeometry:
    """The divisors for a Path-SGD step: in ``dtype`` if given (no check), else in the working dtype of the
    network's parameters with a float64 fallback when the result leaves the normal range.  ``recurrent``:
    see :func:`~pl_pathsgd.paths.norms.scaling_of`."""
    if dtype is not None:
        return StepGeometry(scaling_of(graph, p, dtype, recurrent=recurrent), dtype, comfortable=True)
    dtype = working_dtype(graph.model.parameters())
    scalings = scaling_of(graph, p, dtype, recurrent=recurrent)
    if dtype != torch.float64 and not in_normal_range(scalings, dtype, p):
        return StepGeometry(scaling_of(graph, p, torch.float64, recurrent=recurrent), torch.float64, fell_back=True)
    comfortable = dtype == torch.float64 or in_normal_range(scalings, dtype, p, FUSED_MARGIN)
    return StepGeometry(scalings, dtype, comfortable=comfortable)


def in_normal_range(scalings: dict[str, Scaling], dtype: torch.dtype, p: float, margin: float = 1.0) -> bool:
    """Whether every factor is finite and its gamma comfortably above the underflow range of ``dtype``.

    A factor is gamma^(2/p), gamma a sum over paths of products of |w|^p.  If some gamma is below
    tiny / eps (2^-103 in float32), its terms may have been rounded in the subnormal range, where
    they keep fewer bits, or flushed to zero (the float64 twin would give a positive normal number);
    an infinite or NaN factor is overflow.
    """
    info = torch.finfo(dtype)
    lowest = max(info.tiny, (info.tiny / info.eps * margin) ** (2.0 / p))
    highest = info.max / margin ** (2.0 / p)
    small: list[Tensor] = []
    bounds: list[Tensor] = []
    for scaling in scalings.values():
        factors = (scaling.out_factor, scaling.in_factor) if isinstance(scaling, OuterScaling) else (scaling.divisor,)
        for factor in factors:
            if factor.numel() <= _SMALL:
                small.append(factor.reshape(-1))
            elif factor.numel():
                bounds.append(torch.stack(torch.aminmax(factor)))
    if small:
        bounds.append(torch.stack(torch.aminmax(torch.cat(small))))
    if not bounds:
        return True
    low, high = torch.stack(bounds).T
    low, high = float(low.min()), float(high.max())
    return low >= lowest and high <= highest  # False for NaN


#: How far inside the normal range the last step's gammas must be for the next step to compute its geometry in
#: the passes that update the weights (where a factor cannot be recomputed in float64 once some layers are updated)
FUSED_MARGIN = 2.0**32


def gammas_in_range(gammas: list[Tensor], dtype: torch.dtype, p: float, margin: float = 1.0) -> bool:
    """The check of :func:`in_normal_range` on gammas (sums over paths) rather than on their powers."""
    info = torch.finfo(dtype)
    lowest = info.tiny / info.eps * margin
    vectors = [g.reshape(-1) for g in gammas if g.numel()]
    if not vectors:
        return True
    low, high = torch.aminmax(torch.cat(vectors))
    low, high = float(low), float(high)
    return low >= lowest and (high * margin) ** (2.0 / p) <= info.max if high == high else False
