"""What each callback adds to a training epoch.

Two networks, each trained with SGD (momentum 0.9, batch 100) on synthetic MNIST-sized data in
memory (a shuffled ``TensorDataset``; validation and test sets a fifth of the training set each):

* ``paper``: the paper's MLP 784-4000-4000-10 (28x28 inputs);
* ``small``: one hidden layer of 64 units on 10x10 inputs (100 features), 10 classes: the width-64
  point of Figure 1, where Lightning's per-step overhead dominates the epoch.

For each network, fits without callbacks and with each callback in its default configuration
(``EpochErrorMonitor`` with the test set, so it measures train, val and test) run in one process,
in interleaved order, round after round. An epoch's time is the wall time from one
``on_train_epoch_start`` to the next (so it includes validation and every callback's epoch-end work);
the first epoch of each fit is a warm-up and is not counted. The table gives the median epoch time
and its ratio to the run without callbacks, and (steadier on a busy machine) the time spent inside
the callbacks' hooks per epoch (all epochs of a fit, fit start included, averaged), also as a share
of the epoch without callbacks. On a CUDA device it also gives the peak memory the
rescaling check adds on top of training, in units of the network's parameter memory; on any device
it reports, from a separate untimed fit, the peak memory one check holds (CUDA allocator or
``torch.profiler`` allocation events on the CPU).

    python benchmarks/callback_overhead.py                  # full size: 50,000 examples (a GPU, or patience)
    python benchmarks/callback_overhead.py --quick          # a couple of minutes on 2 CPU cores
    python benchmarks/callback_overhead.py --examples 5000 --paper-examples 1000 --rounds 3

Shrinking the data keeps every epoch a full pass (the error monitor's cost scales with the data, as
the training does), so the ratios stay those of a real epoch; limiting the batches of an epoch instead
would not.
"""

from __future__ import annotations

import os

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # keep the memory profiler's start/stop lines out of the table

import argparse
import logging
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pl_pathsgd.callbacks import EpochErrorMonitor, PathNormMonitor, RescalingInvarianceCheck, TensorBoardExtras

BATCH = 100
MIB = 1024 * 1024


