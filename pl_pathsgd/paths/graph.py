"""A traced network whose path twin can be evaluated for its current weights.

:func:`trace` turns a network into a :class:`PathGraph`, once per network and input shape: it
records what ``forward`` really computes (:mod:`pl_pathsgd.paths.tracing`), classifies every value
(activation, weight, constant, size), checks every operation against its rule
(:mod:`pl_pathsgd.paths.ops`) and reports every operation it cannot compute exactly, together, in
one :class:`~pl_pathsgd.paths.errors.UnsupportedModelError` that names the module and source line.

Evaluating the graph runs the rules on an all-ones input of batch size 1: one pass whose cost does
not depend on any batch size.  If the network's modes or hooks change later (a BatchNorm put back
in training mode, a hook registered), the next evaluation traces it again for the new state.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from pl_pathsgd.paths import tracing
from pl_pathsgd.paths.errors import PathGeometryError, UnsupportedModelError
from pl_pathsgd.paths.ops import Call, Kind, Rule, TwinRun, reason_for, rule_for
from pl_pathsgd.paths.ops.registry import op_name

Shape = tuple[int, ...]

# Operations that build constants shaped like their input, whatever its values.
_FACTORIES_LIKE = {torch.ops.aten.zeros_like, torch.ops.aten.ones_like, torch.ops.aten.full_like,
                   torch.ops.aten.empty_like, torch.ops.aten.new_zeros, torch.ops.aten.new_ones,
                   torch.ops.aten.new_full, torch.ops.aten.new_empty}


def __getattr__(name: str):
    if name == "TRACE_COUNT":  # one counter, kept where the tracing happens
        return tracing.TRACE_COUNT
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class Step:
    node: fx.Node
    kind: Kind
    rule: Rule | None
    call: Call | None


class Program:
    """A traced graph with its support check done and its evaluation planned; independent of the module object."""

    def __init__(self, traced: tracing.TracedProgram, model_name: str):
        self.traced = traced
        self.graph = traced.graph
        self.model_name = model_name
        self.kinds = self._kinds()
        self.steps: list[Step] = []
        problems: list[tuple[str, str]] = []
        for node in self.graph.nodes:
            problem = self._add_step(node)
            if problem:
                problems.append(problem)
        problems += self._output_problems()
        if problems:
            raise UnsupportedModelError(problems, model_name)
        for step in self.steps:
            if step.call is not None:
                step.rule.plan(step.call, None)
        self.output = self._node(traced.output_names[0])
        self.input = self._node(traced.input_name)
        self._analyses: dict[str, Any] = {}  # structural analyses cached per program (e.g. units)

    def cached(self, key: str, compute: Callable[[], Any]) -> Any:
        if key not in self._analyses:
            self._analyses[key] = compute()
        return self._analyses[key]

    def _node(self, name: str) -> fx.Node:
        return next(n for n in self.graph.nodes if n.name == name)

    # -- kinds

    def _kinds(self) -> dict[fx.Node, Kind]:
        kinds: dict[fx.Node, Kind] = {}
        traced = self.traced
        for node in self.graph.nodes:
            if node.op == "placeholder":
                if node.name == traced.input_name:
                    kinds[node] = Kind.ACT
                elif node.name in traced.parameters:
                    kinds[node] = Kind.PARAM
                else:
                    kinds[node] = Kind.CONST
            elif node.op == "output":
                kinds[node] = Kind.LITERAL
            elif not _holds_tensors(node.meta.get("val")):
                kinds[node] = Kind.LITERAL
            elif getattr(node.target, "overloadpacket", None) in _FACTORIES_LIKE:
                kinds[node] = Kind.CONST
            else:
                inputs = node.all_input_nodes
                kinds[node] = max((kinds[n] for n in inputs), default=Kind.CONST)
                kinds[node] = max(kinds[node], Kind.CONST)
        return kinds

    # -- support check

    def _add_step(self, node: fx.Node) -> tuple[str, str] | None:
        kind = self.kinds[node]
        if node.op in ("placeholder", "output") or kind in (Kind.LITERAL, Kind.CONST):
            self.steps.append(Step(node, kind, None, None))
            if node.op == "call_function" and kind == Kind.CONST and _draws_random_numbers(node.target):
                return self._where(node), f"{op_name(node.target)} draws random numbers in forward; the path geometry " \
                                       "needs a fixed network"
            return None
        if node.op != "call_function":
            return self._where(node), f"unexpected graph node {node.op}"
        if kind == Kind.ACT:
            problem = self._batch_problem(node)
            if problem:
                return self._where(node), problem
        rule = rule_for(node.target)
        if rule is None:
            return self._where(node), reason_for(node.target)
        call = Call(node, kind, self.kinds, self._where(node), extra={"parameter_names": self.traced.parameters})
        reason = rule.check(call)
        self.steps.append(Step(node, kind, rule, call))
        return (call.where, reason) if reason else None

    def _where(self, node: fx.Node) -> str:
        return describe(node, self.traced.hooked)

    def _batch_problem(self, node: fx.Node) -> str | None:
        """Activations keep the batch as one dimension of its own (the first, or another after a transpose, as
        for a sequence-first RNN): otherwise forward mixes the examples of a batch."""
        batch = self.traced.batch_symbol
        value = node.meta.get("val")
        if isinstance(value, Tensor):  # operations with several results are checked where a result is taken
            shape = tuple(value.shape)
            batch_dims = [d for d in shape if _is_batch(d, batch)]
            others = [d for d in shape if not _is_batch(d, batch)]
            if len(batch_dims) != 1 or any(not isinstance(d, int) for d in others):
                return (f"{op_name(node.target)} gives a value of shape {_shape_text(shape)} that does not keep the "
                        "batch as a dimension of its own; the path geometry needs every example computed on its "
                        "own (forward must not mix, reduce or reshape across the batch)")
        return None

    def _output_problems(self) -> list[tuple[str, str]]:
        output = self._node(self.traced.output_names[0])
        if self.kinds[output] != Kind.ACT:
            return [(f"{self.model_name}.forward", "returns a value that does not depend on its input")]
        return []


def _draws_random_numbers(target: Any) -> bool:
    tags = getattr(target, "tags", ())
    return torch.Tag.nondeterministic_seeded in tags


def _holds_tensors(value: Any) -> bool:
    return any(True for _ in _tensors(value))


def _tensors(value: Any):
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def _is_batch(size: Any, batch: Any) -> bool:
    return isinstance(size, torch.SymInt) and str(size) == str(batch)


def _shape_text(shape: tuple) -> str:
    return "(" + ", ".join("batch" if isinstance(s, torch.SymInt) else str(s) for s in shape) + ")"


def describe(node: fx.Node, hooked: frozenset[str] = frozenset()) -> str:
    """Where an operation comes from: the innermost module (path and class) and the source line."""
    parts = []
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path, cls = list(stack.values())[-1]
        cls_name = cls.rsplit(".", 1)[-1] if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
        parts.append(f"module '{path}' ({cls_name})" if path else f"{cls_name}.forward")
        if path in hooked:
            parts.append("which has forward hooks (the operation may come from one of them)")
    line = _user_source_line(node.meta.get("stack_trace") or "")
    if line:
        parts.append(line)
    return ", ".join(parts) or f"operation {op_name(node.target)}"


def _user_source_line(stack_trace: str) -> str | None:
    """The innermost frame of the stack trace outside PyTorch's own code: ``file:line `code```."""
    lines = stack_trace.splitlines()
    best = None
    for i, line in enumerate(lines):
        text = line.strip()
        if not text.startswith("File "):
            continue
        try:
            path = text.split('"')[1]
            number = text.split(", line ")[1].split(",")[0]
        except IndexError:
            continue
        if "/torch/" in path.replace("\\", "/") and "site-packages" in path:
            continue
        code = lines[i + 1].strip() if i + 1 < len(lines) else ""
        best = f"{path.rsplit('/', 1)[-1]}:{number} `{code}`"
    return best


