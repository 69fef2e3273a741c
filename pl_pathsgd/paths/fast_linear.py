"""The path twin of a Linear layer without a copy of its weight.

The twin of ``nn.Linear`` maps x to (|W|^p) x + |b|^p.  Computing |W|^p as a tensor would allocate a
weight-sized copy at every evaluation (twice the size when the twin runs in float64): for wide
layers that copy, not the arithmetic, is the cost, since a matrix-vector product is bound by
memory traffic.

Here |W|^p is only ever formed one block of rows at a time, in a reused scratch buffer, and
consumed at once by a matrix-vector product written with ``out=`` into its slice of the result:

* :func:`power_products`: ``(|W|^p) v`` and/or ``(|W|^p)^T g`` in one pass over W;
* :func:`power_sums`: the same against an all-ones vector (row or column sums of |W|^p), a plain
  reduction with no scratch at all;
* :class:`PowerLinear` / :func:`power_linear`: the twin of a Linear layer as an autograd function
  (forward ``x (|W|^p)^T``, backward ``g |W|^p``, each one blockwise pass, W never copied);
* :func:`max_linear`: the p = inf (max-times) twin, blockwise as well.

Results equal ``F.linear(x, |W|^p)`` and friends up to the order of floating-point additions.

The scratch buffer is one per thread and device, of at most :data:`BLOCK_BYTES` bytes (or one
row of W, if a row is longer), shared by every layer, every twin evaluation and the optimizer's
blockwise update; :func:`release_scratch` frees it.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

#: Bytes of one block of rows.  8 MiB: large enough that a wide layer takes a handful of blocks
#: (few, large operations, which keeps a busy machine's thread synchronisation cheap), small enough
#: to stay in cache on most CPUs and negligible next to any weight matrix worth blocking.
BLOCK_BYTES = 8 << 20

_local = threading.local()


def scratch(numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A reused flat buffer of ``numel`` elements of ``dtype`` (contents undefined).

    One byte buffer per thread and device backs every dtype; it grows to the largest request.
    """
    devices = getattr(_local, "devices", None)
    if devices is None:
        devices = _local.devices = {}
    entry = devices.get(device)
    if entry is not None:
        typed = entry[1].get(dtype)
        if typed is not None and typed.numel() >= numel:
            return typed[:numel]
    nbytes = numel * dtype.itemsize
    if entry is None or entry[0].numel() < nbytes:
        entry = devices[device] = (torch.empty(nbytes, dtype=torch.uint8, device=device), {})
    raw = entry[0]
    typed = entry[1][dtype] = raw[: raw.numel() // dtype.itemsize * dtype.itemsize].view(dtype)
    return typed[:numel]


def scratch_bytes() -> int:
    """Bytes held by this thread's scratch buffers."""
    return sum(raw.numel() for raw, _ in getattr(_local, "devices", {}).values())


def release_scratch() -> None:
    """Free this thread's scratch buffers (the next blockwise operation allocates a new one)."""
    _local.devices = {}


def row_block(columns: int, dtype: torch.dtype = torch.float32) -> int:
    """Rows per block for a matrix with ``columns`` columns of ``dtype`` (at least one row)."""
    row_bytes = max(1, columns) * dtype.itemsize
    return max(1, BLOCK_BYTES // row_bytes)


def power_into(block: Tensor, p: float, out: Tensor) -> Tensor:
    """``out = |block|^p`` (``out`` has the block's shape, possibly another dtype); returns ``out``."""
    if out.dtype == block.dtype:
        if p == 2:
            return torch.square(block, out=out)
        torch.abs(block, out=out)
    else:
        out.copy_(block)
        if p == 2:
            return out.square_()
        out.abs_()
    if p != 1:
        out.pow_(p)
    return out


def _blocks(weight: Tensor, p: float, dtype: torch.dtype):
    """Yield (row slice, |W[rows]|^p in the scratch buffer); each block is valid until the next one."""
    rows_total, columns = weight.shape
    rows = row_block(columns, dtype)
    buffer = scratch(min(rows, rows_total) * columns, dtype, weight.device)
    for start in range(0, rows_total, rows):
        stop = min(start + rows, rows_total)
        block = buffer[: (stop - start) * columns].view(stop - start, columns)
        yield slice(start, stop), power_into(weight[start:stop], p, block)


def power_products(weight: Tensor, p: float, dtype: torch.dtype, vector: Tensor | None = None,
                   covector: Tensor | None = None, shift: Tensor | None = None) -> tuple[Tensor | None, Tensor | None]:
    """``(|W|^p) vector + shift`` and ``(|W|^p)^T covector`` (either may be None) in one blockwise pass over W.

    Both in ``dtype``; W is read once whichever of the two is asked for.  ``shift`` (optional, with
    ``vector``) is added to the first.
    """
    out_features, in_features = weight.shape
    if vector is None and covector is None:
        return None, None
    if out_features <= row_block(in_features, dtype):  # one block: no slicing, no accumulation
        block = power_into(weight, p, scratch(weight.numel(), dtype, weight.device).view(weight.shape))
        forward = None
        if vector is not None:
            forward = torch.mv(block, vector) if shift is None else torch.addmv(shift, block, vector)
        return forward, None if covector is None else torch.mv(block.t(), covector)
    forward = None if vector is None else torch.empty(out_features, dtype=dtype, device=weight.device)
    backward = None if covector is None else torch.zeros(in_features, dtype=dtype, device=weight.device)
    for rows, block in _blocks(weight, p, dtype):
        if forward is not None:
            if shift is None:
                torch.mv(block, vector, out=forward[rows])
            else:
                torch.addmv(shift[rows], block, vector, out=forward[rows])
        if backward is not None:
            backward.addmv_(block.t(), covector[rows])
    return forward, backward


def power_sums(weight: Tensor, p: float, dim: int, dtype: torch.dtype) -> Tensor:
    """Sums of |W|^p along ``dim`` (the twin applied to an all-ones vector), in ``dtype``.

    Row sums (``dim=1``) of a weight already in ``dtype`` are one reduction with no scratch
    (``vector_norm``); otherwise (column sums, where ``vector_norm`` is slow, or another dtype) one
    blockwise pass of :func:`power_products` against a vector of ones.
    """
    if dim == 1 and weight.dtype == dtype:
        sums = torch.linalg.vector_norm(weight.detach(), ord=p, dim=1)
        if p == 2:
            return sums.square_()
        return sums if p == 1 else sums.pow_(p)
    ones = torch.ones(weight.shape[dim], dtype=dtype, device=weight.device)
    forward, backward = power_products(weight, p, dtype, *((ones, None) if dim == 1 else (None, ones)))
    return forward if dim == 1 else backward


def power_matmul(weight: Tensor, x: Tensor, p: float) -> Tensor:
    """(|W|^p) applied to the last dimension of ``x``: ``x @ (|W|^p)^T``, blockwise."""
    out_features, in_features = weight.shape
    flat = x.reshape(-1, in_features)
    if flat.shape[0] == 1:
        result, _ = power_products(weight, p, x.dtype, vector=flat[0])
        return result.reshape(*x.shape[:-1], out_features)
    transposed = torch.empty(out_features, flat.shape[0], dtype=x.dtype, device=x.device)
    flat_t = flat.t()
    for rows, block in _blocks(weight, p, x.dtype):
        torch.mm(block, flat_t, out=transposed[rows])
    return transposed.t().reshape(*x.shape[:-1], out_features)


def power_matmul_transposed(weight: Tensor, grad: Tensor, p: float) -> Tensor:
    """``grad @ |W|^p`` over the last dimension of ``grad`` (the backward of :func:`power_matmul`)."""
    out_features, in_features = weight.shape
    flat = grad.reshape(-1, out_features)
    if flat.shape[0] == 1:
        _, result = power_products(weight, p, grad.dtype, covector=flat[0])
        return result.reshape(*grad.shape[:-1], in_features)
    result = torch.zeros(flat.shape[0], in_features, dtype=grad.dtype, device=grad.device)
    for rows, block in _blocks(weight, p, grad.dtype):
        result.addmm_(flat[:, rows], block)
    return result.reshape(*grad.shape[:-1], in_features)


class PowerLinear(torch.autograd.Function):
    """y = x (|W|^p)^T with a gradient for x only; W is read blockwise and never copied."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, p: float) -> Tensor:
        ctx.save_for_backward(weight)
        ctx.p = p
        return power_matmul(weight, x, p)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (weight,) = ctx.saved_tensors
        grad_x = power_matmul_transposed(weight, grad, ctx.p) if ctx.needs_input_grad[0] else None
        return grad_x, None, None


def max_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The max-mode (p = inf) twin of a Linear layer: ``max_j |W_ij| x_j``, then the larger of that and
    ``bias`` (already |b|), blockwise: each block of |W| is scaled by ``x`` and reduced in the scratch
    buffer, so nothing of the weight's size is allocated.
    """
    out_features, in_features = weight.shape
    flat = x.reshape(-1, in_features)
    out = torch.empty(flat.shape[0], out_features, dtype=x.dtype, device=x.device)
    for row, vector in enumerate(flat):
        for rows, block in _blocks(weight.detach(), 1, x.dtype):
            torch.amax(block.mul_(vector), dim=1, out=out[row, rows])
    out = out.reshape(*x.shape[:-1], out_features)
    return out if bias is None else torch.maximum(out, bias)


def power_linear(x: Tensor, weight: Tensor, bias: Tensor | None, p: float) -> Tensor:
    """The sum-mode twin of a Linear layer: ``x (|W|^p)^T + bias``, where ``bias`` is already |b|^p.

    ``weight`` is the layer's weight itself (any dtype); the twin runs in ``x``'s dtype.
    """
    out = PowerLinear.apply(x, weight.detach(), p)
    return out if bias is None else out + bias
