"""What a sweep cell costs through pl-pathsgd against a plain PyTorch loop of the same protocol.

Figure 1's protocol (one hidden layer, 10x10 inputs, SGD lr 0.1 momentum 0.5 with the paper's per-epoch
schedule, batch 100, balanced init, train/val/test error and loss from full passes after every epoch)
for a few epochs at each width, in one process, two ways:

* **pl-pathsgd**: one cell of ``python -m pl_pathsgd.experiments figure1`` — the runner's own path:
  LightningCLI, Trainer, ``EpochErrorMonitor``, CSV and TensorBoard loggers, the cell recorder — on
  MNIST-format files;
* **plain**: a minimal PyTorch loop over the same tensors (the DataModule's splits), with the same
  network, initialisation, optimizer, schedule and per-epoch full passes (in batches of 10,000).

Printed per width: the time of an epoch after the first (median; the first pays for one-time set-up
such as tracing and warm-up), the time of all epochs, the ratios pl-pathsgd / plain, and the targets
(1.3 at width 16, where the per-step overhead is everything; 1.1 at width 1024). A third measurement
shows what Lightning itself costs: the training loop alone (no validation, callbacks or loggers) of a
bare ``Trainer`` with the same classifier and batches, against the plain loop's training part. The data are synthetic
MNIST-shaped files (60,000 + 10,000 images of 28x28, written once into ``--data``): the cost does not
depend on the pixel values.

    python benchmarks/sweep_overhead.py                      # widths 16 and 1024, 4 epochs
    python benchmarks/sweep_overhead.py --epochs 6 --rounds 2
    python benchmarks/sweep_overhead.py --threads 1          # on a loaded machine
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import struct
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pl_pathsgd.experiments import runner
from pl_pathsgd.experiments.cell import read_result
from pl_pathsgd.models import classifier_network
from pl_pathsgd.paths import balanced_init_
from pl_pathsgd.schedules import PaperSchedule

TARGETS = {16: 1.3, 1024: 1.1}
EVAL_BATCH = 10_000
SEED = 0


def write_mnist_files(root: Path, seed: int = 0) -> None:
    """MNIST-format IDX files (unpacked) of the official sizes: noisy class templates, a quarter of the labels
    random, so that the loss stays well above 0 as on real data (a loss near 0 fills the gradients with
    subnormal floats, which slow every CPU kernel down many times and would say nothing about overhead)."""
    raw = root / "MNIST" / "raw"
    if (raw / "t10k-labels-idx1-ubyte").is_file():
        return
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    templates = rng.uniform(64, 192, (10, 28, 28))
    for prefix, count in (("train", 60_000), ("t10k", 10_000)):
        classes = rng.integers(0, 10, count)
        images = np.clip(templates[classes] + rng.normal(0, 120, (count, 28, 28)), 0, 255).astype(np.uint8)
        labels = np.where(rng.random(count) < 0.25, rng.integers(0, 10, count), classes).astype(np.uint8)
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">I", 0x800 | array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + np.ascontiguousarray(array).tobytes())


def through_pl_pathsgd(data_dir: Path, width: int, epochs: int, out: Path) -> list[float]:
    """Epoch end times (seconds since the cell started) of one figure-1 cell run by the sweep runner."""
    runner.run(["figure1", "--dataset", "mnist", "--out", str(out), "--widths", str(width),
                f"--trainer.max_epochs={epochs}", f"--data.init_args.data_dir={data_dir}"])
    record = read_result(out / "cells" / f"width{width:05d}")
    return [row["seconds"] for row in record["epochs"]]


def splits_of(data_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The figure-1 DataModule's train/val/test tensors (the same the cell trains on)."""
    from pl_pathsgd.data import MNISTDataModule

    data = MNISTDataModule(data_dir=str(data_dir), batch_size=100, val_size=10_000, downsample=10, seed=SEED)
    data.prepare_data()
    data.setup("fit")
    return {name: tuple(getattr(data, f"{name}_dataset").tensors) for name in ("train", "val", "test")}


