"""TensorBoardExtras: a custom-scalars layout, a learning-curve figure and hyper-parameters with real metrics."""

from __future__ import annotations

import re
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from pl_pathsgd.callbacks._common import require_logger

DEFAULT_CURVES = ("train/error", "val/error", "test/error", "train/loss", "val/loss", "test/loss")
DEFAULT_HPARAM_METRICS = ("test/error", "val/error", "train/error")

# writers that already hold a custom-scalars layout (TensorBoard keeps the first one a run receives)
_WRITERS_WITH_LAYOUT: weakref.WeakSet = weakref.WeakSet()


def default_layout(prefix: str = "") -> dict[str, dict[str, list]]:
    """The custom-scalars layout: errors, losses, path-norms and invariance gaps, one chart each."""

    def tags(*keys: str) -> list[str]:
        return [f"^{re.escape(prefix)}{key}$" for key in keys]

    return {
        "pl-pathsgd": {
            "0-1 error": ["Multiline", tags(r"train/error", r"val/error", r"test/error")],
            "loss": ["Multiline", tags(r"train/loss", r"val/loss", r"test/loss")],
            "path-norms": ["Multiline", tags(r"path_norm/.*")],
            "rescaling invariance (relative gaps)": ["Multiline", tags(r"invariance/.*")],
        }
    }


