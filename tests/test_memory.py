"""Path-SGD without weight-sized temporaries: allocations, blockwise routes, float32 geometry."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import pl_pathsgd as P
import pl_pathsgd.optim as optim_module
from pl_pathsgd.paths import PathGraph, fast_linear
from pl_pathsgd.paths.ops import TwinRun
from pl_pathsgd.paths.norms import DenseScaling, OuterScaling, linear_chain, scaling_of

# ------------------------------------------------------------------------------------ allocations


def allocation_sizes(fn) -> list[int]:
    """Sizes in bytes of the CPU allocations made while ``fn()`` runs (frees left out)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:  # every allocation on its own
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        return [int(e.nbytes()) for e in events if e.nbytes() > 0]
    except AttributeError:  # profiler internals moved: per-operator totals (coarser, still conservative)
        return [int(e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage > 0]


def test_the_profiler_sees_large_allocations():
    """Guard against a vacuous test: a weight-sized temporary must show up."""
    weight = torch.randn(1000, 1000)
    sizes = allocation_sizes(lambda: weight * 2)
    assert max(sizes, default=0) >= weight.numel() * weight.element_size()


WIDTH = 2000  # the large layer: 2000 x 2000 float32 = 16 MB


def wide_mlp() -> tuple[nn.Module, tuple[int, ...]]:
    """An MLP (the chain route): the large layer is the hidden one."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 10)), (64,)


def wide_conv_mlp() -> tuple[nn.Module, tuple[int, ...]]:
    """Not a chain of Linear layers (the autograd route): a convolution in front."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv1d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 16, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 10),
    )
    return net, (1, 16)


SETTINGS = {
    "momentum": dict(momentum=0.9),
    "plain": dict(),
    "nesterov+decay": dict(momentum=0.9, nesterov=True, weight_decay=1e-4),
}


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("build", [wide_mlp, wide_conv_mlp], ids=["mlp", "conv_mlp"])
def test_step_allocates_nothing_of_a_weights_size(build, setting):
    model, shape = build()
    big = model[-3].weight
    weight_bytes = big.numel() * big.element_size()
    optimizer = P.PathSGD(model.parameters(), lr=1e-3, model=model, input_shape=shape, **SETTINGS[setting])
    x, y = torch.randn(8, *shape), torch.randint(10, (8,))

    def backward():
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()

    for _ in range(2):  # the first steps create the momentum buffers and the scratch buffer
        backward()
        optimizer.step()
    for _ in range(2):
        backward()
        sizes = allocation_sizes(optimizer.step)
        assert optimizer.last_geometry_dtype == torch.float32
        assert max(sizes, default=0) < weight_bytes // 16, "a PathSGD step allocated a large temporary"
        assert sum(sizes) < weight_bytes // 4, "a PathSGD step allocated too much in total"
    assert fast_linear.scratch_bytes() <= max(fast_linear.BLOCK_BYTES, WIDTH * 8)


# ------------------------------------------------------------------------------------ the routes agree


def random_net(widths, seed, bias=True, extras=False) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b, bias=bias and i % 2 == 0))
        if i < len(widths) - 2:
            layers += [nn.ReLU(), nn.Dropout(0.0), nn.Identity()] if extras else [nn.LeakyReLU(0.1)]
    net = nn.Sequential(*layers).double()
    with torch.no_grad():
        for param in net.parameters():
            param.uniform_(-1.5, 1.5)
    return net


