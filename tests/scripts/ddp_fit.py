"""Fit the classifier with PathSGD on fixed data, in one process or under DDP (2 CPU processes, gloo).

    python tests/scripts/ddp_fit.py OUT_DIR {single,ddp}

Both runs see the same global batches: the data is not shuffled and, under DDP, rank r reads
examples r, r+2, r+4, ... (Lightning's own distributed sampler would shuffle), so each global batch
of 32 is split into two per-rank batches of 16. Final weights go to OUT_DIR/<mode>.pt.
"""

import functools
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from pl_pathsgd.callbacks import EpochErrorMonitor, PathNormMonitor, RescalingInvarianceCheck
from pl_pathsgd.module import PathSGDClassifier
from pl_pathsgd.optim import PathSGD

GLOBAL_BATCH = 32


def dataset(n: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=generator)
    return TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0.3).long())


class FixedOrderData(pl.LightningDataModule):
    def __init__(self, devices: int):
        super().__init__()
        self.devices = devices

    def _loader(self, data: TensorDataset) -> DataLoader:
        sampler = DistributedSampler(data, num_replicas=self.devices, rank=self.trainer.global_rank, shuffle=False)
        return DataLoader(data, batch_size=GLOBAL_BATCH // self.devices, sampler=sampler)

    def train_dataloader(self) -> DataLoader:
        return self._loader(dataset(128, 0))

    def test_dataloader(self) -> DataLoader:
        return self._loader(dataset(64, 1))


def main(out: Path, mode: str) -> None:
    pl.seed_everything(0)
    devices = 2 if mode == "ddp" else 1
    model = PathSGDClassifier(input_shape=(6,), num_classes=3, hidden=[32, 32],
                              optimizer=functools.partial(PathSGD, lr=0.05, momentum=0.5))
    trainer = pl.Trainer(
        max_epochs=2, accelerator="cpu", devices=devices, strategy="ddp" if mode == "ddp" else "auto",
        logger=CSVLogger(out, name=mode, version=0), enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, log_every_n_steps=1, use_distributed_sampler=False,
        callbacks=[EpochErrorMonitor(), PathNormMonitor(),
                   RescalingInvarianceCheck(tolerance=1e-4)],
    )
    trainer.fit(model, datamodule=FixedOrderData(devices))
    if trainer.is_global_zero:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, out / f"{mode}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
