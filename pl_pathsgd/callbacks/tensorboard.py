"""TensorBoardExtras: per-epoch charts, a learning-curve figure and hyper-parameters with real metrics."""

from __future__ import annotations

import fnmatch
import numbers
import re
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from pl_pathsgd.callbacks._common import require_logger
from pl_pathsgd.callbacks.path_norm import PathNormMonitor

DEFAULT_CURVES = ("train/error", "val/error", "test/error", "train/loss", "val/loss", "test/loss")
DEFAULT_HPARAM_METRICS = ("test/error", "val/error", "train/error")
DEFAULT_EPOCH_METRICS = ("train/*", "val/*", "test/*", "path_norm/*", "invariance/*")
DEFAULT_PATH_NORM_KEYS = ("path_norm/p1", "path_norm/p2", "path_norm/pinf")
INVARIANCE_KEYS = ("invariance/function", "invariance/path_norm", "invariance/update")
EPOCH_PREFIX = "per_epoch/"
BEST_VAL_METRIC = "hparams/test_error_at_best_val"

# writers that already hold this callback's layout and hyper-parameter record (TensorBoard keeps the first)
_PREPARED_WRITERS: weakref.WeakSet = weakref.WeakSet()


def default_layout(prefix: str = "", path_norm_keys: Iterable[str] = DEFAULT_PATH_NORM_KEYS,
                   epoch_prefix: str = EPOCH_PREFIX) -> dict[str, dict[str, list]]:
    """The custom-scalars layout over the per-epoch scalars (x-axis: epoch).

    The three 0-1 errors share a chart, as do the three losses; every path-norm and every rescaling gap has
    a chart of its own, since their scales differ by orders of magnitude (phi_1 can be 1e4 where phi_2 is 10).
    """

    def tags(*keys: str) -> list[str]:
        return [f"^{re.escape(prefix + epoch_prefix + key)}$" for key in keys]

    charts: dict[str, list] = {
        "0-1 error": ["Multiline", tags("train/error", "val/error", "test/error")],
        "loss": ["Multiline", tags("train/loss", "val/loss", "test/loss")],
    }
    for key in path_norm_keys:
        label = key.rsplit("/", 1)[-1]
        symbol = "φ∞" if label == "pinf" else "φ" + label.removeprefix("p")
        charts[f"path-norm {symbol} ({key})"] = ["Multiline", tags(key)]
    for key in INVARIANCE_KEYS:
        charts[f"rescaling gap ({key})"] = ["Multiline", tags(key)]
    return {"pl-pathsgd, per epoch": charts}


