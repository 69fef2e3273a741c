"""Tests of pl_pathsgd.data.

The vision DataModules are exercised on tiny files written in each
dataset's real on-disk format (MNIST IDX files, CIFAR pickle batches, SVHN
MATLAB files) and read through torchvision, exactly as for the real data,
with ``verify_checksums=False`` because tiny files cannot match the md5 sums
of the official releases.
"""

import gzip
import pickle
import struct
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
import torch.nn.functional as F

from pl_pathsgd.data import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    CacheWarning,
    CorruptDatasetError,
    DataError,
    DatasetDownloadError,
    DatasetNotFoundError,
    DigitsDataModule,
    InvalidDataConfigError,
    MNISTDataModule,
    SVHNDataModule,
    area_downsample,
    area_weights,
    rgb_to_grayscale,
)

CLOSED_PORT = "http://127.0.0.1:9/"  # discard port on the loopback interface; nothing listens there


# ---------------------------------------------------------------------------
# Writers of tiny files in the real formats
# ---------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as a big-endian IDX file (magic 2051 for images, 2049 for labels)."""
    magic = 0x800 | array.ndim
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", dim) for dim in array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def make_mnist(root: Path, n_train: int = 300, n_test: int = 100, gz: bool = False, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    data = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name, array in data.items():
        write_idx(raw / name, array)
        if gz:
            packed = raw / (name + ".gz")
            packed.write_bytes(gzip.compress((raw / name).read_bytes()))
            (raw / name).unlink()
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
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    sizes = {"train": n_train, "test": n_test}
    if n_extra:
        sizes["extra"] = n_extra
    for split, n in sizes.items():
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = rng.integers(1, 11, (n, 1)).astype(np.uint8)  # 10 stands for the digit 0
        scipy.io.savemat(root / f"{split}_32x32.mat", {"X": x, "y": y})
        out[split] = (x, y)
    return out


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    # Make sure the refused-connection tests talk to the loopback port directly.
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def mnist_dir(tmp_path):
    data = make_mnist(tmp_path)
    return tmp_path, data


def mnist(root, **kwargs):
    kwargs.setdefault("val_size", 50)
    kwargs.setdefault("verify_checksums", False)
    return MNISTDataModule(data_dir=str(root), **kwargs)


def ready(dm):
    dm.prepare_data()
    dm.setup("fit")
    return dm


def all_batches(loader):
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


# ---------------------------------------------------------------------------
# Preprocessing primitives
# ---------------------------------------------------------------------------


def explicit_area_mean(image: np.ndarray, size: int) -> np.ndarray:
    """Independent 2-D computation: mean of the piecewise-constant image over each output square."""
    height, width = image.shape
    out = np.zeros((size, size))
    for i in range(size):
        top, bottom = Fraction(i * height, size), Fraction((i + 1) * height, size)
        for j in range(size):
            left, right = Fraction(j * width, size), Fraction((j + 1) * width, size)
            total = Fraction(0)
            for p in range(height):
                dy = min(bottom, p + 1) - max(top, p)
                if dy <= 0:
                    continue
                for q in range(width):
                    dx = min(right, q + 1) - max(left, q)
                    if dx > 0:
                        total += dy * dx * int(image[p, q])
            out[i, j] = float(total / ((bottom - top) * (right - left)))
    return out


def test_area_weights_rows_sum_to_one_and_conserve_mass():
    weights = area_weights(28, 10)
    assert weights.shape == (10, 28)
    torch.testing.assert_close(weights.sum(1), torch.ones(10, dtype=torch.float64))
    # every input pixel contributes its full area: 28 / 10 output cells' worth in total
    torch.testing.assert_close(weights.sum(0), torch.full((28,), 10 / 28, dtype=torch.float64))
    # first cell covers pixels 0, 1 and 0.8 of pixel 2
    torch.testing.assert_close(weights[0, :4], torch.tensor([1, 1, 0.8, 0], dtype=torch.float64) / 2.8)


