"""The rules of the path geometry, one registration per operation (see :mod:`.registry`).

Importing this package registers every rule; :func:`rule_for` finds the rule of an ATen operation.
"""

from pl_pathsgd.paths.ops import (  # noqa: F401  (importing registers the rules)
    batchnorm,
    conv,
    elementwise,
    linear,
    pooling,
    recurrent,
    structural,
    unsupported,
)
from pl_pathsgd.paths.ops.registry import (
    NONE,
    Blocked,
    Call,
    Consumer,
    Kind,
    Producer,
    Rule,
    TwinRun,
    op_name,
    reason_for,
    refuse,
    register,
    registered_operations,
    rule_for,
)

__all__ = [
    "NONE",
    "Blocked",
    "Call",
    "Consumer",
    "Kind",
    "Producer",
    "Rule",
    "TwinRun",
    "op_name",
    "reason_for",
    "refuse",
    "register",
    "registered_operations",
    "rule_for",
]
