"""Tracing a network into the graph of what its ``forward`` really computes.

``torch.export`` runs ``forward`` once on a symbolic batch and records every ATen operation it
performs: subclasses' own ``forward``, forward hooks and pre-hooks, functional calls and keyword
arguments with defaults are all just code that runs.  The graph is then *functionalized*
(``run_decompositions({})``): an in-place ``h.add_(...)`` becomes ``h2 = h + ...`` whose users
read ``h2``, and a write into a view becomes a ``slice_scatter``, so reading the graph never
misses a mutation.  Parameters, buffers and lifted constants are graph inputs, named by their
fully qualified names.  The batch dimension is symbolic, so shapes computed from it stay exact
for any batch size (the twin runs at batch size 1).

Why not ``torch.fx.symbolic_trace``: it works at the level of Python calls, keeps layers as
leaves by their class (so a ``Linear`` subclass with its own ``forward`` looks like a plain
``Linear``), ignores hooks, and records ``h.add_(y)`` as a node whose result nobody reads while
later code reads ``h``.  Repairing that means re-implementing functionalization.
``docs/extending.md`` has the comparison.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.export import Dim
from torch.export.graph_signature import InputKind, OutputKind

from pl_pathsgd.paths.errors import PathGeometryError, UnsupportedModelError

#: Number of networks traced in this process (each real trace adds one; cached graphs do not).
TRACE_COUNT = 0

_NOISY_LOGGERS = ("torch._export", "torch.export", "torch._dynamo", "torch.fx.experimental.symbolic_shapes",
                  "torch._subclasses.fake_tensor")


@dataclass
class TracedProgram:
    """The functional ATen graph of a network, independent of the module object it came from.

    ``parameters`` / ``buffers`` map placeholder names to fully qualified names in the module;
    ``constants`` maps placeholder names to lifted constant tensors; ``input_name`` is the
    placeholder of the network's input; ``batch_symbol`` the symbolic batch size.
    """

    graph: torch.fx.Graph
    parameters: dict[str, str]
    buffers: dict[str, str]
    constants: dict[str, torch.Tensor]
    input_name: str
    output_names: list[str]
    batch_symbol: object
    hooked: frozenset[str] = frozenset()  # paths of modules with forward hooks or pre-hooks


# Layers whose train/eval mode does not change their path twin (dropout is inert in the twin, the others ignore
# the mode): switching them, as Lightning does around validation, needs no new trace.  Exact classes only: a
# subclass may read ``self.training`` in its own forward.
_MODE_FREE = {nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
              nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
              nn.Dropout3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
              nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
              nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.RNN}


def module_fingerprint(model: nn.Module) -> tuple:
    """What a traced graph depends on besides the weights' values.

    Module types and names, train/eval modes (of layers whose mode can matter), hooks, instance-level
    ``forward`` overrides and parameter shapes: if any of these changes, ``forward`` may compute
    something else and the network is traced again.
    """
    modules = tuple(
        (name, type(module), type(module) in _MODE_FREE or module.training, len(module._forward_hooks),
         len(module._forward_pre_hooks), "forward" in module.__dict__)
        for name, module in model.named_modules()
    )
    shapes = tuple((name, tuple(param.shape), param.dtype) for name, param in model.named_parameters())
    global_hooks = (len(nn.modules.module._global_forward_hooks), len(nn.modules.module._global_forward_pre_hooks))
    return modules, shapes, global_hooks


def check_forward_signature(model: nn.Module) -> None:
    """``forward`` must take one tensor; other arguments need defaults (they keep them)."""
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return
    positional = [p for p in signature.parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p.name for p in signature.parameters.values()
                if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if not positional and not any(p.kind == p.VAR_POSITIONAL for p in signature.parameters.values()):
        raise UnsupportedModelError(
            [(f"{type(model).__name__}.forward", "takes no positional input; the path geometry calls forward(x) "
              "with one batch tensor")], type(model).__name__)
    extra = required[1:]
    if extra:
        raise UnsupportedModelError(
            [(f"{type(model).__name__}.forward", f"needs inputs besides the batch ({', '.join(extra)}); the path "
              "geometry calls forward(x) with one tensor. Give the other arguments defaults, or wrap the network "
              "in a module whose forward takes one tensor")], type(model).__name__)


def _first_parameter(model: nn.Module) -> torch.Tensor | None:
    return next(model.parameters(), None)


def example_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the example input: that of the first floating-point parameter (float32 if none)."""
    for tensor in model.parameters():
        if tensor.dtype.is_floating_point:
            return tensor.dtype
    return torch.get_default_dtype()


