"""Time the MNIST DataModule: uncached build, cached build and one training epoch.

MNIST itself may not be downloadable where this runs, so the script writes
full-size synthetic IDX files (60,000 training and 10,000 test images of
random 28x28 pixels, the real file layout and sizes) into a temporary folder
and times

* ``prepare_data() + setup()`` with no cache (reads the IDX files through
  torchvision, downsamples, writes the cache),
* the same with the cache present (a fresh DataModule instance; this
  includes fingerprinting the source files, timed on its own too),
* one epoch over the training dataloader (batch size 100), with nothing
  done per batch, and the same epoch over a plain ``DataLoader`` on the
  same dataset with the default per-example collation for comparison,
* generating the addition problem's default splits (120,000 sequences of
  length 100),
* optionally (``--per-image``) the classic per-image pipeline, torchvision's
  ``MNIST`` with a ``ToTensor + Resize`` transform, on a slice of the data,
  extrapolated to one epoch.

Usage::

    python benchmarks/data_build.py                # 10x10 (the paper's width experiment)
    python benchmarks/data_build.py --downsample 0 # native 28x28
    python benchmarks/data_build.py --per-image
"""

import argparse
import os
import platform
import struct
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from pl_pathsgd.data import AdditionDataModule, MNISTDataModule
from pl_pathsgd.data.cache import file_digest


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">I", 0x800 | array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_synthetic_mnist(root: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    write_idx(raw / "train-images-idx3-ubyte", rng.integers(0, 256, (60000, 28, 28), dtype=np.uint8))
    write_idx(raw / "train-labels-idx1-ubyte", rng.integers(0, 10, 60000, dtype=np.uint8))
    write_idx(raw / "t10k-images-idx3-ubyte", rng.integers(0, 256, (10000, 28, 28), dtype=np.uint8))
    write_idx(raw / "t10k-labels-idx1-ubyte", rng.integers(0, 10, 10000, dtype=np.uint8))


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def epoch(loader) -> int:
    count = 0
    for x, _ in loader:
        count += len(x)
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--downsample", type=int, default=10, help="side length; 0 keeps 28x28")
    parser.add_argument("--repeats", type=int, default=3, help="repetitions of the warm and epoch timings")
    parser.add_argument("--per-image", action="store_true", help="also time a per-image transform pipeline")
    args = parser.parse_args()
    downsample = args.downsample or None

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), Python {platform.python_version()}")
    if hasattr(os, "getloadavg"):
        print("load average before the run (other processes compete for the cores): "
              + ", ".join(f"{v:.2f}" for v in os.getloadavg()))
    def addition():
        dm = AdditionDataModule(100, seed=0)
        dm.setup()
        return dm

    seconds, generated = timed(addition)
    size_mb = sum(t.numel() * t.element_size() for ds in (generated.train_dataset, generated.val_dataset,
                                                         generated.test_dataset) for t in ds.tensors) / 2**20
    print(f"addition problem, 120,000 sequences of length 100 ({size_mb:.0f} MiB): generated in {seconds:.2f} s")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        seconds, _ = timed(lambda: write_synthetic_mnist(root))
        print(f"wrote synthetic MNIST IDX files (60,000 + 10,000 images) in {seconds:.2f} s")

        def build():
            dm = MNISTDataModule(data_dir=tmp, downsample=downsample, seed=0)
            dm.prepare_data()
            dm.setup("fit")
            return dm

        cold, dm = timed(build)
        size_mb = dm.cache_path.stat().st_size / 2**20
        print(f"downsample={downsample}: input_shape={dm.input_shape}, splits "
              f"{len(dm.train_dataset)}/{len(dm.val_dataset)}/{len(dm.test_dataset)}, cache {size_mb:.1f} MiB")
        print(f"cold prepare_data()+setup() (read IDX, preprocess, write cache): {cold:.3f} s")
        warm = [timed(build)[0] for _ in range(args.repeats)]
        print(f"warm prepare_data()+setup() (fingerprint sources, load + check cache, split, normalise): "
              f"{min(warm):.3f} s (best of {args.repeats}; all: {', '.join(f'{w:.3f}' for w in warm)})")
        sources = sorted((root / "MNIST" / "raw").iterdir())
        hashing = [timed(lambda: [file_digest(p) for p in sources])[0] for _ in range(args.repeats)]
        print(f"  of which fingerprinting the {sum(p.stat().st_size for p in sources) / 2**20:.0f} MiB of source "
              f"files: {min(hashing) * 1000:.1f} ms (best of {args.repeats})")

        loader = dm.train_dataloader()
        times = [timed(lambda: epoch(loader))[0] for _ in range(args.repeats)]
        print(f"one epoch over train_dataloader() (batch 100, {len(loader)} batches): "
              f"{min(times) * 1000:.1f} ms (best of {args.repeats})")

        plain = DataLoader(dm.train_dataset, batch_size=100, shuffle=True)
        times = [timed(lambda: epoch(plain))[0] for _ in range(args.repeats)]
        print(f"same epoch with a plain DataLoader (per-example fetching and collation): "
              f"{min(times) * 1000:.1f} ms (best of {args.repeats})")

        if args.per_image:
            from torchvision import datasets, transforms

            transform = [transforms.ToTensor()]
            if downsample:
                transform.append(transforms.Resize(downsample, antialias=True))
            ds = datasets.MNIST(tmp, train=True, transform=transforms.Compose(transform))
            subset = torch.utils.data.Subset(ds, range(5000))
            seconds, _ = timed(lambda: epoch(DataLoader(subset, batch_size=100)))
            print(f"per-image torchvision pipeline (ToTensor+Resize), 5,000 images: {seconds:.2f} s "
                  f"-> about {seconds * 10:.1f} s per 50,000-image epoch")


if __name__ == "__main__":
    main()