class LinearOnChannels(nn.Module):
    """A Linear layer applied to a (channels, length) feature map: the blockwise twin sees a matrix input."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3, padding=1)
        self.mix = nn.Linear(5, 7)
        self.head = nn.Linear(3 * 7, 2)

    def forward(self, x):
        h = self.mix(torch.relu(self.conv(x)))
        return self.head(torch.flatten(h, 1))


def conv_net() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(4 * 2 * 2, 9), nn.ReLU(), nn.Linear(9, 2),
    ).double()


def reference_norm(net, p, shape=None) -> float:
    """phi_p from the twin that builds |W|^p for every Linear layer (no blocks)."""
    graph = PathGraph(net, shape)
    mode = "max" if math.isinf(p) else "sum"
    with torch.no_grad():
        out = graph.evaluate(TwinRun(p=p, mode=mode, dtype=torch.float64, fast_linear=False))
    return float(out.amax()) if mode == "max" else float(out.sum()) ** (1 / p)


def assert_same_scalings(a, b, rtol=1e-12):
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key].dense(), b[key].dense(), rtol=rtol, atol=0)


@pytest.fixture
def tiny_blocks(monkeypatch):
    """Blocks of one row: every blockwise loop runs over many blocks."""
    monkeypatch.setattr(fast_linear, "BLOCK_BYTES", 16)


@pytest.mark.parametrize("blocks", ["default", "one row"])
@pytest.mark.parametrize("p", [1, 2, 3])
@pytest.mark.parametrize("widths", [[5, 3], [4, 6, 2], [3, 7, 5, 2], [4, 3, 9, 6, 5, 2]])
def test_chain_route_equals_autograd_route_and_reference_twin(widths, p, blocks, request):
    if blocks == "one row":
        request.getfixturevalue("tiny_blocks")
    for bias, extras in ((True, False), (False, True)):
        net = random_net(widths, seed=len(widths) + p, bias=bias, extras=extras)
        graph = PathGraph(net)
        assert linear_chain(graph) is not None
        chain = scaling_of(graph, p)
        assert all(isinstance(chain[f"{i}.weight"], OuterScaling) for i, m in enumerate(net) if isinstance(m, nn.Linear))
        assert_same_scalings(chain, scaling_of(graph, p, chain=False))
        assert_same_scalings(chain, scaling_of(graph, p, chain=False, fast_linear=False))
        assert float(P.path_norm(net, p)) == pytest.approx(reference_norm(net, p), rel=1e-12)


@pytest.mark.parametrize("blocks", ["default", "one row"])
@pytest.mark.parametrize("p", [1, 2, 3])
def test_blockwise_twin_equals_reference_on_non_chains(p, blocks, request):
    if blocks == "one row":
        request.getfixturevalue("tiny_blocks")
    for net, shape in ((conv_net(), (1, 8, 8)), (LinearOnChannels().double(), (2, 5))):
        graph = PathGraph(net, shape)
        assert linear_chain(graph) is None
        fast = scaling_of(graph, p)
        assert_same_scalings(fast, scaling_of(graph, p, fast_linear=False))
        assert float(P.path_norm(net, p, shape)) == pytest.approx(reference_norm(net, p, shape), rel=1e-12)


@pytest.mark.parametrize("p", [1, 2, 3])
def test_float64_twin_of_a_float32_model(p, tiny_blocks):
    """The blocks are converted to the twin's dtype before the power: float64 accuracy from float32 weights."""
    for net, shape in ((random_net([4, 6, 5, 3], seed=2).float(), None), (conv_net().float(), (1, 8, 8))):
        graph = PathGraph(net, shape)
        reference = scaling_of(graph, p, torch.float64, chain=False, fast_linear=False)
        assert_same_scalings(scaling_of(graph, p, torch.float64), reference)
        assert_same_scalings(scaling_of(graph, p, torch.float64, chain=False), reference)


def test_chain_detection():
    assert linear_chain(PathGraph(random_net([3, 4, 2], 0))) is not None
    assert linear_chain(PathGraph(conv_net(), (1, 8, 8))) is None

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)

        def forward(self, x):
            return self.b(x + torch.relu(self.a(x)))

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)

        def forward(self, x):
            return self.b(torch.relu(self.a(torch.relu(self.a(x)))))

    assert linear_chain(PathGraph(Residual(), (3,))) is None
    assert linear_chain(PathGraph(Twice())) is None  # a layer called twice: its divisor is not an outer product
    twice = scaling_of(PathGraph(Twice().double()), 2)
    assert any(isinstance(s, DenseScaling) and s.divisor.dim() == 2 for s in twice.values())


