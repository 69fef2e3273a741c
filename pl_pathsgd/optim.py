"""PathSGD: steepest descent in the geometry of the l_p path-norm (Algorithm 1 of Path-SGD)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from pl_pathsgd.paths.errors import PathGeometryError
from pl_pathsgd.paths.fast_linear import row_block, scratch
from pl_pathsgd.paths.graph import PathGraph, trace
from pl_pathsgd.paths.norms import DenseScaling, OuterScaling, Scaling, check_p, scaling_of


# torch's fused SGD kernel (what ``torch.optim.SGD(fused=True)`` runs): the momentum update of a
# block in one pass over parameter, gradient and buffer.  Eager ops do the same where it is missing.
_FUSED_SGD = getattr(torch, "_fused_sgd_", None)
_SMALL = 1 << 16  # factors up to this size are range-checked together, larger ones one by one


class PathSGD(Optimizer):
    r"""Path-SGD (Neyshabur, Salakhutdinov, Srebro 2015), a real :class:`torch.optim.Optimizer`.

    Every step divides each gradient entry by the Path-SGD divisor of its edge, recomputed from the
    current weights of ``model``::

        w_e <- w_e - lr * (dL/dw_e) / gamma(w, e)
        gamma(w, u->v) = gamma_in(u)^(2/p) * gamma_out(v)^(2/p),   gamma(w, bias of v) = gamma_out(v)^(2/p)

    (see :mod:`pl_pathsgd.paths.norms`).  The divisors cost one forward and one backward pass of the
    network's path twin at batch size 1, whatever the training batch; a Linear layer's divisor is
    the outer product gamma_out (x) gamma_in and is never materialised.

    The update is invariant to node-wise rescaling (Theorem 5.1): from w and from any rescaling of
    w, the trajectories stay rescalings of each other and compute the same function.  Momentum
    (and Nesterov momentum) accumulates the *path-normalised* gradient, so it keeps that
    invariance.  ``weight_decay`` adds ``weight_decay * w`` to the gradient before normalising,
    like SGD; it is off by default because it breaks the invariance.

    **Precision.**  By default (``dtype=None``) the twin runs in the parameters' dtype (float32 for a
    float32 model, float64 for a float64 one; float16/bfloat16 models use float32).  The twin's sums
    have only non-negative terms, so float32 loses nothing to cancellation; what it can lose is
    *range*: over many layers the path products can overflow, or underflow to zero or into the
    subnormal numbers, where they keep fewer bits.  So every step checks what it computed: if any
    factor of any divisor is infinite or NaN, or comes from a gamma below ``tiny / eps`` of that
    dtype (2^-103, about 1e-31, in float32), that step's geometry is recomputed in float64 and the
    float64 divisors are used (:attr:`last_geometry_dtype` says which dtype the last step used,
    :attr:`geometry_fallbacks` counts the recomputations).  A unit that genuinely has no path to an
    output (all its outgoing weights exactly zero) has a zero divisor in any precision, so such a
    model pays the float64 recomputation at every step, for the same result.  A 50-layer,
    width-64 float32 MLP with PyTorch's default initialisation stays in float32 (its smallest
    gammas are about 4e-25).  Pass ``dtype=torch.float64`` to always compute the geometry in
    float64, with no check (about twice the twin's cost for wide layers, still without copies).

    **Memory and cost.**  A step allocates nothing of a weight's size.  The twin never builds |W|^p:
    it reads each Linear weight in blocks of rows through a reused scratch buffer
    (:mod:`pl_pathsgd.paths.fast_linear`).  For an MLP (a chain of Linear layers and ReLU-like
    activations) the twin is two sweeps of matrix-vector products with no autograd, and the largest
    hidden layer does its forward and backward product in a single read (see
    :func:`pl_pathsgd.paths.norms.scaling_of`); other networks use an autograd twin whose Linear
    layers read their weight once forward and once backward.  The update of a Linear weight is
    fused and blockwise: per block of rows, ``(grad + wd * w) * (1/gamma_in)[None, :]
    * (1/gamma_out)[:, None]`` goes into the scratch buffer, then momentum buffer and parameter are
    updated in place together (torch's fused SGD kernel where available), so parameter, gradient
    and momentum buffer are each read from memory once, as in SGD.  Extra memory: the momentum buffers (as in
    SGD) plus one scratch buffer of at most :data:`~pl_pathsgd.paths.fast_linear.BLOCK_BYTES`
    (8 MiB, or one row if a row is longer) per thread and device, shared by all layers and reused at
    every step.  Parameters whose divisor is not an outer product (biases, convolution kernels,
    BatchNorm, a Linear layer called more than once per forward) get a dense divisor of their own
    size, which the autograd twin computes anyway, and a dense update.

    Args:
        params: parameters to optimise, or param groups (dicts). A subset of ``model``'s parameters is
            fine, but every one of them must lie on a path of ``model``.
        lr: learning rate.
        model: the network whose path geometry defines the divisors (for a LightningModule, the module
            itself or its network). Checked when the optimizer is bound: unsupported layers raise
            :class:`~pl_pathsgd.paths.errors.UnsupportedModelError` naming each of them. Without it the
            optimizer must be bound with :meth:`bind` before its first step.
        p: the l_p path-norm whose geometry is followed (p >= 1; the paper uses 2).
        momentum, dampening, nesterov, weight_decay: as in :class:`torch.optim.SGD`.
        input_shape: shape of one example without the batch dimension; inferred when the network
            starts with a Linear layer.
        eps: smallest divisor. A divisor is 0 only on an edge that no path uses (a dead unit), where the
            gradient is 0 too; raising it to ``eps`` (default: the smallest normal number of the
            parameter's dtype) makes that update exactly 0 instead of 0/0.
        dtype: precision of the geometry computation. ``None`` (default): the parameters' dtype, with
            the float64 fallback described above. A dtype (e.g. ``torch.float64``): always that one,
            with no check and no fallback.

    ``step(closure=None)``: the closure is optional (Lightning runs it itself under mixed precision).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 0.01,
        *,
        model: nn.Module | None = None,
        p: float = 2,
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        input_shape: tuple[int, ...] | None = None,
        eps: float | None = None,
        dtype: torch.dtype | None = None,
    ):
        if lr < 0:
            raise ValueError(f"Invalid learning rate: {lr} (must be >= 0)")
        if momentum < 0:
            raise ValueError(f"Invalid momentum value: {momentum} (must be >= 0)")
        if weight_decay < 0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay} (must be >= 0)")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum > 0 and zero dampening")
        if eps is not None and eps <= 0:
            raise ValueError(f"Invalid eps: {eps} (must be > 0)")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"Invalid dtype: {dtype!r} (must be None or a floating-point torch.dtype)")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.p = check_p(p, allow_inf=False)
        self.eps = eps
        self.dtype = dtype
        self.model: nn.Module | None = None
        self.graph: PathGraph | None = None
        self._model_parameters: list[Tensor] = []
        #: dtype in which the last step's geometry was computed (after any float64 fallback)
        self.last_geometry_dtype: torch.dtype | None = None
        #: number of steps whose geometry had to be recomputed in float64
        self.geometry_fallbacks = 0
        if model is not None:
            self.bind(model, input_shape)
        elif input_shape is not None:
            raise ValueError("input_shape is given without model; pass both, or give input_shape to bind()")

    def bind(self, model: nn.Module, input_shape: tuple[int, ...] | None = None) -> PathSGD:
        """Follow the path geometry of ``model`` (the network the parameters belong to); returns ``self``.

        ``PathSGD(params, model=net)`` binds at construction.  An optimizer built from parameters alone
        (by LightningCLI, a factory function or ``functools.partial``) is bound by whoever owns the network,
        e.g. :class:`~pl_pathsgd.PathSGDMixin` in ``configure_optimizers``.  The network is traced once per
        input shape (:func:`pl_pathsgd.paths.trace`); an unsupported network raises here, before any step.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"PathSGD.bind needs the network (an nn.Module), got {type(model).__name__}")
        graph = trace(model, input_shape)
        self.model, self.graph = model, graph
        self._model_parameters = list(model.parameters())
        self._check_params_on_paths(self._geometry(count=False))
        return self

    @property
    def is_bound(self) -> bool:
        """Whether the optimizer knows the network whose geometry it follows."""
        return self.graph is not None

    def _check_params_on_paths(self, scalings: dict[int, Scaling]) -> None:
        names = {id(t): n for n, t in self.model.named_parameters()}
        off_path = [
            names.get(id(param), f"<parameter of shape {tuple(param.shape)} not in the model>")
            for group in self.param_groups
            for param in group["params"]
            if id(param) not in scalings
        ]
        if off_path:
            raise PathGeometryError(
                f"PathSGD got parameters that no path of {type(self.model).__name__} uses: {', '.join(off_path)}. "
                "Path-SGD has no divisor for them; optimise them with another optimizer or leave them out."
            )

    # ------------------------------------------------------------------ geometry

    def _working_dtype(self) -> torch.dtype:
        """The parameters' dtype (promoted over the model), at least float32."""
        dtype = torch.float32
        for param in self._model_parameters:
            if param.dtype.is_floating_point:
                dtype = torch.promote_types(dtype, param.dtype)
        return dtype if dtype in (torch.float32, torch.float64) else torch.float64

    def _geometry(self, count: bool = True) -> dict[int, Scaling]:
        """The divisors of this step: in ``self.dtype``, or in the working dtype with a float64 fallback."""
        if self.dtype is not None:
            self.last_geometry_dtype = self.dtype
            return scaling_of(self.graph, self.p, self.dtype)
        dtype = self._working_dtype()
        scalings = scaling_of(self.graph, self.p, dtype)
        if dtype != torch.float64 and not _in_normal_range(scalings, dtype, self.p):
            dtype = torch.float64
            scalings = scaling_of(self.graph, self.p, dtype)
            self.geometry_fallbacks += count
        self.last_geometry_dtype = dtype
        return scalings

    # ------------------------------------------------------------------ update

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.graph is None:
            raise RuntimeError("PathSGD is not bound to a network: pass model=<the network> when building it, or call "
                               "optimizer.bind(network) before the first step (PathSGDMixin does this for you)")
        scalings = self._geometry()
        for group in self.param_groups:
            by_dtype: dict[torch.dtype, list[Tensor]] = {}
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("PathSGD does not support sparse gradients")
                by_dtype.setdefault(param.grad.dtype, []).append(param)
            for dtype, params in by_dtype.items():
                self._update(params, [scalings[id(param)] for param in params], group, dtype)
        return loss

    def _update(self, params: list[Tensor], scalings: list[Scaling], group: dict, dtype: torch.dtype) -> None:
        """One group's parameters whose gradients have ``dtype``; the small vector work is batched."""
        floor = torch.finfo(dtype).tiny if self.eps is None else self.eps
        outer = [i for i, (param, s) in enumerate(zip(params, scalings)) if isinstance(s, OuterScaling) and param.dim() == 2]
        in_outer = set(outer)
        dense = [i for i in range(len(params)) if i not in in_outer]
        # 1 / max(factor, floor) for every Linear weight's two factors; max(divisor, floor) for the rest
        factors = [f.to(dtype) for i in outer for f in (scalings[i].out_factor, scalings[i].in_factor)]
        divisors = [_dense_divisor(scalings[i], params[i].shape).to(dtype) for i in dense]
        clamped = torch._foreach_clamp_min(factors + divisors, floor) if factors or divisors else []
        inverses = clamped[: len(factors)]
        if inverses:
            torch._foreach_reciprocal_(inverses)
        for n, i in enumerate(outer):
            self._outer_update(params[i], inverses[2 * n], inverses[2 * n + 1], group)
        if dense:
            self._dense_update([params[i] for i in dense], clamped[len(factors):], group)

    def _dense_update(self, params: list[Tensor], divisors: list[Tensor], group: dict) -> None:
        """Parameters with a divisor of their own shape (biases, kernels): d = (grad + wd * w) / divisor."""
        grads = [param.grad for param in params]
        if group["weight_decay"]:
            grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
        directions = torch._foreach_div(grads, divisors)
        if group["momentum"] == 0:
            torch._foreach_add_(params, directions, alpha=-group["lr"])
            return
        first_steps, later_steps = [], []
        for i, param in enumerate(params):
            state = self.state[param]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.empty_like(param, memory_format=torch.preserve_format)
                first_steps.append(i)
            else:
                later_steps.append(i)
        for chosen, first in ((first_steps, True), (later_steps, False)):
            if chosen:
                self._momentum([params[i] for i in chosen], [directions[i] for i in chosen],
                               [self.state[params[i]]["momentum_buffer"] for i in chosen], group, first)

    def _outer_update(self, param: Tensor, inv_out: Tensor, inv_in: Tensor, group: dict) -> None:
        """The update of a weight with divisor out (x) in, fused, one block of rows at a time.

        Same arithmetic as the dense path: d = (grad + wd * w) * (1/in)[None, :] * (1/out)[:, None]
        (two broadcasts in sequence: a zero gradient stays zero even where both factors are tiny),
        buffer = d at the first step, else momentum * buffer + (1 - dampening) * d; the step is
        buffer, d + momentum * buffer (Nesterov), or d (no momentum).
        """
        grad = param.grad
        lr, weight_decay, momentum = group["lr"], group["weight_decay"], group["momentum"]
        buffer, first = None, False
        if momentum != 0:
            state = self.state[param]
            buffer = state.get("momentum_buffer")
            if buffer is None:
                buffer = state["momentum_buffer"] = torch.empty_like(param, memory_format=torch.preserve_format)
                first = True

        total_rows, columns = param.shape
        rows = row_block(columns, grad.dtype)
        work = scratch(min(rows, total_rows) * columns, grad.dtype, grad.device)
        for start in range(0, total_rows, rows):
            stop = min(start + rows, total_rows)
            d = work[: (stop - start) * columns].view(stop - start, columns)
            g, w, inv_out_block = grad[start:stop], param[start:stop], inv_out[start:stop, None]
            if weight_decay:
                torch.add(g, w, alpha=weight_decay, out=d)
                d.mul_(inv_in)
            else:
                torch.mul(g, inv_in, out=d)
            if buffer is None:
                w.addcmul_(d, inv_out_block, value=-lr)
            else:
                self._momentum([w], [d.mul_(inv_out_block)], [buffer[start:stop]], group, first)

    @staticmethod
    def _momentum(params: list[Tensor], directions: list[Tensor], buffers: list[Tensor], group: dict,
                  first: bool) -> None:
        """buffer = d (first step) or momentum * buffer + (1 - dampening) * d, then
        w -= lr * buffer (or lr * (d + momentum * buffer) with Nesterov); ``directions`` may be overwritten."""
        momentum, dampening, nesterov, lr = group["momentum"], group["dampening"], group["nesterov"], group["lr"]
        if _fusable(params + directions + buffers):  # one pass over each parameter, direction and buffer
            _FUSED_SGD(params, directions, buffers, weight_decay=0.0, momentum=momentum, lr=lr, dampening=dampening,
                       nesterov=nesterov, maximize=False, is_first_step=first)
            return
        for param, direction, buffer in zip(params, directions, buffers):
            if first:
                buffer.copy_(direction)
            else:
                buffer.mul_(momentum).add_(direction, alpha=1 - dampening)
            param.add_(direction.add_(buffer, alpha=momentum) if nesterov else buffer, alpha=-lr)


