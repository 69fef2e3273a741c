"""Path-norms and the Path-SGD scaling.

For a unit v let gamma_in(v) be the sum over all paths from an input or constant unit to v of
the product of |w_e|^p, and gamma_out(v) the same sum over paths from v to an output.  Then

* phi_p(w)^p = sum over outputs of gamma_in  (``path_norm``), and phi_inf is the largest path product;
* the Path-SGD divisor of an edge u -> v is gamma_in(u)^(2/p) * gamma_out(v)^(2/p), and of the bias
  of v (an edge from a constant unit) gamma_out(v)^(2/p)  (``path_scaling``).

Both come from one evaluation of the path twin (batch size 1): its summed output is phi_p^p and
its gradient with respect to |w_e|^p is gamma_in(u) * gamma_out(v).

Shared weights (a convolution kernel used at every position, a layer called twice) receive the
*sum* of gamma_in(u) * gamma_out(v) over all the edges they stand for, before the power 2/p: the
kappa^(1) term of RNN Path-SGD (Neyshabur, Wu, Salakhutdinov, Srebro 2016).

BatchNorm (eval mode) contributes the edge a = weight/sqrt(var+eps) and the bias
c = bias - a*running_mean.  The divisor of its ``weight`` is kappa_a^(2/p) / (var+eps) (the chain
rule through a = weight * s, which keeps the update invariant to rescaling the units on both sides)
and that of its ``bias`` is kappa_c^(2/p).

The twin is computed in float64 by default, so deep or wide networks in float32 get finite,
positive divisors.  A unit with no path to an output (all outgoing weights zero) has divisor 0;
every divisor is raised to at least ``eps`` (default: the smallest normal number of the
parameter's dtype), so dividing by it never gives inf or NaN; the gradient of such an edge is 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pl_pathsgd.paths.errors import PathGeometryError
from pl_pathsgd.paths.graph import BATCHNORMS, PathGraph, TwinPass
from pl_pathsgd.paths.twin_ops import batchnorm_affine


def check_p(p: float, allow_inf: bool) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or math.isnan(p):
        raise PathGeometryError(f"p must be a number >= 1, got {p!r}")
    if math.isinf(p):
        if p > 0 and allow_inf:
            return math.inf
        raise PathGeometryError("the Path-SGD scaling needs a finite p >= 1 (p=inf is only defined for the path-norm)")
    if p < 1:
        raise PathGeometryError(f"p must be >= 1 (l_p path-norms for p < 1 are not norms), got {p}")
    return float(p)


def path_norm(model: nn.Module, p: float = 2, input_shape: tuple[int, ...] | None = None,
              dtype: torch.dtype = torch.float64) -> Tensor:
    """The l_p path-norm phi_p(w) = (sum over input->output paths of prod |w_e|^p)^(1/p).

    Biases are edges from a constant unit of value 1, so paths also start at biases.  ``p`` may
    be any number >= 1 or ``math.inf`` (the largest path product).  Returns a scalar tensor of
    ``dtype`` (float64 by default).  See :mod:`pl_pathsgd.paths.twin_ops` for pooling and
    BatchNorm conventions.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> float(path_norm(net, p=2)) > 0
        True
    """
    return path_norm_of(PathGraph(model, input_shape), p, dtype)


def path_norm_of(graph: PathGraph, p: float = 2, dtype: torch.dtype = torch.float64) -> Tensor:
    """:func:`path_norm` on an already traced :class:`PathGraph` (no re-tracing)."""
    p = check_p(p, allow_inf=True)
    with torch.no_grad():
        if math.isinf(p):
            return graph.evaluate(TwinPass(p=p, mode="max", dtype=dtype)).amax()
        total = graph.evaluate(TwinPass(p=p, mode="sum", dtype=dtype)).sum()
        return total if p == 1 else total.pow(1.0 / p)


@dataclass
class OuterScaling:
    """A divisor that is an outer product: divisor[i, j] = out_factor[i] * in_factor[j] (a Linear weight)."""

    out_factor: Tensor
    in_factor: Tensor

    def dense(self) -> Tensor:
        return torch.outer(self.out_factor, self.in_factor)


@dataclass
class DenseScaling:
    """A divisor stored in full, with the parameter's shape."""

    divisor: Tensor

    def dense(self) -> Tensor:
        return self.divisor


