"""The rule registry: how each operation acts in the path geometry, one registration per operation.

A :class:`Rule` says three things about an operation, together:

* ``check`` — whether a call can be represented exactly (``None``) or why not (a reason);
* ``twin`` — what it computes in the *path twin*: every weight w replaced by |w|^p (sum semiring,
  finite p) or |w| (max semiring, p = inf), every ReLU-like activation by the identity, the input by
  ones.  The twin's value at a unit is gamma_in(unit), summed (or maximised) over paths;
* ``flow`` — how the *units* of a layer travel through it (for node-wise rescaling): the rule maps
  tensors of unit ids (:data:`NONE` where a value carries no unit of the layer being followed,
  NaN where units were mixed) from its activation inputs to its output.  Parametrized layers also
  say which units they produce (``produces``) and how they absorb a rescaling of their inputs
  (``consumes``).

Rules are registered for ATen operations of the functional graph that ``torch.export`` records
(:mod:`pl_pathsgd.paths.tracing`), in the style of ``torch.utils.flop_counter``::

    @register(torch.ops.aten.relu)
    class PassThrough(Rule): ...

``docs/extending.md`` walks through adding one.
"""

from __future__ import annotations

import enum
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor

#: Unit id of a position that carries no unit of the layer being followed.
NONE = -1.0
GETITEM = operator.getitem


class Kind(enum.IntEnum):
    """What a value in the graph depends on (the largest kind among its inputs)."""

    LITERAL = 0  # Python numbers, shapes, sizes
    CONST = 1  # buffers and constants: fixed numbers, no path starts or passes there
    PARAM = 2  # computed from parameters only: edge weights
    ACT = 3  # depends on the network's input: units


class Blocked(Exception):
    """Units cannot be followed through this operation (the reason is the message)."""


@dataclass
class Call:
    """A call of an operation in a traced graph, with what the rules need to know about it."""

    node: fx.Node
    kind: Kind
    kinds: dict[fx.Node, Kind]
    where: str
    #: argument positions that receive the *actual* parameter instead of its twin (set by the rule's ``plan``)
    actual_args: frozenset[int] = frozenset()
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def target(self):
        return self.node.target

    @property
    def args(self) -> tuple:
        return self.node.args

    def kind_of(self, value: Any) -> Kind:
        """The kind of an argument: a graph node's kind, ``LITERAL`` for anything else."""
        if isinstance(value, fx.Node):
            return self.kinds[value]
        if isinstance(value, (list, tuple)):
            return max((self.kind_of(v) for v in value), default=Kind.LITERAL)
        return Kind.LITERAL

    def arg(self, index: int, name: str | None = None, default: Any = None) -> Any:
        """Positional argument ``index`` (or keyword ``name``) of the call, as recorded in the graph."""
        if index < len(self.node.args):
            return self.node.args[index]
        return self.node.kwargs.get(name, default) if name else default

    def batch_dim(self, value: fx.Node) -> int | None:
        """The dimension of an activation that holds the batch (its symbolic size), or None."""
        shape = self.shape(value)
        return next((i for i, size in enumerate(shape) if isinstance(size, torch.SymInt)), None)

    def shape(self, value: fx.Node | None = None) -> tuple:
        """The recorded shape of a node (the call's output by default), the batch dimension symbolic."""
        value = self.node if value is None else value
        return tuple(value.meta["val"].shape)


class Rule:
    """How one operation acts in the path geometry; subclass and :func:`register` it.

    The default ``check`` accepts a call whose activation inputs (if any) are all it needs; rules
    override what they need.  ``twin``/``flow`` receive the call's arguments evaluated: activations
    as twin values (resp. unit-id tensors), parameters as their twins (|w|^p or |w|), constants and
    literals as they are.
    """

    #: whether the rule computes the max semiring (p = inf)
    max_semiring: bool = True

    def check(self, call: Call) -> str | None:
        return None

    def plan(self, call: Call, uses: Callable[[fx.Node], list[tuple[fx.Node, int]]]) -> None:
        """Called once per call after the support check (e.g. to ask for actual parameters)."""

    def twin(self, call: Call, run: TwinRun, *args, **kwargs) -> Any:
        raise NotImplementedError

    def flow(self, call: Call, *args, **kwargs) -> Any:
        raise Blocked(f"units cannot be followed through {op_name(call.target)}")

    def actual(self, call: Call, *args, **kwargs) -> Any:
        """The real value of a call on constants or parameters (default: run the operation)."""
        return call.target(*args, **kwargs)

    # parametrized layers
    def produces(self, call: Call) -> Producer | list[Producer] | str | None:
        """The units this call creates (its output units; several groups for a multi-layer operation), a
        reason they cannot be rescaled, or None."""
        return None

    def consumes(self, call: Call, *args, **kwargs) -> Consumer | str:
        """How this call absorbs a rescaling of the units in its activation input (ids given), or why it cannot."""
        return f"{op_name(call.target)} does not absorb a rescaling of its inputs"


@dataclass
class Producer:
    """The units a parametrized call creates: their count, the output axis they lie on, and how to
    multiply their incoming weights (and bias) by one factor per unit."""

    count: int
    axis: int  # output dimension of the units (negative: from the end)
    parameters: tuple[str, ...]  # placeholder names of the parameters it scales
    scale: Callable[[dict[str, Tensor], Tensor], None]  # (parameters by placeholder name, factors)
    #: the layer's name for the user (default: its weight's name without ``.weight``)
    name: str | None = None
    #: unit ids on the operation's results, from their recorded values (default: along ``axis``)
    place: Callable[[Any], Any] | None = None
    #: the operation absorbs the units itself too (a recurrence), so no other layer needs to
    absorbed_inside: bool = False


