"""PathSGD: steepest descent in the geometry of the l_p path-norm (Algorithm 1 of Path-SGD)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from pl_pathsgd.paths.errors import PathGeometryError
from pl_pathsgd.paths.fast_linear import row_block, scratch
from pl_pathsgd.paths.chain import fused_chain_step
from pl_pathsgd.paths.geometry import FUSED_MARGIN, StepGeometry, gammas_in_range, step_divisors, working_dtype
from pl_pathsgd.paths.graph import PathGraph, trace
from pl_pathsgd.paths.norms import RECURRENT_MODES, DenseScaling, OuterScaling, Scaling, check_p, program_chain

# torch's fused SGD kernel (what ``torch.optim.SGD(fused=True)`` runs): the momentum update of a
# block in one pass over parameter, gradient and buffer.  Eager ops do the same where it is missing.
_FUSED_SGD = getattr(torch, "_fused_sgd_", None)
_LOW_PRECISION = (torch.float16, torch.bfloat16)


class PathSGD(Optimizer):
    r"""Path-SGD (Neyshabur, Salakhutdinov, Srebro 2015), a real :class:`torch.optim.Optimizer`.

    Every step divides each gradient entry by the Path-SGD divisor of its edge, recomputed from the
    current weights of ``model``::

        w_e <- w_e - lr * (dL/dw_e) / gamma(w, e)
        gamma(w, u->v) = gamma_in(u)^(2/p) * gamma_out(v)^(2/p),   gamma(w, bias of v) = gamma_out(v)^(2/p)

    (see :mod:`pl_pathsgd.paths.norms`).  The divisors cost one forward and one backward pass of the
    network's path twin at batch size 1, whatever the training batch; a Linear layer's divisor is
    the outer product gamma_out (x) gamma_in and is never materialised.  The divisors come from the
    path engine (:func:`pl_pathsgd.paths.geometry.step_divisors`); this class only applies them, as
    :class:`torch.optim.SGD` applies its functional ``sgd``.

    The update is invariant to node-wise rescaling (Theorem 5.1): from w and from any rescaling of
    w, the trajectories stay rescalings of each other and compute the same function.  Momentum
    (and Nesterov momentum) accumulates the *path-normalised* gradient, so it keeps that
    invariance.  ``weight_decay`` adds ``weight_decay * w`` to the gradient before normalising,
    like SGD; it is off by default because it breaks the invariance.

    **Precision, per parameter dtype.**  The geometry runs in the working dtype of the network's
    parameters, with a float64 fallback for a step whose numbers leave the normal range
    (:mod:`pl_pathsgd.paths.geometry`; :attr:`last_geometry_dtype`, :attr:`geometry_fallbacks`):

    * float64 parameters: geometry, division and update in float64;
    * float32 parameters: geometry in float32 (float64 on fallback), division and update in float32;
    * float16 and bfloat16 parameters: geometry in float32 (float64 on fallback); the gradient is
      divided in float32, the update ``w - lr * step`` is computed in float32 and rounded once to the
      parameter's dtype, so it equals the float64 reference within that dtype's rounding.  A momentum
      buffer is kept in the parameter's dtype, as :class:`torch.optim.SGD` does.

    Pass ``dtype=torch.float64`` to always compute the geometry in float64, with no check.

    **Memory and cost.**  A step allocates nothing of a weight's size.  The twin never builds |W|^p:
    it reads each Linear weight in blocks of rows through a reused scratch buffer
    (:mod:`pl_pathsgd.paths.fast_linear`).  For an MLP the twin is two sweeps of matrix-vector
    products with no autograd (:func:`pl_pathsgd.paths.norms.scaling_of`).  The update of a Linear
    weight is fused and blockwise: per block of rows, ``(grad + wd * w) * (1/gamma_in)[None, :]
    * (1/gamma_out)[:, None]`` goes into the scratch buffer, then momentum buffer and parameter are
    updated in place together (torch's fused SGD kernel where available), so parameter, gradient and
    momentum buffer are each read from memory once, as in SGD.  Extra memory: the momentum buffers
    (as in SGD) plus one scratch buffer of at most :data:`~pl_pathsgd.paths.fast_linear.BLOCK_BYTES`
    (8 MiB, or one row if a row is longer) per thread and device.  Parameters whose divisor is not an
    outer product (biases, convolution kernels, BatchNorm, a Linear layer called more than once per
    forward) get a dense divisor of their own size and a dense update.

    Args:
        params: parameters to optimise, or param groups (dicts). A subset of ``model``'s parameters is
            fine, but every one of them must lie on a path of ``model``.
        lr: learning rate.
        model: the network whose path geometry defines the divisors (for a LightningModule, its network).
            Checked when the optimizer is bound: an unsupported network raises
            :class:`~pl_pathsgd.paths.errors.UnsupportedModelError` naming each offending operation.
            Without it the optimizer must be bound with :meth:`bind` before its first step.
        p: the l_p path-norm whose geometry is followed (p >= 1; the paper uses 2).
        momentum, dampening, nesterov, weight_decay: as in :class:`torch.optim.SGD`.
        input_shape: shape of one example without the batch dimension; inferred when the network
            starts with a Linear layer.
        eps: smallest divisor. A divisor is 0 only on an edge that no path uses (a dead unit), where the
            gradient is 0 too; raising it to ``eps`` (default: the smallest normal number of the dtype
            the division runs in) makes that update exactly 0 instead of 0/0.
        dtype: precision of the geometry. ``None`` (default): the working dtype above, with the float64
            fallback. A dtype (e.g. ``torch.float64``): always that one, with no check and no fallback.
        recurrent: for ReLU recurrent networks (``nn.RNN(nonlinearity="relu")``), whose recurrent weights a path
            can use several times: ``"kappa1"`` (default) divides by kappa^(1), the sum of gamma_in * gamma_out
            over the weight's edges, as for any shared weight; ``"exact"`` adds kappa^(2), the part of Path-SGD's
            divisor from paths that use the weight two or more times (O(T n^3) per step for T steps and n
            units; :func:`pl_pathsgd.paths.norms.recurrent_kappas`).  Both keep the rescaling invariance.

    ``p``, ``eps``, ``dtype`` and ``recurrent`` are per-group options (a param group may set its own) and are saved in
    :meth:`state_dict`.  ``step(closure=None)``: the closure is optional (Lightning runs it itself under
    mixed precision).
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
        recurrent: str = "kappa1",
    ):
        if isinstance(params, nn.Module):
            raise TypeError(f"PathSGD's first argument is the parameters, got the module {type(params).__name__}; "
                            "write PathSGD(net.parameters(), lr=..., model=net)")
        if input_shape is not None and model is None:
            raise ValueError("input_shape is given without model; pass both, or give input_shape to bind()")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=weight_decay,
                        p=p, eps=eps, dtype=dtype, recurrent=recurrent)
        _check_options(defaults)
        super().__init__(params, defaults)
        self.model: nn.Module | None = None
        self.graph: PathGraph | None = None
        self._names: dict[int, str] = {}
        #: dtype in which the last step's geometry was computed (after any float64 fallback)
        self.last_geometry_dtype: torch.dtype | None = None
        #: number of steps whose geometry had to be recomputed in float64
        self.geometry_fallbacks = 0
        #: for an MLP, compute the geometry in the passes that update the weights (see ``paths.chain``); False
        #: computes all divisors first, then updates (the same numbers)
        self.fuse = True
        self._comfortable = False  # the first step computes its geometry on its own, and checks its range
        if model is not None:
            self.bind(model, input_shape)

    def add_param_group(self, param_group: dict) -> None:
        _check_options({**self.defaults, **param_group})
        if "p" in param_group:
            param_group["p"] = check_p(param_group["p"], allow_inf=False)
        super().add_param_group(param_group)

    @property
    def p(self) -> float:
        """The default ``p`` (a param group may override it)."""
        return self.defaults["p"]

    @property
    def eps(self) -> float | None:
        """The default ``eps``."""
        return self.defaults["eps"]

    @property
    def dtype(self) -> torch.dtype | None:
        """The default geometry dtype."""
        return self.defaults["dtype"]

    # ------------------------------------------------------------------ the network

    def bind(self, model: nn.Module | PathGraph, input_shape: tuple[int, ...] | None = None) -> PathSGD:
        """Follow the path geometry of ``model`` (the network the parameters belong to, or its traced graph,
        e.g. ``graph.bind(copy)`` for a copy); returns ``self``.

        ``PathSGD(params, model=net)`` binds at construction.  An optimizer built from parameters alone
        (by LightningCLI, a factory function or ``functools.partial``) is bound by whoever owns the network,
        e.g. :class:`~pl_pathsgd.PathSGDMixin` in ``configure_optimizers``.  The network is traced once per
        input shape (:func:`pl_pathsgd.paths.trace`); an unsupported network raises here, before any step.
        """
        if not isinstance(model, (nn.Module, PathGraph)):
            raise TypeError(f"PathSGD.bind needs the network (an nn.Module or its traced PathGraph), got "
                            f"{type(model).__name__}")
        graph = trace(model, input_shape)
        self.model, self.graph = graph.model, graph
        self._names = {id(t): n for n, t in graph.model.named_parameters()}
        self._check_params_on_paths()
        return self

    @property
    def is_bound(self) -> bool:
        """Whether the optimizer knows the network whose geometry it follows."""
        return self.graph is not None

    def _check_params_on_paths(self) -> None:
        on_paths = set()
        for p, dtype, recurrent in {_geometry_key(g) for g in self.param_groups}:
            geometry = step_divisors(self.graph, p, dtype, recurrent)
            on_paths |= set(geometry.scalings)
            self.last_geometry_dtype = geometry.dtype
        off_path = [
            self._names.get(id(param), f"<parameter of shape {tuple(param.shape)} not in the model>")
            for group in self.param_groups
            for param in group["params"]
            if self._names.get(id(param)) not in on_paths
        ]
        if off_path:
            raise PathGeometryError(
                f"PathSGD got parameters that no path of {type(self.model).__name__} uses: {', '.join(off_path)}. "
                "Path-SGD has no divisor for them; optimise them with another optimizer or leave them out."
            )

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
        done = self._fused_chain_step()
        geometries: dict[tuple, StepGeometry] = {}
        for group in self.param_groups:
            by_dtype: dict[torch.dtype, list[Tensor]] = {}
            for param in group["params"]:
                if param.grad is None or id(param) in done:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("PathSGD does not support sparse gradients")
                by_dtype.setdefault(param.grad.dtype, []).append(param)
            if not by_dtype:
                continue
            key = _geometry_key(group)
            if key not in geometries:
                geometries[key] = step_divisors(self.graph, *key)
                self.geometry_fallbacks += geometries[key].fell_back
                self.last_geometry_dtype = geometries[key].dtype
                self._comfortable = geometries[key].comfortable
            scalings = geometries[key].scalings
            for dtype, params in by_dtype.items():
                self._update(params, [scalings[self._names[id(param)]] for param in params], group, dtype)
        return loss

    def _fused_chain_step(self) -> set[int]:
        """For an MLP, the whole step with the geometry computed in the passes that update the weights
        (:func:`~pl_pathsgd.paths.chain.fused_chain_step`); the ids of the parameters it updated (none if the
        network is not a chain, or the chain's parameters do not share one geometry and one float dtype)."""
        program = self.graph.program()
        chain = program_chain(program)
        if chain is None or not self.fuse or not self._comfortable:
            return set()
        parameters = self.graph.parameters(program)
        layers = [(parameters[w], None if b is None else parameters[b]) for w, b in chain]
        groups = {id(p): g for g in self.param_groups for p in g["params"]}
        chosen = [t for layer in layers for t in layer if t is not None and id(t) in groups and t.grad is not None]
        if not chosen or any(t.grad.is_sparse for t in chosen):
            return set()
        keys = {_geometry_key(groups[id(t)]) for t in chosen}
        grad_dtypes = {t.grad.dtype for t in chosen}
        if len(keys) != 1 or len(grad_dtypes) != 1 or next(iter(grad_dtypes)) in _LOW_PRECISION:
            return set()
        (p, dtype, _), grad_dtype = next(iter(keys)), next(iter(grad_dtypes))
        geometry_dtype = dtype or working_dtype(t for layer in layers for t in layer if t is not None)
        margins = []  # whether every gamma of this step stays far inside the range, for the next step's choice

        def checked(vectors: list[Tensor]) -> bool:
            margins.append(gammas_in_range(vectors, geometry_dtype, p, FUSED_MARGIN))
            return gammas_in_range(vectors, geometry_dtype, p)

        unchecked = dtype is not None or geometry_dtype == torch.float64
        ids = {id(t) for t in chosen}
        per_layer: dict[int, tuple] = {}

        def update(j: int, out_factor: Tensor, in_factor: Tensor, rows: tuple[int, int] | None) -> None:
            weight = layers[j][0]
            if id(weight) not in ids:
                return
            group = groups[id(weight)]
            if j not in per_layer:  # once per layer and step: the inverses, the buffer, whether it is new
                floor = torch.finfo(grad_dtype).tiny if group["eps"] is None else group["eps"]
                inv_out, inv_in = torch._foreach_reciprocal(torch._foreach_clamp_min(
                    [out_factor.to(grad_dtype), in_factor.to(grad_dtype)], floor))
                per_layer[j] = (inv_out, inv_in, *self._buffer(weight, group))
            inv_out, inv_in, buffer, first = per_layer[j]
            self._outer_update(weight, inv_out, inv_in, group, grad_dtype, rows, (buffer, first))

        def update_biases(factors: list[Tensor | None]) -> None:  # all biases at once, group by group
            by_group: dict[int, tuple[dict, list[Tensor], list[Tensor]]] = {}
            for (_, bias), factor in zip(layers, factors):
                if bias is not None and id(bias) in ids:
                    group = groups[id(bias)]
                    entry = by_group.setdefault(id(group), (group, [], []))
                    entry[1].append(bias)
                    entry[2].append(factor.to(grad_dtype))
            for group, biases, divisors in by_group.values():
                floor = torch.finfo(grad_dtype).tiny if group["eps"] is None else group["eps"]
                self._dense_update(biases, torch._foreach_clamp_min(divisors, floor), group, grad_dtype)

        if not fused_chain_step(layers, p, geometry_dtype, update, update_biases, None if unchecked else checked):
            self._comfortable = False
            return set()  # a factor out of range before any update: the general route, with its float64 fallback
        self._comfortable = all(margins)
        self.last_geometry_dtype = geometry_dtype
        return ids

    def _update(self, params: list[Tensor], scalings: list[Scaling], group: dict, grad_dtype: torch.dtype) -> None:
        """One group's parameters whose gradients have ``grad_dtype``; the small vector work is batched."""
        dtype = torch.float32 if grad_dtype in _LOW_PRECISION else grad_dtype  # the division's dtype
        floor = torch.finfo(dtype).tiny if group["eps"] is None else group["eps"]
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
            self._outer_update(params[i], inverses[2 * n], inverses[2 * n + 1], group, dtype)
        if dense:
            self._dense_update([params[i] for i in dense], clamped[len(factors):], group, dtype)

    def _buffer(self, param: Tensor, group: dict) -> tuple[Tensor | None, bool]:
        """The momentum buffer of ``param`` (None without momentum) and whether this is its first step."""
        if group["momentum"] == 0:
            return None, False
        state = self.state[param]
        buffer = state.get("momentum_buffer")
        if buffer is None:
            buffer = state["momentum_buffer"] = torch.empty_like(param, memory_format=torch.preserve_format)
            return buffer, True
        return buffer, False

    def _dense_update(self, params: list[Tensor], divisors: list[Tensor], group: dict, dtype: torch.dtype) -> None:
        """Parameters with a divisor of their own shape (biases, kernels): d = (grad + wd * w) / divisor."""
        grads = [param.grad if param.grad.dtype == dtype else param.grad.to(dtype) for param in params]
        if group["weight_decay"]:
            grads = torch._foreach_add(grads, [p if p.dtype == dtype else p.to(dtype) for p in params],
                                       alpha=group["weight_decay"])
        directions = torch._foreach_div(grads, divisors)
        if group["momentum"] == 0 and params[0].dtype == dtype:
            torch._foreach_add_(params, directions, alpha=-group["lr"])
            return
        buffers = [self._buffer(param, group) for param in params]
        for first in (True, False):
            chosen = [i for i, (_, is_first) in enumerate(buffers) if is_first is first]
            if chosen:
                self._momentum([params[i] for i in chosen], [directions[i] for i in chosen],
                               [buffers[i][0] for i in chosen], group, first)

    def _outer_update(self, param: Tensor, inv_out: Tensor, inv_in: Tensor, group: dict, dtype: torch.dtype,
                      only: tuple[int, int] | None = None, buffer_state: tuple | None = None) -> None:
        """The update of a weight with divisor out (x) in, fused, one block of rows at a time (all rows, or the
        rows ``only`` with the step's ``buffer_state`` = (buffer, first) when the caller goes block by block).

        Same arithmetic as the dense path: d = (grad + wd * w) * (1/in)[None, :] * (1/out)[:, None]
        (two broadcasts in sequence: a zero gradient stays zero even where both factors are tiny),
        buffer = d at the first step, else momentum * buffer + (1 - dampening) * d; the step is
        buffer, d + momentum * buffer (Nesterov), or d (no momentum).
        """
        grad = param.grad
        lr, weight_decay = group["lr"], group["weight_decay"]
        buffer, first = self._buffer(param, group) if buffer_state is None else buffer_state
        total_rows, columns = param.shape
        begin, end = only if only is not None else (0, total_rows)
        rows = row_block(columns, dtype) if only is None else end - begin
        work = scratch(min(rows, end - begin) * columns, dtype, grad.device)
        for start in range(begin, end, rows):
            stop = min(start + rows, end)
            d = work[: (stop - start) * columns].view(stop - start, columns)
            g, w, inv_out_block = grad[start:stop], param[start:stop], inv_out[start:stop, None]
            if weight_decay:
                torch.add(g.to(dtype), w.to(dtype), alpha=weight_decay, out=d)
                d.mul_(inv_in)
            else:
                torch.mul(g, inv_in, out=d)
            if buffer is None and w.dtype == dtype:
                w.addcmul_(d, inv_out_block, value=-lr)
            else:
                self._momentum([w], [d.mul_(inv_out_block)], [None if buffer is None else buffer[start:stop]],
                               group, first)

    @staticmethod
    def _momentum(params: list[Tensor], directions: list[Tensor], buffers: list[Tensor | None], group: dict,
                  first: bool) -> None:
        """buffer = d (first step) or momentum * buffer + (1 - dampening) * d, then
        w -= lr * buffer (or lr * (d + momentum * buffer) with Nesterov); ``directions`` may be overwritten.
        Parameters of lower precision than the directions are updated in the directions' dtype and rounded once."""
        momentum, dampening, nesterov, lr = group["momentum"], group["dampening"], group["nesterov"], group["lr"]
        if params[0].dtype != directions[0].dtype:
            for param, direction, buffer in zip(params, directions, buffers):
                _low_precision_update(param, direction, buffer, group, first)
            return
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


