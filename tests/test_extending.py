"""docs/extending.md's worked example runs as written and gives the exact geometry."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

import pl_pathsgd as P
from tests.generated import DenseReference, GeneratedNet, Stage

DOC = (Path(__file__).resolve().parents[1] / "docs" / "extending.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", DOC, flags=re.S)


def test_the_worked_example_registers_pixel_shuffle_and_is_exact(capsys):
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.PixelShuffle(2), nn.Flatten(), nn.Linear(64, 3))
    with pytest.raises(P.UnsupportedModelError, match="pixel_shuffle is not supported"):
        P.path_norm(net, 2, (1, 4, 4))
    assert len(BLOCKS) == 2
    for block in BLOCKS:
        exec(compile(block, "docs/extending.md", "exec"), {"__name__": "extending_example"})
    printed = capsys.readouterr().out.splitlines()
    assert printed[1] == "{'0': 4}"  # the shuffle moves entries: each Linear input comes from one channel

    torch.manual_seed(0)
    net = GeneratedNet([Stage("layer", nn.Conv2d(1, 4, 3, padding=1)), Stage("act", nn.ReLU()),
                        Stage("pool", nn.PixelShuffle(2)), Stage("flatten"), Stage("layer", nn.Linear(64, 3))]).double()
    reference = DenseReference(net, (1, 4, 4))
    for p in (1, 2, 3, float("inf")):
        assert float(P.path_norm(net, p, (1, 4, 4))) == pytest.approx(reference.phi(p), rel=1e-12)
    expected = reference.divisors(2)
    for name, divisor in P.path_scaling(net, 2, (1, 4, 4)).items():
        torch.testing.assert_close(divisor, expected[name], rtol=1e-12, atol=0)
    x = torch.randn(5, 1, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        before = net(x)
    P.rescale_units(net, {"layers.0": torch.tensor([0.1, 10.0, 2.0, 0.5], dtype=torch.float64)}, (1, 4, 4))
    with torch.no_grad():
        torch.testing.assert_close(net(x), before, rtol=1e-12, atol=1e-12)
