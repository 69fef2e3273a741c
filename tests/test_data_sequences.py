"""Data for recurrent networks: the addition problem and images as sequences of rows or pixels."""

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from pl_pathsgd.data import (
    CONSTANT_PREDICTION_MSE,
    AdditionDataModule,
    CIFAR10DataModule,
    InvalidDataConfigError,
    MNISTDataModule,
)
from pl_pathsgd.data.addition import addition_problem
from tests.data_files import make_cifar, make_mnist


def ready(dm):
    dm.prepare_data()
    dm.setup("fit")
    return dm


# ---------------------------------------------------------------------------
# The addition problem
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("seq_len", [2, 7, 50])
def test_addition_sequences_follow_the_classic_task(seq_len):
    x, y = addition_problem(5000, seq_len, np.random.default_rng(0))
    assert x.shape == (5000, seq_len, 2) and y.shape == (5000, 1)
    assert x.dtype == torch.float32 and y.dtype == torch.float32
    values, markers = x[..., 0], x[..., 1]
    assert 0 <= values.min() and values.max() < 1
    assert set(markers.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(markers.sum(1), torch.full((5000,), 2.0))  # exactly two markers
    half = seq_len // 2
    assert torch.equal(markers[:, :half].sum(1), torch.ones(5000))  # one in the first half
    assert torch.equal(markers[:, half:].sum(1), torch.ones(5000))  # one in the second half
    torch.testing.assert_close(y[:, 0], (values * markers).sum(1))  # the target: the sum of the marked values
    # every position of each half is used
    first, second = markers[:, :half].argmax(1), markers[:, half:].argmax(1) + half
    assert set(first.tolist()) == set(range(half)) and set(second.tolist()) == set(range(half, seq_len))


def test_predicting_one_gives_mse_one_sixth():
    _, y = addition_problem(200_000, 10, np.random.default_rng(1))
    mse = float(((y - 1.0) ** 2).mean())
    assert CONSTANT_PREDICTION_MSE == pytest.approx(1 / 6)
    assert mse == pytest.approx(1 / 6, rel=0.02)
    assert float(y.mean()) == pytest.approx(1.0, abs=0.01)  # 1 is the best constant


def test_addition_datamodule_shapes_splits_and_seed():
    dm = AdditionDataModule(30, train_size=300, val_size=40, test_size=50, batch_size=16, seed=3)
    assert dm.input_shape == (30, 2) and dm.num_outputs == 1
    assert not hasattr(dm, "num_classes")
    ready(dm)
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (300, 40, 50)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 30, 2) and y.shape == (16, 1) and x.dtype == y.dtype == torch.float32
    # generated from the seed: the same seed gives the same data, another seed other data
    same = ready(AdditionDataModule(30, train_size=300, val_size=40, test_size=50, seed=3))
    other = ready(AdditionDataModule(30, train_size=300, val_size=40, test_size=50, seed=4))
    assert torch.equal(same.test_dataset.tensors[0], dm.test_dataset.tensors[0])
    assert not torch.equal(other.test_dataset.tensors[0], dm.test_dataset.tensors[0])
    # the splits are independent draws, and a split does not depend on the sizes of the others
    assert not torch.equal(dm.val_dataset.tensors[0], dm.test_dataset.tensors[0][:40])
    resized = ready(AdditionDataModule(30, train_size=10, val_size=40, test_size=50, seed=3))
    assert torch.equal(resized.test_dataset.tensors[1], dm.test_dataset.tensors[1])


@pytest.mark.parametrize("kwargs, argument", [({"seq_len": 1}, "seq_len"), ({"train_size": 0}, "train_size"),
                                              ({"val_size": -1}, "val_size"), ({"batch_size": 0}, "batch_size")])
def test_addition_arguments_are_checked(kwargs, argument):
    with pytest.raises(InvalidDataConfigError) as info:
        AdditionDataModule(**kwargs)
    assert info.value.argument == argument


def test_addition_trains_a_relu_rnn_with_lightning(tmp_path):
    class ReluRNN(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.rnn = torch.nn.RNN(2, 16, nonlinearity="relu", batch_first=True)
            self.readout = torch.nn.Linear(16, 1)

        def forward(self, x):
            return self.readout(self.rnn(x)[0][:, -1])

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.mse_loss(self(x), y)

        def validation_step(self, batch, _):
            x, y = batch
            self.log("val_mse", torch.nn.functional.mse_loss(self(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    dm = AdditionDataModule(8, train_size=256, val_size=64, test_size=0, batch_size=32, seed=0)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(ReluRNN(), datamodule=dm)
    assert trainer.global_step == 8 and torch.isfinite(trainer.callback_metrics["val_mse"])


# ---------------------------------------------------------------------------
# Images as sequences
# ---------------------------------------------------------------------------


def test_mnist_as_rows_and_pixels(tmp_path):
    data = make_mnist(tmp_path)
    images = torch.from_numpy(data["train-images-idx3-ubyte"]).float() / 255

    def mnist(**kwargs):
        return MNISTDataModule(data_dir=str(tmp_path), custom_data=True, val_size=50, seed=0, normalize=False, **kwargs)

    rows = ready(mnist(as_sequence="rows"))
    assert rows.input_shape == (28, 28) and rows.train_dataset.tensors[0].shape == (250, 28, 28)
    k = int(rows.train_indices[4])
    torch.testing.assert_close(rows.train_dataset.tensors[0][4], images[k])  # step t is row t

    pixels = ready(mnist(as_sequence="pixels"))
    assert pixels.input_shape == (784, 1)
    x, _ = next(iter(pixels.train_eval_dataloader()))
    assert x.shape == (100, 784, 1)
    torch.testing.assert_close(x[4, :, 0], images[k].flatten())  # pixel-MNIST: row-major pixel order

    small = ready(mnist(as_sequence="pixels", downsample=10))
    assert small.input_shape == (100, 1) and small.train_dataset.tensors[0].shape == (250, 100, 1)
    flat = ready(mnist(downsample=10))
    torch.testing.assert_close(small.train_dataset.tensors[0][:, :, 0], flat.train_dataset.tensors[0])
    assert ready(mnist(as_sequence="rows", downsample=10)).input_shape == (10, 10)


def test_colour_images_as_rows_keep_the_channels_of_a_pixel_together(tmp_path):
    make_cifar(tmp_path)
    kwargs = dict(data_dir=str(tmp_path), custom_data=True, val_size=20, seed=0, normalize=False)
    images = ready(CIFAR10DataModule(flatten=False, **kwargs)).train_dataset.tensors[0]
    rows = ready(CIFAR10DataModule(as_sequence="rows", **kwargs))
    assert rows.input_shape == (32, 96)
    # step t, feature 3*j + c is channel c of pixel (t, j)
    torch.testing.assert_close(rows.train_dataset.tensors[0][2].view(32, 32, 3), images[2].permute(1, 2, 0))
    pixels = ready(CIFAR10DataModule(as_sequence="pixels", **kwargs))
    assert pixels.input_shape == (1024, 3)
    torch.testing.assert_close(pixels.train_dataset.tensors[0][2], images[2].permute(1, 2, 0).reshape(1024, 3))