Scaling = OuterScaling | DenseScaling


def scaling_of(graph: PathGraph, p: float = 2, dtype: torch.dtype = torch.float64) -> dict[int, Scaling]:
    """The Path-SGD divisors of every parameter on a path, keyed by ``id(parameter)``, before any epsilon.

    One forward and one backward pass of the twin at batch size 1.  Linear weights used once come back
    as :class:`OuterScaling` (never materialised); everything else as :class:`DenseScaling`.
    """
    p = check_p(p, allow_inf=False)
    power = 2.0 / p
    run = TwinPass(p=p, mode="sum", dtype=dtype, track=True)
    with torch.enable_grad():
        total = graph.evaluate(run).sum()
        leaves = [(key, leaf) for key, leaf in run.leaves.items() if leaf.requires_grad]
        norms = [(key, pair) for key, pair in run.batchnorm_leaves.items()]
        targets = [leaf for _, leaf in leaves]
        targets += [t for _, pair in norms for t in pair]
        targets += [out for _, _, out in run.linear_calls]
        grads = torch.autograd.grad(total, targets, allow_unused=True) if targets else ()
    grads = [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, targets)]

    scalings: dict[int, Scaling] = {}
    for (key, _), grad in zip(leaves, grads):
        scalings[key] = DenseScaling(grad.pow(power))
    grads = grads[len(leaves):]
    modules = {id(m): m for m in graph.model.modules() if isinstance(m, BATCHNORMS)}
    for i, (key, _) in enumerate(norms):
        module = modules[key]
        kappa_scale, kappa_shift = grads[2 * i], grads[2 * i + 1]
        if module.weight is not None:
            _, _, s = batchnorm_affine(module)
            scalings[id(module.weight)] = DenseScaling(kappa_scale.pow(power) * s.to(dtype).square())
        if module.bias is not None:
            scalings[id(module.bias)] = DenseScaling(kappa_shift.pow(power))
    grads = grads[2 * len(norms):]
    scalings.update(_linear_weight_scalings(run, grads, power))
    return scalings


def _linear_weight_scalings(run: TwinPass, output_grads: list[Tensor], power: float) -> dict[int, Scaling]:
    """kappa = sum over calls and positions of gamma_out (x) gamma_in: an outer product when used once."""
    calls: dict[int, list[tuple[Tensor, Tensor]]] = {}
    for (module, x, _), grad in zip(run.linear_calls, output_grads):
        calls.setdefault(id(module.weight), []).append(
            (grad.reshape(-1, module.out_features), x.reshape(-1, module.in_features))
        )
    result: dict[int, Scaling] = {}
    for key, pairs in calls.items():
        out_vectors = torch.cat([g for g, _ in pairs])
        in_vectors = torch.cat([x for _, x in pairs])
        if out_vectors.shape[0] == 1:
            result[key] = OuterScaling(out_vectors[0].pow(power), in_vectors[0].pow(power))
        else:
            result[key] = DenseScaling((out_vectors.T @ in_vectors).pow(power))
    return result


def path_scaling(model: nn.Module, p: float = 2, input_shape: tuple[int, ...] | None = None,
                 eps: float | None = None) -> dict[str, Tensor]:
    """The Path-SGD divisor gamma(w, e) of Algorithm 1 for every parameter on a path.

    Returns ``{name: tensor}`` with the names of ``model.named_parameters()`` and tensors of each
    parameter's shape and dtype: gamma_in(u)^(2/p) * gamma_out(v)^(2/p) for an edge u -> v and
    gamma_out(v)^(2/p) for the bias of v.  Parameters that no path uses are left out.  Computed
    from one forward and one backward pass of the twin on a single all-ones input, in float64;
    divisors are raised to at least ``eps`` (default: the smallest normal number of the
    parameter's dtype) so that they can always be divided by.
    """
    graph = PathGraph(model, input_shape)
    scalings = scaling_of(graph, p)
    result = {}
    for name, parameter in model.named_parameters():
        if id(parameter) in scalings:
            divisor = scalings[id(parameter)].dense().to(parameter.dtype).reshape(parameter.shape)
            floor = torch.finfo(parameter.dtype).tiny if eps is None else eps
            result[name] = divisor.clamp_min(floor)
    return result
