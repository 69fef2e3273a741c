"""Capacity measures of a network: path-norms, the training margin and a path-norm generalization bound.

The bound is Theorem 3.1 of Gonon, Brisebarre, Riccietti, Gribonval, "A path-norm toolkit for modern
networks: consequences, promises and challenges" (ICLR 2024).  For ReLU networks of a fixed
architecture whose l1 path-norm is at most r, trained on n examples whose inputs have
||x||_inf <= B, the expected generalization gap of a loss that is Lipschitz in the output is
bounded through a Rademacher term

    (4 * B * C / sqrt(n)) * r,
    C  = sqrt(D * ln((3 + 2P) * K) + ln((3 + 2P) / (1 + P) * (d_in + 1) * d_out)),

and the sharper constant of their Remark 3.1

    C' = sqrt(D * ln 3 + M * ln K + ln((d_in + 1) * d_out)).

:func:`rademacher_coefficient` computes 4 * B * C / sqrt(n) (or with C') from the structural
quantities, given explicitly; :func:`network_structure` derives them from a traced network.  Such
bounds are typically vacuous, by many orders of magnitude for networks trained on real data: the
value is a trend to watch during training, not a guarantee (``docs/capacity.md``).

The structural quantities, as this module counts them (:class:`NetworkStructure`):

* D (``depth``): the largest number of *layers* on a path from an input to an output, where a layer
  is an operation with parametrized weights that mixes units (Linear, convolution, transposed
  convolution, a matrix product with a parameter; a ReLU RNN of L layers over T steps counts
  L + T - 1, its longest unrolled path) or a max-pooling.  Fixed linear maps with one edge per unit
  or non-negative weights (BatchNorm in eval mode, average pooling, means and sums) are not counted:
  they fold into a neighbouring layer without adding a path, as Gonon et al. fold BatchNorm into
  the preceding convolution.  The paper's D is the largest number of edges on a path of its DAG of
  neurons; with those maps folded, that is the count above.
* P (``pool_kinds``): the number of distinct kinds of max-pooling neurons (k-th largest input for
  different k).  PyTorch's max pooling always takes the largest (k = 1), so P = 1 when the network
  max-pools and 0 otherwise.
* K (``max_kernel``): the largest number of inputs of a max-pooling window (1 without max pooling).
  Every input of a window counts, padding included where a window overhangs (the path-norm's
  convention for max pooling: every input of a window is an edge, ``pl_pathsgd.paths.ops.pooling``).
* M (``pools_on_path``): the largest number of max-poolings on a path from an input to an output
  (Remark 3.1; 1 for torchvision's ResNets).
* d_in, d_out: the number of entries of one input and of one output.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.fx as fx
from torch import Tensor, nn

from pl_pathsgd.paths.graph import PathGraph, Program, trace
from pl_pathsgd.paths.ops import Kind
from pl_pathsgd.paths.ops.conv import Convolution
from pl_pathsgd.paths.ops.linear import Linear, MatrixProduct
from pl_pathsgd.paths.ops.pooling import _ADAPTIVE_MAX, AdaptivePool, MaxPool, _adaptive_window_sizes
from pl_pathsgd.paths.ops.recurrent import ReluRNN, _options as rnn_options
from pl_pathsgd.paths.ops.registry import sizes_at_batch_one


@dataclass(frozen=True)
class NetworkStructure:
    """The structural quantities of Theorem 3.1 (see the module docstring for how they are counted)."""

    depth: int  # D
    pool_kinds: int  # P
    max_kernel: int  # K
    pools_on_path: int  # M
    input_dim: int  # d_in
    output_dim: int  # d_out

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def rademacher_coefficient(*, depth: int, pool_kinds: int, max_kernel: int, pools_on_path: int, input_dim: int,
                           output_dim: int, n: int, input_bound: float, sharpened: bool = False) -> float:
    """4 * B * C / sqrt(n): multiplied by the l1 path-norm it is the Rademacher term of Theorem 3.1.

    Args:
        depth, pool_kinds, max_kernel, pools_on_path, input_dim, output_dim: D, P, K, M, d_in, d_out
            (:class:`NetworkStructure`; ``network_structure(model).as_dict()`` gives them).
        n: number of training examples.
        input_bound: B, the largest l_inf norm of a training input as the network sees it.  Paths that start
            at a bias start at the constant 1, so :class:`~pl_pathsgd.callbacks.capacity.CapacityReport`
            passes max(1, max_i ||x_i||_inf).
        sharpened: use C' of Remark 3.1 instead of C.
    """
    constant = bound_constant(depth=depth, pool_kinds=pool_kinds, max_kernel=max_kernel, pools_on_path=pools_on_path,
                              input_dim=input_dim, output_dim=output_dim, sharpened=sharpened)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r} must be the number of training examples, an int >= 1")
    if isinstance(input_bound, bool) or not isinstance(input_bound, (int, float)) or not 0 < input_bound < math.inf:
        raise ValueError(f"input_bound={input_bound!r} must be a positive finite number (the largest |x| of an input)")
    return 4.0 * float(input_bound) * constant / math.sqrt(n)


def bound_constant(*, depth: int, pool_kinds: int, max_kernel: int, pools_on_path: int, input_dim: int,
                   output_dim: int, sharpened: bool = False) -> float:
    """C (or C' with ``sharpened=True``) of Theorem 3.1 for the structural quantities D, P, K, M, d_in, d_out."""
    _check_structure(depth, pool_kinds, max_kernel, pools_on_path, input_dim, output_dim)
    if sharpened:
        squared = depth * math.log(3) + pools_on_path * math.log(max_kernel) + math.log((input_dim + 1) * output_dim)
    else:
        kinds = 3 + 2 * pool_kinds
        squared = depth * math.log(kinds * max_kernel) + math.log(kinds / (1 + pool_kinds) * (input_dim + 1) * output_dim)
    return math.sqrt(squared)


def _check_structure(depth, pool_kinds, max_kernel, pools_on_path, input_dim, output_dim) -> None:
    values = dict(depth=depth, pool_kinds=pool_kinds, max_kernel=max_kernel, pools_on_path=pools_on_path,
                  input_dim=input_dim, output_dim=output_dim)
    for name, value in values.items():
        least = 0 if name in ("pool_kinds", "pools_on_path") else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name}={value!r} must be an int >= {least}")
    if pool_kinds == 0 and (max_kernel != 1 or pools_on_path != 0):
        raise ValueError(f"without max pooling (pool_kinds=0) max_kernel must be 1 and pools_on_path 0, got "
                         f"max_kernel={max_kernel}, pools_on_path={pools_on_path}")
    if pool_kinds > 0 and pools_on_path == 0:
        raise ValueError("a network with max pooling (pool_kinds > 0) has at least one on some path: pools_on_path >= 1")
    if pools_on_path > depth:
        raise ValueError(f"pools_on_path={pools_on_path} cannot exceed depth={depth}: every max-pooling is a layer")


