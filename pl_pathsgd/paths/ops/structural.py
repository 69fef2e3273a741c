"""Operations that only move, select, copy or pad entries: the twin moves the twin's entries the same way.

A moved entry keeps its paths, so applying the operation to the twin (or to unit ids) is exact.
Constants moved into activations (a padding value, a constant tensor in a ``cat``) become their
|value|^p, entries with no unit.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pl_pathsgd.paths.ops.registry import (
    GETITEM,
    NONE,
    Call,
    Kind,
    Rule,
    TwinRun,
    op_name,
    refuse,
    register,
    sizes_at_batch_one,
)

aten = torch.ops.aten


def map_args(call: Call, values: tuple, convert) -> tuple:
    """Apply ``convert(kind, value)`` to every tensor argument, lists included, keeping the call's structure."""

    def one(arg, value):
        if isinstance(arg, (list, tuple)) and isinstance(value, (list, tuple)):
            return type(value)(one(a, v) for a, v in zip(arg, value))
        if isinstance(value, Tensor):
            return convert(call.kind_of(arg), value)
        return value

    return tuple(one(arg, value) for arg, value in zip(call.args, values))


def constants_to_twin(call: Call, run: TwinRun, args: tuple) -> tuple:
    return map_args(call, args, lambda kind, v: run.power(v) if kind <= Kind.CONST else v)


def constants_to_no_unit(call: Call, args: tuple) -> tuple:
    return map_args(call, args, lambda kind, v: v if kind == Kind.ACT else torch.full_like(v, NONE, dtype=torch.float64))


@register(aten.permute, aten.transpose, aten.t, aten.expand, aten.repeat, aten.slice, aten.select, aten.narrow,
          aten.cat, aten.stack, aten.split, aten.split_with_sizes, aten.chunk, aten.unbind, aten.unfold,
          aten.slice_scatter, aten.select_scatter, aten.movedim, aten.upsample_nearest1d, aten.upsample_nearest2d,
          aten.upsample_nearest3d, aten.reflection_pad1d, aten.reflection_pad2d, aten.reflection_pad3d,
          aten.replication_pad1d, aten.replication_pad2d, aten.replication_pad3d)
class Structural(Rule):
    """Selection, transposition, duplication, concatenation, splitting, scatter of a part."""

    def twin(self, call, run, *args, **kwargs):
        return call.target(*constants_to_twin(call, run, args), **kwargs)

    def flow(self, call, *args, **kwargs):
        return call.target(*constants_to_no_unit(call, args), **kwargs)


@register(aten.view, aten._unsafe_view, aten.reshape, aten.flatten, aten.unflatten, aten.squeeze, aten.unsqueeze)
class View(Rule):
    """Reshapes: the entries in row-major order, reshaped to the recorded output shape (batch size 1)."""

    def twin(self, call, run, x, *rest, **kwargs):
        return x.reshape(sizes_at_batch_one(call.shape()))

    def flow(self, call, x, *rest, **kwargs):
        return x.reshape(sizes_at_batch_one(call.shape()))


@register(aten.constant_pad_nd, aten.pad)
class Pad(Rule):
    """Padding: constant padding adds entries of value ``value`` (twin |value|^p, no unit); reflect,
    replicate and circular padding copy entries (structural)."""

    def twin(self, call, run, x, pad, *rest, **kwargs):
        mode, value = _pad_mode(call, rest, kwargs)
        if mode != "constant":
            return aten.pad(x, pad, mode)
        return aten.constant_pad_nd(x, pad, float(run.power(value)))

    def flow(self, call, x, pad, *rest, **kwargs):
        mode, _ = _pad_mode(call, rest, kwargs)
        if mode != "constant":
            return aten.pad(x, pad, mode)
        return aten.constant_pad_nd(x, pad, NONE)