def plain_loop(splits: dict, width: int, epochs: int) -> tuple[list[float], list[float]]:
    """Epoch end times of the same protocol as a minimal PyTorch loop, and the times of its training loops."""
    started = time.perf_counter()
    network = classifier_network("mlp", (100,), 10, hidden=[width])
    with torch.no_grad():
        balanced_init_(network, seed=SEED)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1, momentum=0.5)
    schedule = PaperSchedule(optimizer)
    x, y = splits["train"]
    order_generator = torch.Generator().manual_seed(SEED)
    ends, training = [], []
    for _ in range(epochs):
        epoch_start = time.perf_counter()
        network.train()
        order = torch.randperm(len(x), generator=order_generator)
        for start in range(0, len(x), 100):
            batch = order[start:start + 100]
            loss = F.cross_entropy(network(x[batch]), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        schedule.step()
        training.append(time.perf_counter() - epoch_start)
        network.eval()
        with torch.no_grad():
            for inputs, targets in splits.values():
                loss_sum, errors = torch.zeros(()), torch.zeros(())
                for start in range(0, len(inputs), EVAL_BATCH):
                    logits = network(inputs[start:start + EVAL_BATCH])
                    target = targets[start:start + EVAL_BATCH]
                    loss_sum += F.cross_entropy(logits, target, reduction="sum")
                    errors += (logits.argmax(1) != target).sum()
                float(loss_sum / len(inputs)), float(errors / len(inputs))  # read, as a logger would
        ends.append(time.perf_counter() - started)
    return ends, training


class _BatchesInOrder(torch.utils.data.Dataset):
    """Whole mini-batches of a tensor pair in a random order per epoch (for a DataLoader with batch_size=None)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int = 100):
        self.x, self.y, self.batch_size = x, y, batch_size
        self.order = torch.randperm(len(x))

    def __len__(self) -> int:
        return -(-len(self.x) // self.batch_size)

    def __getitem__(self, index: int):
        if index == 0:
            self.order = torch.randperm(len(self.x))
        rows = self.order[index * self.batch_size:(index + 1) * self.batch_size]
        return self.x[rows], self.y[rows]


def lightning_floor(splits: dict, width: int, epochs: int) -> list[float]:
    """Times of the training loops of a bare Trainer (no validation, callbacks, loggers) with the classifier."""
    import functools

    import lightning.pytorch as pl

    from pl_pathsgd.module import PathSGDClassifier

    class EpochTimes(pl.Callback):
        def __init__(self):
            self.times: list[float] = []

        def on_train_epoch_start(self, trainer, pl_module):
            self.started = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):
            self.times.append(time.perf_counter() - self.started)

    model = PathSGDClassifier(input_shape=(100,), num_classes=10, hidden=[width], init_seed=SEED,
                              optimizer=functools.partial(torch.optim.SGD, lr=0.1, momentum=0.5),
                              lr_scheduler=PaperSchedule)
    timer = EpochTimes()
    trainer = pl.Trainer(max_epochs=epochs, logger=False, callbacks=[timer], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0, accelerator="cpu", devices=1)
    trainer.fit(model, torch.utils.data.DataLoader(_BatchesInOrder(*splits["train"]), batch_size=None))
    return timer.times


def per_epoch(ends: list[float]) -> float:
    """Median time of an epoch after the first."""
    steps = [b - a for a, b in zip(ends, ends[1:])]
    return statistics.median(steps) if steps else ends[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 1024])
    parser.add_argument("--epochs", type=int, default=4, help="epochs per run (at least 2)")
    parser.add_argument("--rounds", type=int, default=1, help="repetitions of each width, medians reported")
    parser.add_argument("--data", type=Path, help="folder for the synthetic MNIST files (default: a temporary one)")
    parser.add_argument("--threads", type=int, help="PyTorch threads for both (default: PyTorch's choice); on a "
                        "machine whose cores are busy with other work, 1 avoids threads waiting for each other")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the first epoch is not a steady-state one)")
    with tempfile.TemporaryDirectory(prefix="sweep-overhead-") as scratch:
        data_dir = args.data or Path(scratch) / "data"
        write_mnist_files(data_dir)
        splits = splits_of(data_dir)
        results: dict[int, dict[str, list]] = {w: {"cell": [], "plain": [], "floor": []} for w in args.widths}
        for round_ in range(args.rounds):
            for width in args.widths:  # interleaved, so that a change of load touches all three
                out = Path(scratch) / f"sweep-{round_}-{width}"
                results[width]["cell"].append(through_pl_pathsgd(data_dir, width, args.epochs, out))
                results[width]["plain"].append(plain_loop(splits, width, args.epochs))
                results[width]["floor"].append(lightning_floor(splits, width, args.epochs))
    print()
    print(f"Figure 1 protocol, {args.epochs} epochs of 50,000 examples (batch 100) + full passes over "
          f"50,000/10,000/10,000; {args.rounds} round(s); torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, {platform.processor() or platform.machine()}, load average "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    print(f"{'width':>6} | {'epoch, pl-pathsgd':>17} | {'epoch, plain':>12} | {'ratio':>5} | {'target':>6} | "
          f"{'all epochs':>10} | {'plain':>7} | {'ratio':>5} || {'train loop, bare Trainer':>24} | "
          f"{'plain':>7} | {'ratio':>5}")
    for width in args.widths:
        cell = statistics.median(per_epoch(e) for e in results[width]["cell"])
        plain = statistics.median(per_epoch(ends) for ends, _ in results[width]["plain"])
        cell_all = statistics.median(e[-1] for e in results[width]["cell"])
        plain_all = statistics.median(ends[-1] for ends, _ in results[width]["plain"])
        floor = statistics.median(statistics.median(t[1:]) for t in results[width]["floor"])
        plain_train = statistics.median(statistics.median(t[1:]) for _, t in results[width]["plain"])
        target = TARGETS.get(width)
        print(f"{width:>6} | {cell:>15.3f} s | {plain:>10.3f} s | {cell / plain:>5.2f} | "
              f"{'<= ' + str(target) if target else '-':>6} | {cell_all:>8.2f} s | {plain_all:>5.2f} s | "
              f"{cell_all / plain_all:>5.2f} || {floor:>22.3f} s | {plain_train:>5.3f} s | {floor / plain_train:>5.2f}")


if __name__ == "__main__":
    main()