@dataclass
class Consumer:
    """How a parametrized call absorbs units that reach its input: ``divide(parameters, buffers, factors)``
    divides its outgoing weights (one factor per unit id of the producer being followed)."""

    parameters: tuple[str, ...]
    divide: Callable[[dict[str, Tensor], dict[str, Tensor], Tensor], None]
    buffers: tuple[str, ...] = ()


class TwinRun:
    """State of one evaluation of the twin, shared by the rules (see :class:`pl_pathsgd.paths.graph.PathGraph`)."""

    def __init__(self, p: float, mode: str, dtype: torch.dtype, track: bool = False, fast_linear: bool = True):
        self.p = p
        self.mode = mode  # "sum" (finite p) or "max" (p = inf)
        self.dtype = dtype
        self.track = track  # keep what the Path-SGD scaling needs
        self.fast_linear = fast_linear
        self.device: torch.device | None = None
        #: placeholder name -> twin leaf |w|^p (one per parameter, however often it is used)
        self.leaves: dict[str, Tensor] = {}
        #: placeholder name -> [(input twin, output twin)] of Linear calls that read the weight blockwise
        self.linear_calls: dict[str, list[tuple[Tensor, Tensor]]] = {}
        #: when a list: (recurrent weight's placeholder, twin states h_0..h_T, |W_hh|^p) of every recurrent
        #: layer, for the exact kappa^(2) (see :mod:`pl_pathsgd.paths.ops.recurrent`)
        self.recurrences: list[tuple[str, list[Tensor], Tensor]] | None = None

    def param_twin(self, name: str, parameter: Tensor) -> Tensor:
        """The twin leaf of a parameter (|w|^p, or |w| for p = inf), one per parameter however often it is used."""
        leaf = self.leaves.get(name)
        if leaf is None:
            leaf = self.leaves[name] = self.power(parameter).requires_grad_(self.track)
        return leaf

    def power(self, value: Tensor | float) -> Tensor | float:
        """|value|^p (sum) or |value| (max), in the run's dtype for tensors."""
        if not isinstance(value, Tensor):
            value = abs(float(value))
            return value if self.mode == "max" or self.p == 1 else value**self.p
        value = value.detach().to(self.dtype).abs()
        if self.mode == "max" or self.p == 1:
            return value
        return value.square() if self.p == 2 else value.pow(self.p)


_RULES: dict[Any, Rule] = {}
_REASONS: dict[Any, str] = {}


def register(*targets) -> Callable[[type[Rule]], type[Rule]]:
    """Class decorator: register a :class:`Rule` for ATen operations (overload packets or overloads)."""

    def decorate(cls: type[Rule]) -> type[Rule]:
        rule = cls()
        for target in targets:
            _RULES[target] = rule
        return cls

    return decorate


def refuse(reason: str, *targets) -> None:
    """Record why operations cannot be part of a network the path geometry handles."""
    for target in targets:
        _REASONS[target] = reason


def rule_for(target: Any) -> Rule | None:
    rule = _RULES.get(target)
    if rule is None and isinstance(target, torch._ops.OpOverload):
        rule = _RULES.get(target.overloadpacket)
    return rule


def reason_for(target: Any) -> str:
    reason = _REASONS.get(target)
    if reason is None and isinstance(target, torch._ops.OpOverload):
        reason = _REASONS.get(target.overloadpacket)
    return f"{op_name(target)} {reason}" if reason else f"{op_name(target)} is not supported by the path geometry"


def registered_operations() -> list[str]:
    """Names of the operations that have a rule (for documentation and messages)."""
    return sorted({op_name(t) for t in _RULES})


def op_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket.__name__
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target.__name__
    return getattr(target, "__name__", repr(target))


# ----------------------------------------------------------------------------- helpers for rules


def is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def merge_ids(a: Tensor, b: Tensor) -> Tensor:
    """Unit ids of a position fed by two values: the common id, else NaN (mixed)."""
    a, b = torch.broadcast_tensors(a, b)
    return torch.where(a == b, a, torch.full_like(a, math.nan))


def none_ids(like: Tensor | Sequence[int], device=None) -> Tensor:
    shape = like.shape if isinstance(like, Tensor) else like
    return torch.full(tuple(shape), NONE, dtype=torch.float64, device=device)


def window_ids(ids: Tensor, window_max: Callable[[Tensor], Tensor]) -> Tensor:
    """Unit ids after an operation that combines windows of positions (pooling, reductions).

    ``window_max`` takes the max over each window (padding ignored).  A window whose positions carry
    different ids (or already mixed ones) becomes mixed.
    """
    mixed = torch.isnan(ids)
    high = window_max(torch.where(mixed, math.inf, ids))
    low = -window_max(torch.where(mixed, math.inf, -ids))
    return torch.where(high == low, high, torch.full_like(high, math.nan))


def same_value_per(ids: Tensor, axis: int) -> Tensor:
    """Per index of ``axis``, the id every position shares; NaN where positions disagree."""
    moved = ids.movedim(axis, -1).reshape(-1, ids.shape[axis])
    first = moved[0]
    agree = (moved == first).all(dim=0)
    return torch.where(agree, first, torch.full_like(first, math.nan))


def only_first_result_used(call: Call) -> bool:
    """Whether forward uses only the first result of an operation that returns several (e.g. not max-pool indices)."""
    return all(user.target is GETITEM and (user.args[1] == 0 or not user.users) for user in call.node.users)


def sizes_at_batch_one(shape: Sequence) -> list[int]:
    """A recorded shape with the symbolic batch size replaced by 1."""
    return [1 if isinstance(s, torch.SymInt) else int(s) for s in shape]