# ----------------------------------------------------------------------------- the graph of a module


class _Programs:
    """The programs traced for one network (one per state of modes and hooks), shared by bound copies."""

    def __init__(self, input_shape: Shape):
        self.input_shape = input_shape
        self.by_fingerprint: dict[tuple, Program] = {}


class PathGraph:
    """A network's traced path graph, evaluated on the network's current weights.

    Build it with :func:`trace` (which shares one graph per network and input shape) or directly.

    Args:
        model: the network. ``forward`` takes one batch tensor (other arguments keep their defaults)
            and returns one tensor.
        input_shape: shape of one example without the batch dimension. Inferred when the network
            starts with a ``Linear`` layer applied to vectors; required otherwise.
    """

    def __init__(self, model: nn.Module, input_shape: Shape | int | None = None, *, _programs: _Programs | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"the path geometry needs an nn.Module, got {type(model).__name__}")
        tracing.check_materialized(model)
        self.model = model
        first = _programs is None
        if first:
            shape, program = _first_trace(model, input_shape)
            _programs = _Programs(shape)
            _programs.by_fingerprint[tracing.module_fingerprint(model)] = program
        self._programs = _programs
        self.input_shape: Shape = _programs.input_shape
        if first:  # one check evaluation per traced network, not per graph sharing its programs
            self._check_runs()

    # -- programs

    def program(self) -> Program:
        """The program for the network's current modes and hooks (traced again if they changed)."""
        fingerprint = tracing.module_fingerprint(self.model)
        program = self._programs.by_fingerprint.get(fingerprint)
        if program is None:
            program = Program(tracing.export_program(self.model, self.input_shape), type(self.model).__name__)
            self._programs.by_fingerprint[fingerprint] = program
        return program

    def bind(self, model: nn.Module) -> PathGraph:
        """The same traced graph on ``model``, a structurally identical network (e.g. a deep copy): no new trace."""
        mine = [(n, tuple(t.shape)) for n, t in self.model.named_parameters()]
        theirs = [(n, tuple(t.shape)) for n, t in model.named_parameters()]
        if mine != theirs or [n for n, _ in self.model.named_modules()] != [n for n, _ in model.named_modules()]:
            raise PathGeometryError(f"{type(model).__name__} is not structurally identical to the traced "
                                    f"{type(self.model).__name__} (modules or parameter shapes differ); trace it instead")
        return PathGraph(model, self.input_shape, _programs=self._programs)

    # -- the module's tensors

    def parameters(self, program: Program | None = None) -> dict[str, Tensor]:
        """The network's parameters by placeholder name (live: the tensors the optimizer updates)."""
        program = program or self.program()
        return {name: _lookup(self.model, fqn, "parameter") for name, fqn in program.traced.parameters.items()}

    def buffers(self, program: Program | None = None) -> dict[str, Tensor]:
        program = program or self.program()
        return {name: _lookup(self.model, fqn, "buffer") for name, fqn in program.traced.buffers.items()}

    def parameter_names(self, program: Program | None = None) -> dict[str, str]:
        """Placeholder name -> the parameter's name in ``model.named_parameters()``."""
        return dict((program or self.program()).traced.parameters)

    def device(self) -> torch.device:
        reference = next(self.model.parameters(), None)
        return reference.device if reference is not None else torch.device("cpu")

    # -- evaluation

    def evaluate(self, run: TwinRun, record: dict[fx.Node, Any] | None = None) -> Tensor:
        """Evaluate the twin on an all-ones input of batch size 1; returns the twin of the output.

        ``record``, if given, receives the value of every node (gamma_in of every unit, and shapes).
        """
        program = self.program()
        run.device = self.device()
        parameters = self.parameters(program)
        buffers = self.buffers(program)
        constants = program.traced.constants
        values: dict[fx.Node, Any] = {}

        def value_of(node: fx.Node, actual: bool = False) -> Any:
            if node in values:
                return values[node]
            if node.name in parameters:  # parameters become twin leaves on first use
                parameter = parameters[node.name]
                return parameter if actual else run.param_twin(node.name, parameter)
            raise KeyError(node.name)

        with torch.autocast(device_type=run.device.type, enabled=False):
            for step in program.steps:
                node = step.node
                if node.op == "placeholder":
                    if node is program.input:
                        # requires grad when tracking, so that every Linear output is part of the autograd graph
                        values[node] = torch.ones((1, *self.input_shape), dtype=run.dtype, device=run.device,
                                                  requires_grad=run.track)
                    elif node.name in buffers:
                        values[node] = buffers[node.name]
                    elif node.name in constants:
                        values[node] = constants[node.name].to(run.device)
                    continue
                if node.op == "output":
                    continue
                call = step.call
                actual_slots = call.actual_args if call is not None else frozenset()
                args = tuple(
                    fx.node.map_arg(arg, lambda n, actual=i in actual_slots: value_of(n, actual))
                    for i, arg in enumerate(node.args)
                )
                kwargs = fx.node.map_arg(node.kwargs, value_of)
                if step.rule is None:  # constants and sizes: the operation itself
                    values[node] = node.target(*args, **kwargs)
                else:
                    values[node] = step.rule.twin(call, run, *args, **kwargs)
        if record is not None:
            record.update(values)
        return values[program.output]

    def _check_runs(self) -> None:
        try:
            with torch.no_grad():
                self.evaluate(TwinRun(p=1.0, mode="sum", dtype=torch.float64))
        except PathGeometryError:
            raise
        except (RuntimeError, TypeError, ValueError, IndexError) as error:
            raise PathGeometryError(
                f"the path twin of {type(self.model).__name__} could not be evaluated on one example of shape "
                f"{self.input_shape}: {type(error).__name__}: {error}"
            ) from error


