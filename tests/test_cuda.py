"""The CUDA paths: blockwise twin, fused update, the step fused with the geometry, low precision under autocast.

Each test compares the GPU against the same computation on the CPU in float64; skipped without a GPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pl_pathsgd as P
from pl_pathsgd.paths import fast_linear

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def mlp(widths=(64, 512, 512, 10)) -> nn.Sequential:
    torch.manual_seed(0)
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def conv_net() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 10))


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(fast_linear, "BLOCK_BYTES", 1 << 12)  # many blocks per weight


@pytest.mark.parametrize("build, shape", [(mlp, (64,)), (conv_net, (3, 8, 8))], ids=["mlp", "conv"])
@pytest.mark.parametrize("p", [1, 2, 3])
def test_path_norm_and_divisors_on_the_gpu_equal_the_cpu(build, shape, p, small_blocks):
    cpu = build().double()
    gpu = copy.deepcopy(cpu).cuda()
    assert float(P.path_norm(gpu, p, shape)) == pytest.approx(float(P.path_norm(cpu, p, shape)), rel=1e-12)
    expected, got = P.path_scaling(cpu, p, shape), P.path_scaling(gpu, p, shape)
    for name in expected:
        torch.testing.assert_close(got[name].cpu(), expected[name], rtol=1e-10, atol=0)


@pytest.mark.parametrize("fused_kernel", [True, False])
@pytest.mark.parametrize("build, shape", [(mlp, (64,)), (conv_net, (3, 8, 8))], ids=["mlp", "conv"])
def test_path_sgd_steps_on_the_gpu_follow_the_cpu(build, shape, fused_kernel, small_blocks, monkeypatch):
    if not fused_kernel:
        import pl_pathsgd.optim as optim_module

        monkeypatch.setattr(optim_module, "_FUSED_SGD", None)
    cpu = build().double()
    gpu = copy.deepcopy(cpu).cuda()
    generator = torch.Generator().manual_seed(2)
    batches = [(torch.randn(16, *shape, generator=generator, dtype=torch.float64),
                torch.randint(10, (16,), generator=generator)) for _ in range(4)]
    for model in (cpu, gpu):
        device = next(model.parameters()).device
        optimizer = P.PathSGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, model=model,
                              input_shape=shape)
        for x, y in batches:  # the MLP's later steps take the route fused with the geometry
            optimizer.zero_grad()
            F.cross_entropy(model(x.to(device)), y.to(device)).backward()
            optimizer.step()
    for a, b in zip(cpu.parameters(), gpu.parameters()):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("precision", [torch.float16, torch.bfloat16])
def test_mixed_precision_under_autocast_keeps_a_float32_geometry(precision):
    model = mlp().cuda()
    reference = copy.deepcopy(model).double()
    optimizer = P.PathSGD(model.parameters(), lr=0.01, model=model)
    x, y = torch.randn(32, 64, device="cuda"), torch.randint(10, (32,), device="cuda")
    with torch.autocast("cuda", dtype=precision):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    grads = {n: t.grad.double().cpu() for n, t in model.named_parameters()}
    divisors = P.path_scaling(reference.cpu())
    before = {n: t.detach().double().cpu() for n, t in model.named_parameters()}
    optimizer.step()
    assert optimizer.last_geometry_dtype == torch.float32
    for name, param in model.named_parameters():
        expected = before[name] - 0.01 * grads[name] / divisors[name]
        torch.testing.assert_close(param.double().cpu(), expected, rtol=1e-4, atol=1e-6)


def test_half_precision_parameters_on_the_gpu():
    model = mlp().cuda().half()
    optimizer = P.PathSGD(model.parameters(), lr=0.01, model=model)
    F.cross_entropy(model(torch.randn(8, 64, device="cuda", dtype=torch.float16)).float(),
                    torch.randint(10, (8,), device="cuda")).backward()
    optimizer.step()
    assert optimizer.last_geometry_dtype == torch.float32
    assert all(bool(torch.isfinite(t).all()) for t in model.parameters())
