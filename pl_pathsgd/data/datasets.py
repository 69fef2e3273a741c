"""In-memory datasets and samplers whose order depends only on a seed and the epoch.

:class:`InMemoryDataset` is a ``TensorDataset`` that also accepts a whole batch of indices:
``dataset[i]`` is one example (so a plain ``DataLoader(dataset, batch_size=32)`` with the default
collation works as for any dataset), and ``dataset[indices]`` gathers a batch with one indexing
operation per tensor. The DataModules' own loaders use the second form through
:class:`EpochBatchSampler` (a loader with ``batch_size=None`` whose sampler yields batches of
indices), which makes an epoch over a small-image dataset cost milliseconds instead of one Python
call per example.
"""

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Sampler, TensorDataset

__all__ = ["EpochBatchSampler", "EpochShuffleSampler", "InMemoryDataset", "epoch_permutation"]


class InMemoryDataset(TensorDataset):
    """A :class:`~torch.utils.data.TensorDataset` that gathers whole batches at once.

    ``dataset[i]`` for an int ``i`` is the tuple of the ``i``-th rows (a slice gives the rows of the
    slice); ``dataset[indices]`` for a sequence or array of ints is the tuple of the gathered rows,
    each of length ``len(indices)``.
    """

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer, slice)) or (isinstance(index, Tensor) and index.dim() == 0):
            return tuple(tensor[index] for tensor in self.tensors)
        rows = np.asarray(index, dtype=np.int64)
        return tuple(_gather_rows(tensor, rows) for tensor in self.tensors)


def _gather_rows(tensor: Tensor, index: np.ndarray) -> Tensor:
    """``tensor[index]`` for a batch of row indices.

    On the CPU this goes through ``numpy.take``: a single-threaded row copy that is several times
    faster than torch's indexing kernels for batches of about a hundred rows, whose multi-threaded
    dispatch costs more than the copy and stalls badly when the cores are busy.
    """
    if tensor.device.type == "cpu":
        return torch.from_numpy(np.take(tensor.numpy(), index, axis=0))
    return tensor.index_select(0, torch.as_tensor(index, device=tensor.device))


def epoch_permutation(size: int, seed: int, epoch: int) -> Tensor:
    """The random order of ``range(size)`` for one epoch: a function of ``(seed, epoch)`` only."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(size, generator=generator)


class _EpochOrder:
    """The epoch bookkeeping shared by the samplers below.

    Lightning calls :meth:`set_epoch` before every epoch, so a run resumed from a checkpoint sees
    exactly the orders an uninterrupted run would; outside Lightning each new iteration moves on to
    the next epoch's order. The order is drawn when the first index is taken, not when the iterator
    is created: a resuming Lightning creates the iterator before it sets the epoch.
    """

    def __init__(self, size: int, seed: int | None) -> None:
        self.size, self.seed = size, seed
        self.epoch = 0
        self._epoch_set = False

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._epoch_set = epoch, True

    def _next_order(self) -> Tensor:
        if self.seed is None:
            return torch.arange(self.size)
        order = epoch_permutation(self.size, self.seed, self.epoch)
        if not self._epoch_set:
            self.epoch += 1
        self._epoch_set = False
        return order


class EpochShuffleSampler(_EpochOrder, Sampler[int]):
    """Indices in a random order per epoch that depends only on ``(seed, epoch)``."""

    def __init__(self, size: int, seed: int) -> None:
        super().__init__(size, seed)

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        yield from self._next_order().tolist()


class EpochBatchSampler(_EpochOrder, Sampler[Sequence[int]]):
    """Batches of indices: shuffled per epoch from ``seed`` (as :class:`EpochShuffleSampler`), or in
    order when ``seed`` is ``None``. The last batch may be smaller.
    """

    def __init__(self, size: int, batch_size: int, seed: int | None) -> None:
        super().__init__(size, seed)
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-self.size // self.batch_size)

    def __iter__(self) -> Iterator[np.ndarray]:
        order = self._next_order().numpy()
        for start in range(0, self.size, self.batch_size):
            yield order[start : start + self.batch_size]
