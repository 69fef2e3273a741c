"""Fit the classifier with PathSGD on fixed data, in one process or under DDP (2 CPU processes, gloo).

    python tests/scripts/ddp_fit.py OUT_DIR {single,ddp}

Both runs see the same global batches (unshuffled data; DDP splits each global batch of 32 into two
per-rank batches of 16) and save their final weights to OUT_DIR/<mode>.pt.
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from pl_pathsgd.callbacks import EpochErrorMonitor, PathNormMonitor, RescalingInvarianceCheck
from pl_pathsgd.module import PathSGDClassifier

GLOBAL_BATCH = 32


def loaders(per_device_batch: int):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(128, 6, generator=generator)
    y = ((x[:, 0] > 0).long() + (x[:, 1] > 0.3).long())
    test_x = torch.randn(64, 6, generator=generator)
    test_y = ((test_x[:, 0] > 0).long() + (test_x[:, 1] > 0.3).long())
    train = DataLoader(TensorDataset(x, y), batch_size=per_device_batch)
    test = DataLoader(TensorDataset(test_x, test_y), batch_size=per_device_batch)
    return train, test


def main(out: Path, mode: str) -> None:
    pl.seed_everything(0)
    devices = 2 if mode == "ddp" else 1
    train, test = loaders(GLOBAL_BATCH // devices)
    model = PathSGDClassifier(input_shape=(6,), num_classes=3, hidden=[32, 32], lr=0.05, momentum=0.5)
    trainer = pl.Trainer(
        max_epochs=2, accelerator="cpu", devices=devices, strategy="ddp" if mode == "ddp" else "auto",
        logger=CSVLogger(out, name=mode, version=0), enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, log_every_n_steps=1,
        callbacks=[EpochErrorMonitor(val=False, test_dataloader=test), PathNormMonitor(),
                   RescalingInvarianceCheck(tolerance=1e-4)],
    )
    trainer.fit(model, train)
    if trainer.is_global_zero:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, out / f"{mode}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