def _pad_mode(call: Call, rest: tuple, kwargs: dict) -> tuple[str, float]:
    if call.target.overloadpacket is aten.constant_pad_nd:
        return "constant", float(rest[0] if rest else kwargs.get("value", 0.0))
    mode = rest[0] if rest else kwargs.get("mode", "constant")
    value = rest[1] if len(rest) > 1 else kwargs.get("value")
    return mode, float(value or 0.0)


@register(aten.index, aten.index_select, aten.index_put)
class Index(Rule):
    """Indexing by constant index tensors (not along the batch dimension)."""

    def check(self, call: Call) -> str | None:
        name = op_name(call.target)
        packet = call.target.overloadpacket
        activation = call.kind_of(call.args[0]) == Kind.ACT
        batch = call.batch_dim(call.args[0]) if activation else None
        if packet is aten.index_select:
            dim, index = call.args[1], call.args[2]
            if call.kind_of(index) > Kind.CONST:
                return f"{name} selects with indices computed from weights or activations"
            if activation and dim % len(call.shape(call.args[0])) == batch:
                return f"{name} along the batch dimension mixes the examples of a batch"
            return None
        indices = call.args[1]
        if any(call.kind_of(i) > Kind.CONST for i in indices if i is not None):
            return f"{name} indexes with indices computed from weights or activations"
        if activation and batch is not None and len(indices) > batch and indices[batch] is not None:
            return f"{name} indexes the batch dimension, which mixes the examples of a batch"
        if packet is aten.index_put and (call.arg(3, "accumulate", False)):
            return f"{name} with accumulate=True is not supported; add the parts explicitly"
        return None

    def twin(self, call, run, *args, **kwargs):
        return self._apply(call, args, kwargs, lambda kind, v: run.power(v) if kind <= Kind.CONST else v)

    def flow(self, call, *args, **kwargs):
        return self._apply(call, args, kwargs,
                           lambda kind, v: v if kind == Kind.ACT else torch.full_like(v, NONE, dtype=torch.float64))

    @staticmethod
    def _apply(call: Call, args: tuple, kwargs: dict, convert):
        """Convert the indexed tensor (and the written values) but never the indices."""
        args = list(args)
        data = (0, 2) if call.target.overloadpacket is aten.index_put else (0,)
        for position in data:
            args[position] = convert(call.kind_of(call.args[position]), args[position])
        return call.target(*args, **kwargs)


@register(aten.flip, aten.roll)
class Reorder(Structural):
    """Reversing or rolling entries along dimensions other than the batch."""

    def check(self, call: Call) -> str | None:
        dims = call.arg(1, "dims") if call.target.overloadpacket is aten.flip else call.arg(2, "dims")
        dims = [dims] if isinstance(dims, int) else list(dims or [])
        rank = len(call.shape(call.args[0]))
        batch = call.batch_dim(call.args[0]) if call.kind_of(call.args[0]) == Kind.ACT else None
        if batch is not None and (not dims or any(d % rank == batch for d in dims)):
            return f"{op_name(call.target)} along the batch dimension mixes the examples of a batch"
        return None


@register(aten.copy)
class CopyInto(Rule):
    """``copy(self, src)``: the values of ``src`` in the shape of ``self`` (what a write into a view becomes)."""

    def twin(self, call, run, target, source, *rest):
        source = run.power(source) if call.kind_of(call.args[1]) <= Kind.CONST else source
        return torch.broadcast_to(source, target.shape).clone()

    def flow(self, call, target, source, *rest):
        if call.kind_of(call.args[1]) != Kind.ACT:
            return torch.full_like(target, NONE)
        return torch.broadcast_to(source, target.shape).clone()


@register(GETITEM)
class GetItem(Rule):
    """Taking one result of an operation that returns several."""

    def twin(self, call, run, values, index):
        return values[index]

    def flow(self, call, values, index):
        return values[index]


refuse("reads memory by strides, which depends on the memory layout rather than on the values; use view/reshape",
       aten.as_strided, aten.as_strided_scatter)
refuse("moves entries along the batch dimension by data-dependent positions", aten.gather, aten.scatter,
       aten.scatter_add, aten.scatter_reduce)
