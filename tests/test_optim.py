"""PathSGD as a torch.optim.Optimizer: the update, groups, schedulers, closures, state."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import pl_pathsgd as P


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).double()


def batch(seed: int):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(10, 5, generator=generator, dtype=torch.float64), torch.randint(3, (10,), generator=generator)


def loss_of(model, seed):
    x, y = batch(seed)
    return nn.functional.cross_entropy(model(x), y)


def test_step_is_gradient_divided_by_path_scaling():
    model = net()
    scaling = P.path_scaling(model)
    loss_of(model, 0).backward()
    expected = {n: p.detach() - 0.3 * p.grad / scaling[n] for n, p in model.named_parameters()}
    P.PathSGD(model.parameters(), lr=0.3, model=model).step()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach(), expected[name], rtol=1e-12, atol=1e-14)


def test_momentum_accumulates_the_normalised_gradient():
    model = net()
    optimizer = P.PathSGD(model.parameters(), lr=0.1, momentum=0.9, model=model)
    buffers = {}
    for seed in range(3):
        optimizer.zero_grad()
        scaling = P.path_scaling(model)
        loss_of(model, seed).backward()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        for n, p in model.named_parameters():
            direction = p.grad / scaling[n]
            buffers[n] = direction if n not in buffers else 0.9 * buffers[n] + direction
        optimizer.step()
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), before[n] - 0.1 * buffers[n], rtol=1e-10, atol=1e-12)


def test_closure_param_groups_and_scheduler():
    model = net()
    optimizer = P.PathSGD(
        [{"params": model[0].parameters(), "lr": 0.0}, {"params": model[2].parameters()}], lr=0.1, model=model
    )
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    frozen = model[0].weight.detach().clone()
    moving = model[2].weight.detach().clone()

    def closure():
        optimizer.zero_grad()
        loss = loss_of(model, 1)
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    assert isinstance(loss, torch.Tensor)
    scheduler.step()
    assert optimizer.param_groups[1]["lr"] == pytest.approx(0.05)
    assert torch.equal(model[0].weight, frozen) and not torch.equal(model[2].weight, moving)


def test_subset_of_parameters_is_fine_but_off_path_ones_are_refused():
    model = net()
    P.PathSGD(model[2].parameters(), lr=0.1, model=model)  # a subset
    stray = nn.Parameter(torch.zeros(3))
    with pytest.raises(P.PathGeometryError, match="no path"):
        P.PathSGD([*model.parameters(), stray], lr=0.1, model=model)

    class WithUnused(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)
            self.unused = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(x)

    unused = WithUnused()
    with pytest.raises(P.PathGeometryError, match="unused.weight, unused.bias"):
        P.PathSGD(unused.parameters(), lr=0.1, model=unused)


def test_bad_arguments_are_explained():
    model = net()
    unbound = P.PathSGD(model.parameters(), lr=0.1)
    nn.functional.mse_loss(model(torch.randn(4, 5, dtype=torch.float64)), torch.zeros(4, 3, dtype=torch.float64)).backward()
    with pytest.raises(RuntimeError, match="not bound to a network"):
        unbound.step()
    with pytest.raises(TypeError, match="nn.Module"):
        unbound.bind("not a network")
    with pytest.raises(ValueError, match="p must be >= 1"):
        P.PathSGD(model.parameters(), lr=0.1, model=model, p=0.5)
    with pytest.raises(ValueError, match="finite p"):
        P.PathSGD(model.parameters(), lr=0.1, model=model, p=float("inf"))
    with pytest.raises(ValueError, match="learning rate"):
        P.PathSGD(model.parameters(), lr=-1, model=model)
    with pytest.raises(TypeError, match=r"PathSGD\(net.parameters\(\), lr=..., model=net\)"):
        P.PathSGD(model, lr=0.1)
    with pytest.raises(ValueError, match="input_shape is given without model"):
        P.PathSGD(model.parameters(), lr=0.1, input_shape=(5,))


def test_an_optimizer_built_from_parameters_alone_is_bound_later():
    model = net()
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
    bound_late = P.PathSGD(model.parameters(), lr=0.1)
    assert not bound_late.is_bound
    assert bound_late.bind(model) is bound_late and bound_late.is_bound
    twin = net()
    twin.load_state_dict(model.state_dict())
    bound_early = P.PathSGD(twin.parameters(), lr=0.1, model=twin)
    for network, optimizer in ((model, bound_late), (twin, bound_early)):
        optimizer.zero_grad()
        nn.functional.mse_loss(network(x), y).backward()
        optimizer.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_state_dict_round_trip_continues_bit_identically():
    model = net()
    optimizer = P.PathSGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, model=model)

    def run(m, opt, seeds):
        for seed in seeds:
            opt.zero_grad()
            loss_of(m, seed).backward()
            opt.step()

    run(model, optimizer, range(3))
    saved_model, saved_optimizer = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    run(model, optimizer, range(3, 6))

    restored = net()
    restored.load_state_dict(saved_model)
    new_optimizer = P.PathSGD(restored.parameters(), lr=0.5, momentum=0.9, nesterov=True, model=restored)
    new_optimizer.load_state_dict(saved_optimizer)
    assert new_optimizer.param_groups[0]["lr"] == 0.1
    run(restored, new_optimizer, range(3, 6))
    for a, b in zip(model.parameters(), restored.parameters()):
        assert torch.equal(a, b)


def test_float32_model_trains_and_stays_finite():
    model = net().float()
    optimizer = P.PathSGD(model.parameters(), lr=0.05, model=model)
    x, y = batch(0)
    first = None
    for _ in range(30):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x.float()), y)
        first = first if first is not None else float(loss)
        loss.backward()
        optimizer.step()
    assert float(loss) < first
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