class TensorBoardExtras(Callback):
    r"""TensorBoard views of a training run, for every :class:`~lightning.pytorch.loggers.TensorBoardLogger`.

    * **Custom scalars** (on fit start, once per writer): a "pl-pathsgd" tab with the train/val/test 0-1
      errors in one chart, the losses in another, the path-norms (``path_norm/*``) and the rescaling gaps
      (``invariance/*``) in two more.  Pass ``layout`` to replace it (``{category: {chart: ["Multiline",
      [tag regexes]]}}``).
    * **Learning curves** (at the end of training): a matplotlib figure (Agg canvas) of the per-epoch values
      of ``curves`` (errors left, losses right) under the tag ``figure_tag``.  The values are read from
      ``trainer.callback_metrics`` once an epoch is complete (when the next one starts, and at the end of
      training), so whatever any callback logged in ``on_train_epoch_end`` is included whatever the order
      of the callbacks.  A key logged only every few epochs repeats its last value in between.
    * **Hyper-parameters with real metrics** (at the end of training): ``logger.log_hyperparams(params,
      metrics)`` with ``params`` = the module's and datamodule's ``hparams``, the optimizer's class and
      first param group, and ``hparams``; ``metrics`` = ``hparams/test_error`` (the final ``test/error``),
      ``hparams/val_error``, ``hparams/train_error`` (each of ``hparam_metrics`` logged), and
      ``hparams/test_error_at_best_val``: the test error of the epoch with the lowest validation error.

    TensorBoard's HPARAMS tab keeps the *first* hyper-parameter record of a run, and a
    ``TensorBoardLogger(default_hp_metric=True)`` (the default) would write a placeholder ``hp_metric = -1``
    when fit starts, hiding these metrics.  The callback therefore sets that logger's ``default_hp_metric``
    off at setup (with an info message); creating the logger with ``default_hp_metric=False`` does the same.

    The metrics come from other callbacks (:class:`EpochErrorMonitor`, :class:`PathNormMonitor`,
    :class:`RescalingInvarianceCheck`) or from the module's own ``self.log`` calls.  Without a
    TensorBoardLogger the callback warns once and does nothing; without any logger it raises.  It writes
    on global rank 0 only.

    Args:
        curves: metric keys plotted in the learning-curve figure.
        hparam_metrics: metric keys whose final value goes to the HPARAMS tab as ``hparams/<key with _>``.
        hparams: extra hyper-parameters to record (they override the collected ones).
        layout: custom-scalars layout to use instead of :func:`default_layout`.
        figure_tag: tag of the learning-curve figure.
    """

    def __init__(
        self,
        curves: Iterable[str] = DEFAULT_CURVES,
        hparam_metrics: Iterable[str] = DEFAULT_HPARAM_METRICS,
        hparams: Mapping[str, Any] | None = None,
        layout: Mapping[str, Mapping[str, list]] | None = None,
        figure_tag: str = "learning_curves",
    ):
        self.curves = _keys(curves, "curves")
        self.hparam_metrics = _keys(hparam_metrics, "hparam_metrics")
        if hparams is not None and not isinstance(hparams, Mapping):
            raise ValueError(f"TensorBoardExtras(hparams=...) must be a mapping, got {type(hparams).__name__}")
        if layout is not None:
            _check_layout(layout)
        if not isinstance(figure_tag, str) or not figure_tag:
            raise ValueError(f"TensorBoardExtras(figure_tag={figure_tag!r}) must be a non-empty string")
        self.hparams = dict(hparams or {})
        self.layout = None if layout is None else {c: dict(charts) for c, charts in layout.items()}
        self.figure_tag = figure_tag
        # every key the figure or the HPARAMS metrics need, by epoch
        self.tracked = tuple(dict.fromkeys((*self.curves, *self.hparam_metrics, "val/error", "test/error")))
        self.history: dict[str, dict[int, float]] = {key: {} for key in self.tracked}
        self._loggers: list[TensorBoardLogger] = []
        self._warned_no_tensorboard = False

    # ------------------------------------------------------------------ Lightning plumbing

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(curves=self.curves, figure_tag=self.figure_tag)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": {key: dict(values) for key, values in self.history.items()}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key, values in state_dict.get("history", {}).items():
            self.history.setdefault(key, {}).update({int(e): float(v) for e, v in values.items()})

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        require_logger(trainer, type(self).__name__)
        self._loggers = [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
        if not self._loggers and not self._warned_no_tensorboard:
            self._warned_no_tensorboard = True
            rank_zero_warn(
                f"{type(self).__name__} needs a TensorBoardLogger; the trainer has "
                f"{', '.join(type(logger).__name__ for logger in trainer.loggers)}. It does nothing in this run."
            )
        for logger in self._loggers:
            if getattr(logger, "_default_hp_metric", False):
                # Lightning would write a placeholder hp_metric=-1 when fit starts, and TensorBoard's HPARAMS tab
                # keeps the first record of a run: the real metrics written at the end would never show.
                logger._default_hp_metric = False
                rank_zero_info(
                    f"{type(self).__name__}: switched off the placeholder hp_metric of the TensorBoardLogger; "
                    "hyper-parameters are recorded at the end of training with hparams/test_error and co."
                )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        for logger in self._loggers:
            writer = logger.experiment
            if writer in _WRITERS_WITH_LAYOUT:
                continue
            layout = self.layout if self.layout is not None else default_layout(_prefix(logger))
            writer.add_custom_scalars(layout)
            _WRITERS_WITH_LAYOUT.add(writer)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the previous epoch is complete: everything it logged (in any hook, by any callback) is in callback_metrics
        self._record(trainer, trainer.current_epoch - 1)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record(trainer, trainer.current_epoch - 1)
        if not trainer.is_global_zero or not self._loggers:
            return
        figure = self.figure()
        params = self.collect_hparams(trainer, pl_module)
        metrics = self.final_metrics()
        for logger in self._loggers:
            if figure is not None:
                logger.experiment.add_figure(self.figure_tag, figure, global_step=trainer.global_step, close=False)
            if metrics:
                logger.log_hyperparams(params, metrics=metrics)
            else:
                rank_zero_info(
                    f"{type(self).__name__}: none of {list(self.hparam_metrics)} was logged; "
                    "hyper-parameters recorded without metrics"
                )
                logger.log_hyperparams(params)
            logger.experiment.flush()

    # ------------------------------------------------------------------ contents

    def _record(self, trainer: pl.Trainer, epoch: int) -> None:
        if epoch < 0:
            return
        metrics = trainer.callback_metrics
        for key in self.tracked:
            value = metrics.get(key)
            if value is not None:
                self.history[key][epoch] = float(value)

    def final_metrics(self) -> dict[str, float]:
        """``hparams/<key>`` = the last recorded value of each of ``hparam_metrics``, plus test error at best val."""
        metrics = {}
        for key in self.hparam_metrics:
            values = self.history.get(key)
            if values:
                metrics["hparams/" + key.replace("/", "_")] = values[max(values)]
        val, test = self.history.get("val/error"), self.history.get("test/error")
        if val and test:
            common = [epoch for epoch in sorted(val) if epoch in test]
            if common:
                best = min(common, key=lambda epoch: val[epoch])  # earliest epoch among ties
                metrics["hparams/test_error_at_best_val"] = test[best]
        return metrics

    def collect_hparams(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        params: dict[str, Any] = {}
        params.update(dict(getattr(pl_module, "hparams", {}) or {}))
        datamodule = trainer.datamodule
        if datamodule is not None:
            params.update(dict(getattr(datamodule, "hparams", {}) or {}))
        if trainer.optimizers:
            optimizer = trainer.optimizers[0]
            params["optimizer"] = type(optimizer).__name__
            for key, value in optimizer.param_groups[0].items():
                if key != "params" and isinstance(value, (bool, int, float, str)):
                    params[f"optimizer.{key}"] = value
            if hasattr(optimizer, "p"):
                params["optimizer.p"] = optimizer.p
        params["max_epochs"] = trainer.max_epochs
        params.update(self.hparams)
        return params

    def figure(self) -> Any:
        """The learning-curve figure (a matplotlib Figure on an Agg canvas), or None without data."""
        errors = [key for key in self.curves if self.history.get(key) and key.endswith("error")]
        others = [key for key in self.curves if self.history.get(key) and not key.endswith("error")]
        if not errors and not others:
            return None
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator

        panels = [group for group in (errors, others) if group]
        figure = Figure(figsize=(5.5 * len(panels), 4), layout="constrained")
        FigureCanvasAgg(figure)
        axes = figure.subplots(1, len(panels), squeeze=False)[0]
        for ax, keys in zip(axes, panels):
            for key in keys:
                epochs = sorted(self.history[key])
                ax.plot(epochs, [self.history[key][e] for e in epochs], marker="o", markersize=3, label=key)
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            losses_only = all(key.endswith("loss") for key in keys)
            ax.set_ylabel("0-1 error" if keys is errors else "loss" if losses_only else "value")
            ax.grid(True, alpha=0.3)
            ax.legend()
        return figure


def _prefix(logger: TensorBoardLogger) -> str:
    prefix = getattr(logger, "_prefix", "") or ""
    return f"{prefix}{getattr(logger, 'LOGGER_JOIN_CHAR', '-')}" if prefix else ""


def _keys(keys: Iterable[str], name: str) -> tuple[str, ...]:
    if isinstance(keys, str):
        keys = (keys,)
    keys = tuple(keys)
    if not all(isinstance(key, str) and key for key in keys):
        raise ValueError(f"TensorBoardExtras({name}={keys!r}) must be metric names (non-empty strings)")
    return keys


def _check_layout(layout: Mapping) -> None:
    problem = (
        "TensorBoardExtras(layout=...) must map category -> {chart title: ['Multiline' or 'Margin', [tag regexes]]}"
    )
    if not isinstance(layout, Mapping) or not layout:
        raise ValueError(problem)
    for charts in layout.values():
        if not isinstance(charts, Mapping):
            raise ValueError(problem)
        for chart in charts.values():
            if not (isinstance(chart, (list, tuple)) and len(chart) == 2 and chart[0] in ("Multiline", "Margin")
                    and isinstance(chart[1], (list, tuple))):
                raise ValueError(problem)

