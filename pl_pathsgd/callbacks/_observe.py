"""What lets a callback look at a training run without changing it.

A callback that evaluates the model must leave the run exactly as it would be without it:

* :func:`preserved_rng` restores every global random generator the run draws from (torch on the CPU
  and on initialised CUDA devices, numpy, Python's ``random``), so evaluation, data loading and dataset
  transforms inside it cannot shift the run's random stream (dropout masks, shuffling orders);
* :func:`eval_mode` puts a module in eval mode and restores the mode of *every submodule* afterwards,
  as Lightning's own loops do, so a submodule the user froze with ``.eval()`` stays frozen;
* :func:`private_generator` seeds the DataLoaders a callback builds, so their worker seeds never come
  from the global generator.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore the global random states (torch CPU, initialised CUDA devices, numpy, ``random``) on exit."""
    torch_state = torch.get_rng_state()
    # reading CUDA states would initialise CUDA; a run that has not initialised it has drawn nothing from it
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        np.random.set_state(numpy_state)
        random.setstate(python_state)


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module.eval()`` inside; on exit every submodule gets back its own ``training`` flag."""
    modes = [(submodule, submodule.training) for submodule in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for submodule, training in modes:
            submodule.training = training  # as Lightning restores modes: no call to a custom train()


def private_generator(seed: int = 0) -> torch.Generator:
    """A generator for a DataLoader built by a callback (its base seed is drawn from it, not the global one)."""
    return torch.Generator().manual_seed(seed)
