"""Fit on DigitsDataModule under DDP (2 CPU processes, gloo) with a different global seed on each rank.

    python tests/scripts/ddp_data_seed.py OUT_DIR

Rank r calls ``seed_everything(100 + r)``; the DataModule must still give every rank the same split
and the same batches (rank 0's seed), which Lightning's distributed sampler then deals out to the
ranks. Each rank saves its resolved seed, its validation indices and the inputs of its first
training batch to OUT_DIR/rank<r>.pt.
"""

import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from pl_pathsgd.data import DigitsDataModule


class Probe(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(64, 10)
        self.first_inputs = None

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.first_inputs is None:
            self.first_inputs = x.clone()
        return F.cross_entropy(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main(out: Path) -> None:
    pl.seed_everything(100 + int(os.environ.get("LOCAL_RANK", 0)))
    data, model = DigitsDataModule(batch_size=50), Probe()
    trainer = pl.Trainer(
        max_epochs=1, limit_train_batches=2, limit_val_batches=0, accelerator="cpu", devices=2, strategy="ddp",
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model, datamodule=data)
    torch.save({"seed": data.resolved_seed, "val": data.val_indices, "first": model.first_inputs},
               out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
