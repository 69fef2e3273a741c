"""What each figure reports, computed from the per-epoch rows of its cells."""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from pl_pathsgd.experiments.cell import CAPACITY


def by_cell(rows: list[dict]) -> dict[str, list[dict]]:
    cells: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        cells[row["cell"]].append(row)
    return {name: sorted(epochs, key=lambda r: r["epoch"]) for name, epochs in cells.items()}


def finite(value) -> float:
    """A metric as a float; a missing or diverged (NaN) value counts as +inf."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return math.inf
    return float(value)


def figure1_summary(rows: list[dict]) -> list[dict]:
    """Per width: final training error, test error at the last epoch, and at the epoch validation error picks."""
    summary = []
    for epochs in by_cell(rows).values():
        last = epochs[-1]
        picked = min(epochs, key=lambda r: (finite(r["val_error"]), r["epoch"]))
        summary.append({"width": int(last["width"]), "train_error": finite(last["train_error"]),
                        "test_error_last": finite(last["test_error"]),
                        "test_error_early_stop": finite(picked["test_error"]), "stop_epoch": picked["epoch"],
                        "parameters": _number(last.get("parameters")),
                        **{column: _number(last.get(column)) for column in CAPACITY}})
    return sorted(summary, key=lambda r: r["width"])


def _number(value) -> float | None:
    """A recorded value as a float; None where nothing was recorded (an empty CSV field, a missing column)."""
    return None if value in (None, "") else float(value)


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation of two equally long lists (ties get their mean rank); NaN if either is constant."""
    rx, ry = _ranks(x), _ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    var = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return cov / var if var else math.nan


def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def curve_key(row: dict) -> tuple[str, str, str]:
    """What a cell's curve stands for: (method, init, variant), variant "" for a plain run, "rebalanced" for
    Figure 2a's SGD with Rebalance, "perturbed" for Figure 3's control."""
    return row["method"], row["init"], row.get("variant") or ""


def curves(rows: list[dict]) -> dict[tuple[str, str, str], list[dict]]:
    """Every cell's curve by :func:`curve_key` (for grids with one cell per key, as Figure 2a's)."""
    return {curve_key(epochs[0]): epochs for epochs in by_cell(rows).values()}


def best_curves(rows: list[dict]) -> dict[tuple[str, str, str], list[dict]]:
    """Per :func:`curve_key`, the curve of the step size with the lowest final validation error."""
    best: dict[tuple[str, str, str], list[dict]] = {}
    for epochs in by_cell(rows).values():
        key = curve_key(epochs[0])
        if key not in best or finite(epochs[-1]["val_error"]) < finite(best[key][-1]["val_error"]):
            best[key] = epochs
    return best


def relative_gaps(reference: list[dict], other: list[dict], column: str = "train_loss") -> list[float]:
    """Per epoch, |other - reference| / |reference| of ``column`` (0 where equal, inf where one diverged)."""
    gaps = []
    for a, b in zip(reference, other):
        x, y = finite(a[column]), finite(b[column])
        if x == y:
            gaps.append(0.0)
        elif math.isinf(x) or math.isinf(y) or x == 0:
            gaps.append(math.inf)
        else:
            gaps.append(abs(y - x) / abs(x))
    return gaps


def rounding_unit(precision) -> float:
    """The machine epsilon of the dtype a run computed in, from Lightning's precision ("64-true", "32-true",
    "bf16-mixed", ...; None is Lightning's default, 32-true)."""
    text = str(precision or "32-true")
    if text.startswith("64") or text == "double":
        return torch.finfo(torch.float64).eps
    if text.startswith("bf16"):
        return torch.finfo(torch.bfloat16).eps
    if text.startswith("16") or text == "half":
        return torch.finfo(torch.float16).eps
    return torch.finfo(torch.float32).eps


def invariance_gaps(rows: list[dict]) -> list[dict]:
    """Figure 3's invariance check, per step size at which Path-SGD ran from both inits: per epoch and largest
    over the epochs, the relative gaps of the training-loss curves of Path-SGD balanced vs unbalanced
    (``pathsgd``), Path-SGD balanced vs the balanced weights perturbed at the rounding level (``control``) and
    SGD balanced vs unbalanced at the same step size (``sgd``); None where a cell is not in the grid."""
    by_key = {(*curve_key(epochs[0]), epochs[0]["alpha"]): epochs for epochs in by_cell(rows).values()}
    pairs = {"pathsgd": (("pathsgd", "balanced", ""), ("pathsgd", "unbalanced", "")),
             "control": (("pathsgd", "balanced", ""), ("pathsgd", "balanced", "perturbed")),
             "sgd": (("sgd", "balanced", ""), ("sgd", "unbalanced", ""))}
    found = []
    alphas = sorted({key[3] for key in by_key if key[:3] == pairs["pathsgd"][0]}, key=float)
    for alpha in alphas:
        if (*pairs["pathsgd"][1], alpha) not in by_key:
            continue
        balanced = by_key[(*pairs["pathsgd"][0], alpha)]
        entry = {"alpha": alpha, "lr": balanced[0]["lr"], "precision": balanced[0].get("precision"),
                 "epochs": [r["epoch"] for r in balanced]}
        for name, (first, second) in pairs.items():
            a, b = by_key.get((*first, alpha)), by_key.get((*second, alpha))
            per_epoch = relative_gaps(a, b) if a and b else None
            entry[name] = max(per_epoch) if per_epoch else None
            entry[f"{name}_per_epoch"] = per_epoch
        found.append(entry)
    return found