def test_area_downsample_divisible_matches_block_means():
    images = torch.rand(5, 3, 32, 32)
    torch.testing.assert_close(area_downsample(images, 8), F.adaptive_avg_pool2d(images, 8))
    torch.testing.assert_close(area_downsample(images, 16), F.avg_pool2d(images, 2))
    torch.testing.assert_close(area_downsample(images, 32), images)


def test_area_downsample_28_to_10_matches_explicit_computation():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (28, 28))
    got = area_downsample(torch.from_numpy(image).double().view(1, 1, 28, 28), 10)[0, 0].numpy()
    np.testing.assert_allclose(got, explicit_area_mean(image, 10), rtol=0, atol=1e-9)
    # by hand: the top-left output pixel weighs rows/columns 0, 1 fully and 2 by 0.8
    w = np.array([1.0, 1.0, 0.8])
    assert got[0, 0] == pytest.approx((w[:, None] * w[None, :] * image[:3, :3]).sum() / 2.8**2)
    # the mean is preserved exactly, unlike adaptive pooling with overlapping windows
    assert got.mean() == pytest.approx(image.mean())


def test_rgb_to_grayscale_uses_luma_weights():
    images = torch.rand(2, 3, 4, 4)
    expected = 0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]
    torch.testing.assert_close(rgb_to_grayscale(images)[:, 0], expected)


# ---------------------------------------------------------------------------
# Digits
# ---------------------------------------------------------------------------


def test_digits_shapes_before_setup():
    assert DigitsDataModule.num_classes == 10
    assert DigitsDataModule().input_shape == (64,)
    assert DigitsDataModule(downsample=4).input_shape == (16,)
    dm = DigitsDataModule(downsample=4, flatten=False)
    assert dm.input_shape == (1, 4, 4) and dm.image_shape == (1, 4, 4) and dm.dims == (1, 4, 4)
    assert dm.input_dim == 16 and dm.num_classes == 10
    assert DigitsDataModule(grayscale=True).input_shape == (64,)  # already one channel


def test_digits_end_to_end():
    dm = ready(DigitsDataModule(batch_size=64, seed=3))
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (1197, 300, 300)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 64) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert len(dm.train_dataloader()) == 19  # ceil(1197 / 64)

    # train_eval: whole training split in stored order; train: a permutation of it
    xs, ys = all_batches(dm.train_eval_dataloader())
    torch.testing.assert_close(xs, dm.train_dataset.tensors[0])
    assert torch.equal(ys, dm.train_dataset.tensors[1])
    xs_shuffled, _ = all_batches(dm.train_dataloader())
    assert not torch.equal(xs_shuffled, xs)
    assert torch.equal(xs_shuffled.sort(0).values, xs.sort(0).values)

    # the shuffle order is reproducible from the seed and changes between epochs
    loader = dm.train_dataloader()
    epoch1, epoch2 = all_batches(loader)[1], all_batches(loader)[1]
    assert not torch.equal(epoch1, epoch2)
    assert torch.equal(all_batches(dm.train_dataloader())[1], epoch1)

    # normalisation: train split has zero mean and unit std
    train = dm.train_dataset.tensors[0]
    assert abs(train.mean().item()) < 1e-5 and abs(train.std(unbiased=False).item() - 1) < 1e-5

    # splits are disjoint and cover the non-test images
    assert set(dm.train_indices.tolist()).isdisjoint(dm.val_indices.tolist())
    assert len(dm.train_indices) + len(dm.val_indices) == 1797 - 300
    assert dm.hparams["seed"] == 3 and dm.hparams["test_size"] == 300


def test_digits_setup_is_idempotent_and_splits_follow_seed():
    dm = ready(DigitsDataModule())
    first = dm.train_dataset
    dm.setup("test")
    dm.prepare_data()
    assert dm.train_dataset is first

    same = ready(DigitsDataModule())
    other = ready(DigitsDataModule(seed=1))
    assert torch.equal(same.val_indices, dm.val_indices)
    assert not torch.equal(other.val_indices, dm.val_indices)
    # the test set does not depend on the seed
    raw_test = ready(DigitsDataModule(normalize=False)).test_dataset.tensors[0]
    raw_test_other = ready(DigitsDataModule(normalize=False, seed=5)).test_dataset.tensors[0]
    assert torch.equal(raw_test, raw_test_other)


