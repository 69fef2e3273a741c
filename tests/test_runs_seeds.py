"""One seed for a run: seed_everything drives the initialisation (and, with the DataModule's seed: null,
the split and the order) unless a seed is pinned; two seeds give two runs, the same seed the same run."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml

from pl_pathsgd.cli import make_cli
from pl_pathsgd.module import PathSGDClassifier

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


@pytest.fixture(autouse=True)
def restore_global_seed(monkeypatch):
    """seed_everything records its seed in PL_GLOBAL_SEED; leave the environment as it was."""
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)


def initial_weights(**options) -> dict[str, torch.Tensor]:
    module = PathSGDClassifier(input_shape=(6,), num_classes=3, hidden=[8, 8], **options)
    module.configure_model()
    return {k: v.detach().clone() for k, v in module.network.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_seed_everything_drives_the_initialisation_unless_init_seed_is_pinned():
    pl.seed_everything(1)
    first = initial_weights()
    pl.seed_everything(2)
    second = initial_weights()
    pinned = initial_weights(init_seed=1)
    pl.seed_everything(1)
    again = initial_weights()
    assert not same(first, second), "two seeds, two initialisations"
    assert same(first, again), "the same seed, the same initialisation"
    assert same(first, pinned), "init_seed=1 pins what seed_everything(1) gives"
    pl.seed_everything(3)
    assert same(initial_weights(init_seed=1), pinned), "a pinned seed ignores seed_everything"


def test_the_seed_used_is_recorded_and_both_inits_follow_it():
    pl.seed_everything(7)
    balanced = PathSGDClassifier(input_shape=(6,), num_classes=3, hidden=[16, 16], init="balanced")
    unbalanced = PathSGDClassifier(input_shape=(6,), num_classes=3, hidden=[16, 16], init="unbalanced")
    assert balanced.hparams.init_seed == 7 and unbalanced.hparams.init_seed == 7
    x = torch.randn(10, 6)
    torch.testing.assert_close(balanced(x), unbalanced(x), rtol=1e-4, atol=1e-5)  # same function
    assert not torch.equal(balanced.network[0].weight, unbalanced.network[0].weight)
    with pytest.raises(ValueError, match="init_seed must be an integer >= 0, or None"):
        PathSGDClassifier(input_shape=(6,), init_seed=-1)


def fit(root: Path, seed: int):
    return make_cli(["fit", "--config", str(QUICKSTART), "--trainer.logger=false", "--trainer.callbacks=[]",
                     "--trainer.enable_checkpointing=false", f"--trainer.default_root_dir={root}",
                     "--trainer.enable_progress_bar=false", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
                     "--model.init_args.hidden=[32]", f"--seed_everything={seed}"])


def test_two_seeds_on_the_command_line_give_two_runs_and_one_seed_the_same_run(tmp_path):
    runs = [fit(tmp_path / str(i), seed) for i, seed in enumerate((0, 1, 0))]
    weights = [{k: v.detach().clone() for k, v in cli.model.state_dict().items()} for cli in runs]
    assert not same(weights[0], weights[1])
    assert same(weights[0], weights[2])
    assert runs[1].model.hparams.init_seed == 1


def test_no_config_pins_what_follows_the_seed():
    for path in (ROOT / "configs").rglob("*.yaml"):
        config = yaml.safe_load(path.read_text())
        assert "init_seed" not in (config.get("model", {}).get("init_args") or {}), path
        assert "seed" not in (config.get("data", {}).get("init_args") or {}), path
        assert isinstance(config.get("seed_everything"), int), f"{path} sets the one seed of its runs"
