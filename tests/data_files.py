"""Writers of small dataset files in each dataset's real on-disk format, for the data tests.

MNIST: big-endian IDX files (optionally gzipped, as served); CIFAR: Python pickle batches plus the
meta file; SVHN: MATLAB files with ``X`` of shape 32x32x3xN and labels 1..10. They are read by the
same torchvision code as the real files. They cannot match the md5 sums of the official releases,
so tests pass ``custom_data=True`` unless they test the integrity checks.
"""

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np

MNIST_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def idx_bytes(array: np.ndarray) -> bytes:
    """A uint8 array as a big-endian IDX file (magic 2051 for 3-d images, 2049 for 1-d labels)."""
    header = struct.pack(">I", 0x800 | array.ndim) + b"".join(struct.pack(">I", dim) for dim in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    """Write ``array`` as ``path`` (or as ``path.gz``, gzipped); return the file written."""
    data = idx_bytes(array)
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def mnist_arrays(n_train: int = 300, n_test: int = 100, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }


def make_mnist(root: Path, n_train: int = 300, n_test: int = 100, gz: bool = False, seed: int = 1) -> dict:
    """Write MNIST's four files into ``root/MNIST/raw``; return the arrays by (unpacked) file name."""
    data = mnist_arrays(n_train, n_test, seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name, array in data.items():
        write_idx(raw / name, array, gz=gz)
    return data


def make_cifar(root: Path, hundred: bool = False, n_train: int = 200, n_test: int = 50, seed: int = 2) -> dict:
    """CIFAR-10's five training batches and test batch, or CIFAR-100's train/test files, plus the meta file."""
    rng = np.random.default_rng(seed)
    classes, label_key = (100, "fine_labels") if hundred else (10, "labels")
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True, exist_ok=True)
    train_names = ["train"] if hundred else [f"data_batch_{i}" for i in range(1, 6)]
    sizes = {name: n_train // len(train_names) for name in train_names}
    sizes["test" if hundred else "test_batch"] = n_test
    out = {}
    for filename, n in sizes.items():
        entry = {
            "batch_label": filename,
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            label_key: rng.integers(0, classes, n).tolist(),
            "filenames": [f"img_{i}.png" for i in range(n)],
        }
        if hundred:
            entry["coarse_labels"] = rng.integers(0, 20, n).tolist()
        with open(folder / filename, "wb") as handle:
            pickle.dump(entry, handle)
        out[filename] = entry
    if hundred:
        meta_name, meta = "meta", {"fine_label_names": [f"c{i}" for i in range(100)]}
    else:
        meta_name, meta = "batches.meta", {"label_names": [f"c{i}" for i in range(10)], "num_vis": 3072}
    with open(folder / meta_name, "wb") as handle:
        pickle.dump(meta, handle)
    return out


def make_svhn(root: Path, n_train: int = 120, n_test: int = 60, n_extra: int = 0, seed: int = 3) -> dict:
    """SVHN's MATLAB files: ``X`` is H x W x C x N uint8, ``y`` is N x 1 with 10 standing for the digit 0."""
    import scipy.io

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    sizes = {"train": n_train, "test": n_test}
    if n_extra:
        sizes["extra"] = n_extra
    for split, n in sizes.items():
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = rng.integers(1, 11, (n, 1)).astype(np.uint8)
        scipy.io.savemat(root / f"{split}_32x32.mat", {"X": x, "y": y})
        out[split] = (x, y)
    return out