# ----------------------------------------------------------------------------- structure of a traced network


def network_structure(model: nn.Module | PathGraph, input_shape: tuple[int, ...] | None = None) -> NetworkStructure:
    """D, P, K, M, d_in and d_out of a network, from its traced graph (counted as the module docstring says)."""
    graph = trace(model, input_shape)
    program = graph.program()
    # per activation: (layers, max-poolings, largest max-pool window) of its longest path from the input
    reach: dict[fx.Node, tuple[int, int, int]] = {}
    for step in program.steps:
        node = step.node
        if node is program.input:
            reach[node] = (0, 0, 1)
            continue
        if step.kind != Kind.ACT or node.op != "call_function":
            continue
        sources = [reach[n] for n in node.all_input_nodes if n in reach]
        layers, pools, kernel = (max(values) for values in zip(*sources))
        window = _max_pool_window(step)
        if window is None:
            reach[node] = (layers + _layers(step, program), pools, kernel)
        else:
            reach[node] = (layers + 1, pools + 1, max(kernel, window))
    layers, pools, kernel = reach[program.output]
    return NetworkStructure(
        depth=max(layers, 1),
        pool_kinds=1 if pools > 0 else 0,
        max_kernel=kernel if pools > 0 else 1,
        pools_on_path=pools,
        input_dim=math.prod(graph.input_shape),
        output_dim=math.prod(sizes_at_batch_one(program.output.meta["val"].shape)),
    )


