"""The paper's experiments as grids of cells: one cell is one ``pl-pathsgd fit`` run."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

FIGURES = ("figure1", "figure2", "figure3")
DATASETS = {
    "figure1": ("mnist", "cifar10"),
    "figure2": ("mnist",),
    "figure3": ("mnist", "cifar10", "cifar100", "svhn"),
}
DEFAULT_WIDTHS = tuple(2**k for k in range(2, 13))  # 4 ... 4096
SMOKE_WIDTHS = (4, 16, 64, 256)
#: the optimizers of Figure 3, by the name the runner and its tables use
OPTIMIZERS = {"pathsgd": "pl_pathsgd.PathSGD", "sgd": "torch.optim.SGD", "adagrad": "torch.optim.Adagrad"}
METHODS = tuple(OPTIMIZERS)
INITS = ("balanced", "unbalanced")
DEFAULT_ALPHAS = (1, 2, 3, 4)  # step sizes 10^-alpha
SMOKE_ALPHAS = {"pathsgd": (1,), "sgd": (1, 2), "adagrad": (2,)}  # step sizes 10^-alpha for smoke runs


#: per figure, the options its runner sweeps (as written without ``init_args``) and the runner option that
#: sets them instead; an override of one of them would replace the sweep, so it is refused
SWEPT = {
    "figure1": {"model.hidden": "--widths"},
    "figure2": {"model.init": "nothing: figure2 compares the balanced and the unbalanced init"},
    "figure3": {"model.optimizer": "--methods and --alphas", "model.optimizer.class_path": "--methods",
                "model.optimizer.lr": "--alphas", "model.init": "--inits", "model.dropout": "--dropout"},
}


#: per figure, the callbacks its runner adds to some cells only (``class_path``: the cells that get it): any other
#: instance of them (from a config or an override) would blur the comparison of the cells, so it is refused
CELL_CALLBACKS = {
    "figure1": {},
    "figure2": {"pl_pathsgd.callbacks.Rebalance": "the cell of SGD + Rebalance"},
    "figure3": {"pl_pathsgd.experiments.PerturbWeights": "the control cells of the invariance claim"},
}
#: Figure 2a's third curve: SGD from the unbalanced init, rebalanced to the smallest l2 norm before the first
#: step and after every epoch
REBALANCE = {"class_path": "pl_pathsgd.callbacks.Rebalance",
             "init_args": {"method": "l2", "every_n_epochs": 1, "at_fit_start": True}}
#: Figure 3's control: the balanced init with every weight moved by one unit in the last place (seeded)
PERTURB = {"class_path": "pl_pathsgd.experiments.PerturbWeights", "init_args": {"relative": None, "seed": 0}}


@dataclass(frozen=True)
class Cell:
    """One run: a name (its folder), the CLI overrides that define it, what it stands for in the figure,
    the resolved values (dotted keys of the config) that its overrides set, and the callbacks it adds to the
    run (appended after every override, so that none can remove them)."""

    name: str
    args: tuple[str, ...]
    meta: dict = field(default_factory=dict, hash=False, compare=False)
    sets: dict = field(default_factory=dict, hash=False, compare=False)
    callbacks: tuple[dict, ...] = field(default=(), hash=False, compare=False)


def config_path(figure: str, dataset: str, smoke: bool, root: Path | None = None) -> Path:
    """``configs/paper/<figure>_<dataset>.yaml`` (``configs/paper/smoke/<figure>.yaml`` for smoke runs)."""
    base = _configs_root(root) / "paper"
    path = base / "smoke" / f"{figure}.yaml" if smoke else base / f"{figure}_{dataset}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no config for {figure} on {dataset}{' (smoke)' if smoke else ''}: expected {path}")
    return path


def _configs_root(root: Path | None) -> Path:
    """``root`` if given, else ``./configs`` if it holds the paper's configs, else the package's own configs."""
    if root is not None:
        return root
    if (Path.cwd() / "configs" / "paper").is_dir():
        return Path.cwd() / "configs"
    from pl_pathsgd import configs

    return configs.root()


def swept_override(figure: str, option: str) -> tuple[str, str] | None:
    """``(swept key, runner option to use instead)`` if the command-line ``option`` (``--model.init_args.hidden=...``)
    sets a key that ``figure`` sweeps, else None."""
    name = option[2:].split("=", 1)[0].rstrip("+") if option.startswith("--") else ""
    path = ".".join(part for part in name.split(".") if part != "init_args")
    for key, instead in SWEPT[figure].items():
        if path == key or (path.startswith(key + ".") and key != "model.optimizer"):
            return key, instead
    return None


def _arg(key: str, value) -> str:
    return f"--{key}={value if isinstance(value, str) else json.dumps(value)}"


def figure1_cells(widths) -> list[Cell]:
    return [Cell(f"width{w:05d}", (_arg("model.init_args.hidden", [w]),), {"width": w},
                 {"model.init_args.hidden": [w]}) for w in widths]


def figure2_cells() -> list[Cell]:
    """SGD from the balanced and from the unbalanced init, and SGD with :data:`REBALANCE` from the unbalanced one."""
    cells = [Cell(init, (_arg("model.init_args.init", init),), {"method": "sgd", "init": init},
                  {"model.init_args.init": init}) for init in INITS]
    unbalanced = cells[1]
    cells.append(Cell("unbalanced-rebalanced", unbalanced.args, {**unbalanced.meta, "variant": "rebalanced"},
                      unbalanced.sets, (REBALANCE,)))
    return cells


def figure3_cells(methods, inits, alphas: dict[str, tuple[int, ...]], dropout: float,
                  control: bool = True) -> list[Cell]:
    """Every (method, init, step size); with ``control``, for each step size at which Path-SGD runs from both
    inits, also Path-SGD from the balanced init under :data:`PERTURB` (the yardstick of the invariance claim)."""
    cells = []
    for method in methods:
        for init in inits:
            for alpha in alphas[method]:
                lr = 10.0**-alpha
                optimizer = {"class_path": OPTIMIZERS[method], "init_args": {"lr": lr}}
                args = (_arg("model.init_args.optimizer", optimizer), _arg("model.init_args.init", init),
                        _arg("model.init_args.dropout", dropout))
                meta = {"method": method, "init": init, "alpha": alpha, "lr": lr, "dropout": dropout}
                sets = {"model.init_args.optimizer.class_path": OPTIMIZERS[method],
                        "model.init_args.optimizer.init_args.lr": lr, "model.init_args.init": init,
                        "model.init_args.dropout": dropout}
                cells.append(Cell(f"{method}-{init}-lr1e-{alpha}", args, meta, sets))
    if control and "pathsgd" in methods and set(INITS) <= set(inits):
        for cell in [c for c in cells if c.meta["method"] == "pathsgd" and c.meta["init"] == "balanced"]:
            cells.append(Cell(cell.name.replace("-balanced-", "-balanced-perturbed-"), cell.args,
                              {**cell.meta, "variant": "perturbed"}, cell.sets, (PERTURB,)))
    return cells
