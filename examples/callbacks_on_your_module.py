"""The pl-pathsgd callbacks on your own LightningModule (no mixin, plain torch.optim.SGD).

    python examples/callbacks_on_your_module.py
    tensorboard --logdir runs/callbacks_example
"""

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from pl_pathsgd.callbacks import EpochErrorMonitor, PathNormMonitor, RescalingInvarianceCheck, TensorBoardExtras
from pl_pathsgd.data import DigitsDataModule


class MyClassifier(pl.LightningModule):
    """An ordinary LightningModule: its forward is the network, so the callbacks can use it directly."""

    def __init__(self, lr: float = 0.1):
        super().__init__()
        self.save_hyperparameters()
        self.layers = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x):
        return self.layers(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def main(max_epochs: int = 5, save_dir: str = "runs") -> dict:
    pl.seed_everything(0)
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        logger=TensorBoardLogger(save_dir, name="callbacks_example", default_hp_metric=False),
        callbacks=[EpochErrorMonitor(), PathNormMonitor(), RescalingInvarianceCheck(), TensorBoardExtras()],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(MyClassifier(), datamodule=DigitsDataModule())
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    print(f"train error {metrics['train/error']:.4f}, test error {metrics['test/error']:.4f}, "
          f"path-norm (p=2) {metrics['path_norm/p2']:.3f}, "
          f"SGD's update gap under rescaling {metrics['invariance/update']:.3g} (Path-SGD's is round-off)")
    return metrics


if __name__ == "__main__":
    main()
