"""Figure 2(b) and 2(c) of the paper: one step of SGD and of Path-SGD on two equivalent networks.

Two networks that are node-wise rescalings of each other compute the same function.  After one step of
SGD they no longer do; after one step of Path-SGD they still do (Theorem 5.1).  The paper's setting: zero
thresholds (no biases), step size 1, and the gradient of the loss with respect to the output given:

* (b) a chain x -> h -> y with input x = 1 and output gradient delta = -1, given balanced (weights 1, 1) and
  rescaled (0.1, 10: the hidden unit's incoming weight multiplied by 0.1, its outgoing one divided by 0.1);
* (c) two inputs, two hidden units, two outputs, all weights 1, with input x = (1, 1) and output gradient
  delta = (-1, -1), given balanced and with the first hidden unit rescaled by 10.

The steps are taken by the real optimizers (``torch.optim.SGD`` and ``pl_pathsgd.PathSGD``, p = 2, no
momentum) on ``nn.Linear`` layers without bias and a ReLU, in float64.  ``docs/capacity.md`` works the
same numbers out by hand.

    python -m pl_pathsgd.experiments figure2b --out docs/figures
    python -m pl_pathsgd.experiments.worked_examples --out docs/figures    # the same
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from pl_pathsgd.optim import PathSGD

OPTIMIZERS = ("sgd", "pathsgd")
NAMES = {"sgd": "SGD", "pathsgd": "Path-SGD"}


@dataclass(frozen=True)
class Example:
    """A worked example: the input, the output gradient, and the networks (layer weight matrices, (out, in))."""

    name: str
    title: str
    x: tuple[float, ...]
    delta: tuple[float, ...]
    networks: dict[str, tuple[tuple[tuple[float, ...], ...], ...]]


EXAMPLES = {
    "b": Example(
        name="b", title="Figure 2(b): x = 1, delta = -1, step size 1", x=(1.0,), delta=(-1.0,),
        networks={"balanced": (((1.0,),), ((1.0,),)),
                  "rescaled": (((0.1,),), ((10.0,),))},
    ),
    "c": Example(
        name="c", title="Figure 2(c): x = (1, 1), delta = (-1, -1), step size 1", x=(1.0, 1.0), delta=(-1.0, -1.0),
        networks={"balanced": (((1.0, 1.0), (1.0, 1.0)), ((1.0, 1.0), (1.0, 1.0))),
                  "rescaled": (((10.0, 10.0), (1.0, 1.0)), ((0.1, 1.0), (0.1, 1.0)))},
    ),
}


@dataclass
class Outcome:
    """One network before and after one step of each optimizer: weights and the output at the example's x."""

    weights: list[Tensor]
    output: Tensor
    after: dict[str, tuple[list[Tensor], Tensor]]  # optimizer -> (weights, output)


def network(weights) -> nn.Sequential:
    """Linear layers without bias (zero thresholds) with a ReLU between them, in float64."""
    layers: list[nn.Module] = []
    for index, matrix in enumerate(weights):
        matrix = torch.as_tensor(matrix, dtype=torch.float64)
        linear = nn.Linear(matrix.shape[1], matrix.shape[0], bias=False, dtype=torch.float64)
        with torch.no_grad():
            linear.weight.copy_(matrix)
        layers += [linear] if index == 0 else [nn.ReLU(), linear]
    return nn.Sequential(*layers)


def one_step(weights, x, delta, optimizer: str) -> tuple[list[Tensor], Tensor]:
    """The weights after one step (step size 1) given the output gradient ``delta`` at input ``x``, and the
    new network's output at ``x``."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r}: choose one of {OPTIMIZERS}")
    net = network(weights)
    step = torch.optim.SGD(net.parameters(), lr=1.0) if optimizer == "sgd" else PathSGD(net.parameters(), lr=1.0,
                                                                                         model=net)
    inputs = torch.tensor([x], dtype=torch.float64)
    net(inputs).backward(torch.tensor([delta], dtype=torch.float64))  # dL/dy = delta
    step.step()
    with torch.no_grad():
        return [layer.weight.detach().clone() for layer in _linears(net)], net(inputs)[0]


def _linears(net: nn.Sequential) -> list[nn.Linear]:
    return [layer for layer in net if isinstance(layer, nn.Linear)]


def run(example: Example) -> dict[str, Outcome]:
    """Every network of ``example`` before and after one step of SGD and of Path-SGD."""
    outcomes = {}
    for label, weights in example.networks.items():
        net = network(weights)
        with torch.no_grad():
            output = net(torch.tensor([example.x], dtype=torch.float64))[0]
        after = {name: one_step(weights, example.x, example.delta, name) for name in OPTIMIZERS}
        outcomes[label] = Outcome([layer.weight.detach().clone() for layer in _linears(net)], output, after)
    return outcomes


def same_function(first: list[Tensor], second: list[Tensor], inputs: int) -> bool:
    """Whether two networks agree (to 1e-12, relatively) on a grid of inputs with positive and negative entries."""
    grid = torch.cartesian_prod(*[torch.tensor([-1.5, -0.25, 0.5, 1.0, 2.0], dtype=torch.float64)] * inputs)
    grid = grid.reshape(-1, inputs)
    with torch.no_grad():
        a, b = network(first)(grid), network(second)(grid)
    return bool(((a - b).abs() <= 1e-12 * a.abs().max().clamp_min(1e-300)).all())


# ----------------------------------------------------------------------------- printing


def _number(value: float) -> str:
    return f"{value:.6g}"


def _matrix(tensor: Tensor) -> str:
    rows = ["[" + ", ".join(_number(v) for v in row) + "]" for row in tensor.tolist()]
    return rows[0] if len(rows) == 1 else "[" + ", ".join(rows) + "]"


def _vector(tensor: Tensor) -> str:
    return "(" + ", ".join(_number(v) for v in tensor.tolist()) + ")"


def report(example: Example, outcomes: dict[str, Outcome]) -> str:
    """A text table: each network's weights and output before and after one step of each optimizer."""
    lines = [example.title]
    for label, outcome in outcomes.items():
        layers = "  ".join(f"W{i + 1} = {_matrix(w)}" for i, w in enumerate(outcome.weights))
        lines.append(f"  {label:9s} before:         {layers}   y = {_vector(outcome.output)}")
        for name, (weights, output) in outcome.after.items():
            layers = "  ".join(f"W{i + 1} = {_matrix(w)}" for i, w in enumerate(weights))
            lines.append(f"  {label:9s} after {NAMES[name]:9s} {layers}   y = {_vector(output)}")
    for name in OPTIMIZERS:
        outputs = [outcome.after[name][1] for outcome in outcomes.values()]
        networks = [outcome.after[name][0] for outcome in outcomes.values()]
        same = all(same_function(networks[0], other, len(example.x)) for other in networks[1:])
        verdict = "the same function" if same else "different functions"
        lines.append(f"  after one {NAMES[name]} step the equivalent networks compute {verdict}; at x: "
                     + " vs ".join(_vector(o) for o in outputs))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- drawing


