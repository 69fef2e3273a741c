"""The base of every DataModule of :mod:`pl_pathsgd.data`: in-memory splits, seeded order, loaders.

A subclass says what one example looks like (:attr:`~BaseDataModule.input_shape`,
:attr:`~BaseDataModule.num_outputs`) and builds its three splits from a seed
(:meth:`~BaseDataModule.build_splits`); this class resolves the seed, keeps the splits and serves
them:

* ``seed=None`` (the default) follows the global seed that ``lightning.seed_everything`` set (the
  ``PL_GLOBAL_SEED`` environment variable, which is also what Lightning's own distributed sampler
  reads; 0 if no global seed was set); an int pins the data's randomness independently of it.
* Under distributed training every rank uses rank 0's seed, so all ranks agree on the split and the
  order even if the global seeds differ.
* The seed is saved in checkpoints; resuming (or validating) with another seed is an error, since it
  would change the validation split.
"""

from abc import ABC, abstractmethod
from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from ..seeding import global_seed
from .datasets import EpochBatchSampler, InMemoryDataset
from .errors import InvalidDataConfigError, check_int

__all__ = ["BaseDataModule"]


class BaseDataModule(pl.LightningDataModule, ABC):
    """Base class of the pl_pathsgd DataModules.

    Args:
        batch_size: Examples per batch for every dataloader (an integer >= 1).
        num_workers: Worker processes of the dataloaders (0 loads in the main process, which is
            normally fastest here: the data is in memory and a batch is one indexing operation).
        seed: Seed of the data's randomness (the split and the training order). ``None`` follows
            the global seed set by ``seed_everything`` (0 if none was set); an integer >= 0 pins it.
    """

    def __init__(self, *, batch_size: int = 100, num_workers: int = 0, seed: int | None = None) -> None:
        super().__init__()
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.num_workers = check_int("num_workers", num_workers, 0)
        self.seed = None if seed is None else check_int("seed", seed, 0)
        self.save_hyperparameters()
        #: The seed actually used, set by :meth:`setup`.
        self.resolved_seed: int | None = None
        #: Training split; set by :meth:`setup`.
        self.train_dataset: InMemoryDataset | None = None
        #: Validation split; set by :meth:`setup`.
        self.val_dataset: InMemoryDataset | None = None
        #: Test split; set by :meth:`setup`.
        self.test_dataset: InMemoryDataset | None = None

    # ------------------------------------------------------------------ what a subclass provides

    @property
    @abstractmethod
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example as the model receives it (known before any data is loaded)."""

    @property
    @abstractmethod
    def num_outputs(self) -> int:
        """Width of the model's output: the number of classes, or of regression targets."""

    @abstractmethod
    def build_splits(self, seed: int) -> tuple[InMemoryDataset, InMemoryDataset, InMemoryDataset]:
        """Build the training, validation and test splits; all randomness comes from ``seed``."""

    # ------------------------------------------------------------------ seed

    def _resolve_seed(self) -> int:
        seed = self.seed if self.seed is not None else global_seed()
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            seed = int(trainer.strategy.broadcast(seed, src=0))
        return seed

    def state_dict(self) -> dict[str, Any]:
        """The seed of the split and order, saved in checkpoints."""
        return {"seed": self.resolved_seed} if self.resolved_seed is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Refuse to fit or validate from a checkpoint made with another seed (another validation split).

        Lightning calls this after :meth:`setup`. Testing and predicting do not depend on the split
        and accept any seed.
        """
        saved = state_dict.get("seed")
        stage = getattr(getattr(self.trainer, "state", None), "fn", None)
        if getattr(stage, "value", stage) in ("test", "predict"):
            return
        if saved is not None and self.resolved_seed is not None and saved != self.resolved_seed:
            how = "seed" if self.seed is not None else "seed_everything"
            raise InvalidDataConfigError(
                f"the checkpoint was trained with data seed {saved} but this run uses {self.resolved_seed} "
                f"(from {how}): resuming would change the validation split and the order; "
                f"resume with seed_everything={saved} or the DataModule's seed={saved}",
                "seed",
            )

    # ------------------------------------------------------------------ Lightning hooks

    def setup(self, stage: str | None = None) -> None:
        """Build the three splits once (whatever ``stage`` is); later calls do nothing."""
        if self.train_dataset is not None:
            return
        seed = self._resolve_seed()
        self.train_dataset, self.val_dataset, self.test_dataset = self.build_splits(seed)
        self.resolved_seed = seed

    def _loader(self, dataset: InMemoryDataset | None, split: str, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(
                f"{type(self).__name__}.{split}_dataloader() was called before setup(); "
                "call prepare_data() and setup() first (a Lightning Trainer does this for you)"
            )
        # batch_size=None: the sampler yields whole batches of indices, gathered by one indexing operation.
        sampler = EpochBatchSampler(len(dataset), self.batch_size, self.resolved_seed if shuffle else None)
        return DataLoader(
            dataset,
            batch_size=None,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Training split, reshuffled every epoch; the order depends only on the seed and the epoch."""
        return self._loader(self.train_dataset, "train", shuffle=True)

    def train_eval_dataloader(self) -> DataLoader:
        """The whole training split in a fixed order, for measuring the training error."""
        return self._loader(self.train_dataset, "train_eval", shuffle=False)

    def val_dataloader(self) -> DataLoader:
        """Validation split, in a fixed order (empty if there is no validation set)."""
        return self._loader(self.val_dataset, "val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test split, in a fixed order."""
        return self._loader(self.test_dataset, "test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """The test split, in a fixed order, batches ``(inputs, targets)`` as for testing."""
        return self._loader(self.test_dataset, "predict", shuffle=False)

    def teardown(self, stage: str | None = None) -> None:
        """Keep the in-memory splits: they are cheap to hold and slow to rebuild."""