def test_worker_processes_yield_the_same_batches():
    dm = ready(DigitsDataModule(num_workers=1))
    xs, ys = all_batches(dm.train_eval_dataloader())
    assert torch.equal(xs, dm.train_dataset.tensors[0]) and torch.equal(ys, dm.train_dataset.tensors[1])


def test_digits_downsample_and_values():
    from sklearn.datasets import load_digits

    dm = ready(DigitsDataModule(normalize=False, flatten=False, downsample=4, val_size=0))
    x = dm.train_dataset.tensors[0]
    assert x.shape[1:] == (1, 4, 4) and len(dm.val_dataset) == 0
    assert 0 <= x.min() and x.max() <= 1
    images = torch.from_numpy(load_digits().images).float()
    # training images are in the original order, so the first one is known
    first = images[dm.train_indices[0]] / 16
    torch.testing.assert_close(x[0, 0], F.avg_pool2d(first.view(1, 1, 8, 8), 2)[0, 0])


def test_digits_trains_with_lightning(tmp_path):
    import lightning.pytorch as pl

    class Tiny(pl.LightningModule):
        def __init__(self, inputs, classes):
            super().__init__()
            self.layer = torch.nn.Linear(inputs, classes)

        def training_step(self, batch, _):
            x, y = batch
            return F.cross_entropy(self.layer(x), y)

        def validation_step(self, batch, _):
            x, y = batch
            self.log("val_loss", F.cross_entropy(self.layer(x), y))

        def test_step(self, batch, _):
            x, y = batch
            self.log("test_acc", (self.layer(x).argmax(1) == y).float().mean())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = DigitsDataModule(batch_size=50)
    model = Tiny(dm.input_dim, dm.num_classes)
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    result = trainer.test(model, datamodule=dm, verbose=False)
    assert result[0]["test_acc"] > 0.8


def test_jsonargparse_instantiates_from_arguments():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(SVHNDataModule, "data")
    cfg = parser.parse_args(["--data.downsample=10", "--data.grayscale=true", "--data.extra=true"])
    dm = parser.instantiate_classes(cfg).data
    assert isinstance(dm, SVHNDataModule)
    assert dm.input_shape == (100,) and dm.extra and dm.val_size == 10000


# ---------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls, kwargs, fragment",
    [
        (MNISTDataModule, {"val_size": 60000}, "val_size=60000"),
        (MNISTDataModule, {"val_size": -1}, "val_size must be >= 0"),
        (MNISTDataModule, {"downsample": 29}, "downsample=29"),
        (MNISTDataModule, {"downsample": 0}, "downsample must be >= 1"),
        (CIFAR10DataModule, {"batch_size": 0}, "batch_size must be >= 1"),
        (CIFAR100DataModule, {"val_size": 50000}, "val_size=50000"),
        (SVHNDataModule, {"val_size": 73257, "extra": True}, "val_size=73257"),
        (SVHNDataModule, {"downsample": 33}, "between 1 and 32"),
        (SVHNDataModule, {"mirror": ""}, "mirror"),
        (DigitsDataModule, {"downsample": 9}, "between 1 and 8"),
        (DigitsDataModule, {"val_size": 1497}, "val_size=1497"),
        (DigitsDataModule, {"test_size": 1797}, "test_size=1797"),
        (DigitsDataModule, {"num_workers": -1}, "num_workers"),
        (DigitsDataModule, {"batch_size": 2.5}, "batch_size must be an int"),
    ],
)
def test_invalid_arguments_raise_in_init(cls, kwargs, fragment):
    with pytest.raises(InvalidDataConfigError, match=fragment) as info:
        cls(**kwargs)
    assert isinstance(info.value, ValueError) and isinstance(info.value, DataError)


def test_val_size_too_large_for_files_raises_in_setup(mnist_dir):
    root, _ = mnist_dir
    dm = mnist(root, val_size=300)  # valid for the real MNIST, not for 300 images
    with pytest.raises(InvalidDataConfigError, match="has 300 examples"):
        ready(dm)


