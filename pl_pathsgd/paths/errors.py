"""Errors raised by the path geometry."""

from __future__ import annotations


class PathGeometryError(ValueError):
    """The path geometry cannot be computed for this model or this call (see the message)."""


class UnsupportedModelError(PathGeometryError):
    """The model contains operations that have no path decomposition.

    ``problems`` lists one ``(location, reason)`` pair per offending module or operation.
    """

    def __init__(self, problems: list[tuple[str, str]], model_name: str = "model"):
        self.problems = problems
        lines = "\n".join(f"  - {where}: {why}" for where, why in problems)
        super().__init__(
            f"{model_name} cannot be handled by the path geometry ({len(problems)} problem"
            f"{'s' if len(problems) != 1 else ''}):\n{lines}\n"
            "Path-SGD and path-norms need a network built from Linear, Conv and ConvTranspose layers, positively "
            "homogeneous activations (ReLU, LeakyReLU), dropout, pooling, eval-mode BatchNorm, reshapes, slicing, "
            "concatenation, scalar multiples and residual additions (docs/extending.md: adding an operation)."
        )
