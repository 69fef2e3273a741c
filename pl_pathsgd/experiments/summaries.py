"""What each figure reports, computed from the per-epoch rows of its cells."""

from __future__ import annotations

import math
from collections import defaultdict


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
                        "test_error_early_stop": finite(picked["test_error"]), "stop_epoch": picked["epoch"]})
    return sorted(summary, key=lambda r: r["width"])


def best_curves(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """Per (method, init), the curve of the step size with the lowest final validation error."""
    best: dict[tuple[str, str], list[dict]] = {}
    for epochs in by_cell(rows).values():
        key = (epochs[0]["method"], epochs[0]["init"])
        if key not in best or finite(epochs[-1]["val_error"]) < finite(best[key][-1]["val_error"]):
            best[key] = epochs
    return best