# ------------------------------------------------------------------------------------ the update, blockwise


UPDATE_SETTINGS = [
    dict(),
    dict(momentum=0.9),
    dict(momentum=0.9, dampening=0.3),
    dict(momentum=0.8, nesterov=True),
    dict(momentum=0.9, weight_decay=0.01),
    dict(weight_decay=0.05),
]


def reference_run(model, shape, settings, batches, lr=0.05):
    """Algorithm 1 with dense divisors from path_scaling and SGD's momentum rules, written out."""
    momentum = settings.get("momentum", 0.0)
    dampening = settings.get("dampening", 0.0)
    nesterov = settings.get("nesterov", False)
    decay = settings.get("weight_decay", 0.0)
    buffers: dict[str, torch.Tensor] = {}
    for x, y in batches:
        model.zero_grad()
        scaling = P.path_scaling(model, input_shape=shape)
        nn.functional.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            for name, param in model.named_parameters():
                direction = (param.grad + decay * param) / scaling[name]
                if momentum:
                    if name not in buffers:
                        buffers[name] = direction.clone()
                    else:
                        buffers[name] = momentum * buffers[name] + (1 - dampening) * direction
                    direction = direction + momentum * buffers[name] if nesterov else buffers[name]
                param -= lr * direction


def path_sgd_run(model, shape, settings, batches, lr=0.05):
    optimizer = P.PathSGD(model.parameters(), lr=lr, model=model, input_shape=shape, **settings)
    for x, y in batches:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


@pytest.mark.parametrize("kernel", ["fused", "eager"])
@pytest.mark.parametrize("settings", UPDATE_SETTINGS, ids=lambda s: "+".join(s) or "plain")
@pytest.mark.parametrize("case", ["mlp", "conv"])
def test_blockwise_update_equals_the_written_out_algorithm(case, settings, kernel, tiny_blocks, monkeypatch):
    if kernel == "eager":  # where torch has no fused SGD kernel (or for other devices)
        monkeypatch.setattr(optim_module, "_FUSED_SGD", None)
    if case == "mlp":
        model, shape = random_net([4, 6, 5, 3], seed=5), (4,)
        with torch.no_grad():
            for param in model.parameters():
                param.mul_(0.5)
    else:
        model, shape = conv_net(), (1, 8, 8)
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(6, *shape, generator=generator, dtype=torch.float64),
                torch.randint(model[-1].out_features, (6,), generator=generator)) for _ in range(4)]
    expected, actual = copy.deepcopy(model), copy.deepcopy(model)
    reference_run(expected, shape, settings, batches)
    path_sgd_run(actual, shape, settings, batches)
    for a, b in zip(actual.parameters(), expected.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------ float32 geometry


def deep_mlp(depth=50, width=64, bias=True) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width, bias=bias), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10, bias=bias))


def test_float32_model_gets_float32_geometry_close_to_float64():
    model = deep_mlp(depth=4, width=300)
    graph = PathGraph(model)
    single, double = scaling_of(graph, 2, torch.float32), scaling_of(graph, 2, torch.float64)
    for key in single:
        torch.testing.assert_close(single[key].dense().double(), double[key].dense(), rtol=1e-5, atol=0)
    optimizer = P.PathSGD(model.parameters(), lr=0.01, model=model)
    model(torch.randn(5, 300)).square().sum().backward()
    optimizer.step()
    assert optimizer.last_geometry_dtype == torch.float32 and optimizer.geometry_fallbacks == 0