class Classifier(pl.LightningModule):
    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x):
        return self.network(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


NETWORKS: dict[str, tuple[int, Callable[[], nn.Module]]] = {
    "paper": (784, lambda: nn.Sequential(nn.Linear(784, 4000), nn.ReLU(), nn.Linear(4000, 4000), nn.ReLU(),
                                         nn.Linear(4000, 10))),
    "small": (100, lambda: nn.Sequential(nn.Linear(100, 64), nn.ReLU(), nn.Linear(64, 10))),
}


def held_out_loader(data: dict[str, TensorDataset]) -> DataLoader:
    return DataLoader(data["test"], batch_size=BATCH)


CASES: dict[str, Callable[[dict[str, TensorDataset]], list[Callback]]] = {
    "none": lambda data: [],
    "PathNormMonitor": lambda data: [PathNormMonitor()],
    "RescalingInvarianceCheck": lambda data: [RescalingInvarianceCheck()],
    "EpochErrorMonitor": lambda data: [EpochErrorMonitor(val=True, test_dataloader=held_out_loader(data))],
    "TensorBoardExtras": lambda data: [TensorBoardExtras()],
    "all four": lambda data: [PathNormMonitor(), RescalingInvarianceCheck(),
                              EpochErrorMonitor(val=True, test_dataloader=held_out_loader(data)), TensorBoardExtras()],
}


class EpochTimer(Callback):
    """Wall time from one training epoch start to the next (or to the end of training)."""

    def __init__(self, device: torch.device):
        self.device, self.times, self._start = device, [], None

    def _tick(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        if self._start is not None:
            self.times.append(now - self._start)
        self._start = now

    def on_train_epoch_start(self, trainer, pl_module):
        self._tick()

    def on_train_end(self, trainer, pl_module):
        self._tick()


HOOKS = ("on_fit_start", "on_train_epoch_start", "on_train_batch_start", "on_train_batch_end",
         "on_validation_epoch_end", "on_validation_end", "on_train_epoch_end")


def time_hooks(callbacks: list[Callback], device: torch.device) -> list[float]:
    """Wrap the callbacks' per-epoch hooks so that the time spent in them is added to the returned cell."""
    spent = [0.0]
    for callback in callbacks:
        for name in HOOKS:
            hook = getattr(callback, name)

            def timed(*args, _hook=hook, **kwargs):
                start = time.perf_counter()
                result = _hook(*args, **kwargs)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                spent[0] += time.perf_counter() - start
                return result

            setattr(callback, name, timed)
    return spent


class PeakMemory(Callback):
    """CUDA memory the callbacks after it add at the end of an epoch, beyond what training held then."""

    def __init__(self):
        self.baseline, self.peaks = 0, []

    def on_train_epoch_end(self, trainer, pl_module):
        torch.cuda.synchronize()
        self.baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()


class PeakMemoryEnd(Callback):
    def __init__(self, start: PeakMemory):
        self.start = start

    def on_train_epoch_end(self, trainer, pl_module):
        torch.cuda.synchronize()
        self.start.peaks.append(torch.cuda.max_memory_allocated() - self.start.baseline)


def check_peak_memory(name: str, data: dict[str, TensorDataset], accelerator: str, device: torch.device,
                      root: str) -> float:
    """Peak memory one rescaling check holds beyond what it started with, in parameter-memory units.

    On CUDA from the allocator's peak; on the CPU from ``torch.profiler``'s allocation events (every
    allocation and free in time order). A separate, untimed fit: profiling slows the check down.
    """
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = Classifier(NETWORKS[name][1]())
    check = RescalingInvarianceCheck()
    measure, peaks = check.measure, []

    def profiled(trainer, pl_module):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
            result = measure(trainer, pl_module)
            peaks.append(torch.cuda.max_memory_allocated() - start)
            return result
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = measure(trainer, pl_module)
        events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                        key=lambda e: e.start_ns())
        held = peak = 0
        for event in events:
            held += int(event.nbytes())
            peak = max(peak, held)
        peaks.append(peak)
        return result

    check.measure = profiled
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, accelerator=accelerator, devices=1,
                         logger=TensorBoardLogger(root, name=f"{name}-memory"), callbacks=[check],
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(model, DataLoader(data["train"], batch_size=BATCH))
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return max(peaks) / parameter_bytes


def make_data(features: int, examples: int, seed: int = 0) -> dict[str, TensorDataset]:
    generator = torch.Generator().manual_seed(seed)
    sizes = {"train": examples, "val": max(examples // 5, BATCH), "test": max(examples // 5, BATCH)}
    teacher = torch.randn(features, 10, generator=generator)
    data = {}
    for split, n in sizes.items():
        x = torch.randn(n, features, generator=generator)
        data[split] = TensorDataset(x, (x @ teacher).argmax(1))
    return data


def fit_once(name: str, case: str, data: dict[str, TensorDataset], epochs: int, accelerator: str,
             device: torch.device, root: str) -> tuple[list[float], list[int], int]:
    features, build = NETWORKS[name]
    torch.manual_seed(0)
    model = Classifier(build())
    timer = EpochTimer(device)
    callbacks: list[Callback] = [timer]
    memory = PeakMemory() if device.type == "cuda" else None
    if memory is not None:
        callbacks.append(memory)
    observed = CASES[case](data)
    hook_time = time_hooks(observed, device)
    callbacks += observed
    if memory is not None:
        callbacks.append(PeakMemoryEnd(memory))
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator=accelerator, devices=1, logger=TensorBoardLogger(root, name=f"{name}-{case}"),
        callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        num_sanity_val_steps=0, log_every_n_steps=50,
    )
    trainer.fit(model, DataLoader(data["train"], batch_size=BATCH, shuffle=True),
                DataLoader(data["val"], batch_size=BATCH))
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return timer.times[1:], (memory.peaks if memory is not None else []), parameter_bytes, hook_time[0] / epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=50_000, help="training examples (an epoch is all of them)")
    parser.add_argument("--paper-examples", type=int, default=None,
                        help="training examples for the paper's MLP (default: --examples)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per fit (the first is not counted)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds over the cases")
    parser.add_argument("--networks", nargs="+", choices=sorted(NETWORKS), default=["small", "paper"])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--accelerator", default="auto", help="Lightning accelerator (cpu, gpu, auto)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's; on a busy machine 1 avoids oversubscription)")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes for a couple of minutes on 2 CPU cores: --examples 20000 "
                             "--paper-examples 1000 --epochs 2 --rounds 2 --threads 1")
    args = parser.parse_args()
    if args.quick:
        args.examples, args.paper_examples, args.epochs, args.rounds, args.threads = 20_000, 1_000, 2, 2, 1
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if "none" not in args.cases:
        args.cases = ["none", *args.cases]
    accelerator = args.accelerator if args.accelerator != "auto" else ("gpu" if torch.cuda.is_available() else "cpu")
    device = torch.device("cuda" if accelerator == "gpu" else "cpu")
    warnings.filterwarnings("ignore", message=r".*(does not have many workers|litlogger|LeafSpec|log_every_n_steps"
                                              r"|have no `val_dataloader`).*")
    for logger_name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(logger_name).setLevel(logging.ERROR)

    print(f"callback_overhead: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, lightning {pl.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""))
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    with tempfile.TemporaryDirectory() as root:
        for name in args.networks:
            examples = args.paper_examples if name == "paper" and args.paper_examples else args.examples
            data = make_data(NETWORKS[name][0], examples)
            times: dict[str, list[float]] = {case: [] for case in args.cases}
            peaks: dict[str, list[int]] = {case: [] for case in args.cases}
            hooks: dict[str, list[float]] = {case: [] for case in args.cases}
            parameter_bytes = 1
            for _ in range(args.rounds):
                for case in args.cases:
                    epoch_times, case_peaks, parameter_bytes, hook_seconds = fit_once(
                        name, case, data, args.epochs, accelerator, device, root)
                    times[case] += epoch_times
                    peaks[case] += case_peaks
                    hooks[case].append(hook_seconds)
            base = statistics.median(times["none"])
            print(f"\n{name}: {examples} training examples ({examples // BATCH} steps of {BATCH}), "
                  f"{parameter_bytes / MIB:.1f} MiB of parameters, {len(times['none'])} timed epochs per case")
            header = f"{'callbacks':26s} {'epoch s':>9s} {'ratio':>7s} {'in hooks s':>11s} {'hooks/epoch':>12s}"
            if device.type == "cuda":
                header += f" {'epoch-end peak / params':>24s}"
            print(header)
            for case in args.cases:
                median = statistics.median(times[case])
                in_hooks = statistics.median(hooks[case])
                line = f"{case:26s} {median:9.3f} {median / base:7.3f} {in_hooks:11.4f} {in_hooks / base:12.2%}"
                if device.type == "cuda" and peaks[case]:
                    line += f" {max(peaks[case]) / parameter_bytes:24.2f}"
                print(line)
            if "RescalingInvarianceCheck" in args.cases:
                ratio = check_peak_memory(name, data, accelerator, device, root)
                print(f"RescalingInvarianceCheck: one check holds at most {ratio:.2f}x the parameter memory beyond "
                      "what training holds (a copy, its gradients, SGD's momentum buffer)")
    print(f"\nload average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
