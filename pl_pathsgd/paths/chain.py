"""MLPs: the Path-SGD geometry as two sweeps of matrix-vector products, and a step fused with them.

For a chain of Linear layers W_0 ... W_(d-1) with ReLU-like activations between them, gamma_in of
layer j's inputs is v_j (v_0 = 1, v_(j+1) = |W_j|^p v_j + |b_j|^p) and gamma_out of its outputs is
g_j (g_(d-1) = 1, g_(j-1) = (|W_j|^p)^T g_j): the values and the gradients of the path twin, with
no autograd.  Layer j's divisor is the outer product g_j^(2/p) (x) v_j^(2/p) (its bias: g_j^(2/p)).

:func:`chain_scaling` computes all of them; :func:`fused_chain_step` also updates the weights, reading
each weight matrix about as often as SGD does.  Both order the work by what is known when: g_j
depends only on the layers after j and v_j only on those before, so with k the largest layer,

* the forward sweep up to k and the backward sweep down to k read the other layers once (old values);
* one pass over W_k, block of rows by block of rows, computes both of its products (v_(k+1) and
  g_(k-1)) from each block's old values and, in the same pass, overwrites the block with its update;
* then the layers below k (top down) and above k (bottom up) each get one pass that computes the product
  the next layer needs from the block's old values and updates the block.

So W_k is read once per step, as in SGD, and every other matrix twice (its first read only feeds the
sweeps).  Only one layer can be read once: fusing two layers j < k would need g_j (which depends on
W_k's old values) before W_j's pass and v_k (which depends on W_j's old values) before W_k's pass.
The largest layer is the one worth fusing.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from pl_pathsgd.paths.fast_linear import power_into, power_products, power_sums, row_block, scratch

Layers = list[tuple[Tensor, Tensor | None]]
#: ``update(j, out_factor, in_factor, rows)``: update the weight of layer j (rows ``(start, stop)``, or all of them
#: when None) with divisor out_factor (x) in_factor
RowUpdate = Callable[[int, Tensor, Tensor, tuple[int, int] | None], None]


def powers(values: list[Tensor | None], p: float, dtype: torch.dtype) -> list[Tensor | None]:
    """|value|^p in ``dtype`` for each tensor given (None stays None), with one foreach call per operation."""
    present = [i for i, value in enumerate(values) if value is not None]
    result: list[Tensor | None] = [None] * len(values)
    if not present:
        return result
    powered = torch._foreach_abs([values[i].detach().to(dtype) for i in present])
    if p == 2:
        torch._foreach_mul_(powered, powered)
    elif p != 1:
        torch._foreach_pow_(powered, p)
    for i, value in zip(present, powered):
        result[i] = value
    return result


class _Sweeps:
    """The vectors v_j and g_j of a chain, filled in as the layers are read."""

    def __init__(self, layers: Layers, p: float, dtype: torch.dtype):
        self.weights = [weight.detach() for weight, _ in layers]
        self.p, self.dtype = p, dtype
        self.shifts = powers([bias for _, bias in layers], p, dtype)  # |b_j|^p of the current biases
        d = len(layers)
        device = self.weights[0].device
        self.v: list[Tensor | None] = [None] * d
        self.g: list[Tensor | None] = [None] * d
        self.v[0] = torch.ones(self.weights[0].shape[1], dtype=dtype, device=device)
        self.g[-1] = torch.ones(self.weights[-1].shape[0], dtype=dtype, device=device)
        self.largest = max(range(d), key=lambda j: self.weights[j].numel())

    def forward(self, j: int) -> None:
        """v_(j+1) from layer j."""
        if j == 0:
            product = power_sums(self.weights[0], self.p, 1, self.dtype)
            self.v[1] = product if self.shifts[0] is None else product.add_(self.shifts[0])
        else:
            self.v[j + 1] = power_products(self.weights[j], self.p, self.dtype, self.v[j], shift=self.shifts[j])[0]

    def backward(self, j: int) -> None:
        """g_(j-1) from layer j."""
        if j == len(self.weights) - 1:
            self.g[j - 1] = power_sums(self.weights[j], self.p, 0, self.dtype)
        else:
            self.g[j - 1] = power_products(self.weights[j], self.p, self.dtype, covector=self.g[j])[1]

    def around_largest(self) -> None:
        """The sweeps up to the largest layer and down to it (each other layer read once)."""
        k = self.largest
        for j in range(len(self.weights) - 1, k, -1):
            self.backward(j)
        for j in range(k):
            self.forward(j)

    def needs(self, j: int) -> tuple[bool, bool]:
        """Which products layer j's pass must give after the sweeps: (v_(j+1), g_(j-1))."""
        k, last = self.largest, len(self.weights) - 1
        return k <= j < last, 0 < j <= k


