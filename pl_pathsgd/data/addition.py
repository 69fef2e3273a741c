"""The addition problem, a classic long-range memory task for recurrent networks, generated offline.

Each example is a sequence of ``T`` steps; step ``t`` holds two numbers: a value drawn uniformly
from [0, 1] and a marker, 0 or 1. Exactly two steps are marked: the first uniformly in the first
half (``t < T // 2``), the second uniformly in the second half (``t >= T // 2``). The target is the
sum of the two marked values. A network must remember the first marked value across at least half
the sequence.

Always predicting 1 (the mean of the target) gives a mean squared error of exactly 1/6: the target
is the sum of two independent uniform values, whose variance is 2 * 1/12. A network "solves" the
task when its error is far below that.
"""

from typing import Any

import numpy as np
import torch

from .base import BaseDataModule
from .datasets import InMemoryDataset
from .errors import check_int

__all__ = ["AdditionDataModule", "CONSTANT_PREDICTION_MSE", "addition_problem"]

#: Mean squared error of always predicting 1, the best constant prediction.
CONSTANT_PREDICTION_MSE = 1.0 / 6.0


def addition_problem(size: int, seq_len: int, generator: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` sequences: inputs ``(size, seq_len, 2)`` (value, marker) and targets ``(size, 1)``, float32."""
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} is too short: the addition problem marks one step in each half of a "
                         "sequence, so seq_len must be at least 2")
    values = generator.random((size, seq_len), dtype=np.float32)
    half = seq_len // 2
    rows = np.arange(size)
    first = generator.integers(0, half, size)
    second = generator.integers(half, seq_len, size)
    markers = np.zeros((size, seq_len), dtype=np.float32)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    inputs = np.stack([values, markers], axis=-1)
    targets = (values[rows, first] + values[rows, second]).reshape(size, 1)
    return torch.from_numpy(inputs), torch.from_numpy(targets)


class AdditionDataModule(BaseDataModule):
    """The addition problem: sequences of (value, marker) pairs whose target is the sum of the two marked values.

    Batches are ``(x, y)`` with ``x`` of shape ``(B, seq_len, 2)`` and ``y`` of shape ``(B, 1)``, both
    float32; ``input_shape == (seq_len, 2)`` and ``num_outputs == 1``. The three splits are
    generated independently from the seed (offline, in about a second for 100,000 sequences of
    length 100). Always predicting 1 gives a mean squared error of 1/6 (``CONSTANT_PREDICTION_MSE``).

    Args:
        seq_len: Length ``T`` of each sequence (at least 2): the first marker is in the first
            ``T // 2`` steps, the second in the rest.
        train_size: Number of training sequences (at least 1).
        val_size: Number of validation sequences (0 for no validation set).
        test_size: Number of test sequences (0 for no test set).
    """

    def __init__(
        self,
        seq_len: int = 100,
        *,
        train_size: int = 100000,
        val_size: int = 10000,
        test_size: int = 10000,
        **kwargs: Any,
    ) -> None:
        self.seq_len = check_int("seq_len", seq_len, 2)
        self.train_size = check_int("train_size", train_size, 1)
        self.val_size = check_int("val_size", val_size, 0)
        self.test_size = check_int("test_size", test_size, 0)
        super().__init__(**kwargs)

    @property
    def input_shape(self) -> tuple[int, int]:
        """``(seq_len, 2)``: a value and a marker per step."""
        return (self.seq_len, 2)

    @property
    def num_outputs(self) -> int:
        """One regression target."""
        return 1

    def build_splits(self, seed: int) -> tuple[InMemoryDataset, InMemoryDataset, InMemoryDataset]:
        splits = []
        for index, size in enumerate((self.train_size, self.val_size, self.test_size)):
            generator = np.random.default_rng([seed, index])  # an independent stream per split
            splits.append(InMemoryDataset(*addition_problem(size, self.seq_len, generator)))
        return splits[0], splits[1], splits[2]
