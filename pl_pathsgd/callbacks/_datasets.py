"""Reading every example of a data source once, in large batches, without touching the source.

:func:`whole_dataset_reader` turns what a split's data source is (a DataLoader, or any re-iterable of
batches) into a :class:`DatasetReader` whose ``batches()`` cover the examples of the source exactly once:

* a DataLoader over a :class:`~torch.utils.data.TensorDataset` (the package's ``InMemoryDataset`` is one)
  whose ``collate_fn`` stacks rows (checked on the first two examples) is read by slicing its tensors
  directly: no per-example or per-batch Python beyond one slice per tensor;
* any other map-style DataLoader is read through a new, unshuffled DataLoader over the same dataset (same
  ``collate_fn`` and workers, ``eval_batch_size`` examples per batch, its own seeded generator);
* the examples are those the loader's sampler draws (the whole dataset for sequential, random and
  distributed samplers; a ``SubsetRandomSampler``'s indices; for other samplers, the indices one pass of a
  copy of the sampler yields), each once; under DDP each process reads every world-size-th of them;
* an iterable-style dataset is read through a new DataLoader over it (it must be re-iterable);
* another iterable of batches (a list) is read as it is; a one-shot iterator is refused.

The source's own sampler, generator and iterators are never advanced, so the training order is untouched.
"""

from __future__ import annotations

import copy
import itertools
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    Subset,
    SubsetRandomSampler,
    TensorDataset,
)

from pl_pathsgd.callbacks._observe import preserved_rng, private_generator


class DatasetReader(ABC):
    """The batches of a whole data source; see :func:`whole_dataset_reader`."""

    @abstractmethod
    def batches(self) -> Iterator[Any]:
        """One pass over the examples, in batches."""


class TensorSlices(DatasetReader):
    """Batches sliced straight from in-memory tensors (views when the rows are contiguous)."""

    def __init__(self, tensors: Sequence[Tensor], rows: Sequence[int] | None, batch_size: int, container: type):
        self.tensors, self.batch_size, self.container = tuple(tensors), batch_size, container
        self.rows = None if rows is None else torch.as_tensor(rows, dtype=torch.long)
        self.length = len(self.tensors[0]) if self.rows is None else len(self.rows)

    def batches(self) -> Iterator[Any]:
        for start in range(0, self.length, self.batch_size):
            if self.rows is None:
                yield self.container(t[start:start + self.batch_size] for t in self.tensors)
            else:
                index = self.rows[start:start + self.batch_size]
                yield self.container(t[index.to(t.device)] for t in self.tensors)


class LoaderBatches(DatasetReader):
    """Batches of a DataLoader (or any re-iterable) that this module built or that is safe to re-read."""

    def __init__(self, loader: Iterable):
        self.loader = loader

    def batches(self) -> Iterator[Any]:
        return iter(self.loader)


def whole_dataset_reader(source: Any, batch_size: int, rank: int = 0, world_size: int = 1) -> DatasetReader:
    """A reader of every example of ``source`` once (this process's share under DDP)."""
    if not isinstance(source, DataLoader):
        if iter(source) is source:
            raise ValueError(
                f"a {type(source).__name__} can be read only once; the error monitor reads its data every epoch: "
                "pass a DataLoader (or a list of batches)"
            )
        return LoaderBatches(source)
    dataset = source.dataset
    if isinstance(dataset, IterableDataset):
        return LoaderBatches(_rebuilt(source, dataset, batch_size if source.batch_size is not None else None))
    rows = _sampled_rows(source)
    if world_size > 1:
        rows = (range(len(dataset)) if rows is None else rows)[rank::world_size]
    container = _slicing_container(source)
    if container is not None:
        return TensorSlices(dataset.tensors, rows, batch_size, container)
    subset = dataset if rows is None else Subset(dataset, list(rows))
    return LoaderBatches(_rebuilt(source, subset, batch_size))


def _rebuilt(loader: DataLoader, dataset: Any, batch_size: int | None) -> DataLoader:
    """An unshuffled DataLoader over ``dataset`` with ``loader``'s collate and workers, and a private generator."""
    workers = loader.num_workers
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        drop_last=False,
        collate_fn=loader.collate_fn,
        num_workers=workers,
        pin_memory=loader.pin_memory,
        worker_init_fn=loader.worker_init_fn if workers else None,
        multiprocessing_context=loader.multiprocessing_context if workers else None,
        persistent_workers=loader.persistent_workers if workers else False,
        prefetch_factor=loader.prefetch_factor if workers else None,
        generator=private_generator(),
    )


def _sampled_rows(loader: DataLoader) -> list[int] | None:
    """The dataset indices the loader's sampler draws, each once and sorted; ``None`` for all of them."""
    batch_sampler = loader.batch_sampler
    if batch_sampler is None or type(batch_sampler) is BatchSampler:
        sampler = loader.sampler
    else:
        sampler = batch_sampler  # a custom batch sampler decides the examples itself
    if isinstance(sampler, (SequentialSampler, DistributedSampler)):
        return None
    if isinstance(sampler, RandomSampler) and not sampler.replacement and sampler.num_samples == len(loader.dataset):
        return None
    if isinstance(sampler, SubsetRandomSampler):
        return sorted({int(i) for i in sampler.indices})
    with preserved_rng():  # one pass of a copy: the original sampler (and its generator) does not move
        try:
            drawn = list(copy.deepcopy(sampler, {id(loader.dataset): loader.dataset}))  # the dataset is not copied
        except Exception as error:
            raise ValueError(
                f"cannot tell which examples the {type(sampler).__name__} of this DataLoader draws "
                f"({type(error).__name__}: {error}); pass the error monitor an unshuffled DataLoader over the "
                "examples to measure"
            ) from error
    flat = itertools.chain.from_iterable(i if isinstance(i, Iterable) else (i,) for i in drawn)
    return sorted({int(i) for i in flat})


def _slicing_container(loader: DataLoader) -> type | None:
    """``list`` or ``tuple`` when the loader's batches are its TensorDataset's rows stacked, else ``None``.

    Checked on the first two examples: the dataset's own fetch (``__getitems__``, ``__getitem__``, or
    ``dataset[indices]`` for a loader with ``batch_size=None`` whose sampler yields lists of indices) and the
    loader's ``collate_fn`` must give exactly the sliced tensors, so a dataset that transforms its examples
    or a collate_fn that reshapes the batch is read through the DataLoader instead.
    """
    dataset = loader.dataset
    if not isinstance(dataset, TensorDataset) or not dataset.tensors:
        return None
    count = min(2, len(dataset))
    if count == 0:
        return list
    indices = list(range(count))
    with preserved_rng():
        try:
            if loader.batch_sampler is None:  # batch_size=None: the sampler yields index lists, the dataset gathers
                fetched = dataset[indices]
            elif hasattr(dataset, "__getitems__"):
                fetched = dataset.__getitems__(indices)
            else:
                fetched = [dataset[i] for i in indices]
            collated = loader.collate_fn(fetched)
        except Exception:  # whatever goes wrong shows up, with its own message, when the loader is read
            return None
    sliced = [t[:count] for t in dataset.tensors]
    if not isinstance(collated, (list, tuple)) or len(collated) != len(sliced):
        return None
    for got, expected in zip(collated, sliced):
        if not (isinstance(got, Tensor) and got.dtype == expected.dtype and got.shape == expected.shape
                and got.device == expected.device and torch.equal(got, expected)):
            return None
    return list if isinstance(collated, list) else tuple
