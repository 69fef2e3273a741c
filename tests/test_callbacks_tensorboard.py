"""TensorBoardExtras, checked on the event files it writes (read back with TensorBoard's EventAccumulator)."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import plugin_data_pb2
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pl_pathsgd.callbacks import EpochErrorMonitor, PathNormMonitor, RescalingInvarianceCheck, TensorBoardExtras

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*(log_every_n_steps|does not have many workers|LeafSpec|litlogger|litmodels|no `validation_step`).*"
)

FEATURES, CLASSES = 5, 3


def data(seed: int, n: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, FEATURES, generator=generator), torch.randint(CLASSES, (n,), generator=generator))


class Classifier(pl.LightningModule):
    def __init__(self, lr: float = 0.1):
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(FEATURES, 16), nn.ReLU(), nn.Linear(16, CLASSES))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def fit_with_tensorboard(tmp_path, logger: TensorBoardLogger, max_epochs: int = 3):
    extras = TensorBoardExtras(hparams={"note": "tiny"})
    callbacks = [
        EpochErrorMonitor(test_dataloader=DataLoader(data(2, 30), batch_size=10)),
        PathNormMonitor(p=(1, 2, math.inf)),
        RescalingInvarianceCheck(every_n_epochs=2),
        extras,
    ]
    trainer = pl.Trainer(max_epochs=max_epochs, limit_train_batches=2, default_root_dir=tmp_path, logger=logger,
                         callbacks=callbacks, check_val_every_n_epoch=2, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(Classifier(), DataLoader(data(0, 40), batch_size=10, shuffle=True),
                DataLoader(data(1, 20), batch_size=10))
    accumulator = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    accumulator.Reload()
    return trainer, extras, accumulator


def scalars(accumulator, tag):
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


def plugin_content(accumulator, tag):
    return plugin_data_pb2.HParamsPluginData.FromString(accumulator.SummaryMetadata(tag).plugin_data.content)


def test_per_epoch_scalars_have_the_epoch_as_x_axis_and_each_path_norm_its_own_chart(tmp_path):
    trainer, extras, accumulator = fit_with_tensorboard(tmp_path, TensorBoardLogger(tmp_path, name="tb"))
    tags = accumulator.Tags()["scalars"]

    # every epoch-level metric once per epoch in which it was logged, against the epoch
    for key in ("train/error", "test/error", "path_norm/p1", "path_norm/p2", "path_norm/pinf"):
        assert [step for step, _ in scalars(accumulator, "per_epoch/" + key)] == [0, 1, 2], key
    assert [step for step, _ in scalars(accumulator, "per_epoch/val/error")] == [1]  # check_val_every_n_epoch=2
    assert [step for step, _ in scalars(accumulator, "per_epoch/invariance/update")] == [1]  # every_n_epochs=2
    last = dict(scalars(accumulator, "per_epoch/path_norm/p1"))[2]
    assert last == pytest.approx(float(trainer.callback_metrics["path_norm/p1"]), rel=1e-6)
    assert extras.history["test/error"].keys() == {0, 1, 2}
    assert "train/error" in tags  # Lightning's own step-based scalar is still there

    # the custom-scalars layout: errors together, each path-norm and each gap on its own axis, all per epoch
    layout = layout_pb2.Layout()
    layout.ParseFromString(accumulator.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    charts = {chart.title: list(chart.multiline.tag) for category in layout.category for chart in category.chart}
    assert charts["0-1 error"] == ["^per_epoch/train/error$", "^per_epoch/val/error$", "^per_epoch/test/error$"]
    assert charts["path-norm φ1 (path_norm/p1)"] == ["^per_epoch/path_norm/p1$"]
    assert charts["path-norm φ2 (path_norm/p2)"] == ["^per_epoch/path_norm/p2$"]
    assert charts["path-norm φ∞ (path_norm/pinf)"] == ["^per_epoch/path_norm/pinf$"]
    assert charts["rescaling gap (invariance/update)"] == ["^per_epoch/invariance/update$"]
    for tag_patterns in charts.values():  # every chart shows data that exists
        assert any(pattern.strip("^$") in tags for pattern in tag_patterns), tag_patterns

    assert len(accumulator.Images("learning_curves")) == 1


@pytest.mark.parametrize("default_hp_metric", [True, False])
def test_hparams_tab_shows_the_real_metrics_without_touching_the_logger(tmp_path, default_hp_metric):
    logger = TensorBoardLogger(tmp_path, name="tb", default_hp_metric=default_hp_metric)
    trainer, _, accumulator = fit_with_tensorboard(tmp_path, logger, max_epochs=2)
    assert logger._default_hp_metric is default_hp_metric  # the logger is left as configured

    # TensorBoard keeps the first record of a run: this callback's, naming its metrics
    experiment = plugin_content(accumulator, "_hparams_/experiment").experiment
    metric_names = [info.name.tag for info in experiment.metric_infos]
    assert metric_names == ["hparams/test_error", "hparams/val_error", "hparams/train_error",
                            "hparams/test_error_at_best_val"]
    start = plugin_content(accumulator, "_hparams_/session_start_info").session_start_info
    assert start.hparams["optimizer"].string_value == "SGD"
    assert start.hparams["optimizer.lr"].number_value == 0.1 and start.hparams["lr"].number_value == 0.1
    assert start.hparams["note"].string_value == "tiny" and start.hparams["max_epochs"].number_value == 2

    # the values TensorBoard shows in the HPARAMS tab: the last scalar of each metric
    final_test = scalars(accumulator, "hparams/test_error")
    assert len(final_test) == 1 and final_test[0][1] == pytest.approx(float(trainer.callback_metrics["test/error"]))
    test_by_epoch = dict(scalars(accumulator, "per_epoch/test/error"))
    assert scalars(accumulator, "hparams/test_error_at_best_val")[0][1] == pytest.approx(test_by_epoch[1])
    # Lightning's placeholder only where the logger asks for it, and then only as a plain scalar
    assert ("hp_metric" in accumulator.Tags()["scalars"]) is default_hp_metric


def test_a_second_fit_on_the_same_logger_writes_no_second_layout_or_record(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="tb")
    fit_with_tensorboard(tmp_path, logger, max_epochs=1)
    _, _, accumulator = fit_with_tensorboard(tmp_path, logger, max_epochs=1)
    assert len(accumulator.Tensors("custom_scalars__config__")) == 1
    metric_names = [info.name.tag for info in plugin_content(accumulator, "_hparams_/experiment").experiment.metric_infos]
    assert "hp_metric" not in metric_names


def test_state_round_trips(tmp_path):
    _, extras, _ = fit_with_tensorboard(tmp_path, TensorBoardLogger(tmp_path, name="tb"), max_epochs=1)
    restored = TensorBoardExtras(hparams={"note": "tiny"})
    restored.load_state_dict(extras.state_dict())
    assert restored.history == extras.history and restored.state_key == extras.state_key