def _low_precision_update(param: Tensor, direction: Tensor, buffer: Tensor | None, group: dict, first: bool) -> None:
    """A float16/bfloat16 parameter: the step in the direction's dtype (float32), rounded once into the parameter."""
    momentum, dampening, nesterov, lr = group["momentum"], group["dampening"], group["nesterov"], group["lr"]
    step = direction
    if buffer is not None:
        velocity = direction.clone() if first else buffer.to(direction.dtype).mul_(momentum).add_(direction,
                                                                                                  alpha=1 - dampening)
        buffer.copy_(velocity)
        step = direction.add(velocity, alpha=momentum) if nesterov else velocity
    param.copy_(param.to(direction.dtype).sub_(step, alpha=lr))


def _geometry_key(group: dict) -> tuple:
    """What a group's divisors depend on besides the weights (groups that agree share one computation)."""
    return group["p"], group["dtype"], group.get("recurrent", "kappa1")


def _check_options(options: dict) -> None:
    """Validate the hyper-parameters of PathSGD (defaults or one param group)."""
    lr, momentum = options["lr"], options["momentum"]
    if isinstance(lr, Tensor):
        lr = float(lr)
    if not lr >= 0:
        raise ValueError(f"Invalid learning rate: {lr} (must be >= 0)")
    if not momentum >= 0:
        raise ValueError(f"Invalid momentum value: {momentum} (must be >= 0)")
    if not options["weight_decay"] >= 0:
        raise ValueError(f"Invalid weight_decay value: {options['weight_decay']} (must be >= 0)")
    if options["nesterov"] and (momentum <= 0 or options["dampening"] != 0):
        raise ValueError("Nesterov momentum requires a momentum > 0 and zero dampening")
    eps = options["eps"]
    if eps is not None and not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"Invalid eps: {eps} (must be a positive number, or None)")
    dtype = options["dtype"]
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"Invalid dtype: {dtype!r} (must be None or a floating-point torch.dtype)")
    check_p(options["p"], allow_inf=False)
    if options.get("recurrent", "kappa1") not in RECURRENT_MODES:
        raise ValueError(f"Invalid recurrent={options['recurrent']!r}: choose 'kappa1' (the default) or 'exact'")


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