# ---------------------------------------------------------------------------
# MNIST
# ---------------------------------------------------------------------------


def test_mnist_shapes_splits_and_values(mnist_dir):
    root, data = mnist_dir
    assert MNISTDataModule(downsample=10).input_shape == (100,)  # before setup, no files needed
    dm = ready(mnist(root, downsample=10, normalize=False, batch_size=32))
    assert dm.input_shape == (100,) and dm.num_classes == 10
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (250, 50, 100)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 100) and y.shape == (32,)

    train_idx, val_idx = dm.train_indices, dm.val_indices
    assert set(train_idx.tolist()).isdisjoint(val_idx.tolist())
    assert sorted(train_idx.tolist() + val_idx.tolist()) == list(range(300))
    labels = torch.from_numpy(data["train-labels-idx1-ubyte"]).long()
    assert torch.equal(dm.train_dataset.tensors[1], labels[train_idx])
    assert torch.equal(dm.val_dataset.tensors[1], labels[val_idx])
    assert torch.equal(dm.test_dataset.tensors[1], torch.from_numpy(data["t10k-labels-idx1-ubyte"]).long())

    # 28x28 -> 10x10 area averaging, checked against the explicit computation
    images = data["train-images-idx3-ubyte"]
    for k in (0, 17):
        expected = explicit_area_mean(images[int(train_idx[k])], 10) / 255
        np.testing.assert_allclose(dm.train_dataset.tensors[0][k].view(10, 10).numpy(), expected, atol=1e-6)


def test_mnist_split_reproducible_and_seed_dependent(mnist_dir):
    root, _ = mnist_dir
    a = ready(mnist(root))
    b = ready(mnist(root))
    c = ready(mnist(root, seed=1))
    assert torch.equal(a.val_indices, b.val_indices)
    assert torch.equal(a.train_dataset.tensors[0], b.train_dataset.tensors[0])
    assert not torch.equal(a.val_indices, c.val_indices)


def test_mnist_normalisation_uses_training_split_only(mnist_dir):
    root, data = mnist_dir
    dm = ready(mnist(root, flatten=False))
    raw = torch.from_numpy(data["train-images-idx3-ubyte"]).double() / 255
    train_raw = raw[dm.train_indices]
    assert dm.mean.shape == (1,) and dm.std.shape == (1,)
    assert dm.mean.item() == pytest.approx(train_raw.mean().item(), abs=1e-6)
    assert dm.std.item() == pytest.approx(train_raw.std(unbiased=False).item(), abs=1e-6)
    assert abs(raw.mean().item() - train_raw.mean().item()) > 1e-5  # the whole pool would differ
    x = dm.train_dataset.tensors[0]
    assert x.shape == (250, 1, 28, 28)
    assert abs(x.mean().item()) < 1e-5 and abs(x.std(unbiased=False).item() - 1) < 1e-5
    expected_val = (raw[dm.val_indices] - train_raw.mean()) / train_raw.std(unbiased=False)
    torch.testing.assert_close(dm.val_dataset.tensors[0][:, 0].double(), expected_val, atol=1e-5, rtol=0)


