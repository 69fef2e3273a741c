"""Path-norms and the Path-SGD scaling.

For a unit v let gamma_in(v) be the sum over all paths from an input or constant unit to v of
the product of |w_e|^p, and gamma_out(v) the same sum over paths from v to an output.  Then

* phi_p(w)^p = sum over outputs of gamma_in  (``path_norm``), and phi_inf is the largest path product;
* the Path-SGD divisor of an edge u -> v is gamma_in(u)^(2/p) * gamma_out(v)^(2/p), and of the bias
  of v (an edge from a constant unit) gamma_out(v)^(2/p)  (``path_scaling``).

Both come from one evaluation of the path twin (batch size 1): its summed output is phi_p^p and
its gradient with respect to |w_e|^p is gamma_in(u) * gamma_out(v).  The twin of a Linear layer
never builds |W|^p (see :mod:`pl_pathsgd.paths.fast_linear`), and for an MLP — a chain of Linear
layers and ReLU-like activations — :func:`scaling_of` needs no autograd at all: gamma_in and
gamma_out are one forward and one backward sweep of matrix-vector products (:mod:`pl_pathsgd.paths.chain`).

Shared weights (a convolution kernel used at every position, a layer called twice) receive the
*sum* of gamma_in(u) * gamma_out(v) over all the edges they stand for, before the power 2/p: the
kappa^(1) term of RNN Path-SGD (Neyshabur, Wu, Salakhutdinov, Srebro 2016).

BatchNorm (eval mode) contributes the edge a = weight/sqrt(var+eps) and the bias
c = bias - a*running_mean.  The divisor of its ``weight`` is kappa_a^(2/p) / (var+eps) (the chain
rule through a = weight * s, which keeps the update invariant to rescaling the units on both sides)
and that of its ``bias`` is kappa_c^(2/p).

``path_norm`` and ``path_scaling`` compute the twin in float64 by default, so deep or wide networks
in float32 get finite, positive divisors.  ``PathSGD`` computes it in the parameters' dtype and
falls back to float64 for a step whose float32 result is out of range (see its docstring).  A unit with no path to an output (all outgoing weights zero) has divisor 0;
every divisor is raised to at least ``eps`` (default: the smallest normal number of the
parameter's dtype), so dividing by it never gives inf or NaN; the gradient of such an edge is 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pl_pathsgd.paths.errors import PathGeometryError
from pl_pathsgd.paths.chain import chain_scaling
from pl_pathsgd.paths.graph import PathGraph, Program, trace
from pl_pathsgd.paths.ops import Kind, TwinRun
from pl_pathsgd.paths.ops.elementwise import Copy, PositivelyHomogeneous
from pl_pathsgd.paths.ops.registry import GETITEM
from pl_pathsgd.paths.ops.recurrent import ReluRNN, _layer_parameters, _options, kappa2_of


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


def path_norm(model: nn.Module | PathGraph, p: float = 2, input_shape: tuple[int, ...] | None = None,
              dtype: torch.dtype = torch.float64) -> Tensor:
    """The l_p path-norm phi_p(w) = (sum over input->output paths of prod |w_e|^p)^(1/p).

    Biases are edges from a constant unit of value 1, so paths also start at biases.  ``p`` may
    be any number >= 1 or ``math.inf`` (the largest path product).  Returns a scalar tensor of
    ``dtype`` (float64 by default).  ``model`` may be a network or its traced graph
    (:func:`~pl_pathsgd.paths.trace`).  See :mod:`pl_pathsgd.paths.ops` for the conventions of
    pooling, BatchNorm and shared weights.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> float(path_norm(net, p=2)) > 0
        True
    """
    return path_norm_of(trace(model, input_shape), p, dtype)


def path_norm_of(graph: PathGraph, p: float = 2, dtype: torch.dtype = torch.float64) -> Tensor:
    """:func:`path_norm` on an already traced :class:`PathGraph` (no re-tracing)."""
    p = check_p(p, allow_inf=True)
    with torch.no_grad():
        if math.isinf(p):
            return graph.evaluate(TwinRun(p=p, mode="max", dtype=dtype)).amax()
        total = graph.evaluate(TwinRun(p=p, mode="sum", dtype=dtype)).sum()
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


RECURRENT_MODES = ("kappa1", "exact")


def scaling_of(graph: PathGraph, p: float = 2, dtype: torch.dtype = torch.float64, *,
               chain: bool = True, fast_linear: bool = True, recurrent: str = "kappa1") -> dict[str, Scaling]:
    """The Path-SGD divisors of every parameter on a path, keyed by parameter name, before any epsilon.

    One forward and one backward pass of the twin at batch size 1.  Linear weights used once come back
    as :class:`OuterScaling` (never materialised); everything else as :class:`DenseScaling`.

    A network that is a chain of Linear layers and pass-through activations (an MLP) takes a shorter
    route when ``chain`` is true (see :mod:`pl_pathsgd.paths.chain`): the same numbers, without autograd, and
    with one read fewer of the largest hidden weight matrix.  ``chain=False`` forces the general route,
    and ``fast_linear=False`` makes it build |W|^p for every Linear layer instead of reading W blockwise
    (:mod:`pl_pathsgd.paths.fast_linear`) — both only for comparison.

    ``recurrent``: ``"kappa1"`` gives a shared weight the sum over its edges of gamma_in * gamma_out
    (kappa^(1)); ``"exact"`` adds kappa^(2) for the paths that use a recurrent weight more than once
    (:func:`recurrent_kappas`), the exact Path-SGD divisor.
    """
    p = check_p(p, allow_inf=False)
    exact = _check_recurrent(recurrent, graph)
    program = graph.program()
    names = graph.parameter_names(program)
    layers = program_chain(program) if chain else None
    if layers is not None:
        parameters = graph.parameters(program)
        chain_layers = [(parameters[w], None if b is None else parameters[b]) for w, b in layers]
        result = {}
        for (w, b), (out_factor, in_factor) in zip(layers, chain_scaling(chain_layers, p, dtype)):
            result[names[w]] = OuterScaling(out_factor, in_factor)
            if b is not None:
                result[names[b]] = DenseScaling(out_factor)
        return result
    kappas, outer = _twin_kappas(graph, p, dtype, fast_linear, exact)
    power = 2.0 / p
    scalings: dict[str, Scaling] = {}
    for name, (kappa1, kappa2) in kappas.items():
        scalings[names[name]] = DenseScaling((kappa1 + kappa2).pow(power))
    for name, pairs in outer.items():
        scalings[names[name]] = _linear_weight_scaling(pairs, power)
    return scalings


def _check_recurrent(recurrent: str, graph: PathGraph) -> bool:
    if recurrent not in RECURRENT_MODES:
        raise PathGeometryError(f"recurrent={recurrent!r}: choose 'kappa1' (the default) or 'exact'")
    if recurrent == "exact":
        repeated = graph.program().cached("repeated_on_a_path", lambda: _repeated_on_a_path(graph.program()))
        if repeated:
            names = graph.parameter_names()
            raise PathGeometryError(
                f"recurrent='exact' computes kappa^(2) for nn.RNN(nonlinearity='relu'); "
                f"{', '.join(names[n] for n in repeated)} {'is' if len(repeated) == 1 else 'are'} used more than once "
                "along a path by other operations (a hand-written recurrence or a layer applied twice in a row). Use "
                "recurrent='kappa1' for them, or write the recurrence with nn.RNN.")
    return recurrent == "exact"


def _twin_kappas(graph: PathGraph, p: float, dtype: torch.dtype, fast_linear: bool, exact: bool):
    """kappa^(1) and kappa^(2) (zeros unless ``exact``) of every parameter leaf of the twin, by placeholder name,
    and the (gamma_out, gamma_in) pairs of the Linear weights read blockwise."""
    run = TwinRun(p=p, mode="sum", dtype=dtype, track=True, fast_linear=fast_linear)
    if exact:
        run.recurrences = []
    with torch.enable_grad():
        total = graph.evaluate(run).sum()
        leaves = [(name, leaf) for name, leaf in run.leaves.items() if leaf.requires_grad]
        calls = [(name, x, out) for name, pairs in run.linear_calls.items() for x, out in pairs]
        states = [state for _, layer_states, _ in run.recurrences or [] for state in layer_states]
        targets = [leaf for _, leaf in leaves] + [out for _, _, out in calls] + states
        trackable = [t.requires_grad for t in targets]
        grads = torch.autograd.grad(total, [t for t, on in zip(targets, trackable) if on], allow_unused=True) \
            if any(trackable) else ()
    grads = iter(grads)
    grads = [next(grads) if on else None for on in trackable]
    grads = [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, targets)]
    kappas = {name: [grad, torch.zeros_like(grad)] for (name, _), grad in zip(leaves, grads)}
    outer: dict[str, list[tuple[Tensor, Tensor]]] = {}
    for (name, x, _), grad in zip(calls, grads[len(leaves):]):
        outer.setdefault(name, []).append((grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])))
    state_grads = iter(grads[len(leaves) + len(calls):])
    for name, layer_states, recurrent_twin in run.recurrences or []:
        gamma_out = [next(state_grads) for _ in layer_states]
        kappas[name][1] = kappas[name][1] + kappa2_of(layer_states, gamma_out, recurrent_twin)
    return {name: tuple(pair) for name, pair in kappas.items()}, outer


def recurrent_kappas(model: nn.Module | PathGraph, p: float = 2, input_shape: tuple[int, ...] | None = None,
                     dtype: torch.dtype = torch.float64) -> dict[str, tuple[Tensor, Tensor]]:
    """kappa^(1) and kappa^(2) of every recurrent weight (``weight_hh`` of an ``nn.RNN``), by parameter name.

    Path-SGD's exact divisor of a shared weight is (kappa^(1) + kappa^(2))^(2/p): kappa^(1) sums
    gamma_in * gamma_out over the edges the weight stands for, kappa^(2) adds what the paths that use it
    two or more times contribute (see :func:`pl_pathsgd.paths.ops.recurrent.kappa2_of`).  Where
    kappa^(2) / kappa^(1) is large, the default (kappa^(1) alone) is a rough approximation.
    """
    graph = trace(model, input_shape)
    p = check_p(p, allow_inf=False)
    recurrent = _recurrent_weights(graph.program())
    if not recurrent:
        return {}
    kappas, _ = _twin_kappas(graph, p, dtype, fast_linear=True, exact=True)
    names = graph.parameter_names()
    return {names[name]: kappas[name] for name in recurrent if name in kappas}


def recurrence_ratio(model: nn.Module | PathGraph, p: float = 2,
                     input_shape: tuple[int, ...] | None = None) -> dict[str, float]:
    """The largest kappa^(2) / kappa^(1) over the entries of every recurrent weight (0 where kappa^(1) is 0)."""
    ratios = {}
    for name, (kappa1, kappa2) in recurrent_kappas(model, p, input_shape).items():
        ratio = torch.where(kappa1 > 0, kappa2 / kappa1.clamp_min(torch.finfo(kappa1.dtype).tiny),
                            torch.zeros_like(kappa1))
        ratios[name] = float(ratio.max()) if ratio.numel() else 0.0
    return ratios


def _recurrent_weights(program: Program) -> list[str]:
    """The placeholder names of the recurrent weights (``weight_hh``) of every recurrent layer."""
    names = []
    for step in program.steps:
        if isinstance(step.rule, ReluRNN):
            layers = _options(step.call)["num_layers"]
            names += [_layer_parameters(step.call, layer)[1].name for layer in range(layers)]
    return names


def _repeated_on_a_path(program: Program) -> list[str]:
    """Parameters used by two operations one of which feeds the other (outside recurrent layers, which compute
    their own kappa^(2)): a path can use them twice, and their kappa^(2) is not computed."""
    repeated = []
    for name in program.traced.parameters:
        node = next(n for n in program.graph.nodes if n.name == name)
        uses = [u for u in node.users if program.kinds.get(u) in (Kind.ACT, Kind.PARAM) and not _bias_use(u, node)]
        for use in uses:
            reachable = _descendants(use)
            if any(other in reachable for other in uses if other is not use):
                repeated.append(name)
                break
    return repeated


def _bias_use(user, parameter) -> bool:
    """Whether a parameter enters an operation only as a bias: an edge from a constant unit, where paths start, so
    no path uses it twice."""
    packet = getattr(user.target, "overloadpacket", None)
    operands = list(user.args)
    if packet in (torch.ops.aten.add, torch.ops.aten.sub):
        return True
    if packet in (torch.ops.aten.linear, torch.ops.aten.conv1d, torch.ops.aten.conv2d, torch.ops.aten.conv3d,
                  torch.ops.aten.convolution):
        return parameter not in operands[:2]
    return False


def _descendants(node) -> set:
    seen, stack = set(), [node]
    while stack:
        for user in stack.pop().users:
            if user not in seen:
                seen.add(user)
                stack.append(user)
    return seen


def _linear_weight_scaling(pairs: list[tuple[Tensor, Tensor]], power: float) -> Scaling:
    """kappa = sum over calls and positions of gamma_out (x) gamma_in: an outer product when used once."""
    out_vectors = torch.cat([g for g, _ in pairs])
    in_vectors = torch.cat([x for _, x in pairs])
    if out_vectors.shape[0] == 1:
        return OuterScaling(out_vectors[0].pow(power), in_vectors[0].pow(power))
    return DenseScaling((out_vectors.T @ in_vectors).pow(power))


# ----------------------------------------------------------------------------- MLPs: the chain route

_PASS_THROUGH = (PositivelyHomogeneous, Copy)


def linear_chain(graph: PathGraph) -> list[tuple[str, str | None]] | None:
    """The (weight, bias) parameter names (as in ``named_parameters``) of the Linear layers of an MLP, in
    order; None if the network is not a chain of Linear layers (see :func:`program_chain`)."""
    layers = program_chain(graph.program())
    if layers is None:
        return None
    names = graph.parameter_names()
    return [(names[w], None if b is None else names[b]) for w, b in layers]


def program_chain(program: Program) -> list[tuple[str, str | None]] | None:
    """The (weight, bias) placeholder names of the Linear layers of an MLP, in order; else None.

    A chain: the input (a vector per example, possibly reshaped into one) flows through one operation
    after another, each a Linear layer whose weight and bias are parameters used nowhere else, or a
    ReLU-like activation, dropout or copy, into the output.
    """
    return program.cached("linear_chain", lambda: _find_chain(program))


def _find_chain(program: Program) -> list[tuple[str, str | None]] | None:
    layers: list[tuple[str, str | None]] = []
    current = program.input
    if len(current.meta["val"].shape) != 2:
        current = _reshaped_to_vector(program, current)
        if current is None:
            return None
    while current is not program.output:
        users = [u for u in current.users if program.kinds.get(u) == Kind.ACT]
        if len(users) != 1 or len(current.users) != 1:
            return None
        node = users[0]
        step = next(s for s in program.steps if s.node is node)
        if getattr(node.target, "overloadpacket", None) is torch.ops.aten.linear:
            weight, bias = node.args[1], node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            if node.args[0] is not current or not _own_placeholder(program, weight, node) or \
                    (bias is not None and not _own_placeholder(program, bias, node)):
                return None
            layers.append((weight.name, None if bias is None else bias.name))
        elif node.target is GETITEM:
            if node.args[1] != 0:
                return None
        elif not isinstance(step.rule, _PASS_THROUGH):
            return None
        current = node
    return layers or None


def _reshaped_to_vector(program: Program, node):
    """The node after the input's reshape into one vector per example, if that is all that happens first."""
    users = list(node.users)
    if len(users) != 1 or getattr(users[0].target, "overloadpacket", None) not in _VIEWS:
        return None
    reshaped = users[0]
    return reshaped if len(reshaped.meta["val"].shape) == 2 else None


