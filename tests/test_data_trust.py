"""Regression tests for the data items of "Runs you can trust" (seeds, fingerprints, integrity,
empty splits, read-only and shared folders, download timeouts, argument messages).

Each test is named after the case it covers; the files are written in the datasets' real formats
(``tests/data_files.py``).
"""

import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pl_pathsgd.data import (
    CacheWarning,
    DatasetDownloadError,
    DigitsDataModule,
    InvalidDataConfigError,
    MNISTDataModule,
    WrongDatasetError,
)
from pl_pathsgd.data.datasets import epoch_permutation
from tests.data_files import make_mnist, mnist_arrays, write_idx

ROOT = Path(__file__).resolve().parents[1]


def ready(dm):
    dm.prepare_data()
    dm.setup("fit")
    return dm


class Tiny(pl.LightningModule):
    """A linear classifier that logs validation and test accuracy."""

    def __init__(self, inputs: int = 64, classes: int = 10) -> None:
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


def trainer(tmp_path, **kwargs) -> pl.Trainer:
    options = dict(max_epochs=1, limit_train_batches=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    return pl.Trainer(**{**options, **kwargs})


# ---------------------------------------------------------------------------
# 3. One seed for a run
# ---------------------------------------------------------------------------


def test_split_and_order_follow_seed_everything_unless_pinned(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")  # restored after the test

    def split_and_order(**kwargs):
        dm = ready(DigitsDataModule(**kwargs))
        return dm.resolved_seed, dm.val_indices, torch.cat([y for _, y in dm.train_dataloader()])

    with torch.random.fork_rng():
        pl.seed_everything(1)
        one = split_and_order()
        pinned_one = split_and_order(seed=7)
        pl.seed_everything(2)
        two = split_and_order()
        pinned_two = split_and_order(seed=7)
        pl.seed_everything(1)
        again = split_and_order()
    assert one[0] == 1 and two[0] == 2
    assert not torch.equal(one[1], two[1]) and not torch.equal(one[2], two[2])  # two seeds, two runs
    assert torch.equal(one[1], again[1]) and torch.equal(one[2], again[2])  # same seed, same run
    assert pinned_one[0] == pinned_two[0] == 7
    assert torch.equal(pinned_one[1], pinned_two[1]) and torch.equal(pinned_one[2], pinned_two[2])

    monkeypatch.delenv("PL_GLOBAL_SEED")  # no global seed at all: 0, reproducibly
    assert split_and_order()[0] == 0


def test_ddp_ranks_agree_on_the_split_and_order(tmp_path):
    """Ranks seeded differently (100 and 101) all use rank 0's seed: the same split and the same batches."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "scripts" / "ddp_data_seed.py"), str(tmp_path)],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert rank0["seed"] == rank1["seed"] == 100
    assert torch.equal(rank0["val"], rank1["val"])
    reference = ready(DigitsDataModule(batch_size=50, seed=100))
    assert torch.equal(rank0["val"], reference.val_indices)
    # Lightning's distributed sampler deals the batches of the shared epoch order out to the ranks:
    # each rank's first batch is one of the batches made with seed 100
    order = epoch_permutation(len(reference.train_dataset), 100, 0)
    inputs = reference.train_dataset.tensors[0]
    batches = [inputs[order[start : start + 50]] for start in range(0, len(order), 50)]
    for rank in (rank0, rank1):
        assert rank["first"].shape == (50, 64)
        assert any(torch.equal(rank["first"], batch) for batch in batches)


class RecordBatches(pl.Callback):
    def __init__(self) -> None:
        self.labels: dict[int, list[torch.Tensor]] = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.labels.setdefault(trainer.current_epoch, []).append(batch[1].clone())


def test_resumed_run_sees_the_same_order_as_an_uninterrupted_one(tmp_path):
    straight = RecordBatches()
    trainer(tmp_path, max_epochs=2, callbacks=[straight]).fit(Tiny(), datamodule=DigitsDataModule(batch_size=50, seed=5))
    first = trainer(tmp_path, max_epochs=1)
    first.fit(Tiny(), datamodule=DigitsDataModule(batch_size=50, seed=5))
    first.save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed = RecordBatches()
    trainer(tmp_path, max_epochs=2, callbacks=[resumed]).fit(
        Tiny(), datamodule=DigitsDataModule(batch_size=50, seed=5), ckpt_path=tmp_path / "epoch1.ckpt")
    assert list(resumed.labels) == [1]
    assert not torch.equal(straight.labels[0][0], straight.labels[1][0])  # a new order in epoch 1 ...
    for a, b in zip(straight.labels[1], resumed.labels[1], strict=True):  # ... and the same one after resuming
        assert torch.equal(a, b)


def test_resuming_or_validating_with_another_seed_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "1")
    first = trainer(tmp_path)
    first.fit(Tiny(), datamodule=DigitsDataModule(batch_size=50))
    checkpoint = tmp_path / "epoch1.ckpt"
    first.save_checkpoint(checkpoint)

    monkeypatch.setenv("PL_GLOBAL_SEED", "2")
    with pytest.raises(InvalidDataConfigError, match="trained with data seed 1 but this run uses 2"):
        trainer(tmp_path, max_epochs=2).fit(Tiny(), datamodule=DigitsDataModule(batch_size=50), ckpt_path=checkpoint)
    with pytest.raises(InvalidDataConfigError, match="trained with data seed 1 but this run uses 2"):
        trainer(tmp_path).validate(Tiny(), datamodule=DigitsDataModule(batch_size=50), ckpt_path=checkpoint)
    trainer(tmp_path).test(Tiny(), datamodule=DigitsDataModule(batch_size=50), ckpt_path=checkpoint)  # no split
    monkeypatch.setenv("PL_GLOBAL_SEED", "1")
    resumed = trainer(tmp_path, max_epochs=2)
    resumed.fit(Tiny(), datamodule=DigitsDataModule(batch_size=50), ckpt_path=checkpoint)
    assert resumed.current_epoch == 2


# ---------------------------------------------------------------------------
# 6. Fingerprint what the user supplied
# ---------------------------------------------------------------------------


def mnist(root, **kwargs):
    kwargs.setdefault("val_size", 50)
    kwargs.setdefault("custom_data", True)
    kwargs.setdefault("seed", 0)
    return MNISTDataModule(data_dir=str(root), **kwargs)


def test_replaced_gz_file_is_read(tmp_path):
    data = make_mnist(tmp_path, gz=True)
    first = ready(mnist(tmp_path))
    assert torch.equal(first.test_dataset.tensors[1], torch.from_numpy(data["t10k-labels-idx1-ubyte"]).long())
    relabelled = (data["t10k-labels-idx1-ubyte"] + 3) % 10
    write_idx(tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte", relabelled, gz=True)
    second = ready(mnist(tmp_path))
    assert torch.equal(second.test_dataset.tensors[1], torch.from_numpy(relabelled).long())
    assert second.cache_path != first.cache_path


def test_file_rewritten_with_same_size_and_mtime_is_noticed(tmp_path):
    data = make_mnist(tmp_path)
    path = tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    ready(mnist(tmp_path))
    before = path.stat()
    relabelled = (data["train-labels-idx1-ubyte"] + 1) % 10
    write_idx(path, relabelled)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    dm = ready(mnist(tmp_path))
    assert torch.equal(dm.train_dataset.tensors[1], torch.from_numpy(relabelled).long()[dm.train_indices])


# ---------------------------------------------------------------------------
# 7. Files of the wrong dataset
# ---------------------------------------------------------------------------


def test_md5_of_gz_files_on_disk_is_checked(tmp_path):
    """Files that are not MNIST's (Fashion-MNIST's, or any others) are refused even when they were not downloaded."""
    make_mnist(tmp_path, gz=True)
    with pytest.raises(WrongDatasetError, match="does not match the md5 sum of the official MNIST release") as info:
        ready(MNISTDataModule(data_dir=str(tmp_path), val_size=50))
    assert "custom_data=True" in str(info.value) and "train-images-idx3-ubyte.gz" in str(info.value)
    assert len(ready(mnist(tmp_path)).train_dataset) == 250  # the explicit opt-out


def test_test_files_under_the_training_names_are_refused(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    test = mnist_arrays(n_train=1, n_test=10000)
    for split in ("train", "t10k"):  # the t10k files under both names
        write_idx(raw / f"{split}-images-idx3-ubyte", test["t10k-images-idx3-ubyte"])
        write_idx(raw / f"{split}-labels-idx1-ubyte", test["t10k-labels-idx1-ubyte"])
    with pytest.raises(WrongDatasetError, match="hold 10000 examples, but the official train split has 60000") as info:
        ready(MNISTDataModule(data_dir=str(tmp_path), val_size=5000, seed=0))
    assert "the size of the test split" in str(info.value) and "custom_data=True" in str(info.value)

    # files of the official sizes pass (no md5 sums exist for unpacked files: format and sizes are checked)
    write_idx(raw / "train-images-idx3-ubyte", np.zeros((60000, 28, 28), dtype=np.uint8))
    write_idx(raw / "train-labels-idx1-ubyte", np.arange(60000, dtype=np.uint8) % 10)
    dm = ready(MNISTDataModule(data_dir=str(tmp_path), downsample=4, seed=0))
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (50000, 10000, 10000)


# ---------------------------------------------------------------------------
# 8. Empty validation and test sets
# ---------------------------------------------------------------------------


def test_val_size_zero_and_test_size_zero_work_with_lightning(tmp_path):
    dm = DigitsDataModule(val_size=0, test_size=0, batch_size=50, seed=0)
    run = trainer(tmp_path)
    run.fit(Tiny(), datamodule=dm)
    assert run.global_step == 2
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (1797, 0, 0)
    assert dm.val_dataset.tensors[0].shape == (0, 64) and dm.test_dataset.tensors[0].shape == (0, 64)
    assert len(dm.val_dataloader()) == 0 and len(dm.test_dataloader()) == 0

    images = DigitsDataModule(val_size=0, flatten=False, seed=0)
    assert ready(images).val_dataset.tensors[0].shape == (0, 1, 8, 8)
    root = tmp_path / "mnist"
    make_mnist(root)
    assert ready(mnist(root, val_size=0, downsample=10)).val_dataset.tensors[0].shape == (0, 100)


# ---------------------------------------------------------------------------
# 9. Read-only and shared data folders
# ---------------------------------------------------------------------------


def test_cache_dir_puts_the_cache_elsewhere(tmp_path):
    make_mnist(tmp_path / "data")
    dm = ready(mnist(tmp_path / "data", cache_dir=str(tmp_path / "cache")))
    assert dm.cache_path.parent == tmp_path / "cache" and dm.cache_path.is_file()
    assert not (tmp_path / "data" / "pl_pathsgd_cache").exists()


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775)])
def test_cache_files_have_the_users_normal_permissions(tmp_path, umask, file_mode, dir_mode):
    make_mnist(tmp_path)
    old = os.umask(umask)
    try:
        dm = ready(mnist(tmp_path))
    finally:
        os.umask(old)
    assert stat.S_IMODE(dm.cache_path.stat().st_mode) == file_mode
    assert stat.S_IMODE(dm.cache_path.parent.stat().st_mode) == dir_mode


OTHER_USER = 65534  # nobody


@pytest.fixture
def shared_folder():
    """A folder every user may enter (pytest's own tmp_path is private to its owner), and in it
    ``own``, a folder of the second user's own."""
    folder = Path(tempfile.mkdtemp(prefix="pl_pathsgd-shared-"))
    folder.chmod(0o755)
    (folder / "own").mkdir()
    if os.geteuid() == 0:
        os.chown(folder / "own", OTHER_USER, OTHER_USER)
    yield folder
    shutil.rmtree(folder)


@contextmanager
def as_second_user():
    """Act as another user (nobody) for file access; needs root, which can switch back."""
    if os.geteuid() != 0:
        pytest.skip("acting as a second user needs root")
    os.setegid(OTHER_USER)
    os.seteuid(OTHER_USER)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def test_read_only_data_folder_without_cache_dir_keeps_data_in_memory(shared_folder):
    data = shared_folder / "data"
    make_mnist(data)
    for path in [data, *data.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    with as_second_user():
        with pytest.warns(CacheWarning, match="Pass cache_dir= a writable folder") as caught:
            dm = ready(mnist(data))
        assert len(dm.train_dataset) == 250 and len(caught) == 1
        elsewhere = ready(mnist(data, cache_dir=str(shared_folder / "own" / "cache")))
        assert elsewhere.cache_path.is_file() and elsewhere.cache_path.parent == shared_folder / "own" / "cache"
        torch.testing.assert_close(elsewhere.train_dataset.tensors[0], dm.train_dataset.tensors[0])
    assert not (data / "pl_pathsgd_cache").exists()


def test_a_second_user_reads_the_cache_of_the_first(shared_folder):
    data = shared_folder / "data"
    make_mnist(data)
    old = os.umask(0o022)  # a usual umask
    try:
        cache = ready(mnist(data, downsample=10)).cache_path
    finally:
        os.umask(old)
    stamp = cache.stat().st_mtime_ns
    with as_second_user(), warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)  # no "could not be read", no rebuild
        dm = ready(mnist(data, downsample=10))
    assert len(dm.train_dataset) == 250 and dm.cache_path == cache and cache.stat().st_mtime_ns == stamp


def test_unreadable_cache_is_reported_as_a_permission_problem(shared_folder):
    data = shared_folder / "data"
    make_mnist(data)
    old = os.umask(0o077)  # the first user's own files are private
    try:
        ready(mnist(data))
    finally:
        os.umask(old)
    with as_second_user(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm = ready(mnist(data))
    messages = [str(w.message) for w in caught if issubclass(w.category, CacheWarning)]
    assert any("this user may not read it" in m and "cache_dir=" in m for m in messages), messages
    assert not any("could not be read" in m or "corrupt" in m for m in messages), messages
    assert len(dm.train_dataset) == 250


# ---------------------------------------------------------------------------
# 11. A stalled dataset host
# ---------------------------------------------------------------------------


def test_stalled_host_times_out_with_a_clear_message(tmp_path, monkeypatch):
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    # A listening socket that never answers: the kernel accepts the connection, nobody ever replies.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        mirror = f"http://127.0.0.1:{server.getsockname()[1]}/"
        dm = mnist(tmp_path, download=True, mirror=mirror, download_timeout=0.5)
        start = time.monotonic()
        with pytest.raises(DatasetDownloadError) as info:
            dm.prepare_data()
        elapsed = time.monotonic() - start
    assert elapsed < 10
    message = str(info.value)
    assert f"{mirror}train-images-idx3-ubyte.gz: the host sent nothing for 0.5 s (download_timeout=0.5)" in message
    assert "\n" not in message and "download=False" in message


# ---------------------------------------------------------------------------
# 12. A bad argument: one line naming the option and the fix
# ---------------------------------------------------------------------------


def test_bad_batch_size_is_one_line_naming_the_option():
    with pytest.raises(InvalidDataConfigError) as info:
        DigitsDataModule(batch_size=-1)
    assert str(info.value) == "batch_size=-1 is invalid: batch_size must be an integer >= 1"
    assert info.value.argument == "batch_size"


def test_bad_batch_size_through_the_cli_is_one_line_naming_the_option(capsys):
    """``pl-pathsgd fit --data.init_args.batch_size=-1``: the DataModule's own error, in one line naming the
    option, and exit status 2 (no traceback, no jsonargparse union listing)."""
    from pl_pathsgd.cli import make_cli

    with pytest.raises(SystemExit) as info:
        make_cli(["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--data.init_args.batch_size=-1"])
    assert info.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("pl-pathsgd: error: --data.init_args.batch_size: batch_size=-1 is invalid")


def test_no_warnings_from_a_plain_digits_fit(tmp_path):
    """The DataModules' loaders do not trigger Lightning's warnings (sampler, shuffling, batch size)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, limit_val_batches=2).fit(Tiny(), datamodule=DigitsDataModule(batch_size=50, seed=0))
    ours = [str(w.message) for w in caught if "pl_pathsgd" in w.filename or "sampler" in str(w.message).lower()
            or "batch_size" in str(w.message)]
    assert not ours, ours