def test_mnist_reads_gzipped_files(tmp_path):
    make_mnist(tmp_path, gz=True)
    dm = ready(mnist(tmp_path))
    assert len(dm.train_dataset) == 250
    assert (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file()


def test_cache_is_reused_keyed_and_self_sufficient(mnist_dir, monkeypatch):
    root, _ = mnist_dir
    first = ready(mnist(root, downsample=10))
    path = first.cache_path
    assert path.parent == root / "pl_pathsgd_cache" and path.name.startswith("mnist-") and path.suffix == ".pt"
    assert not [p for p in path.parent.iterdir() if p.suffix == ".tmp"]
    stamp = path.stat().st_mtime_ns

    def fail(self):
        raise AssertionError("source files were read although a valid cache exists")

    monkeypatch.setattr(MNISTDataModule, "_read_files", fail)
    second = ready(mnist(root, downsample=10))
    assert path.stat().st_mtime_ns == stamp
    torch.testing.assert_close(second.train_dataset.tensors[0], first.train_dataset.tensors[0])
    # split and normalisation options share the cache; image options do not
    assert mnist(root, downsample=10, val_size=20, seed=4, normalize=False).cache_path == path
    assert mnist(root, downsample=7).cache_path != path
    assert mnist(root).cache_path != path
    assert ready(mnist(root, downsample=10, val_size=20)).val_dataset.tensors[0].shape == (20, 100)
    # the cache alone is enough once built
    for file in (root / "MNIST" / "raw").iterdir():
        file.unlink()
    assert len(ready(mnist(root, downsample=10)).test_dataset) == 100


def test_corrupt_cache_is_rebuilt_with_warning(mnist_dir):
    root, _ = mnist_dir
    reference = ready(mnist(root, downsample=10))
    path = reference.cache_path
    path.write_bytes(path.read_bytes()[:1000])  # truncated
    with pytest.warns(CacheWarning, match="could not be read"):
        rebuilt = ready(mnist(root, downsample=10))
    torch.testing.assert_close(rebuilt.train_dataset.tensors[0], reference.train_dataset.tensors[0])
    torch.load(path, weights_only=True)  # a valid file again

    payload = torch.load(path, weights_only=True)
    payload["tensors"]["train_x"][0, 0, 0, 0] += 1.0  # silent damage
    torch.save(payload, path)
    with pytest.warns(CacheWarning, match="checksum of train_x"):
        rebuilt = ready(mnist(root, downsample=10))
    torch.testing.assert_close(rebuilt.train_dataset.tensors[0], reference.train_dataset.tensors[0])

    payload = torch.load(path, weights_only=True)
    payload["format_version"] = -1
    torch.save(payload, path)
    with pytest.warns(CacheWarning, match="format version"):
        ready(mnist(root, downsample=10))


def test_cache_rebuilt_when_source_files_change(mnist_dir):
    root, data = mnist_dir
    ready(mnist(root))
    labels = (data["train-labels-idx1-ubyte"] + 1) % 10
    write_idx(root / "MNIST" / "raw" / "train-labels-idx1-ubyte", labels)
    with pytest.warns(CacheWarning, match="changed"):
        dm = ready(mnist(root))
    assert torch.equal(dm.train_dataset.tensors[1], torch.from_numpy(labels).long()[dm.train_indices])


def test_mnist_missing_files_error_names_paths(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        ready(mnist(tmp_path))
    message = str(info.value)
    raw = tmp_path / "MNIST" / "raw"
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        assert str(raw / name) in message
    assert "download=True" in message and ".gz" in message
    assert isinstance(info.value, FileNotFoundError)

    make_mnist(tmp_path)
    (raw / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetNotFoundError, match="t10k-labels-idx1-ubyte") as info:
        ready(mnist(tmp_path))
    assert str(raw / "train-images-idx3-ubyte") not in str(info.value).split("Missing:")[1].split("Either")[0]


def test_mnist_download_from_unreachable_host(tmp_path):
    dm = mnist(tmp_path, download=True, mirror=CLOSED_PORT)
    with pytest.raises(DatasetDownloadError) as info:
        dm.prepare_data()
    message = str(info.value)
    assert "could not be reached" in message and "127.0.0.1:9" in message
    assert str(tmp_path / "MNIST" / "raw") in message and "train-images-idx3-ubyte" in message
    assert info.value.__cause__ is not None


@pytest.mark.parametrize(
    "damage, fragment",
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-100]), "truncated or damaged"),
        (lambda p: p.write_bytes(b"\x00\x00\x08\x01" + p.read_bytes()[4:]), "magic number is 2049"),
        (lambda p: p.write_bytes(b"garbage"), "magic number"),
    ],
)
def test_mnist_corrupt_file_is_named(mnist_dir, damage, fragment):
    root, _ = mnist_dir
    path = root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    damage(path)
    with pytest.raises(CorruptDatasetError, match=fragment) as info:
        ready(mnist(root))
    assert str(path) in str(info.value)


