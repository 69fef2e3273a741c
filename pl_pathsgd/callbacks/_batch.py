"""Reading inputs and targets out of a batch, the one way all callbacks share.

Every callback takes ``unpack_batch``: a function ``batch -> (inputs, targets)``.  The default,
:func:`default_unpack_batch`, reads

* ``(x, y, ...)`` tuples and lists (the first two entries), and a bare tensor as inputs without targets;
* dicts (any mapping) with an inputs key among ``INPUT_KEYS`` (``"x"``, ``"input"``, ``"image"``, ...) and a
  targets key among ``TARGET_KEYS`` (``"y"``, ``"target"``, ``"label"``, ...).

Anything else needs an ``unpack_batch``, e.g. ``unpack_batch=lambda batch: (batch.pixels, batch.digit)``.
The callbacks check the first batch they meet in a fit, before any training step, and raise
:class:`UnreadableBatchError` saying what the batch looked like and what to pass.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

UnpackBatch = Callable[[Any], tuple[Any, Any]]

INPUT_KEYS = ("x", "input", "inputs", "image", "images", "data", "features")
TARGET_KEYS = ("y", "target", "targets", "label", "labels")


class UnreadableBatchError(ValueError):
    """A callback cannot find the inputs (and targets) in a batch; pass ``unpack_batch=...``."""


def default_unpack_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` of an ``(x, y, ...)`` tuple or list, a dict with known keys, or a bare tensor."""
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0], batch[1] if len(batch) > 1 else None
    if isinstance(batch, Mapping):
        inputs_key = next((key for key in INPUT_KEYS if key in batch), None)
        if inputs_key is not None:
            targets_key = next((key for key in TARGET_KEYS if key in batch), None)
            return batch[inputs_key], None if targets_key is None else batch[targets_key]
    raise UnreadableBatchError(f"no inputs found in {describe(batch)}")


def describe(batch: Any) -> str:
    """A short description of a batch's structure for error messages."""
    if isinstance(batch, Tensor):
        return f"a tensor of shape {tuple(batch.shape)}"
    if isinstance(batch, Mapping):
        return f"a {type(batch).__name__} with keys {list(batch)[:10]!r}"
    if isinstance(batch, (tuple, list)):
        parts = ", ".join(describe(item) if isinstance(item, (Tensor, Mapping)) else type(item).__name__
                          for item in batch[:4])
        return f"a {type(batch).__name__} of {len(batch)} ({parts}{', ...' if len(batch) > 4 else ''})"
    return f"a {type(batch).__name__}"


class BatchReader:
    """Applies a callback's ``unpack_batch`` and checks what comes out.

    Args:
        unpack_batch: ``batch -> (inputs, targets)``; ``None`` for :func:`default_unpack_batch`.
        owner: the callback's name, for messages.
        inputs_tensor: the inputs must be a tensor with a batch dimension (the path geometry needs it).
        targets: the targets must be a tensor with one entry per example (``False``: not needed).
    """

    def __init__(self, unpack_batch: UnpackBatch | None, owner: str, inputs_tensor: bool, targets: bool):
        if unpack_batch is not None and not callable(unpack_batch):
            raise ValueError(f"{owner}(unpack_batch={unpack_batch!r}) must be a function batch -> (inputs, targets)")
        self.unpack_batch = unpack_batch if unpack_batch is not None else default_unpack_batch
        self.custom = unpack_batch is not None
        self.owner = owner
        self.inputs_tensor = inputs_tensor
        self.targets = targets

    def __call__(self, batch: Any) -> tuple[Any, Any]:
        return self.unpack_batch(batch)

    def check(self, batch: Any, where: str) -> tuple[Any, Any]:
        """``(inputs, targets)`` of ``batch``, or :class:`UnreadableBatchError` explaining what to pass."""
        try:
            unpacked = self.unpack_batch(batch)
        except Exception as error:
            raise self._error(batch, where, f"{type(error).__name__}: {error}") from error
        if not (isinstance(unpacked, tuple) and len(unpacked) == 2):
            raise self._error(batch, where, f"unpack_batch returned {describe(unpacked)}, not a pair (inputs, targets)")
        inputs, targets = unpacked
        if self.inputs_tensor and not (isinstance(inputs, Tensor) and inputs.dim() >= 2):
            found = describe(inputs) if isinstance(inputs, Tensor) else type(inputs).__name__
            raise self._error(batch, where, f"the inputs must be a tensor with a batch dimension, got {found}")
        if self.targets:
            if not isinstance(targets, Tensor) or targets.dim() == 0:
                found = "no targets" if targets is None else describe(targets) if isinstance(targets, Tensor) \
                    else type(targets).__name__
                raise self._error(batch, where, f"the targets must be a tensor with one entry per example, got {found}")
            if isinstance(inputs, Tensor) and inputs.dim() > 0 and len(targets) != len(inputs):
                raise self._error(batch, where, f"{len(inputs)} inputs but {len(targets)} targets")
        return inputs, targets

    def _error(self, batch: Any, where: str, problem: str) -> UnreadableBatchError:
        wanted = "(inputs, targets)" if self.targets else "(inputs, targets or None)"
        if self.custom:
            advice = f"Fix unpack_batch so that it returns {wanted} for such a batch."
        else:
            advice = (f"Out of the box the callbacks read (x, y) tuples or lists and dicts with keys "
                      f"{INPUT_KEYS[0]!r}/{TARGET_KEYS[0]!r} (or {', '.join(map(repr, INPUT_KEYS[1:4]))} ... / "
                      f"{', '.join(map(repr, TARGET_KEYS[1:4]))} ...). Pass unpack_batch=<function batch -> {wanted}>, "
                      f"e.g. {self.owner}(unpack_batch=lambda batch: (batch['pixels'], batch['digit'])).")
        return UnreadableBatchError(
            f"{self.owner} cannot read the {where}, {describe(batch)}: {problem}. {advice}"
        )
