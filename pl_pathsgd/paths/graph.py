"""Tracing a network into its path twin, with a support check.

:class:`PathGraph` traces a model once with ``torch.fx`` (so ``nn.Sequential`` and modules
with their own ``forward`` both work), checks every operation against the supported list,
and can then evaluate the twin of the model's *current* weights (see
:mod:`pl_pathsgd.paths.twin_ops`).  One evaluation is one forward pass of batch size 1 and,
for the Path-SGD scaling, one backward pass: its cost does not depend on any batch size.

Every unsupported module or operation is collected and reported together in one
:class:`~pl_pathsgd.paths.errors.UnsupportedModelError` when the graph is built.
"""

from __future__ import annotations

import copy
import operator
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from pl_pathsgd.paths import twin_ops
from pl_pathsgd.paths.errors import PathGeometryError, UnsupportedModelError
from pl_pathsgd.paths.fast_linear import max_linear, power_linear

# ----------------------------------------------------------------------------- supported set

PASS_THROUGH_MODULES = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
)
SHAPE_MODULES = (nn.Flatten, nn.Unflatten)
CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
ADAPTIVE_AVG_POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
ADAPTIVE_MAX_POOLS = (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
BATCHNORMS = (nn.modules.batchnorm._BatchNorm,)
PARAMETRIZED_MODULES = (nn.Linear, *CONV_MODULES, *BATCHNORMS)
SUPPORTED_MODULES = (
    *PASS_THROUGH_MODULES,
    *SHAPE_MODULES,
    *PARAMETRIZED_MODULES,
    *AVG_POOLS,
    *MAX_POOLS,
    *ADAPTIVE_AVG_POOLS,
    *ADAPTIVE_MAX_POOLS,
)

PASS_THROUGH_FUNCTIONS = {F.relu, F.relu_, torch.relu, torch.relu_, F.leaky_relu, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d}
SHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}
ADD_FUNCTIONS = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub}
CAT_FUNCTIONS = {torch.cat, torch.concat}
META_FUNCTIONS = {getattr, len}  # produce shapes and sizes, not activations
PASS_THROUGH_METHODS = {"relu", "relu_", "contiguous"}
SHAPE_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "view_as", "reshape_as"}
ADD_METHODS = {"add", "add_", "sub", "sub_"}
META_METHODS = {"size", "dim"}

# functional pooling -> (module class, names of the positional arguments after the input)
_AVG_ARGS = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
FUNCTIONAL_POOLS: dict[Callable, tuple[type[nn.Module], tuple[str, ...]]] = {
    F.avg_pool1d: (nn.AvgPool1d, _AVG_ARGS[:5]),
    F.avg_pool2d: (nn.AvgPool2d, _AVG_ARGS),
    F.avg_pool3d: (nn.AvgPool3d, _AVG_ARGS),
    F.max_pool1d: (nn.MaxPool1d, ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")),
    F.max_pool2d: (nn.MaxPool2d, ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")),
    F.max_pool3d: (nn.MaxPool3d, ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")),
    F.adaptive_avg_pool1d: (nn.AdaptiveAvgPool1d, ("output_size",)),
    F.adaptive_avg_pool2d: (nn.AdaptiveAvgPool2d, ("output_size",)),
    F.adaptive_avg_pool3d: (nn.AdaptiveAvgPool3d, ("output_size",)),
    F.adaptive_max_pool1d: (nn.AdaptiveMaxPool1d, ("output_size", "return_indices")),
    F.adaptive_max_pool2d: (nn.AdaptiveMaxPool2d, ("output_size", "return_indices")),
    F.adaptive_max_pool3d: (nn.AdaptiveMaxPool3d, ("output_size", "return_indices")),
}

_NOT_HOMOGENEOUS = (
    "is not positively homogeneous (f(c*x) != c*f(x) for c > 0), so the network is no sum over paths "
    "of weight products"
)
_PER_EXAMPLE_NORM = "normalises by statistics of each example, which divides paths by other paths"
_PRODUCT = "multiplies activations together (products of paths), which has no path decomposition"


def _module_reason(module: nn.Module) -> str:
    name = type(module).__name__
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm)):
        return f"{name} {_PER_EXAMPLE_NORM}"
    if isinstance(module, (nn.MultiheadAttention, nn.Bilinear, nn.RNNBase)):
        return f"{name} {_PRODUCT}"
    if isinstance(module, (nn.Softmax, nn.LogSoftmax, nn.Softmin)):
        return f"{name} {_NOT_HOMOGENEOUS}; leave it to the loss (cross-entropy takes logits)"
    if isinstance(module, (nn.PReLU,)):
        return f"{name} has a learnable slope that is not an edge weight; use LeakyReLU"
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Embedding)):
        return f"{name} is not supported by the path geometry yet"
    if isinstance(module, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)):
        return f"{name} with dilation != 1 or return_indices=True is not supported"
    if isinstance(module, BATCHNORMS):
        return f"{name} with track_running_stats=False always uses batch statistics and is not a fixed map"
    activation_like = "activation" in type(module).__module__
    if activation_like:
        return f"{name} {_NOT_HOMOGENEOUS}"
    return f"{name} is not a supported layer"