def _is_parameter(program: Program, value) -> bool:
    return isinstance(value, fx.Node) and program.kinds[value] == Kind.PARAM


def _layers(step, program: Program) -> int:
    """How many layers of weights an operation adds to a path through it."""
    rule, call = step.rule, step.call
    if isinstance(rule, (Linear, Convolution)):
        return 1 if _is_parameter(program, call.args[1]) else 0
    if isinstance(rule, MatrixProduct):
        operands = call.args[1] if call.target.overloadpacket is torch.ops.aten.einsum else call.args
        return 1 if any(_is_parameter(program, o) for o in operands if isinstance(o, fx.Node)) else 0
    if isinstance(rule, ReluRNN):
        options = rnn_options(call)
        shape = call.shape(call.args[0])
        steps = int(shape[1] if options["batch_first"] else shape[0])
        return options["num_layers"] + steps - 1
    return 0


def _max_pool_window(step) -> int | None:
    """The largest number of inputs of a window of a max-pooling operation, or None for other operations."""
    rule, call = step.rule, step.call
    if not (isinstance(rule, MaxPool) or (isinstance(rule, AdaptivePool) and call.target.overloadpacket in _ADAPTIVE_MAX)):
        return None
    spatial = int(call.target.overloadpacket.__name__.split("pool")[1][0])
    if isinstance(rule, MaxPool):
        kernel = call.arg(1, "kernel_size")
        kernel = list(kernel) if isinstance(kernel, (list, tuple)) else [kernel]
        return math.prod(int(k) for k in (kernel * spatial if len(kernel) == 1 else kernel))
    result = call.node.meta["val"]
    sizes_in = sizes_at_batch_one(call.shape(call.args[0]))[-spatial:]
    sizes_out = sizes_at_batch_one((result[0] if isinstance(result, (list, tuple)) else result).shape)[-spatial:]
    return math.prod(int(_adaptive_window_sizes(i, o, torch.zeros(())).max()) for i, o in zip(sizes_in, sizes_out))


# ----------------------------------------------------------------------------- margins


def classification_margins(outputs: Tensor, targets: Tensor) -> Tensor:
    """Per example, the output of the correct class minus the largest output of the other classes (float64).

    ``outputs``: (batch, classes) scores; ``targets``: class indices (batch,), or one-hot / probability rows
    (batch, classes), whose arg-max is the class.  Positive where the example is classified correctly.
    """
    if outputs.dim() != 2 or outputs.shape[1] < 2:
        raise ValueError(f"margins need outputs of shape (batch, classes) with at least 2 classes, got "
                         f"{tuple(outputs.shape)}")
    labels = targets.argmax(dim=-1) if targets.dim() == 2 else targets
    if labels.dim() != 1 or len(labels) != len(outputs):
        raise ValueError(f"targets of shape {tuple(targets.shape)} do not match outputs of shape {tuple(outputs.shape)}; "
                         "give class indices (batch,) or one-hot rows (batch, classes)")
    outputs = outputs.detach().to(torch.float64)
    labels = labels.to(device=outputs.device, dtype=torch.long)
    correct = outputs.gather(1, labels[:, None]).squeeze(1)
    others = outputs.scatter(1, labels[:, None], -math.inf)
    return correct - others.amax(dim=1)


def percentile(values: Tensor, q: float) -> float:
    """The q-th percentile (0 <= q <= 100) of ``values``, linearly interpolated between order statistics
    (numpy's default); no size limit."""
    if values.numel() == 0:
        raise ValueError("the percentile of no values is undefined")
    if not 0 <= q <= 100:
        raise ValueError(f"q={q!r} must lie in [0, 100]")
    ordered = values.detach().flatten().to(torch.float64).sort().values
    position = (ordered.numel() - 1) * q / 100.0
    low = int(math.floor(position))
    high = min(low + 1, ordered.numel() - 1)
    fraction = position - low
    return float(ordered[low] + (ordered[high] - ordered[low]) * fraction)


__all__ = [
    "NetworkStructure",
    "bound_constant",
    "classification_margins",
    "network_structure",
    "percentile",
    "rademacher_coefficient",
]