def test_fifty_layer_float32_mlp_stays_float32_finite_and_positive():
    model = deep_mlp()  # 50 layers, width 64, PyTorch's default init, float32
    graph = PathGraph(model)
    scalings = scaling_of(graph, 2, torch.float32)
    reference = scaling_of(graph, 2, torch.float64)
    for key, scaling in scalings.items():
        divisor = scaling.dense()
        assert divisor.dtype == torch.float32
        assert bool(torch.isfinite(divisor).all()) and bool((divisor > 0).all())
        torch.testing.assert_close(divisor.double(), reference[key].dense(), rtol=1e-4, atol=0)
    assert float(scalings["0.weight"].dense().max()) < 1e-6  # the products really are tiny
    gammas = torch.cat([t for s in scalings.values() if isinstance(s, OuterScaling) for t in (s.out_factor, s.in_factor)])
    assert float(gammas.min()) > 1e-30  # comfortably inside float32's normal range: no fallback needed
    x, y = torch.randn(8, 64), torch.randint(10, (8,))
    updates = []
    for dtype in (None, torch.float64):
        trained = copy.deepcopy(model)
        optimizer = P.PathSGD(trained.parameters(), lr=1e-9, model=trained, dtype=dtype)
        nn.functional.cross_entropy(trained(x), y).backward()
        optimizer.step()
        assert optimizer.geometry_fallbacks == 0
        assert optimizer.last_geometry_dtype == (dtype or torch.float32)
        updates.append([(a - b).detach().double() / 1e-9 for a, b in zip(model.parameters(), trained.parameters())])
    for single, double in zip(*updates):
        assert bool(torch.isfinite(single).all())
        torch.testing.assert_close(single, double, rtol=1e-3, atol=1e-3 * float(double.abs().max()))


def underflowing_mlp() -> nn.Sequential:
    """l4 geometry of a deep net with small weights: gammas ~1e-44, below float32's normal range,
    while the divisors gamma^(1/2) ~1e-22 are ordinary float32 numbers."""
    model = deep_mlp(depth=20, width=16, bias=False)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(0.1 / param.abs().mean())
    return model


def test_float32_underflow_falls_back_to_float64():
    model = underflowing_mlp()
    graph = PathGraph(model)
    single, double = scaling_of(graph, 4, torch.float32), scaling_of(graph, 4, torch.float64)
    worst = max(float(((single[k].dense().double() - double[k].dense()) / double[k].dense()).abs().max()) for k in single)
    assert worst > 1e-3  # float32 alone would be visibly wrong here
    assert min(float(s.dense().min()) for s in double.values()) > torch.finfo(torch.float32).tiny

    x, y = torch.randn(8, 16), torch.randint(10, (8,))
    results = []
    for dtype in (None, torch.float64):
        trained = copy.deepcopy(model)
        optimizer = P.PathSGD(trained.parameters(), lr=1e-25, p=4, momentum=0.9, model=trained, dtype=dtype)
        for _ in range(2):
            optimizer.zero_grad()
            nn.functional.cross_entropy(trained(x), y).backward()
            optimizer.step()
        assert optimizer.last_geometry_dtype == torch.float64
        results.append((trained, optimizer))
    (default, default_optimizer), (forced, forced_optimizer) = results
    assert default_optimizer.geometry_fallbacks == 2  # both steps
    assert forced_optimizer.geometry_fallbacks == 0
    for a, b in zip(default.parameters(), forced.parameters()):
        assert torch.equal(a, b)
        assert bool(torch.isfinite(a).all())


def test_overflow_falls_back_and_dead_units_stay_exact():
    model = deep_mlp(depth=3, width=8)
    with torch.no_grad():
        model[2].weight.mul_(1e25)  # gamma_in of the last layer ~1e50: beyond float32
    optimizer = P.PathSGD(model.parameters(), lr=0.1, model=model)
    model(torch.randn(4, 8)).square().sum().backward()
    optimizer.step()
    assert optimizer.last_geometry_dtype == torch.float64 and optimizer.geometry_fallbacks == 1
    dead = deep_mlp(depth=3, width=8)
    with torch.no_grad():
        dead[2].weight[:, 3] = 0.0
    optimizer = P.PathSGD(dead.parameters(), lr=0.1, model=dead)
    dead(torch.randn(4, 8)).square().sum().backward()
    before = dead[0].weight.detach().clone()
    optimizer.step()
    assert optimizer.last_geometry_dtype == torch.float64  # a zero divisor may be underflow: checked in float64
    assert torch.equal(dead[0].weight[3], before[3])
    assert all(bool(torch.isfinite(p).all()) for p in dead.parameters())


