"""``pl-pathsgd``: LightningCLI for the package's classifier and DataModules, configured from YAML."""

from __future__ import annotations

import torch
from lightning.pytorch.cli import LightningCLI

from pl_pathsgd.data import BaseDataModule
from pl_pathsgd.module import PathSGDClassifier


class PathSGDCLI(LightningCLI):
    """LightningCLI whose model input shape and class count come from the chosen DataModule."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.input_shape", "model.init_args.input_shape", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        # Like Trainer.init_module(): under 64-bit precision, build the model in float64 from the start,
        # so that initialisations (e.g. the unbalanced rescaling) are not rounded to float32 first.
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        if str(config.get("trainer", {}).get("precision")) in ("64", "64-true", "double"):
            torch.set_default_dtype(torch.float64)

    def after_fit(self) -> None:
        metrics = self.trainer.callback_metrics
        parts = [f"{split} error {float(metrics[f'{split}/error']):.4f}"
                 for split in ("train", "val", "test") if f"{split}/error" in metrics]
        if parts and self.trainer.is_global_zero:
            print("Final: " + ", ".join(parts), flush=True)


def make_cli(args=None, run: bool = True) -> PathSGDCLI:
    """The ``pl-pathsgd`` CLI; with ``run=False`` it only builds the model, data and trainer."""
    return PathSGDCLI(
        PathSGDClassifier,
        BaseDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,  # the module builds its own (PathSGD needs the network)
        run=run,
        args=args,
    )


def main(args=None) -> None:
    make_cli(args)


if __name__ == "__main__":
    main()
