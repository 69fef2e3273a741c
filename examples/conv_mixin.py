"""A conv net with pooling trained by Path-SGD through PathSGDMixin, on 8x8 digit images.

    python examples/conv_mixin.py
"""

import functools

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from pl_pathsgd import PathSGD, PathSGDMixin
from pl_pathsgd.data import DigitsDataModule


class DigitConvNet(PathSGDMixin, pl.LightningModule):
    def __init__(self, lr: float = 0.05):
        super().__init__(optimizer=functools.partial(PathSGD, lr=lr, momentum=0.9))
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 16 x 4 x 4
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),  # 32 x 2 x 2
            nn.Flatten(), nn.Linear(128, 10),
        )
        # one 1x8x8 image: the input shape Path-SGD follows (without it, the first batch's is used)
        self.example_input_array = torch.zeros(1, 1, 8, 8)

    # Path-SGD normalises this network
    @property
    def path_network(self) -> nn.Module:
        return self.net

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_error", (self(x).argmax(1) != y).float().mean())


def main(max_epochs: int = 8) -> None:
    pl.seed_everything(0)
    data = DigitsDataModule(flatten=False)
    model = DigitConvNet()
    trainer = pl.Trainer(max_epochs=max_epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=data)
    result = trainer.test(model, datamodule=data, verbose=False)[0]
    print(f"conv net trained by Path-SGD: test error {result['test_error']:.4f}")


if __name__ == "__main__":
    main()
