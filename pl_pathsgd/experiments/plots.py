"""The paper's figures, laid out like the paper's, from the per-epoch rows of a run."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from pl_pathsgd.experiments.summaries import (  # noqa: E402
    best_curves,
    curves,
    figure1_summary,
    finite,
    invariance_gaps,
    rounding_unit,
)

_PANELS = (("train_loss", "cross-entropy (training objective)"), ("train_error", "training error"),
           ("test_error", "test error"))
_COLOURS = {"pathsgd": "tab:green", "sgd": "tab:red", "adagrad": "tab:blue"}
_STYLES = {"balanced": "-", "unbalanced": "--"}
_NAMES = {"pathsgd": "Path-SGD", "sgd": "SGD", "adagrad": "AdaGrad"}
#: how a variant of a curve is drawn: (colour, line style, what the legend adds)
_VARIANTS = {"rebalanced": ("tab:purple", "-.", " + Rebalance (l2, every epoch)"),
             "perturbed": ("black", ":", ", moved by one unit in the last place")}


def render(figure: str, rows: list[dict], title: str) -> Figure:
    if figure == "figure1":
        return _width_figure(rows, title)
    if figure == "figure2":
        return _learning_curves(curves(rows), title)
    shown = {key: epochs for key, epochs in best_curves(rows).items() if key[2] != "perturbed"}  # in the gap panel
    return _learning_curves(shown, title, invariance_gaps(rows))


def _width_figure(rows: list[dict], title: str) -> Figure:
    summary = figure1_summary(rows)
    widths = [r["width"] for r in summary]
    fig, (ax, norms) = plt.subplots(1, 2, figsize=(11.5, 4))
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
    _norm_panel(norms, summary)
    fig.tight_layout()
    return fig


def _norm_panel(ax, summary: list[dict]) -> None:
    """The capacity after the last epoch against the width: the margin-normalized l2 path-norm (what the paper
    argues controls generalization), the l2 path-norm and the margin, and the parameter count on a second axis."""
    def series(column: str) -> tuple[list[int], list[float]]:
        kept = [r for r in summary if r[column] is not None and r[column] > 0]  # a log axis shows positive values
        return [r["width"] for r in kept], [r[column] for r in kept]

    ax.plot(*series("normalized_path_norm_l2"), "D-", color="tab:purple", label="l2 path-norm / margin")
    ax.plot(*series("path_norm_l2"), "o--", color="tab:purple", alpha=0.5, label="l2 path-norm")
    ax.plot(*series("margin"), "v:", color="tab:gray", label="margin (5th percentile)")
    ax.set_xscale("log", base=2)
    if any(len(line.get_xdata()) for line in ax.get_lines()):
        ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no capacity recorded:\nadd pl_pathsgd.experiments.FinalCapacityReport\nto the trainer's callbacks",
                ha="center", va="center", transform=ax.transAxes, fontsize=9)
    ax.set_xlabel("hidden units")
    ax.set_ylabel("after the last epoch")
    ax.grid(alpha=0.3)
    size = ax.twinx()
    size.plot(*series("parameters"), "s-", color="tab:brown", alpha=0.35, label="parameters (right axis)")
    if len(size.get_lines()[0].get_xdata()):
        size.set_yscale("log")
    size.set_ylabel("parameters")
    lines = ax.get_lines() + size.get_lines()
    missing = [r["width"] for r in summary if r["normalized_path_norm_l2"] is None]
    heading = "capacity after the last epoch"
    if missing:
        heading += f"\n(no normalized norm where the margin is <= 0 or not measured: width {', '.join(map(str, missing))})"
    ax.set_title(heading, fontsize=9)
    ax.legend(lines, [line.get_label() for line in lines], fontsize=8)


def _learning_curves(found: dict[tuple[str, str, str], list[dict]], title: str, gaps: list[dict] | None = None) -> Figure:
    fig, axes = plt.subplots(1, 4 if gaps else 3, figsize=(18.5 if gaps else 14, 4))
    for (method, init, variant), epochs in sorted(found.items()):
        colour, style, extra = _VARIANTS.get(variant, (_COLOURS.get(method), _STYLES.get(init, "-"), ""))
        label = f"{_NAMES.get(method, method)}, {init}{extra}"
        alpha = epochs[0].get("alpha")
        if alpha not in (None, ""):
            label += f" (lr 1e-{alpha})"
        x = [r["epoch"] for r in epochs]
        for ax, (column, _) in zip(axes, _PANELS):
            ax.plot(x, [finite(r[column]) for r in epochs], style, color=colour, label=label)
    for ax, (_, name) in zip(axes, _PANELS):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    if gaps:
        _gap_panel(axes[3], gaps, found)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _gap_panel(ax, gaps: list[dict], found: dict) -> None:
    """Figure 3's invariance check at the step size of Path-SGD's balanced curve shown: per epoch, the relative gap
    of the training loss between the inits for Path-SGD and for SGD, and the control's (a rounding-level
    perturbation); a gap of 0 is drawn at a tenth of the rounding unit."""
    shown = found.get(("pathsgd", "balanced", ""))
    chosen = next((g for g in gaps if shown and g["alpha"] == shown[0]["alpha"]), gaps[0])
    unit = rounding_unit(chosen["precision"])
    for name, colour, style, label in (("pathsgd", "tab:green", "o-", "Path-SGD: balanced vs unbalanced"),
                                       ("control", "black", "x:", "control: balanced vs moved by one ulp"),
                                       ("sgd", "tab:red", "s--", "SGD: balanced vs unbalanced")):
        per_epoch = chosen[f"{name}_per_epoch"]
        if per_epoch:
            ax.plot(chosen["epochs"], [max(g, unit / 10) for g in per_epoch], style, color=colour, label=label)
    ax.axhline(unit, color="tab:gray", linewidth=0.8, label=f"rounding unit ({chosen['precision'] or '32-true'})")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("relative gap of the cross-entropy")
    ax.set_title(f"same curve up to rounding? (lr {chosen['lr']:g})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def to_tensorboard(log_dir: Path, tag: str, figure: Figure) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(log_dir))
    try:
        writer.add_figure(tag, figure, close=False)
    finally:
        writer.close()
