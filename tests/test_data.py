"""Tests of pl_pathsgd.data: preprocessing, the DataModules and their loaders, the cache, errors.

The vision DataModules are exercised on tiny files written in each dataset's real on-disk format
(MNIST IDX files, CIFAR pickle batches, SVHN MATLAB files; see ``tests/data_files.py``) and read
through torchvision, exactly as for the real data, with ``custom_data=True`` because tiny files
cannot match the official md5 sums and sizes (those checks are tested in ``test_data_trust.py``).
"""

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

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
    WrongDatasetError,
    area_downsample,
    area_weights,
    rgb_to_grayscale,
)
from tests.data_files import make_cifar, make_mnist, make_svhn, write_idx
from tests.test_data_trust import Tiny

CLOSED_PORT = "http://127.0.0.1:9/"  # discard port on the loopback interface; nothing listens there


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
    kwargs.setdefault("custom_data", True)
    kwargs.setdefault("seed", 0)
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
# Package layout
# ---------------------------------------------------------------------------


def test_base_classes_are_abstract():
    from pl_pathsgd.data import BaseDataModule, ImageDataModule, TorchvisionDataModule

    for cls in (BaseDataModule, ImageDataModule, TorchvisionDataModule):
        with pytest.raises(TypeError, match="abstract"):
            cls()


def test_a_new_torchvision_dataset_is_a_short_subclass(tmp_path):
    """Fashion-MNIST (MNIST's file format) in three lines: torchvision's FashionMNIST names the folder and md5 sums."""
    from torchvision import datasets

    class FashionMNISTDataModule(MNISTDataModule):
        name, display_name = "fashion", "Fashion-MNIST"
        dataset_class = datasets.FashionMNIST

    data = make_mnist(tmp_path / "MNIST-tmp")
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name, array in data.items():
        write_idx(raw / name, array)
    dm = ready(FashionMNISTDataModule(data_dir=str(tmp_path), custom_data=True, val_size=10, seed=0))
    assert torch.equal(dm.test_dataset.tensors[1], torch.from_numpy(data["t10k-labels-idx1-ubyte"]).long())
    assert dm.cache_path.name.startswith("fashion-")
    for name in data:  # gzipped, the files are checked against Fashion-MNIST's md5 sums, not MNIST's
        write_idx(raw / name, data[name], gz=True)
    with pytest.raises(WrongDatasetError, match=f"official Fashion-MNIST release .{datasets.FashionMNIST.resources[0][1]}"):
        ready(FashionMNISTDataModule(data_dir=str(tmp_path), val_size=10))


def test_every_argument_has_help_for_the_cli():
    from jsonargparse import ArgumentParser

    from pl_pathsgd.data import DATAMODULES

    for cls in DATAMODULES.values():
        parser = ArgumentParser()
        parser.add_class_arguments(cls, "data")
        actions = [a for a in parser._actions if a.dest.startswith("data.") and a.dest not in ("data.help", "data.__path__")]
        assert len(actions) >= 7
        undocumented = [a.dest for a in actions if not a.help or a.help.lstrip().startswith("(type")]
        assert not undocumented, f"{cls.__name__}: {undocumented}"