def test_dtype_argument():
    model = deep_mlp(depth=3, width=8)
    optimizer = P.PathSGD(model.parameters(), lr=0.1, model=model, dtype=torch.float64)
    assert optimizer.last_geometry_dtype == torch.float64 and optimizer.geometry_fallbacks == 0
    with pytest.raises(ValueError, match="dtype"):
        P.PathSGD(model.parameters(), lr=0.1, model=model, dtype=torch.int64)
    double = deep_mlp(depth=3, width=8).double()
    assert P.PathSGD(double.parameters(), lr=0.1, model=double).last_geometry_dtype == torch.float64
    half = deep_mlp(depth=3, width=8).bfloat16()
    assert P.PathSGD(half.parameters(), lr=0.1, model=half).last_geometry_dtype == torch.float32


def test_path_norm_is_unchanged_by_blocking(tiny_blocks):
    net = random_net([4, 6, 5, 3], seed=1)
    for p in (1, 2, 3, math.inf):
        assert float(P.path_norm(net, p)) == pytest.approx(reference_norm(net, p), rel=1e-12)


def test_max_path_norm_is_blockwise_and_allocates_nothing_of_a_weights_size(tiny_blocks):
    net = LinearOnChannels().double()  # a Linear layer on a matrix input, too
    assert float(P.path_norm(net, math.inf, (2, 5))) == reference_norm(net, math.inf, (2, 5))
    model, _ = wide_mlp()
    graph = PathGraph(model)
    weight_bytes = model[2].weight.numel() * model[2].weight.element_size()
    sizes = allocation_sizes(lambda: P.paths.norms.path_norm_of(graph, math.inf))
    assert max(sizes, default=0) < weight_bytes // 16


# ------------------------------------------------------------------------------------ the step fused with the geometry


@pytest.mark.parametrize("widths", [[5, 9, 9, 3], [12, 4, 3], [3, 4, 12], [4, 6, 5, 7, 3]], ids=str)
@pytest.mark.parametrize("settings", UPDATE_SETTINGS, ids=lambda s: "+".join(s) or "plain")
@pytest.mark.parametrize("p", [1, 2, 3])
def test_the_fused_step_equals_geometry_then_update(widths, settings, p, tiny_blocks):
    """The fused route (the geometry computed in the passes that update the weights, whichever layer is the
    largest) gives bit for bit what computing every divisor first and then updating gives."""
    model = random_net(widths, seed=len(widths) + p)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(0.5)
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(6, widths[0], generator=generator, dtype=torch.float64),
                torch.randint(widths[-1], (6,), generator=generator)) for _ in range(4)]
    runs = []
    for fuse in (True, False):
        net = copy.deepcopy(model)
        optimizer = P.PathSGD(net.parameters(), lr=0.05, p=p, model=net, **settings)
        optimizer.fuse = fuse
        fused_steps = 0
        for x, y in batches:
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            fused_steps += optimizer._comfortable and fuse
            optimizer.step()
        runs.append(net)
        if fuse:
            assert fused_steps == 3  # every step after the first
    for a, b in zip(*(run.parameters() for run in runs)):
        assert torch.equal(a, b)


def test_the_fused_step_keeps_allocating_nothing_of_a_weights_size():
    model, shape = wide_mlp()
    optimizer = P.PathSGD(model.parameters(), lr=1e-3, momentum=0.9, model=model)
    x, y = torch.randn(8, *shape), torch.randint(10, (8,))
    for _ in range(2):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    assert optimizer._comfortable  # the next step is fused
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    sizes = allocation_sizes(optimizer.step)
    weight_bytes = model[2].weight.numel() * 4
    assert max(sizes, default=0) < weight_bytes // 16 and sum(sizes) < weight_bytes // 4
