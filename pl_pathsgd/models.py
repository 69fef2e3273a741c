"""The paper's feed-forward ReLU networks and a small conv net, all supported by the path geometry."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn


class MLP(nn.Sequential):
    """Feed-forward ReLU network: Linear -> ReLU [-> Dropout] for each hidden width, then a Linear.

    The paper's nets have two hidden layers of 4000 units (``hidden=(4000, 4000)``) and, in some
    experiments, dropout with keep probability 0.5 (``dropout=0.5``). Inputs are flat vectors.
    """

    def __init__(self, input_dim: int, hidden: Sequence[int] = (4000, 4000), num_classes: int = 10,
                 dropout: float = 0.0):
        if input_dim < 1 or num_classes < 1 or any(h < 1 for h in hidden):
            raise ValueError(f"MLP sizes must be positive: input_dim={input_dim}, hidden={list(hidden)}, "
                             f"num_classes={num_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout is a drop probability in [0, 1), got {dropout}")
        layers: list[nn.Module] = []
        width = input_dim
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = size
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)


class ConvNet(nn.Sequential):
    """A small conv net: [Conv3x3 -> ReLU -> MaxPool2] per channel width, then global average pooling and a Linear.

    Takes images of shape ``(in_channels, H, W)``.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, channels: Sequence[int] = (32, 64)):
        if in_channels < 1 or num_classes < 1 or not channels or any(c < 1 for c in channels):
            raise ValueError(f"ConvNet sizes must be positive: in_channels={in_channels}, channels={list(channels)}")
        layers: list[nn.Module] = []
        width = in_channels
        for size in channels:
            layers += [nn.Conv2d(width, size, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True)]
            width = size
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes)]
        super().__init__(*layers)


def classifier_network(kind: Literal["mlp", "conv"], input_shape: Sequence[int], num_classes: int,
                       hidden: Sequence[int] = (4000, 4000), channels: Sequence[int] = (32, 64),
                       dropout: float = 0.0) -> nn.Module:
    """The network of :class:`~pl_pathsgd.PathSGDClassifier` for inputs of ``input_shape`` (one example).

    ``"mlp"``: an :class:`MLP` (behind a ``Flatten`` for image inputs); ``"conv"``: a :class:`ConvNet`,
    which needs image inputs ``(C, H, W)``.
    """
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"input_shape must be a non-empty shape of positive sizes, got {list(input_shape)}")
    if kind == "mlp":
        mlp = MLP(math.prod(shape), list(hidden), num_classes, dropout)
        return mlp if len(shape) == 1 else nn.Sequential(nn.Flatten(), mlp)
    if kind == "conv":
        if len(shape) != 3:
            raise ValueError(f"network='conv' needs image inputs (C, H, W), got input_shape={shape}; "
                             "set the DataModule's flatten: false")
        return ConvNet(shape[0], num_classes, list(channels))
    raise ValueError(f"network must be 'mlp' or 'conv', got {kind!r}")


class RecurrentRegressor(nn.Module):
    """A ReLU RNN read out at the last step: ``nn.RNN(nonlinearity="relu", batch_first=True)`` then a Linear layer.

    Takes sequences of shape ``(T, features)`` per example and returns ``num_outputs`` values.
    ``init="identity"`` starts the recurrence at the identity (recurrent weights I, input weights
    N(0, 0.001^2), biases 0; Le, Jaitly and Hinton 2015), which lets a ReLU RNN carry a value across
    many steps from the start; ``"default"`` keeps PyTorch's initialisation.
    """

    def __init__(self, features: int, hidden: int = 100, num_outputs: int = 1, layers: int = 1,
                 init: Literal["default", "identity"] = "default"):
        if features < 1 or hidden < 1 or num_outputs < 1 or layers < 1:
            raise ValueError(f"RecurrentRegressor sizes must be positive: features={features}, hidden={hidden}, "
                             f"num_outputs={num_outputs}, layers={layers}")
        if init not in ("default", "identity"):
            raise ValueError(f"init must be 'default' or 'identity', got {init!r}")
        super().__init__()
        self.rnn = nn.RNN(features, hidden, num_layers=layers, nonlinearity="relu", batch_first=True)
        self.readout = nn.Linear(hidden, num_outputs)
        if init == "identity":
            with torch.no_grad():
                for name, parameter in self.rnn.named_parameters():
                    if name.startswith("weight_hh"):
                        parameter.copy_(torch.eye(hidden))
                    elif name.startswith("weight_ih"):
                        parameter.normal_(0.0, 1e-3)
                    else:
                        parameter.zero_()

    def forward(self, x):
        states, _ = self.rnn(x)
        return self.readout(states[:, -1])