def _fusable(tensors) -> bool:
    """Whether torch's fused SGD kernel can update these tensors (same device and dtype, contiguous, CPU or CUDA)."""
    if _FUSED_SGD is None:
        return False
    first = tensors[0]
    return first.device.type in ("cpu", "cuda") and all(
        t.device == first.device and t.dtype == first.dtype and t.is_contiguous() for t in tensors
    )


def _dense_divisor(scaling: Scaling, shape: torch.Size) -> Tensor:
    """A divisor with the parameter's shape (an outer product is formed only for a non-matrix parameter)."""
    divisor = scaling.divisor if isinstance(scaling, DenseScaling) else scaling.dense()
    return divisor.reshape(shape)


def _in_normal_range(scalings: dict[int, Scaling], dtype: torch.dtype, p: float) -> bool:
    """Whether every factor is finite and its gamma comfortably above the underflow range of ``dtype``.

    A factor is gamma^(2/p), gamma a sum over paths of products of |w|^p.  If some gamma is below
    tiny / eps (2^-103 in float32), its terms may have been rounded in the subnormal range, where
    they keep fewer bits, or flushed to zero (the float64 twin would give a positive normal number);
    an infinite or NaN factor is overflow.  Either way the step's geometry is recomputed in float64.
    """
    info = torch.finfo(dtype)
    lowest = max(info.tiny, (info.tiny / info.eps) ** (2.0 / p))
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
    return low >= lowest and high <= info.max  # False for NaN