def _lookup(model: nn.Module, fqn: str, what: str) -> Tensor:
    module_name, _, attribute = fqn.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    tensor = getattr(module, attribute, None)
    if not isinstance(tensor, Tensor):
        raise PathGeometryError(f"the traced {what} '{fqn}' is no longer a tensor of {type(model).__name__}")
    return tensor


def _first_trace(model: nn.Module, input_shape: Shape | int | None) -> tuple[Shape, Program]:
    """Trace the network, inferring the input shape from a leading Linear layer when none is given."""
    name = type(model).__name__
    if input_shape is not None:
        shape = _check_shape(input_shape)
        return shape, Program(tracing.export_program(model, shape), name)
    guess = _leading_linear(model)
    if guess is not None:
        shape = (guess.in_features,)
        try:
            traced = tracing.export_program(model, shape)
        except tracing.InputShapeError:
            traced = None  # the guess was wrong: the input is not a vector of that size
        if traced is not None:
            program = Program(traced, name)  # an unsupported network is reported as such
            if _input_feeds_linear(program):
                return shape, program
    raise PathGeometryError(
        f"cannot infer the input shape of {name}: it does not start with a Linear layer applied to vectors. "
        "Pass input_shape, the shape of one example without the batch dimension, e.g. input_shape=(3, 32, 32)."
    )


