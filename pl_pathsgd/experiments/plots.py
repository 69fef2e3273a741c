"""The paper's figures, laid out like the paper's, from the per-epoch rows of a run."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from pl_pathsgd.experiments.summaries import best_curves, by_cell, figure1_summary, finite  # noqa: E402

_PANELS = (("train_loss", "cross-entropy (training objective)"), ("train_error", "training error"),
           ("test_error", "test error"))
_COLOURS = {"pathsgd": "tab:green", "sgd": "tab:red", "adagrad": "tab:blue"}
_STYLES = {"balanced": "-", "unbalanced": "--"}
_NAMES = {"pathsgd": "Path-SGD", "sgd": "SGD", "adagrad": "AdaGrad"}


def render(figure: str, rows: list[dict], title: str) -> Figure:
    if figure == "figure1":
        return _width_figure(rows, title)
    curves = {(c[0]["method"], c[0]["init"]): c for c in by_cell(rows).values()} if figure == "figure2" \
        else best_curves(rows)
    return _learning_curves(curves, title)


def _width_figure(rows: list[dict], title: str) -> Figure:
    summary = figure1_summary(rows)
    widths = [r["width"] for r in summary]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot(widths, [r["train_error"] for r in summary], "o-", color="tab:blue", label="training")
    ax.plot(widths, [r["test_error_last"] for r in summary], "s-", color="tab:red", label="test (last epoch)")
    ax.plot(widths, [r["test_error_early_stop"] for r in summary], "^--", color="tab:orange",
            label="test (early stopping on validation)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("hidden units")
    ax.set_ylabel("error")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def _learning_curves(curves: dict[tuple[str, str], list[dict]], title: str) -> Figure:
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for (method, init), epochs in sorted(curves.items()):
        label = f"{_NAMES.get(method, method)}, {init}"
        alpha = epochs[0].get("alpha")
        if alpha not in (None, ""):
            label += f" (lr 1e-{alpha})"
        x = [r["epoch"] for r in epochs]
        for ax, (column, _) in zip(axes, _PANELS):
            ax.plot(x, [finite(r[column]) for r in epochs], _STYLES.get(init, "-"),
                    color=_COLOURS.get(method), label=label)
    for ax, (_, name) in zip(axes, _PANELS):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def to_tensorboard(log_dir: Path, tag: str, figure: Figure) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(log_dir))
    try:
        writer.add_figure(tag, figure, close=False)
    finally:
        writer.close()
