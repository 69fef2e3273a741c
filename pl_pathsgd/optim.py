"""PathSGD: steepest descent in the geometry of the l_p path-norm (Algorithm 1 of Path-SGD)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from pl_pathsgd.paths.errors import PathGeometryError
from pl_pathsgd.paths.graph import PathGraph
from pl_pathsgd.paths.norms import DenseScaling, OuterScaling, Scaling, check_p, scaling_of


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

    Args:
        params: parameters to optimise, or param groups (dicts). A subset of ``model``'s parameters is
            fine, but every one of them must lie on a path of ``model``.
        lr: learning rate.
        model: the network whose path geometry defines the divisors (for a LightningModule, the module
            itself or its network). Checked when the optimizer is built: unsupported layers raise
            :class:`~pl_pathsgd.paths.errors.UnsupportedModelError` naming each of them.
        p: the l_p path-norm whose geometry is followed (p >= 1; the paper uses 2).
        momentum, dampening, nesterov, weight_decay: as in :class:`torch.optim.SGD`.
        input_shape: shape of one example without the batch dimension; inferred when the network
            starts with a Linear layer.
        eps: smallest divisor. A divisor is 0 only on an edge that no path uses (a dead unit), where the
            gradient is 0 too; raising it to ``eps`` (default: the smallest normal number of the
            parameter's dtype) makes that update exactly 0 instead of 0/0.
        dtype: precision of the geometry computation (float64 by default, so that products over
            many layers neither overflow nor underflow).

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
        dtype: torch.dtype = torch.float64,
    ):
        if model is None:
            raise TypeError("PathSGD needs the network whose path geometry it follows: pass model=<your nn.Module>")
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
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.p = check_p(p, allow_inf=False)
        self.eps = eps
        self.dtype = dtype
        self.model = model
        self.graph = PathGraph(model, input_shape)
        self._check_params_on_paths(scaling_of(self.graph, self.p, self.dtype))

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

    def _normalised(self, grad: Tensor, scaling: Scaling) -> Tensor:
        floor = torch.finfo(grad.dtype).tiny if self.eps is None else self.eps
        if isinstance(scaling, OuterScaling):
            inv_out = scaling.out_factor.to(grad.dtype).clamp_min(floor).reciprocal()
            inv_in = scaling.in_factor.to(grad.dtype).clamp_min(floor).reciprocal()
            # two broadcasts in sequence: a zero gradient stays zero even where both factors are tiny
            return grad * inv_out[:, None] * inv_in[None, :]
        assert isinstance(scaling, DenseScaling)
        return grad / scaling.divisor.to(grad.dtype).reshape(grad.shape).clamp_min(floor)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        scalings = scaling_of(self.graph, self.p, self.dtype)
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                if group["weight_decay"]:
                    grad = grad.add(param, alpha=group["weight_decay"])
                direction = self._normalised(grad, scalings[id(param)])
                direction = self._apply_momentum(param, direction, group)
                param.add_(direction, alpha=-group["lr"])
        return loss

    def _apply_momentum(self, param: Tensor, direction: Tensor, group: dict) -> Tensor:
        momentum = group["momentum"]
        if momentum == 0:
            return direction
        state = self.state[param]
        buffer = state.get("momentum_buffer")
        if buffer is None:
            buffer = state["momentum_buffer"] = direction.clone()
        else:
            buffer.mul_(momentum).add_(direction, alpha=1 - group["dampening"])
        return direction.add(buffer, alpha=momentum) if group["nesterov"] else buffer