class TensorBoardExtras(Callback):
    r"""TensorBoard views of a training run, for every :class:`~lightning.pytorch.loggers.TensorBoardLogger`.

    * **Per-epoch scalars.**  Lightning writes epoch-level metrics against the global step.  This callback
      also writes each metric matching ``epoch_metrics`` (train/val/test errors and losses, path-norms,
      rescaling gaps by default) once per epoch as ``per_epoch/<key>`` with the *epoch* as x-axis, in the
      epoch it was logged (a key logged every few epochs, or in a validation run, appears at those epochs only).
    * **Custom scalars** (on fit start, once per writer): a "pl-pathsgd, per epoch" tab over those scalars:
      the three 0-1 errors in one chart, the three losses in another, and one chart per path-norm (one per
      ``p`` of the run's :class:`PathNormMonitor`) and per rescaling gap, so that phi_1, phi_2 and phi_inf
      are each readable on their own axis.  Pass ``layout`` to replace it.
    * **Learning curves** (at the end of training): a matplotlib figure (Agg canvas) of the per-epoch values
      of ``curves`` (errors left, losses right) under the tag ``figure_tag``.
    * **Hyper-parameters with real metrics.**  TensorBoard's HPARAMS tab shows the *first* hyper-parameter
      record of a run and, for each metric that record names, the last value of that scalar.  This callback
      writes its record on fit start, before Lightning's own (``Trainer`` logs hyper-parameters right after the
      callbacks' ``on_fit_start``): the module's and datamodule's ``hparams``, the optimizer's class and first
      param group as configured, ``max_epochs`` and ``hparams``, with the metrics ``hparams/test_error``,
      ``hparams/val_error``, ``hparams/train_error`` (one per ``hparam_metrics``) and
      ``hparams/test_error_at_best_val`` (the test error of the epoch with the lowest validation error).
      Their values are written as scalars at the end of training.  The logger itself is left as it is: a
      ``TensorBoardLogger(default_hp_metric=True)`` (its default) still writes its placeholder scalar
      ``hp_metric = -1``, which then shows only in the SCALARS tab; create the logger with
      ``default_hp_metric=False`` to leave it out.  A record written to the same log directory before this
      fit (by an earlier fit or by hand) stays the one TensorBoard shows.

    The metrics come from other callbacks (:class:`EpochErrorMonitor`, :class:`PathNormMonitor`,
    :class:`RescalingInvarianceCheck`) or from the module's own ``self.log`` calls.  Without a
    TensorBoardLogger the callback warns once and does nothing; without any logger it raises.  It writes on
    global rank 0 only.

    Args:
        curves: metric keys plotted in the learning-curve figure.
        hparam_metrics: metric keys whose final value goes to the HPARAMS tab as ``hparams/<key with _>``.
        hparams: extra hyper-parameters to record (they override the collected ones).
        layout: custom-scalars layout to use instead of :func:`default_layout`.
        figure_tag: tag of the learning-curve figure.
        epoch_metrics: glob patterns of the metric keys written per epoch.
    """

    def __init__(
        self,
        curves: Iterable[str] = DEFAULT_CURVES,
        hparam_metrics: Iterable[str] = DEFAULT_HPARAM_METRICS,
        hparams: Mapping[str, Any] | None = None,
        layout: Mapping[str, Mapping[str, list]] | None = None,
        figure_tag: str = "learning_curves",
        epoch_metrics: Iterable[str] = DEFAULT_EPOCH_METRICS,
    ):
        self.curves = _keys(curves, "curves")
        self.hparam_metrics = _keys(hparam_metrics, "hparam_metrics")
        self.epoch_metrics = _keys(epoch_metrics, "epoch_metrics")
        if hparams is not None and not isinstance(hparams, Mapping):
            raise ValueError(f"TensorBoardExtras(hparams=...) must be a mapping, got {type(hparams).__name__}")
        if layout is not None:
            _check_layout(layout)
        if not isinstance(figure_tag, str) or not figure_tag:
            raise ValueError(f"TensorBoardExtras(figure_tag={figure_tag!r}) must be a non-empty string")
        self.hparams = dict(hparams or {})
        self.layout = None if layout is None else {c: dict(charts) for c, charts in layout.items()}
        self.figure_tag = figure_tag
        # every key the figure or the HPARAMS metrics need, by epoch, besides those matching epoch_metrics
        self.tracked = tuple(dict.fromkeys((*self.curves, *self.hparam_metrics, "val/error", "test/error")))
        self.history: dict[str, dict[int, float]] = {key: {} for key in self.tracked}
        self._recorded: dict[str, Tensor] = {}  # the value object last recorded per key (see _record)
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
        self._recorded.clear()
        if not self._loggers and not self._warned_no_tensorboard:
            self._warned_no_tensorboard = True
            rank_zero_warn(
                f"{type(self).__name__} needs a TensorBoardLogger; the trainer has "
                f"{', '.join(type(logger).__name__ for logger in trainer.loggers)}. It does nothing in this run."
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        params = self.collect_hparams(trainer, pl_module)
        path_norm_keys = [key for callback in trainer.callbacks if isinstance(callback, PathNormMonitor)
                          for key in callback.keys.values()] or DEFAULT_PATH_NORM_KEYS
        for logger in self._loggers:
            writer = logger.experiment
            if writer in _PREPARED_WRITERS:
                continue
            prefix = _prefix(logger)
            writer.add_custom_scalars(self.layout if self.layout is not None else default_layout(prefix, path_norm_keys))
            self._write_hparams_record(writer, params, prefix)
            _PREPARED_WRITERS.add(writer)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the previous epoch is complete: everything it logged (in any hook, by any callback) is in callback_metrics
        self._record(trainer, trainer.current_epoch - 1)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record(trainer, trainer.current_epoch - 1)  # the loop has counted the last epoch as completed
        if not trainer.is_global_zero or not self._loggers:
            return
        figure = self.figure()
        metrics = self.final_metrics()
        if not metrics:
            rank_zero_info(f"{type(self).__name__}: none of {list(self.hparam_metrics)} was logged; the HPARAMS tab "
                           "shows the hyper-parameters without metrics")
        for logger in self._loggers:
            if figure is not None:
                logger.experiment.add_figure(self.figure_tag, figure, global_step=trainer.global_step, close=False)
            if metrics:
                logger.log_metrics(metrics, step=trainer.global_step)
            logger.experiment.flush()

    # ------------------------------------------------------------------ contents

    def _record(self, trainer: pl.Trainer, epoch: int) -> None:
        """Keep (and write per epoch) the metrics logged in ``epoch``.

        A metric that was not logged again keeps the very tensor object of its last value in
        ``callback_metrics`` (Lightning computes a new one each time a metric is logged), so a value
        recorded before is recognised by identity and not written again for this epoch.
        """
        if epoch < 0:
            return
        fresh: dict[str, float] = {}
        for key, value in trainer.callback_metrics.items():
            if self._recorded.get(key) is value or not self._wanted(key) or value.numel() != 1:
                continue
            self._recorded[key] = value
            fresh[key] = float(value)
        for key, value in fresh.items():
            if key in self.tracked or key in self.history:
                self.history.setdefault(key, {})[epoch] = value
        per_epoch = {EPOCH_PREFIX + key: value for key, value in fresh.items()
                     if any(fnmatch.fnmatchcase(key, pattern) for pattern in self.epoch_metrics)}
        if per_epoch and trainer.is_global_zero:
            for logger in self._loggers:
                logger.log_metrics(per_epoch, step=epoch)

    def _wanted(self, key: str) -> bool:
        return key in self.tracked or any(fnmatch.fnmatchcase(key, pattern) for pattern in self.epoch_metrics)

    def final_metrics(self) -> dict[str, float]:
        """``hparams/<key>`` = the last recorded value of each of ``hparam_metrics``, plus test error at best val."""
        metrics = {}
        for key in self.hparam_metrics:
            values = self.history.get(key)
            if values:
                metrics[_hparam_metric(key)] = values[max(values)]
        val, test = self.history.get("val/error"), self.history.get("test/error")
        if val and test:
            common = [epoch for epoch in sorted(val) if epoch in test]
            if common:
                best = min(common, key=lambda epoch: val[epoch])  # earliest epoch among ties
                metrics[BEST_VAL_METRIC] = test[best]
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
            if isinstance(getattr(optimizer, "p", None), numbers.Real):
                params["optimizer.p"] = optimizer.p
        params["max_epochs"] = trainer.max_epochs
        params.update(self.hparams)
        return params

    def _write_hparams_record(self, writer: Any, params: dict[str, Any], prefix: str) -> None:
        """The HPARAMS record (experiment and session start) naming this callback's metrics, written first."""
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        names = [_hparam_metric(key) for key in self.hparam_metrics] + [BEST_VAL_METRIC]
        # the metric values do not go into the record: TensorBoard reads them from the scalars of these names
        experiment, session_start, _ = hparams_summaries(_flat_params(params), {prefix + n: 0.0 for n in names})
        writer.file_writer.add_summary(experiment)
        writer.file_writer.add_summary(session_start)

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


def _hparam_metric(key: str) -> str:
    return "hparams/" + key.replace("/", "_")


def _flat_params(params: Mapping[str, Any], parent: str = "") -> dict[str, Any]:
    """Nested mappings flattened to ``a/b`` keys; values TensorBoard cannot show become their ``str``."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{parent}{key}"
        if isinstance(value, Mapping):
            flat.update(_flat_params(value, name + "/"))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


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