_VIEWS = tuple(packet for packet in (torch.ops.aten.view, torch.ops.aten._unsafe_view, torch.ops.aten.reshape,
                                     torch.ops.aten.flatten))


def _own_placeholder(program: Program, node, user) -> bool:
    return (getattr(node, "op", None) == "placeholder" and program.kinds.get(node) == Kind.PARAM
            and list(node.users) == [user])


def path_scaling(model: nn.Module | PathGraph, p: float = 2, input_shape: tuple[int, ...] | None = None,
                 eps: float | None = None) -> dict[str, Tensor]:
    """The Path-SGD divisor gamma(w, e) of Algorithm 1 for every parameter on a path.

    Returns ``{name: tensor}`` with the names of ``model.named_parameters()`` and tensors of each
    parameter's shape and dtype: gamma_in(u)^(2/p) * gamma_out(v)^(2/p) for an edge u -> v and
    gamma_out(v)^(2/p) for the bias of v.  Parameters that no path uses are left out.  Computed
    from one forward and one backward pass of the twin on a single all-ones input, in float64;
    divisors are raised to at least ``eps`` (default: the smallest normal number of the
    parameter's dtype) so that they can always be divided by.
    """
    graph = trace(model, input_shape)
    scalings = scaling_of(graph, p)
    result = {}
    for name, parameter in graph.model.named_parameters():
        if name in scalings:
            divisor = scalings[name].dense().to(parameter.dtype).reshape(parameter.shape)
            floor = torch.finfo(parameter.dtype).tiny if eps is None else eps
            result[name] = divisor.clamp_min(floor)
    return result
