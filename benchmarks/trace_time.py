"""How long tracing a network for the path geometry takes (once per network and input shape).

    python benchmarks/trace_time.py [--repeats 3]

For torchvision's ResNet-18 and VGG-11 (BatchNorm frozen, 3x224x224 inputs) it prints the time of
torch.export with the package's rewrite of simple in-place operations, the same with torch's general
functionalization forced instead, the whole ``PathGraph`` construction (export, support check and one
check evaluation of the twin at 224x224) and, for comparison, ``torch.fx.symbolic_trace`` (which
does not see hooks, keeps layers as leaves and misses in-place writes).  CPU time of this process (``time.process_time``),
so other jobs on the machine disturb it less; medians over the repeats.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision

import pl_pathsgd as P
from pl_pathsgd.paths import graph as graph_module
from pl_pathsgd.paths import tracing


def cpu_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    tracing.export_program(torch.nn.Linear(2, 2), (2,))  # warm up torch.export's own imports
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; CPU seconds, median of {args.repeats}")
    print(f"{'network':10} {'export + rewrite':>17} {'export + functionalize':>22} {'whole trace()':>14} "
          f"{'fx.symbolic_trace':>18}")
    for name in ("resnet18", "vgg11"):
        plain = getattr(torchvision.models, name)()
        model = P.freeze_batchnorm(getattr(torchvision.models, name)())
        shape = (3, 224, 224)
        rewritten = cpu_seconds(lambda: tracing.export_program(model, shape), args.repeats)
        rewrite = tracing._functionalize_in_place
        tracing._functionalize_in_place = lambda graph: False
        try:
            general = cpu_seconds(lambda: tracing.export_program(model, shape), args.repeats)
        finally:
            tracing._functionalize_in_place = rewrite
        whole = cpu_seconds(lambda: graph_module.PathGraph(model, shape), args.repeats)  # + support check, one twin
        # fx on the unfrozen model: fx keeps BatchNorm as a leaf, and cannot trace a frozen one's input check
        fx = cpu_seconds(lambda: torch.fx.symbolic_trace(plain), args.repeats)
        print(f"{name:10} {rewritten:17.2f} {general:22.2f} {whole:14.2f} {fx:18.3f}")

if __name__ == "__main__":
    main()