def _module_supported(module: nn.Module) -> bool:
    if isinstance(module, MAX_POOLS):
        return _ntuple_all_one(module.dilation) and not module.return_indices
    if isinstance(module, ADAPTIVE_MAX_POOLS):
        return not module.return_indices
    if isinstance(module, BATCHNORMS):
        return module.track_running_stats
    return isinstance(module, SUPPORTED_MODULES)


def _ntuple_all_one(value) -> bool:
    return all(v == 1 for v in (value if isinstance(value, (tuple, list)) else (value,)))


def _function_name(target: Any) -> str:
    return getattr(target, "__name__", repr(target))


class _PathTracer(fx.Tracer):
    """Keeps the supported layers (and their subclasses) as leaves; traces through the rest."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, SUPPORTED_MODULES) or super().is_leaf_module(m, module_qualified_name)


# ----------------------------------------------------------------------------- evaluation


@dataclass
class TwinPass:
    """State of one evaluation of the twin."""

    p: float
    mode: str  # "sum": sums of products of |w|^p; "max": largest product of |w|
    dtype: torch.dtype
    track: bool = False  # keep what the Path-SGD scaling needs
    # Linear twins read |W|^p blockwise (fast_linear.power_linear / max_linear) instead of building it
    fast_linear: bool = True
    leaves: dict[int, Tensor] = field(default_factory=dict)  # id(parameter) -> |w|^p
    batchnorm_leaves: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)  # id(module) -> (|a|^p, |c|^p)
    linear_calls: list[tuple[nn.Linear, Tensor, Tensor]] = field(default_factory=list)  # (module, input, output)

    def power(self, value: Tensor) -> Tensor:
        value = value.detach().to(self.dtype).abs()
        if self.mode == "max" or self.p == 1:
            return value
        return value.square() if self.p == 2 else value.pow(self.p)

    def leaf(self, parameter: Tensor | None, requires_grad: bool) -> Tensor | None:
        """|w|^p of a parameter, one tensor per parameter however often it is used."""
        if parameter is None:
            return None
        key = id(parameter)
        if key not in self.leaves:
            self.leaves[key] = self.power(parameter).requires_grad_(self.track and requires_grad)
        return self.leaves[key]


Handler = Callable[[tuple, dict, TwinPass], Any]

#: Number of networks traced in this process (each :func:`trace` of a new network or input shape adds one).
TRACE_COUNT = 0


class PathGraph:
    """A traced network whose path twin can be evaluated for the current weights.

    Args:
        model: the network. Its ``forward`` must take one tensor (a batch) and return one tensor.
        input_shape: shape of one example without the batch dimension. Inferred when the first
            operation on the input is a ``Linear``; required otherwise.
    """

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...] | None = None):
        global TRACE_COUNT
        TRACE_COUNT += 1
        self.model = model
        self.graph = self._trace(model)
        self._handlers: dict[fx.Node, Handler] = {}
        problems = []
        for node in self.graph.nodes:
            handler_or_reason = self._handler(node)
            if isinstance(handler_or_reason, str):
                problems.append((self._where(node), handler_or_reason))
            else:
                self._handlers[node] = handler_or_reason
        if problems:
            raise UnsupportedModelError(problems, type(model).__name__)
        self.parametrized_nodes = [
            node for node in self.graph.nodes
            if node.op == "call_module" and isinstance(self.module(node), PARAMETRIZED_MODULES)
        ]
        self.input_shape = self._input_shape(input_shape)
        self._check_runs()

    def bind(self, model: nn.Module) -> PathGraph:
        """The same traced graph evaluated on ``model``, a structurally identical network (e.g. a deep copy)."""
        if [n for n, _ in self.model.named_modules()] != [n for n, _ in model.named_modules()]:
            raise PathGeometryError(f"{type(model).__name__} is not structurally identical to the traced "
                                    f"{type(self.model).__name__}; trace it instead")
        bound = copy.copy(self)
        bound.model = model
        return bound

    # -- tracing and support check

    @staticmethod
    def _trace(model: nn.Module) -> fx.Graph:
        try:
            graph = _PathTracer().trace(model)
        except Exception as error:  # fx raises many types; all mean "not traceable"
            raise UnsupportedModelError(
                [(f"{type(model).__name__}.forward", f"could not be traced symbolically ({type(error).__name__}: {error}). "
                  "Write forward without control flow that depends on tensor values")],
                type(model).__name__,
            ) from error
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise UnsupportedModelError(
                [(f"{type(model).__name__}.forward", f"takes {len(placeholders)} inputs; the path geometry needs exactly one")],
                type(model).__name__,
            )
        return graph

    def module(self, node: fx.Node) -> nn.Module:
        return self.model.get_submodule(node.target)

    def _where(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return f"module '{node.target}' ({type(self.module(node)).__name__})"
        if node.op in ("call_function", "call_method"):
            return f"operation '{node.name}' ({_function_name(node.target)})"
        return f"node '{node.name}'"

    def _handler(self, node: fx.Node) -> Handler | str:
        """The twin rule of a node, or the reason it has none."""
        if node.op == "placeholder":
            return lambda args, kwargs, run: None  # the input is set by evaluate()
        if node.op == "output":
            value = node.args[0]
            if not isinstance(value, fx.Node):
                return "the model returns a container; the path geometry needs forward to return one tensor"
            return lambda args, kwargs, run: args[0]
        if node.op == "get_attr":
            return (f"the tensor '{node.target}' is used directly in forward; put weights in nn.Linear/nn.Conv layers "
                    "so the geometry knows which units they connect")
        if node.op == "call_module":
            return self._module_handler(self.module(node))
        if node.op == "call_function":
            return self._function_handler(node)
        if node.op == "call_method":
            return self._method_handler(node)
        return f"unknown node kind {node.op}"

    def _module_handler(self, module: nn.Module) -> Handler | str:
        if not _module_supported(module):
            return _module_reason(module)
        if isinstance(module, PASS_THROUGH_MODULES):
            return lambda args, kwargs, run: args[0]
        if isinstance(module, SHAPE_MODULES):
            return lambda args, kwargs, run: module(args[0])
        if isinstance(module, nn.Linear):
            return lambda args, kwargs, run: _linear(module, args[0], run)
        if isinstance(module, CONV_MODULES):
            return lambda args, kwargs, run: twin_ops.conv_twin(
                module, args[0], run.leaf(module.weight, True), run.leaf(module.bias, True), run.mode
            )
        if isinstance(module, BATCHNORMS):
            return lambda args, kwargs, run: _batchnorm(module, args[0], run)
        if isinstance(module, AVG_POOLS):
            return lambda args, kwargs, run: twin_ops.avg_pool_twin(module, args[0], run.p, run.mode)
        if isinstance(module, MAX_POOLS):
            return lambda args, kwargs, run: twin_ops.max_pool_twin(module, args[0], run.mode)
        is_max = isinstance(module, ADAPTIVE_MAX_POOLS)
        return lambda args, kwargs, run: twin_ops.adaptive_pool_twin(module, args[0], run.p, run.mode, is_max)

    def _function_handler(self, node: fx.Node) -> Handler | str:
        target = node.target
        if target in PASS_THROUGH_FUNCTIONS:
            return lambda args, kwargs, run: args[0]
        if target in SHAPE_FUNCTIONS or target in META_FUNCTIONS:
            return lambda args, kwargs, run: target(*args, **kwargs)
        if target is operator.getitem:
            return lambda args, kwargs, run: args[0][args[1]]
        if target in ADD_FUNCTIONS:
            return _add_handler(node.args, node.kwargs, target in (operator.sub, operator.isub, torch.sub))
        if target in CAT_FUNCTIONS:
            return lambda args, kwargs, run: target(*args, **kwargs)
        if target in FUNCTIONAL_POOLS:
            module_class, names = FUNCTIONAL_POOLS[target]
            options = dict(zip(names, node.args[1:]), **node.kwargs)
            for key in ("kernel_size", "output_size", "stride", "padding", "dilation", "divisor_override", "ceil_mode"):
                if isinstance(options.get(key), fx.Node):
                    return f"pooling argument '{key}' is computed in forward; pass a constant"
            options = {k: v for k, v in options.items() if not (k == "stride" and v is None and "kernel_size" in options)}
            pool = module_class(**options)
            return self._module_handler(pool)
        if target in (torch.sigmoid, torch.tanh, F.sigmoid, F.tanh, F.gelu, F.silu, F.elu, F.softplus, torch.exp,
                      F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, F.relu6, F.hardtanh):
            return f"{_function_name(target)} {_NOT_HOMOGENEOUS}"
        if target in (operator.mul, operator.imul, operator.truediv, operator.matmul, torch.mul, torch.matmul,
                      torch.bmm, torch.einsum, F.scaled_dot_product_attention, torch.div):
            return f"{_function_name(target)} {_PRODUCT}"
        if target in (F.layer_norm, F.group_norm, F.instance_norm, F.normalize):
            return f"{_function_name(target)} {_PER_EXAMPLE_NORM}"
        return f"{_function_name(target)} is not a supported operation"

    def _method_handler(self, node: fx.Node) -> Handler | str:
        name = node.target
        if name in PASS_THROUGH_METHODS:
            return lambda args, kwargs, run: args[0]
        if name in SHAPE_METHODS or name in META_METHODS:
            return lambda args, kwargs, run: getattr(args[0], name)(*args[1:], **kwargs)
        if name in ADD_METHODS:
            return _add_handler(node.args, node.kwargs, name.startswith("sub"))
        if name in ("sigmoid", "tanh", "exp", "softmax", "log_softmax"):
            return f"Tensor.{name} {_NOT_HOMOGENEOUS}"
        if name in ("mul", "mul_", "matmul", "div", "div_", "bmm"):
            return f"Tensor.{name} {_PRODUCT}"
        return f"Tensor.{name} is not a supported operation"

    # -- input shape

    def _input_shape(self, input_shape) -> tuple[int, ...]:
        if input_shape is not None:
            shape = (input_shape,) if isinstance(input_shape, int) else tuple(int(s) for s in input_shape)
            if not shape or any(s < 1 for s in shape):
                raise PathGeometryError(f"input_shape={input_shape!r} must be a non-empty tuple of positive sizes")
            return shape
        placeholder = next(n for n in self.graph.nodes if n.op == "placeholder")
        first_users = list(placeholder.users)
        if len(first_users) == 1 and first_users[0].op == "call_module":
            first = self.module(first_users[0])
            if isinstance(first, nn.Linear):
                return (first.in_features,)
        raise PathGeometryError(
            f"cannot infer the input shape of {type(self.model).__name__}: its first operation is not a Linear layer. "
            "Pass input_shape, the shape of one example without the batch dimension, e.g. input_shape=(3, 32, 32)."
        )

    def _check_runs(self) -> None:
        try:
            with torch.no_grad():
                self.evaluate(TwinPass(p=1.0, mode="sum", dtype=torch.float64))
        except PathGeometryError:
            raise
        except RuntimeError as error:
            raise PathGeometryError(
                f"{type(self.model).__name__} does not run on one example of input_shape={self.input_shape}: {error}. "
                "Check input_shape (the shape of one example, without the batch dimension)."
            ) from error

    # -- evaluation

    def evaluate(self, run: TwinPass, record: dict[fx.Node, Any] | None = None) -> Tensor:
        """Evaluate the twin on an all-ones input of batch size 1; returns the output tensor.

        ``record``, if given, receives the value of every node (gamma_in of every unit, and shapes).
        """
        reference = next(iter(self.model.parameters()), None)
        device = reference.device if reference is not None else None
        values: dict[fx.Node, Any] = {}
        output = None
        with torch.autocast(device_type=(device or torch.device("cpu")).type, enabled=False):
            for node in self.graph.nodes:
                if node.op == "placeholder":
                    values[node] = torch.ones((1, *self.input_shape), dtype=run.dtype, device=device,
                                              requires_grad=run.track)
                    continue
                args = fx.node.map_arg(node.args, lambda n: values[n])
                kwargs = fx.node.map_arg(node.kwargs, lambda n: values[n])
                values[node] = self._handlers[node](args, kwargs, run)
                if node.op == "output":
                    output = values[node]
        if record is not None:
            record.update(values)
        if not isinstance(output, Tensor):
            raise PathGeometryError(f"{type(self.model).__name__}.forward must return one tensor")
        return output


def _add_handler(node_args: tuple, node_kwargs: dict, subtract: bool) -> Handler | str:
    """Twin of a + b and a - b: the twins add (|+-1|^p = 1), or take the larger in the max semiring."""
    if not all(isinstance(a, fx.Node) for a in node_args[:2]) or node_kwargs.get("alpha", 1) != 1:
        return ("adds a constant or scales an operand; a constant is a bias without a parameter — "
                "use a layer's bias instead")

    def add(args, kwargs, run):
        a, b = args[0], args[1]
        if not (isinstance(a, Tensor) and isinstance(b, Tensor)):  # arithmetic on sizes
            return a - b if subtract else a + b
        return a + b if run.mode == "sum" else torch.maximum(a, b)

    return add


def _linear(module: nn.Linear, x: Tensor, run: TwinPass) -> Tensor:
    # The weight's scaling is the (rank-one per call) product of the output gradient and the input;
    # its |W|^p needs no gradient of its own, and it is never built: the blockwise twin reads W
    # (once forward, once backward) through a small reused scratch buffer.
    if run.fast_linear:
        bias = run.leaf(module.bias, True)
        out = power_linear(x, module.weight, bias, run.p) if run.mode == "sum" else max_linear(x, module.weight, bias)
    else:
        out = twin_ops.linear_twin(x, run.leaf(module.weight, False), run.leaf(module.bias, True), run.mode)
    if run.track:
        run.linear_calls.append((module, x.detach(), out))
    return out


def _batchnorm(module: nn.modules.batchnorm._BatchNorm, x: Tensor, run: TwinPass) -> Tensor:
    key = id(module)
    if key not in run.batchnorm_leaves:
        scale, shift, _ = twin_ops.batchnorm_affine(module)
        run.batchnorm_leaves[key] = (run.power(scale).requires_grad_(run.track),
                                     run.power(shift).requires_grad_(run.track))
    scale, shift = run.batchnorm_leaves[key]
    return twin_ops.batchnorm_twin(x, scale, shift, run.mode)


# ----------------------------------------------------------------------------- one trace per network and shape

_TRACES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def trace(model: nn.Module | PathGraph, input_shape: tuple[int, ...] | None = None) -> PathGraph:
    """The :class:`PathGraph` of ``model`` for ``input_shape``, traced once and then shared.

    The optimizer, the norms and every callback that asks for the same network and input shape get the
    same graph, so a run traces its network once.  A :class:`PathGraph` is returned as it is.
    """
    if isinstance(model, PathGraph):
        return model
    key = None if input_shape is None else ((input_shape,) if isinstance(input_shape, int) else tuple(input_shape))
    graphs = _TRACES.setdefault(model, {})
    graph = graphs.get(key)
    if graph is None:
        graph = graphs[key] = PathGraph(model, key)
    return graph
