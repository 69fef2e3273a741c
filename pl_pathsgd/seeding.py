"""The run's seed, as ``lightning.seed_everything`` (or ``--seed_everything``) set it."""

from __future__ import annotations

import os


def global_seed() -> int:
    """The seed ``lightning.seed_everything`` set in this process (``PL_GLOBAL_SEED``; 0 if none was set).

    What follows it when not pinned: the data's split and training order (``seed=None`` of the DataModules)
    and the classifier's initialisation (``init_seed=None``).
    """
    return int(os.environ.get("PL_GLOBAL_SEED", 0))