def test_mnist_bad_labels_are_reported(mnist_dir):
    root, data = mnist_dir
    write_idx(root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte", data["t10k-labels-idx1-ubyte"] + 20)
    with pytest.raises(CorruptDatasetError, match="t10k-labels-idx1-ubyte.*expected classes 0..9"):
        ready(mnist(root))


# ---------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100
# ---------------------------------------------------------------------------


def cifar(cls, root, **kwargs):
    kwargs.setdefault("val_size", 20)
    kwargs.setdefault("verify_checksums", False)
    return cls(data_dir=str(root), **kwargs)


def test_cifar10_layout_and_values(tmp_path):
    batches = make_cifar(tmp_path)
    dm = ready(cifar(CIFAR10DataModule, tmp_path, flatten=False, normalize=False))
    assert dm.input_shape == (3, 32, 32) and dm.num_classes == 10
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (180, 20, 50)
    pool = np.concatenate([batches[f"data_batch_{i}"]["data"] for i in range(1, 6)])
    labels = sum((batches[f"data_batch_{i}"]["labels"] for i in range(1, 6)), [])
    k = 7
    n = int(dm.train_indices[k])
    # CIFAR rows hold the red, green and blue planes one after the other, row-major
    expected = torch.from_numpy(pool[n].reshape(3, 32, 32)).float() / 255
    torch.testing.assert_close(dm.train_dataset.tensors[0][k], expected)
    assert int(dm.train_dataset.tensors[1][k]) == labels[n]
    test = torch.from_numpy(batches["test_batch"]["data"].reshape(-1, 3, 32, 32)).float() / 255
    torch.testing.assert_close(dm.test_dataset.tensors[0], test)


def test_cifar10_grayscale_downsample_and_channel_normalisation(tmp_path):
    batches = make_cifar(tmp_path)
    pool = np.concatenate([batches[f"data_batch_{i}"]["data"] for i in range(1, 6)])
    images = torch.from_numpy(pool.reshape(-1, 3, 32, 32)).float() / 255

    dm = ready(cifar(CIFAR10DataModule, tmp_path, grayscale=True, downsample=8, normalize=False))
    assert dm.input_shape == (64,) and dm.image_shape == (1, 8, 8)
    gray = 0.299 * images[:, :1] + 0.587 * images[:, 1:2] + 0.114 * images[:, 2:]
    expected = F.adaptive_avg_pool2d(gray, 8)[dm.train_indices].reshape(-1, 64)
    torch.testing.assert_close(dm.train_dataset.tensors[0], expected)

    dm = ready(cifar(CIFAR10DataModule, tmp_path, flatten=False))
    x = dm.train_dataset.tensors[0]
    assert dm.mean.shape == (3,)
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(dm.mean, images[dm.train_indices].mean(dim=(0, 2, 3)), atol=1e-6, rtol=0)


def test_cifar100_fine_labels(tmp_path):
    batches = make_cifar(tmp_path, hundred=True)
    dm = ready(cifar(CIFAR100DataModule, tmp_path, downsample=10))
    assert dm.num_classes == 100 and dm.input_shape == (300,)
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (180, 20, 50)
    fine = torch.tensor(batches["train"]["fine_labels"])
    assert torch.equal(dm.train_dataset.tensors[1], fine[dm.train_indices])


def test_cifar_checksums_are_verified_by_default(tmp_path):
    make_cifar(tmp_path)
    with pytest.raises(CorruptDatasetError, match="md5") as info:
        ready(cifar(CIFAR10DataModule, tmp_path, verify_checksums=True))
    assert str(tmp_path / "cifar-10-batches-py" / "data_batch_1") in str(info.value)
    assert "verify_checksums=False" in str(info.value)


def test_cifar_missing_files_error_names_layout(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        ready(cifar(CIFAR100DataModule, tmp_path))
    message = str(info.value)
    for name in ("train", "test", "meta"):
        assert str(tmp_path / "cifar-100-python" / name) in message
    assert "cifar-100-python.tar.gz" in message and "download=True" in message

    with pytest.raises(DatasetNotFoundError) as info:
        ready(cifar(CIFAR10DataModule, tmp_path))
    for name in ["data_batch_1", "data_batch_5", "test_batch", "batches.meta"]:
        assert str(tmp_path / "cifar-10-batches-py" / name) in str(info.value)


def test_cifar_download_from_unreachable_host(tmp_path):
    dm = cifar(CIFAR10DataModule, tmp_path, download=True, mirror=CLOSED_PORT)
    with pytest.raises(DatasetDownloadError, match="could not be reached") as info:
        dm.prepare_data()
    assert "http://127.0.0.1:9/cifar-10-python.tar.gz" in str(info.value)
    assert "cifar-10-batches-py" in str(info.value)
    assert info.value.__cause__ is not None


def test_cifar_corrupt_pickle_is_named(tmp_path):
    make_cifar(tmp_path)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(bad.read_bytes()[:500])
    with pytest.raises(CorruptDatasetError, match="data_batch_3"):
        ready(cifar(CIFAR10DataModule, tmp_path))


# ---------------------------------------------------------------------------
# SVHN
# ---------------------------------------------------------------------------


def svhn(root, **kwargs):
    kwargs.setdefault("val_size", 20)
    kwargs.setdefault("verify_checksums", False)
    return SVHNDataModule(data_dir=str(root), **kwargs)


def test_svhn_layout_labels_and_extra(tmp_path):
    files = make_svhn(tmp_path, n_extra=40)
    dm = ready(svhn(tmp_path, flatten=False, normalize=False))
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (100, 20, 60)
    x, y = files["train"]
    n = int(dm.train_indices[3])
    expected = torch.from_numpy(x[:, :, :, n]).permute(2, 0, 1).float() / 255  # X is H x W x C x N
    torch.testing.assert_close(dm.train_dataset.tensors[0][3], expected)
    labels = torch.from_numpy(y[:, 0].astype(np.int64)) % 10  # label 10 is the digit 0
    assert torch.equal(dm.train_dataset.tensors[1], labels[dm.train_indices])
    assert int(dm.test_dataset.tensors[1].max()) <= 9

    with_extra = ready(svhn(tmp_path, flatten=False, normalize=False, extra=True))
    assert (len(with_extra.train_dataset), len(with_extra.val_dataset)) == (140, 20)
    assert torch.equal(with_extra.val_dataset.tensors[0], dm.val_dataset.tensors[0])
    assert with_extra.cache_path != dm.cache_path


def test_svhn_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        ready(svhn(tmp_path, extra=True))
    for name in ("train_32x32.mat", "test_32x32.mat", "extra_32x32.mat"):
        assert str(tmp_path / name) in str(info.value)

    with pytest.raises(DatasetDownloadError, match="could not be reached") as info:
        svhn(tmp_path, download=True, mirror=CLOSED_PORT).prepare_data()
    assert "http://127.0.0.1:9/train_32x32.mat" in str(info.value)

    make_svhn(tmp_path)
    bad = tmp_path / "test_32x32.mat"
    bad.write_bytes(b"not a MATLAB file")
    with pytest.raises(CorruptDatasetError, match="test_32x32.mat"):
        ready(svhn(tmp_path))


def test_dataloaders_before_setup_raise():
    dm = DigitsDataModule()
    with pytest.raises(RuntimeError, match="before setup"):
        dm.train_dataloader()


def test_training_order_depends_only_on_seed_and_epoch():
    from pl_pathsgd.data.base import EpochShuffleSampler

    dm = DigitsDataModule(seed=3)
    dm.setup("fit")
    loader = dm.train_dataloader()
    first = torch.cat([y for _, y in loader])
    second = torch.cat([y for _, y in loader])
    assert not torch.equal(first, second)  # reshuffled every epoch
    fresh = dm.train_dataloader()
    assert isinstance(fresh.sampler, EpochShuffleSampler)
    fresh.sampler.set_epoch(1)  # what Lightning does when it resumes at epoch 1
    assert torch.equal(torch.cat([y for _, y in fresh]), second)
    assert sorted(fresh.sampler) == list(range(len(dm.train_dataset)))