def chain_scaling(layers: Layers, p: float, dtype: torch.dtype) -> list[tuple[Tensor, Tensor]]:
    """(g_j^(2/p), v_j^(2/p)) of every layer: its divisor's output and input factors, before any epsilon.

    The largest layer computes both of its products in one blockwise read; every other weight matrix is
    read twice (once per sweep).
    """
    sweeps = _Sweeps(layers, p, dtype)
    sweeps.around_largest()
    for j in _pass_order(sweeps):  # the passes of fused_chain_step without the updates: the same numbers
        forward, backward = sweeps.needs(j)
        if forward or backward:
            _read_and_update(sweeps, j, forward, backward, lambda rows: None)
    power = 2.0 / p
    return [(_power(g, power), _power(v, power)) for g, v in zip(sweeps.g, sweeps.v)]


def _pass_order(sweeps: _Sweeps) -> list[int]:
    """The largest layer first, then the layers below it top down, then those above it bottom up."""
    k, d = sweeps.largest, len(sweeps.weights)
    return [k, *range(k - 1, -1, -1), *range(k + 1, d)]


def fused_chain_step(layers: Layers, p: float, dtype: torch.dtype, update: RowUpdate,
                     update_biases: Callable[[list[Tensor | None]], None],
                     in_range: Callable[[list[Tensor]], bool] | None = None) -> bool:
    """One Path-SGD step of an MLP, the geometry computed in the same passes that update the weights.

    ``update(j, out_factor, in_factor, rows)`` updates layer j's weight with divisor out_factor (x) in_factor (given
    rows, or all); ``update_biases(g)``
    receives g_j^(2/p) (the bias divisors) of every layer once all weights are updated.  ``in_range`` checks
    factors (``None``: no checks).  Returns False, having changed nothing, if a factor known before the
    first update fails the check (the caller then computes the geometry another way); a factor that fails
    later, when some layers are already updated and their old values gone, is used with a warning.
    """
    sweeps = _Sweeps(layers, p, dtype)
    sweeps.around_largest()
    known = [t for t in (*sweeps.v, *sweeps.g) if t is not None]
    if in_range is not None and not in_range(known):
        return False
    power = 2.0 / p
    products = []
    for j in _pass_order(sweeps):
        out_factor, in_factor = _power(sweeps.g[j], power), _power(sweeps.v[j], power)
        forward, backward = sweeps.needs(j)
        if not (forward or backward):
            update(j, out_factor, in_factor, None)
            continue
        products += _read_and_update(sweeps, j, forward, backward,
                                     lambda rows, j=j, o=out_factor, i=in_factor: update(j, o, i, rows))
    if in_range is not None and not in_range(products):  # checked once, at the end: it can only warn now
        warnings.warn("PathSGD: a path factor computed during this step left the normal range of "
                      f"{dtype}; the layers updated after it used it as computed. Pass dtype=torch.float64 "
                      "to compute the geometry in float64.", RuntimeWarning, stacklevel=3)
    update_biases([None if bias is None else _power(g, power) for (_, bias), g in zip(layers, sweeps.g)])
    return True


def _power(factor: Tensor, power: float) -> Tensor:
    return factor if power == 1 else factor.pow(power)


def _read_and_update(sweeps: _Sweeps, j: int, forward: bool, backward: bool,
                     update_rows: Callable[[tuple[int, int]], None]) -> list[Tensor]:
    """One blockwise pass over W_j: each block's products from its old values, then the block's update."""
    weight, p, dtype = sweeps.weights[j], sweeps.p, sweeps.dtype
    out_features, in_features = weight.shape
    shift = sweeps.shifts[j]
    v_next = torch.empty(out_features, dtype=dtype, device=weight.device) if forward else None
    g_prev = torch.zeros(in_features, dtype=dtype, device=weight.device) if backward else None
    rows = row_block(in_features, dtype)
    for start in range(0, out_features, rows):
        stop = min(start + rows, out_features)
        block = scratch((stop - start) * in_features, dtype, weight.device).view(stop - start, in_features)
        power_into(weight[start:stop], p, block)
        if forward:
            if shift is None:
                torch.mv(block, sweeps.v[j], out=v_next[start:stop])
            else:
                torch.addmv(shift[start:stop], block, sweeps.v[j], out=v_next[start:stop])
        if backward:
            g_prev.addmv_(block.t(), sweeps.g[j][start:stop])
        update_rows((start, stop))  # the block's old values are no longer needed
    products = []
    if forward:
        sweeps.v[j + 1] = v_next
        products.append(v_next)
    if backward:
        sweeps.g[j - 1] = g_prev
        products.append(g_prev)
    return products