def check_materialized(model: nn.Module) -> None:
    """Parameters on the meta device have shapes but no values: nothing can be computed from them."""
    on_meta = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if on_meta:
        raise PathGeometryError(
            f"{type(model).__name__} has tensors on the meta device ({', '.join(on_meta[:4])}"
            f"{', ...' if len(on_meta) > 4 else ''}), which have shapes but no values. Materialise the model first, "
            "e.g. model.to_empty(device='cpu') and then initialise it (or load a state dict).")


def export_program(model: nn.Module, input_shape: tuple[int, ...]) -> TracedProgram:
    """Trace ``model`` on a symbolic batch of examples of ``input_shape``; raise if it cannot be traced.

    Tracing draws no random numbers from the global generators (it runs under ``fork_rng``) and
    leaves the module's weights, buffers and modes as they were.
    """
    global TRACE_COUNT
    TRACE_COUNT += 1
    check_forward_signature(model)
    reference = _first_parameter(model)
    device = reference.device if reference is not None else torch.device("cpu")
    example = torch.ones((2, *input_shape), dtype=example_dtype(model), device=device)
    name = type(model).__name__
    fork_devices = [device] if device.type == "cuda" else []
    try:
        with _quiet(), torch.random.fork_rng(devices=fork_devices):
            exported = torch.export.export(model, (example,), dynamic_shapes=({0: Dim("batch")},), strict=False)
            if _mutates(exported.graph) and not _functionalize_in_place(exported.graph):
                exported = exported.run_decompositions({})  # the general functionalization
    except UnsupportedModelError:
        raise
    except Exception as error:  # export raises many types; all mean "forward cannot be traced"
        hint, shape_related = _export_failure(error, input_shape)
        if shape_related:
            raise InputShapeError(f"{name}.forward {hint}") from error
        raise UnsupportedModelError([(f"{name}.forward", hint)], name) from error
    program = _program(exported, name)
    program.hooked = frozenset(path for path, module in model.named_modules()
                               if module._forward_hooks or module._forward_pre_hooks)
    return program


class InputShapeError(PathGeometryError):
    """``forward`` does not run on examples of the given input shape."""


def _mutates(graph: torch.fx.Graph) -> bool:
    """Whether any operation of the graph writes into one of its arguments (``add_``, ``relu_``, ``copy_``...)."""
    for node in graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if schema is not None and schema.is_mutable:
            return True
    return False


def _aliases(node: torch.fx.Node) -> bool:
    """Whether a node's result may share memory with an argument (a view, an alias, an in-place result)."""
    schema = getattr(node.target, "_schema", None)
    return schema is not None and any(r.alias_info is not None for r in schema.returns)


def _functional_variant(target):
    """The out-of-place overload of an in-place ATen operation (``add_.Tensor`` -> ``add.Tensor``), or None."""
    packet = getattr(target, "overloadpacket", None)
    if packet is None or not packet.__name__.endswith("_"):
        return None
    functional = getattr(torch.ops.aten, packet.__name__[:-1], None)
    return getattr(functional, target._overloadname, None) if functional is not None else None


