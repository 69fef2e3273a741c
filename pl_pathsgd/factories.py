"""Optimizer and scheduler factories: what a module accepts, and how it records them as plain data.

A factory is what LightningCLI injects (``OptimizerCallable``/``LRSchedulerCallable``): a callable that
takes the parameters (or the optimizer) and builds the object — a class, a ``functools.partial``, a
function. Outside the command line the same factory may also be written as in YAML: an import path
(``"torch.optim.SGD"``) or a ``{"class_path": ..., "init_args": {...}}`` mapping; that is also the form
in which :func:`describe` records a factory in a module's hyper-parameters, so checkpoints hold plain
data and ``load_from_checkpoint`` rebuilds the same factory. Pure Python: no Lightning here.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from importlib import import_module
from typing import Any

#: The optimizer names of pl-pathsgd 0.1 and the classes that replace them.
OPTIMIZER_NAMES = {
    "pathsgd": "pl_pathsgd.PathSGD",
    "sgd": "torch.optim.SGD",
    "adagrad": "torch.optim.Adagrad",
    "adam": "torch.optim.Adam",
}


def removed_name_message(key: str, name: str, where: str = "") -> str:
    """Why an optimizer name such as ``"pathsgd"`` (given as ``key``, ``where``) no longer works, and what to write instead."""
    replacement = OPTIMIZER_NAMES[name]
    return (f"{key}: {name!r}{where} is an optimizer name of pl-pathsgd 0.1; optimizers are now given by class. "
            f"Write `{key}: {{class_path: {replacement}, init_args: {{lr: 0.01}}}}` in YAML, "
            f"`--{key}={replacement.rsplit('.', 1)[1]} --{key}.lr=0.01` on the command line, or "
            f"`functools.partial({replacement}, lr=0.01)` in Python")


def as_factory(spec: Any, what: str) -> Callable[..., Any]:
    """The factory ``spec`` stands for: a callable as it is, or one built from an import path or mapping."""
    if isinstance(spec, str):
        if spec in OPTIMIZER_NAMES and what == "optimizer":
            raise ValueError(removed_name_message(what, spec))
        return _import(spec, what)
    if isinstance(spec, Mapping):
        if "class_path" not in spec or not set(spec) <= {"class_path", "init_args"}:
            raise ValueError(f"{what}: a mapping must be {{'class_path': ..., 'init_args': {{...}}}}, got {dict(spec)!r}")
        return functools.partial(_import(spec["class_path"], what), **dict(spec.get("init_args") or {}))
    if callable(spec):
        return spec
    raise TypeError(f"{what} must be a callable (a class, functools.partial or function), an import path or a "
                    f"{{'class_path': ..., 'init_args': ...}} mapping; got {type(spec).__name__}")


def describe(factory: Callable[..., Any] | None) -> dict | str | None:
    """``factory`` as plain data: ``{"class_path": ..., "init_args": {...}}`` with every init argument the
    class will receive (defaults included), an import path for a plain function, ``None`` for ``None``.

    Values that are not plain data (numbers, strings, lists, dicts) are recorded as their ``repr``; a
    factory that cannot be imported (a lambda, a local function) is recorded as its ``repr``.
    """
    if factory is None:
        return None
    target, kwargs = _unwrap(factory)
    path = import_path(target)
    if path is None:
        return repr(factory)
    if inspect.isclass(target):
        kwargs = {**_defaults(target), **kwargs}
    elif not kwargs:
        return path
    return {"class_path": path, "init_args": {name: _plain(value) for name, value in kwargs.items()}}


def import_path(target: Any) -> str | None:
    """The shortest dotted path that imports ``target`` (``torch.optim.SGD``), or None if there is none."""
    module, qualname = getattr(target, "__module__", None), getattr(target, "__qualname__", None)
    if not module or not qualname or "<" in qualname:
        return None
    parts = module.split(".")
    for end in range(1, len(parts) + 1):
        prefix = ".".join(parts[:end])
        try:
            found = functools.reduce(getattr, qualname.split("."), import_module(prefix))
        except (ImportError, AttributeError):
            continue
        if found is target:
            return f"{prefix}.{qualname}"
    return None


def _unwrap(factory: Callable[..., Any]) -> tuple[Any, dict[str, Any]]:
    """The class or function a factory calls and the keyword arguments it adds (through partials;
    LightningCLI's partial carries the class among its arguments)."""
    kwargs: dict[str, Any] = {}
    while isinstance(factory, functools.partial):
        kwargs = {**factory.keywords, **kwargs}
        classes = [a for a in (factory.func, *factory.args) if inspect.isclass(a)]
        if classes:
            return classes[0], kwargs
        factory = factory.func
    return factory, kwargs


def _defaults(cls: type) -> dict[str, Any]:
    """The keyword arguments of ``cls`` after the first (the parameters or the optimizer), with defaults."""
    try:
        parameters = list(inspect.signature(cls).parameters.values())[1:]
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in parameters
            if p.default is not inspect.Parameter.empty and p.kind is not inspect.Parameter.POSITIONAL_ONLY}


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return repr(value)


def _import(path: str, what: str) -> Any:
    module, _, name = path.rpartition(".")
    try:
        return getattr(import_module(module), name) if module else import_module(name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"{what}: cannot import {path!r} ({error}); give a full import path such as "
                         "'torch.optim.SGD' or pass the callable itself") from None
