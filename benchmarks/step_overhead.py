"""What Path-SGD costs on top of SGD: step time, path-scaling time and memory.

One process. For every case, ``torch.optim.SGD(momentum=0.9)`` and ``PathSGD(momentum=0.9)`` take
turns on the same model and the same batch (each its own momentum buffers; lr = 0, see ``LR``). A *step*
is ``zero_grad`` + forward + loss + backward + ``optimizer.step()``. After warm-up, the two are
timed in alternating order, round after round; the table gives the median step time of each, the
median of the per-round ratios PathSGD/SGD (robust to a machine whose load drifts), and the time
of the path-scaling computation alone (one twin forward + backward, interleaved with the steps),
which depends on the weights only and so should not grow with the batch.

Memory, from ``torch.profiler`` (``profile_memory=True``) around one ``optimizer.step()``:
``step peak`` is the largest amount of memory the step holds at once beyond what it started with,
``largest alloc`` its largest single allocation; ``state`` is what each optimizer keeps between
steps (momentum buffers, plus PathSGD's reused scratch buffer).

    python benchmarks/step_overhead.py                 # full run (a few minutes on 2 cores)
    python benchmarks/step_overhead.py --quick         # fewer rounds
    python benchmarks/step_overhead.py --device cuda   # on a GPU: adds ResNet-18 (batch 128) and counts kernels

On a GPU every timing is bracketed by ``torch.cuda.synchronize()``, memory is CUDA's peak allocation
during the step, and ``kernels`` counts the CUDA kernels one ``optimizer.step()`` launches (from
``torch.profiler``): SGD launches a handful whatever the depth; PathSGD's count grows with the number
of layers, which makes small, deep networks launch-bound on a GPU.
"""

from __future__ import annotations

import os

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # keep the memory profiler's start/stop lines out of the table

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from pl_pathsgd import PathSGD
from pl_pathsgd.paths import fast_linear
from pl_pathsgd.paths.norms import scaling_of

MIB = 1024 * 1024
# The two optimizers take turns on the same weights. With lr = 0 every operation of both steps
# still runs (nothing in SGD or PathSGD skips work for lr = 0), but the weights keep their initial
# values, so both always see the same numbers and nothing can diverge (Path-SGD on a deep net with
# PyTorch's default init takes huge steps) or slow down on non-finite or subnormal values.
LR = 0.0


def paper_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 4000), nn.ReLU(), nn.Linear(4000, 4000), nn.ReLU(), nn.Linear(4000, 10))


def cifar_conv() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(64 * 8 * 8, 10),
    )


def resnet18() -> nn.Module:
    import torchvision

    from pl_pathsgd import freeze_batchnorm

    return freeze_batchnorm(torchvision.models.resnet18())


def deep_narrow_mlp(depth: int = 20, width: int = 256) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(784, width), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


# name, builder, input shape (one example), batch size
CASES = [
    ("MLP 784-4000-4000-10", paper_mlp, (784,), 10),
    ("MLP 784-4000-4000-10", paper_mlp, (784,), 100),
    ("MLP 784-4000-4000-10", paper_mlp, (784,), 1000),
    ("conv 3x32x32 (max+avg pool)", cifar_conv, (3, 32, 32), 100),
    ("MLP depth 20 width 256", deep_narrow_mlp, (784,), 100),
]
CUDA_CASES = [
    ("MLP 784-4000-4000-10", paper_mlp, (784,), 100),
    ("MLP 784-4000-4000-10", paper_mlp, (784,), 1000),
    ("MLP depth 5 width 256", lambda: deep_narrow_mlp(5), (784,), 100),
    ("MLP depth 20 width 256", deep_narrow_mlp, (784,), 100),
    ("ResNet-18 3x224x224", resnet18, (3, 224, 224), 128),
]


def make_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step


def timed(fn: Callable[[], object]) -> float:
    synchronize()
    start = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - start


DEVICE = torch.device("cpu")


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def kernel_launches(model, optimizer, x, y) -> int:
    """CUDA kernels launched by one optimizer.step() (0 on the CPU)."""
    if DEVICE.type != "cuda":
        return 0
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        optimizer.step()
        synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def step_memory(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
    """(peak bytes held at once beyond the start, largest single allocation) during one optimizer.step()
    (on a GPU: CUDA's peak allocation beyond the start, and no largest allocation)."""
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    if DEVICE.type == "cuda":
        synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        optimizer.step()
        synchronize()
        return torch.cuda.max_memory_allocated() - start, 0
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        optimizer.step()
    sizes = allocation_sizes(prof)
    current = peak = largest = 0
    for size in sizes:
        current += size
        peak = max(peak, current)
        largest = max(largest, size)
    return peak, largest


def allocation_sizes(prof) -> list[int]:
    """Signed sizes of every allocation (+) and free (-) in time order."""
    try:
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        events.sort(key=lambda e: e.start_ns())
        return [int(e.nbytes()) for e in events]
    except AttributeError:  # older/newer profiler internals: per-operator totals
        return [int(e.self_cpu_memory_usage) for e in prof.events()]


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))