def _functionalize_in_place(graph: torch.fx.Graph) -> bool:
    """Rewrite in-place operations on values nothing else aliases (``h.relu_()``, ``h.add_(y)``) into their
    out-of-place forms, later readers of the value reading the new result.  Returns False, changing
    nothing, when any mutation is not that simple (a write into a view, into an input or a buffer, a
    value with views): then the general functionalization must run.
    """
    order = {node: i for i, node in enumerate(graph.nodes)}
    rewrites = []
    rewritten = set()
    for node in graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if schema is None or not schema.is_mutable:
            continue
        written = [a for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
        functional = _functional_variant(node.target)
        source = node.args[0] if node.args else None
        if functional is None or len(written) != 1 or written[0].name != schema.arguments[0].name:
            return False
        if not isinstance(source, torch.fx.Node) or source.op != "call_function":
            return False
        if _aliases(source) and source not in rewritten:  # a view: writing into it writes into its base
            return False
        if any(_aliases(user) and user is not node for user in source.users):  # views of the written value
            return False
        rewrites.append((node, source, functional))
        rewritten.add(node)
    for node, source, functional in rewrites:
        for user in list(source.users):
            if order[user] > order[node]:  # readers after the write see the written value
                user.replace_input_with(source, node)
        node.target = functional
    graph.lint()
    return True


@contextlib.contextmanager
def _quiet():
    """Silence torch.export's own warnings and log lines (its errors are turned into ours)."""
    loggers = [logging.getLogger(n) for n in _NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR + 10)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _export_failure(error: Exception, input_shape: tuple[int, ...]) -> tuple[str, bool]:
    """A one-line explanation of why export failed, and whether the input shape is the likely cause."""
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    if len(first) > 300:
        first = first[:300] + "..."
    text = f"{type(error).__name__}: {first}"
    shape_related = False
    if "data-dependent" in text or "GuardOnDataDependent" in text:
        hint = "forward branches on the values of tensors; the path geometry needs one fixed network"
    elif "specialized it to be a constant" in text or "Constraints violated" in text:
        hint = ("forward depends on the batch size (e.g. view(100, -1)); write view(x.shape[0], -1) or "
                "flatten(1) so that it works for every batch size")
    elif any(word in text for word in ("shape", "size", "mat1 and mat2", "dim", "Expected", "must match")):
        shape_related = True
        hint = (f"does not run on examples of shape {tuple(input_shape)}; check input_shape (the shape "
                "of one example, without the batch dimension)")
    else:
        hint = "torch.export cannot follow forward"
    if shape_related:
        return f"{hint} ({text})", True
    return f"could not be traced: {hint} ({text})", False


def _program(exported: torch.export.ExportedProgram, name: str) -> TracedProgram:
    signature = exported.graph_signature
    parameters, buffers, constants, user_inputs = {}, {}, {}, []
    for spec in signature.input_specs:
        arg = spec.arg.name
        if spec.kind == InputKind.PARAMETER:
            parameters[arg] = spec.target
        elif spec.kind == InputKind.BUFFER:
            buffers[arg] = spec.target
        elif spec.kind == InputKind.CONSTANT_TENSOR:
            constants[arg] = exported.constants[spec.target]
        elif spec.kind == InputKind.USER_INPUT:
            user_inputs.append(arg)
        else:
            raise UnsupportedModelError([(f"{name}.forward", f"uses an input of kind {spec.kind.name}, which the "
                                          "path geometry does not know")], name)
    outputs = [spec.arg.name for spec in signature.output_specs if spec.kind == OutputKind.USER_OUTPUT]
    if len(outputs) != 1 or not _returns_one_tensor(exported):
        raise UnsupportedModelError([(f"{name}.forward", f"returns {len(outputs)} tensors (or a container); the path "
                                      "geometry needs forward to return one tensor of outputs")], name)
    graph = exported.graph_module.graph
    input_node = next(n for n in graph.nodes if n.op == "placeholder" and n.name == user_inputs[0])
    batch_symbol = input_node.meta["val"].shape[0]
    return TracedProgram(graph, parameters, buffers, constants, user_inputs[0], outputs, batch_symbol)


def _returns_one_tensor(exported: torch.export.ExportedProgram) -> bool:
    spec = exported.call_spec.out_spec
    return spec is None or spec.is_leaf()