def _leading_linear(model: nn.Module) -> nn.Linear | None:
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            return module
        if len(list(module.children())) == 0 and name:  # the first leaf is something else
            return None
    return None


def _input_feeds_linear(program: Program) -> bool:
    """Whether the network's input goes straight into a linear call (so a vector is its natural input)."""
    return any(getattr(user.target, "overloadpacket", None) is torch.ops.aten.linear and user.args[0] is program.input
               for user in program.input.users)


def _check_shape(input_shape: Any) -> Shape:
    shape = (input_shape,) if isinstance(input_shape, int) else input_shape
    try:
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        shape = ()
    if not shape or any(s < 1 for s in shape) or isinstance(input_shape, bool):
        raise PathGeometryError(f"input_shape={input_shape!r} must be a non-empty tuple of positive sizes, the shape "
                                "of one example without the batch dimension")
    return shape


# ----------------------------------------------------------------------------- one trace per network and shape

# The traced programs of a network, by input shape: they do not refer to the network, so this cache never keeps
# a network alive.  The graphs themselves are shared while someone holds them (the optimizer, a callback).
_PROGRAMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_GRAPHS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def trace(model: nn.Module | PathGraph, input_shape: Shape | int | None = None) -> PathGraph:
    """The :class:`PathGraph` of ``model`` for ``input_shape``, traced once and then shared.

    The optimizer, the norms and every callback that ask for the same network and input shape get the
    same traced graph, so a run traces its network once (and again only if its modes or hooks change).
    A :class:`PathGraph` is returned as it is.  ``input_shape=None`` reuses the shape the network was
    traced with, or infers it from a leading ``Linear`` layer.
    """
    if isinstance(model, PathGraph):
        return model
    programs = _PROGRAMS.setdefault(model, {})
    key = _check_shape(input_shape) if input_shape is not None else next(iter(programs), None)
    if key is not None:
        graph = _GRAPHS.get((id(model), key))
        if graph is not None and graph.model is model:
            return graph
        if key in programs:
            graph = PathGraph(model, key, _programs=programs[key])
            _GRAPHS[(id(model), key)] = graph
            return graph
    graph = PathGraph(model, key)
    programs[graph.input_shape] = graph._programs
    _GRAPHS[(id(model), graph.input_shape)] = graph
    return graph


__all__ = ["PathGraph", "Program", "describe", "trace"]
