"""Keeping BatchNorm layers frozen (eval mode), the form the path geometry understands."""

from __future__ import annotations

from torch import nn


class _StaysInEval:
    """Mixin: ``train()`` leaves the layer in eval mode (running statistics, a fixed affine map)."""

    def train(self, mode: bool = True):
        return super().train(False)


class FrozenBatchNorm1d(_StaysInEval, nn.BatchNorm1d):
    """A BatchNorm1d that always normalises with its running statistics."""


class FrozenBatchNorm2d(_StaysInEval, nn.BatchNorm2d):
    """A BatchNorm2d that always normalises with its running statistics."""


class FrozenBatchNorm3d(_StaysInEval, nn.BatchNorm3d):
    """A BatchNorm3d that always normalises with its running statistics."""


_FROZEN = {nn.BatchNorm1d: FrozenBatchNorm1d, nn.BatchNorm2d: FrozenBatchNorm2d, nn.BatchNorm3d: FrozenBatchNorm3d}


def freeze_batchnorm(model: nn.Module) -> nn.Module:
    """Put every BatchNorm layer of ``model`` in eval mode for good, in place.

    A frozen BatchNorm uses its running statistics, so it is the fixed per-channel affine map
    a*x + c that the path geometry (and Path-SGD) understands; ``model.train()`` — which Lightning
    calls every epoch — leaves it in eval mode. Its ``weight`` and ``bias`` still train. The layers
    become ``FrozenBatchNorm{1,2,3}d`` (subclasses of the originals), so models still pickle.
    """
    for module in model.modules():
        frozen = _FROZEN.get(type(module))
        if frozen is None and isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, _StaysInEval):
            raise TypeError(f"freeze_batchnorm knows BatchNorm1d/2d/3d, not {type(module).__name__}; call .eval() on it "
                            "after every model.train()")
        if frozen is not None:
            module.__class__ = frozen
            module.eval()
    return model