def run_case(name, build, shape, batch, rounds, warmup) -> dict:
    fast_linear.release_scratch()  # count only this case's scratch buffer
    torch.manual_seed(0)
    model = build().to(DEVICE)  # one model: both optimizers step the same parameters, so memory layout is shared
    sgd = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    path = PathSGD(model.parameters(), lr=LR, momentum=0.9, model=model, input_shape=shape)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, *shape, generator=generator).to(DEVICE)
    y = torch.randint(10, (batch,), generator=generator).to(DEVICE)
    sgd_step, path_step = make_step(model, sgd, x, y), make_step(model, path, x, y)

    def geometry() -> None:
        scaling_of(path.graph, path.p, torch.float32)

    for _ in range(warmup):
        sgd_step(), path_step(), geometry()
    sgd_times, path_times, ratios, geometry_times = [], [], [], []
    for i in range(rounds):
        if i % 2:
            t_path, t_sgd = timed(path_step), timed(sgd_step)
        else:
            t_sgd, t_path = timed(sgd_step), timed(path_step)
        geometry_times.append(timed(geometry))
        sgd_times.append(t_sgd)
        path_times.append(t_path)
        ratios.append(t_path / t_sgd)
    sgd_peak, sgd_largest = step_memory(model, sgd, x, y)
    path_peak, path_largest = step_memory(model, path, x, y)
    sgd_kernels, path_kernels = kernel_launches(model, sgd, x, y), kernel_launches(model, path, x, y)
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        print(f"warning: {name} (batch {batch}) diverged; its timings involve non-finite numbers")
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    largest_param = max(p.numel() * p.element_size() for p in model.parameters())
    return dict(
        name=name, batch=batch, params=params, largest_param=largest_param,
        sgd=statistics.median(sgd_times), path=statistics.median(path_times), ratio=statistics.median(ratios),
        geometry=statistics.median(geometry_times), geometry_dtype=path.last_geometry_dtype,
        sgd_peak=sgd_peak, path_peak=path_peak, sgd_largest=sgd_largest, path_largest=path_largest,
        sgd_state=state_bytes(sgd), path_state=state_bytes(path) + fast_linear.scratch_bytes(),
        min_ratio=min(path_times) / min(sgd_times), sgd_kernels=sgd_kernels, path_kernels=path_kernels,
    )


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (5 instead of 15) and one warm-up step")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per case (default 15, or 5 with --quick)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave as is)")
    parser.add_argument("--only", type=str, default=None, help="run only cases whose name contains this text")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = args.rounds or (5 if args.quick else 15)
    warmup = 1 if args.quick else 3
    where = torch.cuda.get_device_name() if DEVICE.type == "cuda" else cpu_name()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; device {DEVICE}: {where}")
    print(f"rounds {rounds}, warm-up {warmup}; load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    header = (f"{'model':<29} {'batch':>5} {'SGD ms':>8} {'PathSGD ms':>10} {'ratio':>6} {'(mins)':>6} {'scaling ms':>10} "
              f"{'step peak MiB SGD/Path':>23} {'largest alloc MiB':>18} {'state MiB SGD/Path':>19} {'params MiB':>10}"
              f"{' kernels SGD/Path' if DEVICE.type == 'cuda' else ''}")
    print(header)
    print("-" * len(header))
    for name, build, shape, batch in (CUDA_CASES if DEVICE.type == "cuda" else CASES):
        if args.only and args.only not in name:
            continue
        r = run_case(name, build, shape, batch, rounds, warmup)
        print(f"{r['name']:<29} {r['batch']:>5} {1e3 * r['sgd']:>8.1f} {1e3 * r['path']:>10.1f} {r['ratio']:>6.3f} {r['min_ratio']:>6.3f} "
              f"{1e3 * r['geometry']:>10.2f} {r['sgd_peak'] / MIB:>11.2f} / {r['path_peak'] / MIB:<9.2f} "
              f"{r['sgd_largest'] / MIB:>7.2f} / {r['path_largest'] / MIB:<8.2f} "
              f"{r['sgd_state'] / MIB:>8.1f} / {r['path_state'] / MIB:<8.1f} {r['params'] / MIB:>10.1f}"
              + (f" {r['sgd_kernels']:>7} / {r['path_kernels']:<6}" if DEVICE.type == "cuda" else ""), flush=True)
    print(f"load average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print("ratio: median over rounds of PathSGD step / SGD step of the same round (alternating order); "
          "(mins): fastest PathSGD step / fastest SGD step.\nscaling: the path-scaling computation alone "
          "(float32, as PathSGD does it), timed between the steps; it never sees the batch.")


if __name__ == "__main__":
    main()