def test_optional_dependencies_are_imported_lazily():
    """scikit-learn (digits) and scipy (SVHN) are extras: no module of pl_pathsgd.data imports them at import time."""
    import ast

    import pl_pathsgd.data as package

    for path in Path(package.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        top_level = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
        names = [alias.name for node in top_level if isinstance(node, ast.Import) for alias in node.names]
        names += [node.module for node in top_level if isinstance(node, ast.ImportFrom) and node.module]
        assert not [n for n in names if n.split(".")[0] in ("sklearn", "scipy", "matplotlib")], path


def test_missing_extras_are_named(monkeypatch, tmp_path):
    import sys

    from pl_pathsgd.data import MissingDependencyError

    monkeypatch.setitem(sys.modules, "sklearn", None)  # as if scikit-learn were not installed
    with pytest.raises(MissingDependencyError, match=r"pip install 'pl-pathsgd\[digits\]'") as info:
        DigitsDataModule().setup()
    assert isinstance(info.value, ImportError)

    make_svhn(tmp_path)
    monkeypatch.setitem(sys.modules, "scipy", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'pl-pathsgd\[svhn\]'"):
        ready(svhn(tmp_path))


# ---------------------------------------------------------------------------
# Digits
# ---------------------------------------------------------------------------


def test_digits_shapes_before_setup():
    assert DigitsDataModule.num_classes == 10
    assert DigitsDataModule().input_shape == (64,)
    assert DigitsDataModule(downsample=4).input_shape == (16,)
    dm = DigitsDataModule(downsample=4, flatten=False)
    assert dm.input_shape == (1, 4, 4) and dm.image_shape == (1, 4, 4) and dm.dims == (1, 4, 4)
    assert dm.input_dim == 16 and dm.num_classes == 10 and dm.num_outputs == 10
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

    # predict: the test split in order
    assert torch.equal(all_batches(dm.predict_dataloader())[1], dm.test_dataset.tensors[1])

    # normalisation: train split has zero mean and unit std
    train = dm.train_dataset.tensors[0]
    assert abs(train.mean().item()) < 1e-5 and abs(train.std(unbiased=False).item() - 1) < 1e-5

    # splits are disjoint and cover the non-test images
    assert set(dm.train_indices.tolist()).isdisjoint(dm.val_indices.tolist())
    assert len(dm.train_indices) + len(dm.val_indices) == 1797 - 300
    assert dm.hparams["seed"] == 3 and dm.hparams["test_size"] == 300 and dm.hparams["batch_size"] == 64


def test_digits_setup_is_idempotent_and_splits_follow_seed():
    dm = ready(DigitsDataModule(seed=0))
    first = dm.train_dataset
    dm.setup("test")
    dm.prepare_data()
    assert dm.train_dataset is first

    same = ready(DigitsDataModule(seed=0))
    other = ready(DigitsDataModule(seed=1))
    assert torch.equal(same.val_indices, dm.val_indices)
    assert not torch.equal(other.val_indices, dm.val_indices)
    # the test set does not depend on the seed
    raw_test = ready(DigitsDataModule(normalize=False, seed=0)).test_dataset.tensors[0]
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
    cfg = parser.parse_args(["--data.downsample=10", "--data.grayscale=true", "--data.extra=true", "--data.seed=4"])
    dm = parser.instantiate_classes(cfg).data
    assert isinstance(dm, SVHNDataModule)
    assert dm.input_shape == (100,) and dm.extra and dm.val_size == 10000 and dm.seed == 4


# ---------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------


def test_datasets_work_with_a_plain_dataloader():
    """Issue 10, item 5: default collation over dm.train_dataset gives normal (x, y) batches."""
    dm = ready(DigitsDataModule(seed=0))
    x, y = next(iter(DataLoader(dm.train_dataset, batch_size=32)))
    assert x.shape == (32, 64) and y.shape == (32,)
    assert torch.equal(x, dm.train_dataset.tensors[0][:32]) and torch.equal(y, dm.train_dataset.tensors[1][:32])
    # also shuffled, with workers, and with the last, smaller batch
    xs, ys = all_batches(DataLoader(dm.train_dataset, batch_size=100, shuffle=True, num_workers=1))
    assert xs.shape == (1197, 64) and torch.equal(ys.sort().values, dm.train_dataset.tensors[1].sort().values)
    # one example, and a batch of indices, as the DataModule's own loaders fetch it
    one = dm.train_dataset[5]
    assert one[0].shape == (64,) and one[1].dim() == 0
    for indices in (np.array([5, 7, 1]), [5, 7, 1], torch.tensor([5, 7, 1])):
        batch = dm.train_dataset[indices]
        assert torch.equal(batch[0], dm.train_dataset.tensors[0][[5, 7, 1]])
    assert torch.equal(dm.train_dataset[2:5][1], dm.train_dataset.tensors[1][2:5])


def test_dataloaders_before_setup_raise():
    dm = DigitsDataModule()
    with pytest.raises(RuntimeError, match="before setup"):
        dm.train_dataloader()


def test_training_order_depends_only_on_seed_and_epoch():
    from pl_pathsgd.data import EpochBatchSampler, EpochShuffleSampler

    dm = DigitsDataModule(seed=3)
    dm.setup("fit")
    loader = dm.train_dataloader()
    first = torch.cat([y for _, y in loader])
    second = torch.cat([y for _, y in loader])
    assert not torch.equal(first, second)  # reshuffled every epoch
    fresh = dm.train_dataloader()
    assert isinstance(fresh.sampler, EpochBatchSampler)
    fresh.sampler.set_epoch(1)  # what Lightning does when it resumes at epoch 1
    assert torch.equal(torch.cat([y for _, y in fresh]), second)
    # the per-index sampler gives the same order
    single = EpochShuffleSampler(len(dm.train_dataset), 3)
    single.set_epoch(1)
    assert torch.equal(dm.train_dataset.tensors[1][list(single)], second)


def test_lightning_sets_the_epoch_of_the_batch_sampler():
    """Resume is exact: Lightning's set_epoch (the function its loops call) reaches the DataModule's sampler."""
    from lightning.fabric.utilities.data import _set_sampler_epoch

    dm = ready(DigitsDataModule(seed=3))
    loader = dm.train_dataloader()
    _set_sampler_epoch(loader, 4)
    assert loader.sampler.epoch == 4


# ---------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls, kwargs, argument, fragment",
    [
        (MNISTDataModule, {"val_size": 60000}, "val_size", "val_size=60000 leaves no training examples"),
        (MNISTDataModule, {"val_size": -1}, "val_size", "val_size must be an integer >= 0"),
        (MNISTDataModule, {"downsample": 29}, "downsample", "between 1 and 28"),
        (MNISTDataModule, {"downsample": 0}, "downsample", "downsample must be an integer >= 1"),
        (MNISTDataModule, {"as_sequence": "columns"}, "as_sequence", "'rows', 'pixels' or None"),
        (MNISTDataModule, {"download_timeout": 0}, "download_timeout", "seconds > 0"),
        (MNISTDataModule, {"seed": -3}, "seed", "seed must be an integer >= 0"),
        (CIFAR10DataModule, {"batch_size": 0}, "batch_size", "batch_size must be an integer >= 1"),
        (CIFAR100DataModule, {"val_size": 50000}, "val_size", "val_size=50000"),
        (SVHNDataModule, {"val_size": 73257, "extra": True}, "val_size", "val_size=73257"),
        (SVHNDataModule, {"downsample": 33}, "downsample", "between 1 and 32"),
        (SVHNDataModule, {"mirror": ""}, "mirror", "mirror"),
        (DigitsDataModule, {"downsample": 9}, "downsample", "between 1 and 8"),
        (DigitsDataModule, {"val_size": 1497}, "val_size", "val_size=1497"),
        (DigitsDataModule, {"test_size": 1797}, "test_size", "test_size=1797"),
        (DigitsDataModule, {"num_workers": -1}, "num_workers", "num_workers"),
        (DigitsDataModule, {"batch_size": 2.5}, "batch_size", "batch_size=2.5 is invalid"),
    ],
)
def test_invalid_arguments_raise_in_init(cls, kwargs, argument, fragment):
    with pytest.raises(InvalidDataConfigError, match=fragment) as info:
        cls(**kwargs)
    assert isinstance(info.value, ValueError) and isinstance(info.value, DataError)
    assert info.value.argument == argument and "\n" not in str(info.value)


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


def test_mnist_reads_gzipped_files_without_writing_next_to_them(tmp_path):
    data = make_mnist(tmp_path, gz=True)
    raw = tmp_path / "MNIST" / "raw"
    before = sorted(p.name for p in raw.iterdir())
    dm = ready(mnist(tmp_path))
    assert len(dm.train_dataset) == 250
    assert torch.equal(dm.test_dataset.tensors[1], torch.from_numpy(data["t10k-labels-idx1-ubyte"]).long())
    assert sorted(p.name for p in raw.iterdir()) == before  # nothing unpacked into the data folder


def test_mnist_gz_and_unpacked_copy_must_agree(tmp_path):
    """torchvision's download leaves both; a copy that differs from its .gz is named, not silently ignored."""
    data = make_mnist(tmp_path, gz=True)
    raw = tmp_path / "MNIST" / "raw"
    for name, array in data.items():
        write_idx(raw / name, array)
    assert len(ready(mnist(tmp_path)).train_dataset) == 250
    write_idx(raw / "train-labels-idx1-ubyte", (data["train-labels-idx1-ubyte"] + 1) % 10)
    with pytest.raises(CorruptDatasetError, match="hold different data") as info:
        ready(mnist(tmp_path))
    assert str(raw / "train-labels-idx1-ubyte.gz") in str(info.value)


def test_cache_is_reused_and_keyed(mnist_dir, monkeypatch):
    root, _ = mnist_dir
    first = ready(mnist(root, downsample=10))
    path = first.cache_path
    assert path.parent == root / "pl_pathsgd_cache" and path.name.startswith("mnist-") and path.suffix == ".pt"
    assert not [p for p in path.parent.iterdir() if p.suffix == ".tmp"]
    stamp = path.stat().st_mtime_ns

    def fail(self):
        raise AssertionError("source files were read although a valid cache exists")

    monkeypatch.setattr(MNISTDataModule, "read_raw", fail)
    second = ready(mnist(root, downsample=10))
    assert second.cache_path == path and path.stat().st_mtime_ns == stamp
    torch.testing.assert_close(second.train_dataset.tensors[0], first.train_dataset.tensors[0])
    # split and normalisation options share the cache; image options do not
    assert ready(mnist(root, downsample=10, val_size=20, seed=4, normalize=False)).cache_path == path
    assert ready(mnist(root, downsample=10, val_size=20)).val_dataset.tensors[0].shape == (20, 100)
    monkeypatch.undo()
    assert ready(mnist(root, downsample=7)).cache_path != path
    assert ready(mnist(root)).cache_path != path
    assert first.source_digests.keys() == {f"MNIST/raw/{name}" for name in (
        "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


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
    payload["key"]["format_version"] = -1
    torch.save(payload, path)
    with pytest.warns(CacheWarning, match="other options, files or a format version"):
        ready(mnist(root, downsample=10))


def test_mnist_missing_files_error_names_paths(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        ready(mnist(tmp_path))
    message = str(info.value)
    raw = tmp_path / "MNIST" / "raw"
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        assert str(raw / name) in message
    assert "download=True" in message and ".gz" in message and "\n" not in message
    assert isinstance(info.value, FileNotFoundError)

    make_mnist(tmp_path)
    (raw / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetNotFoundError, match="t10k-labels-idx1-ubyte") as info:
        ready(mnist(tmp_path))
    assert str(raw / "train-images-idx3-ubyte") not in str(info.value).split("missing:")[1].split(". Either")[0]


def test_mnist_download_from_unreachable_host(tmp_path):
    dm = mnist(tmp_path, download=True, mirror=CLOSED_PORT)
    with pytest.raises(DatasetDownloadError) as info:
        dm.prepare_data()
    message = str(info.value)
    assert "could not be reached" in message and "http://127.0.0.1:9/train-images-idx3-ubyte.gz" in message
    assert str(tmp_path / "MNIST" / "raw") in message and "download=False" in message
    assert not list(tmp_path.rglob("*.gz*"))  # no partial file left


@pytest.fixture
def file_server(tmp_path):
    """A local HTTP server for the files in ``tmp_path / "served"``; yields (folder, base URL)."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    folder = tmp_path / "served"
    folder.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_mnist_download_from_a_mirror(tmp_path, file_server):
    folder, url = file_server
    data = make_mnist(folder, gz=True)
    for path in (folder / "MNIST" / "raw").iterdir():
        path.rename(folder / path.name)  # served at the mirror's top level, like the real mirrors
    target = tmp_path / "data"
    # the files served are not MNIST's official ones: refused by their md5 sums, nothing left behind
    with pytest.raises(DatasetDownloadError, match="does not match the official md5 sum f68b3c2dcbeaaa9fbdd348bbdeb94873"):
        MNISTDataModule(data_dir=str(target), download=True, mirror=url).prepare_data()
    assert not list(target.rglob("*.gz*"))
    dm = ready(mnist(target, download=True, mirror=url))  # custom_data=True: no md5 sums
    assert torch.equal(dm.test_dataset.tensors[1], torch.from_numpy(data["t10k-labels-idx1-ubyte"]).long())
    assert sorted(p.name for p in (target / "MNIST" / "raw").iterdir()) == sorted(
        f"{name}.gz" for name in data)


def test_cifar_download_and_unpack_from_a_mirror(tmp_path, file_server):
    import tarfile

    folder, url = file_server
    batches = make_cifar(tmp_path / "made")
    with tarfile.open(folder / "cifar-10-python.tar.gz", "w:gz") as archive:
        archive.add(tmp_path / "made" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    dm = ready(cifar(CIFAR10DataModule, tmp_path / "data", download=True, mirror=url))
    assert dm.test_dataset.tensors[1].tolist() == batches["test_batch"]["labels"]


def test_mnist_mixes_gz_and_unpacked_files(tmp_path):
    data = make_mnist(tmp_path)
    raw = tmp_path / "MNIST" / "raw"
    for name in ("train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        write_idx(raw / name, data[name], gz=True)
        (raw / name).unlink()
    dm = ready(mnist(tmp_path, normalize=False, flatten=False))
    assert torch.equal(dm.test_dataset.tensors[1], torch.from_numpy(data["t10k-labels-idx1-ubyte"]).long())
    expected = torch.from_numpy(data["train-images-idx3-ubyte"])[dm.train_indices].float() / 255
    torch.testing.assert_close(dm.train_dataset.tensors[0][:, 0], expected)
    assert set(dm.source_digests) == {f"MNIST/raw/{n}" for n in (
        "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte.gz")}


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


def test_mnist_corrupt_gz_is_named(tmp_path):
    make_mnist(tmp_path, gz=True)
    path = tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CorruptDatasetError, match="Could not unpack") as info:
        ready(mnist(tmp_path))
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
    kwargs.setdefault("custom_data", True)
    kwargs.setdefault("seed", 0)
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
    with pytest.raises(WrongDatasetError, match="md5") as info:
        ready(cifar(CIFAR10DataModule, tmp_path, custom_data=False))
    assert str(tmp_path / "cifar-10-batches-py" / "data_batch_1") in str(info.value)
    assert "custom_data=True" in str(info.value)


def test_cifar_archive_in_data_dir_is_checked_and_unpacked(tmp_path):
    import tarfile

    source = tmp_path / "made"
    batches = make_cifar(source)
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as archive:
        archive.add(source / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    with pytest.raises(WrongDatasetError, match="cifar-10-python.tar.gz does not match the md5 sum"):
        ready(cifar(CIFAR10DataModule, tmp_path, custom_data=False))
    dm = ready(cifar(CIFAR10DataModule, tmp_path))  # custom_data=True: unpacked without its md5 sum
    assert (tmp_path / "cifar-10-batches-py" / "test_batch").is_file()
    assert dm.test_dataset.tensors[1].tolist() == batches["test_batch"]["labels"]


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


def test_cifar_corrupt_pickle_is_named(tmp_path):
    make_cifar(tmp_path)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(bad.read_bytes()[:500])
    with pytest.raises(CorruptDatasetError, match=r"data_batch_3 is not a readable CIFAR pickle file"):
        ready(cifar(CIFAR10DataModule, tmp_path))


# ---------------------------------------------------------------------------
# SVHN
# ---------------------------------------------------------------------------


def svhn(root, **kwargs):
    kwargs.setdefault("val_size", 20)
    kwargs.setdefault("custom_data", True)
    kwargs.setdefault("seed", 0)
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
    with pytest.raises(WrongDatasetError, match="train_32x32.mat does not match the md5 sum"):
        ready(svhn(tmp_path, custom_data=False))
    bad = tmp_path / "test_32x32.mat"
    bad.write_bytes(b"not a MATLAB file")
    with pytest.raises(CorruptDatasetError, match="test_32x32.mat is not a readable MATLAB file"):
        ready(svhn(tmp_path))


def test_docs_data_examples_run(tmp_path, monkeypatch):
    """The self-contained Python examples of docs/data.md run as written (those needing a model are skipped)."""
    import re

    text = (Path(__file__).resolve().parents[1] / "docs" / "data.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "model" not in b]
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, "docs/data.md", "exec"), {"__name__": "docs_example"})
