"""What determines a run's result, recorded with it, and how two such records differ.

A run's *identity* has three parts:

* ``config``: the resolved configuration of ``pl-pathsgd fit`` (every option, defaults included), less
  the options that change where and how results are written but not the numbers (:data:`NOT_RESULT_KEYS`);
* ``data``: the fingerprint of the data files, as the DataModule gives it (:func:`data_fingerprint`);
* ``versions``: of pl-pathsgd, PyTorch and Lightning.

Two runs with the same identity compute the same numbers; the sweep runner reuses a finished cell only
when its recorded identity equals the current one, and otherwise names the settings that differ.
"""

from __future__ import annotations

import json
from typing import Any

import torch

#: options of the resolved config that do not change a run's numbers (dotted keys, with what is below them)
NOT_RESULT_KEYS = (
    "config",  # the config files' paths: their content is in the resolved options
    "ckpt_path",
    "weights_only",  # how a checkpoint is loaded
    "trainer.logger",
    "trainer.default_root_dir",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.enable_checkpointing",
    "trainer.log_every_n_steps",
    "data.init_args.data_dir",  # where the files are: their content is in the data fingerprint
    "data.init_args.cache_dir",
    "data.init_args.download",
    "data.init_args.download_timeout",
    "data.init_args.mirror",
    "data.init_args.num_workers",
)
#: callbacks that record a run without changing it (left out of ``trainer.callbacks``)
RECORDING_CALLBACKS = ("pl_pathsgd.experiments.CellRecorder", "pl_pathsgd.experiments.cell.CellRecorder")


def versions() -> dict[str, str]:
    import lightning

    import pl_pathsgd

    return {"pl_pathsgd": pl_pathsgd.__version__, "torch": torch.__version__, "lightning": lightning.__version__}


def result_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` (a resolved pl-pathsgd config as plain data) without the options that do not change results."""
    config = json.loads(json.dumps(config, default=str))  # a deep copy, as JSON would store it
    for key in NOT_RESULT_KEYS:
        *parents, last = key.split(".")
        node = config
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    trainer = config.get("trainer")
    if isinstance(trainer, dict) and isinstance(trainer.get("callbacks"), list):
        trainer["callbacks"] = [c for c in trainer["callbacks"]
                                if not (isinstance(c, dict) and c.get("class_path") in RECORDING_CALLBACKS)]
    return config


def data_fingerprint(datamodule: Any) -> Any:
    """What identifies a prepared DataModule's data files, as plain data: the SHA-1 of each source file
    (``source_digests`` of the file-backed DataModules); ``None`` for data that has no files of its own (the
    bundled digits ship inside scikit-learn, generated data come from a seed: the options identify them)."""
    digests = getattr(datamodule, "source_digests", None)
    return _plain(digests) if digests else None


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def identity(config: dict[str, Any], datamodule: Any) -> dict[str, Any]:
    """The identity of a run of the resolved ``config`` on the set-up ``datamodule`` (plain data)."""
    return {"config": result_config(config), "data": data_fingerprint(datamodule), "versions": versions()}


def same_value(key: str, a: Any, b: Any) -> bool:
    """Whether two values of the option ``key`` are the same setting: class paths are compared by the
    class they import (``torch.optim.SGD`` is ``SGD``), sequences element by element (a tuple equals a list)."""
    if key.endswith("class_path") and isinstance(a, str) and isinstance(b, str) and a != b:
        from pl_pathsgd.factories import as_factory

        try:
            return as_factory(a, "class") is as_factory(b, "class")
        except (ValueError, TypeError):
            return False
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_value(key, x, y) for x, y in zip(a, b))
    return a == b


def lookup(config: Any, key: str, missing: Any = None) -> Any:
    """The value at the dotted ``key`` of a nested mapping, or ``missing``."""
    node = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return missing
        node = node[part]
    return node


def differences(recorded: Any, current: Any, limit: int = 8) -> list[str]:
    """The settings that differ between two identities, one ``key: recorded -> current`` each (at most
    ``limit``, then a count of the others)."""
    old, new = _flatten(recorded), _flatten(current)
    keys = [key for key in sorted(set(old) | set(new), key=_order) if old.get(key, _MISSING) != new.get(key, _MISSING)]
    # where a class changed, its own options differ as a matter of course: name the class only
    replaced = [key[: -len("class_path")] for key in keys if key.endswith("class_path")]
    keys = [key for key in keys if not any(key.startswith(prefix + "init_args.") for prefix in replaced)]
    changed = [f"{_name(key)}: {_short(old.get(key, '(not set)'))} -> {_short(new.get(key, '(not set)'))}"
               for key in keys]
    if len(changed) > limit:
        changed = changed[:limit] + [f"and {len(changed) - limit} more"]
    return changed


_MISSING = object()


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    if isinstance(value, list) and value and any(isinstance(v, (dict, list)) for v in value):
        flat = {}
        for index, item in enumerate(value):
            flat.update(_flatten(item, f"{prefix}[{index}]"))
        return flat
    return {prefix: value}


def _order(key: str) -> tuple[int, str]:
    """Configuration first, then data, then versions; alphabetical within each."""
    rank = {"config": 0, "data": 1, "versions": 2}.get(key.split(".", 1)[0].split("[", 1)[0], 3)
    return rank, key


def _name(key: str) -> str:
    """A key of an identity as the user knows it: the option itself, the data's content, a version."""
    part, _, rest = key.partition(".")
    if part == "config":
        return rest
    if part == "data":
        return f"data files ({rest})" if rest else "data files"
    if part == "versions":
        return f"version of {rest}"
    return key


def _short(value: Any, width: int = 60) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= width else text[: width - 3] + "..."