def draw(results: dict[str, tuple[Example, dict[str, Outcome]]], path: Path) -> Path:
    """One row per network of each example, columns: before, after SGD, after Path-SGD; saved to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(example, label, outcome) for example, outcomes in results.values() for label, outcome in outcomes.items()]
    figure, axes = plt.subplots(len(rows), 3, figsize=(11, 2.6 * len(rows)), squeeze=False)
    for row, (example, label, outcome) in enumerate(rows):
        states = [("before", outcome.weights, outcome.output)] + \
                 [(f"after one {NAMES[name]} step", *outcome.after[name]) for name in OPTIMIZERS]
        for column, (heading, weights, output) in enumerate(states):
            axis = axes[row][column]
            _draw_network(axis, weights, example.x, output)
            axis.set_title(f"({example.name}) {label}, {heading}", fontsize=9)
    figure.suptitle("One step from equivalent networks: SGD moves them apart, Path-SGD keeps them equivalent "
                    "(x and the output gradient as in the paper, step size 1)", fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path


def _draw_network(axis, weights: list[Tensor], x, output: Tensor) -> None:
    widths = [weights[0].shape[1]] + [w.shape[0] for w in weights]
    positions = [[(layer, (width - 1) / 2 - unit) for unit in range(width)] for layer, width in enumerate(widths)]
    for layer, matrix in enumerate(weights):
        for target, row in enumerate(matrix.tolist()):
            for source, value in enumerate(row):
                (x0, y0), (x1, y1) = positions[layer][source], positions[layer + 1][target]
                axis.plot([x0, x1], [y0, y1], color="0.55", linewidth=1, zorder=1)
                fraction = 0.3 if len(widths[layer + 1:layer + 2]) and widths[layer + 1] > 1 else 0.5
                axis.text(x0 + (x1 - x0) * fraction, y0 + (y1 - y0) * fraction, _number(value), fontsize=8,
                          ha="center", va="center", zorder=3,
                          bbox=dict(boxstyle="round,pad=0.15", facecolor="white", edgecolor="none"))
    labels = [[f"x={_number(v)}" for v in x]] + [["h"] * w for w in widths[1:-1]] + \
             [[f"y={_number(v)}" for v in output.tolist()]]
    for layer, column in enumerate(positions):
        for (px, py), text in zip(column, labels[layer]):
            axis.scatter([px], [py], s=500, color="tab:blue" if layer in (0, len(widths) - 1) else "tab:orange",
                         zorder=2)
            axis.text(px, py - 0.42, text, ha="center", va="top", fontsize=8)
    axis.set_xlim(-0.4, len(widths) - 0.6)
    axis.set_ylim(-max(widths) / 2 - 0.5, max(widths) / 2)
    axis.axis("off")


# ----------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None,
         prog: str = "python -m pl_pathsgd.experiments.worked_examples") -> dict[str, tuple[Example, dict[str, Outcome]]]:
    """Print the worked examples and, unless ``--no-figure``, draw them into ``--out`` (``figure2bc.png``);
    ``python -m pl_pathsgd.experiments figure2b`` runs this too."""
    parser = argparse.ArgumentParser(prog=prog,
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for figure2bc.png (default: .)")
    parser.add_argument("--no-figure", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if not args.no_figure and args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file; give a folder for figure2bc.png (it is created if missing)")
    results = {name: (example, run(example)) for name, example in EXAMPLES.items()}
    for example, outcomes in results.values():
        print(report(example, outcomes), flush=True)
    if not args.no_figure:
        try:
            path = draw(results, args.out / "figure2bc.png")
        except ModuleNotFoundError as error:
            if error.name != "matplotlib":
                raise
            raise SystemExit("drawing needs matplotlib: pip install 'pl-pathsgd[figures]' (or pass --no-figure)") from None
        print(f"wrote {path}", flush=True)
    return results


if __name__ == "__main__":
    main()
