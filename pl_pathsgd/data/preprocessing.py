"""Whole-tensor image preprocessing: exact area downsampling, grayscale, normalisation, output layout.

Everything here works on ``(N, C, H, W)`` tensors at once (in chunks for large sets), never image
by image.
"""

from fractions import Fraction
from typing import Literal

import torch
from torch import Tensor

from .errors import InvalidDataConfigError

__all__ = [
    "SequenceLayout",
    "area_downsample",
    "area_weights",
    "channel_stats",
    "layout_images",
    "preprocess",
    "rgb_to_grayscale",
    "to_float",
]

#: How an image becomes a sequence: one step per row (features: the row's pixels and channels)
#: or one step per pixel (features: its channels).
SequenceLayout = Literal["rows", "pixels"]

# Images are converted and downsampled in chunks of this many images, which bounds the temporary
# float32 memory for large sets (SVHN with 'extra').
CHUNK = 8192

# ITU-R BT.601 luma weights, the ones PIL's ``convert("L")`` and torchvision's ``rgb_to_grayscale`` use.
LUMA = (0.299, 0.587, 0.114)


def area_weights(n_in: int, n_out: int) -> Tensor:
    """Return the ``(n_out, n_in)`` matrix of exact 1-D area-averaging weights.

    Output cell ``i`` covers the interval ``[i * n_in / n_out, (i + 1) * n_in / n_out)`` of the input
    axis; input pixel ``j`` covers ``[j, j + 1)``. The weight is the length of their overlap divided
    by the length of the output cell, so every row sums to one and, when ``n_out`` divides ``n_in``,
    the weights are the plain block means of ``adaptive_avg_pool2d``. For other sizes (28 -> 10)
    pixels that straddle two output cells are split between them in proportion to the area they
    share (box filter / "INTER_AREA").
    """
    if not 1 <= n_out <= n_in:
        raise InvalidDataConfigError(f"area downsampling needs 1 <= n_out <= n_in, got n_in={n_in}, n_out={n_out}")
    weights = torch.zeros(n_out, n_in, dtype=torch.float64)
    cell = Fraction(n_in, n_out)
    for i in range(n_out):
        start, end = i * cell, (i + 1) * cell
        for j in range(int(start), min(n_in, -(-end.numerator // end.denominator))):
            overlap = min(end, Fraction(j + 1)) - max(start, Fraction(j))
            if overlap > 0:
                weights[i, j] = float(overlap / cell)
    return weights


def area_downsample(images: Tensor, size: int) -> Tensor:
    """Downsample ``(..., H, W)`` float images to ``(..., size, size)`` by exact area averaging.

    Each output pixel is the mean of the input image over the square region it covers (see
    :func:`area_weights`); the operation is separable, so it is two small matrix products over the
    whole batch.
    """
    height, width = images.shape[-2:]
    rows = area_weights(height, size).to(images.dtype)
    cols = area_weights(width, size).to(images.dtype)
    return torch.matmul(torch.matmul(rows, images), cols.T)


def rgb_to_grayscale(images: Tensor) -> Tensor:
    """Convert ``(N, 3, H, W)`` float RGB images to ``(N, 1, H, W)`` luma (BT.601 weights)."""
    weights = torch.tensor(LUMA, dtype=images.dtype).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


def preprocess(raw: Tensor, *, scale: float, grayscale: bool, downsample: int | None) -> Tensor:
    """Apply grayscale conversion and downsampling to a ``(N, C, H, W)`` uint8 tensor.

    Returns ``raw`` itself (still uint8) when there is nothing to do, so that full-resolution data is
    kept in its compact form; otherwise a float32 tensor with values in ``[0, 1]``.
    """
    n, channels, height, width = raw.shape
    to_gray = grayscale and channels == 3
    if not to_gray and downsample is None:
        return raw
    out_c = 1 if to_gray else channels
    out_h, out_w = (downsample, downsample) if downsample is not None else (height, width)
    out = torch.empty(n, out_c, out_h, out_w, dtype=torch.float32)
    for start in range(0, n, CHUNK):
        chunk = raw[start : start + CHUNK].to(torch.float32).div_(scale)
        if to_gray:
            chunk = rgb_to_grayscale(chunk)
        if downsample is not None:
            chunk = area_downsample(chunk, downsample)
        out[start : start + CHUNK] = chunk
    return out


def to_float(images: Tensor, scale: float) -> Tensor:
    """float32 images in ``[0, 1]``: uint8 pixels are divided by ``scale``, float ones copied."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(scale)
    return images.to(torch.float32)


def channel_stats(images: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and (population) standard deviation of ``(N, C, H, W)`` float32 images.

    Two passes over chunks; each chunk is summed in float32 (torch's pairwise summation keeps that
    accurate) and the chunk sums are accumulated in float64. A constant channel gets std 1, so that
    normalising it never divides by zero.
    """
    channels = images.shape[1]
    count = images.numel() // channels
    total = torch.zeros(channels, dtype=torch.float64)
    for start in range(0, images.shape[0], CHUNK):
        total += images[start : start + CHUNK].sum(dim=(0, 2, 3)).to(torch.float64)
    mean = total / count
    sq = torch.zeros(channels, dtype=torch.float64)
    centre = mean.to(images.dtype).view(1, channels, 1, 1)
    for start in range(0, images.shape[0], CHUNK):
        sq += (images[start : start + CHUNK] - centre).square_().sum(dim=(0, 2, 3)).to(torch.float64)
    std = (sq / count).sqrt()
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    return mean, std


def layout_images(images: Tensor, flatten: bool, as_sequence: SequenceLayout | None) -> Tensor:
    """Arrange ``(N, C, H, W)`` images as the model receives them.

    ``as_sequence="rows"`` gives ``(N, H, W*C)`` (step t is row t, pixels left to right, the
    channels of a pixel next to each other), ``"pixels"`` gives ``(N, H*W, C)`` (row-major pixel
    order); otherwise ``flatten`` gives ``(N, C*H*W)`` and no flattening keeps the images.
    Shapes are given explicitly, so empty splits keep their shape.
    """
    n, channels, height, width = images.shape
    if as_sequence == "rows":
        return images.permute(0, 2, 3, 1).reshape(n, height, width * channels)
    if as_sequence == "pixels":
        return images.permute(0, 2, 3, 1).reshape(n, height * width, channels)
    if flatten:
        return images.reshape(n, channels * height * width)
    return images
