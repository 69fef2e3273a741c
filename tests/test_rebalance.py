"""Rebalancing: l2 and Lemma 4.1 rescalings keep the function, optimizer state follows them, and the
Rebalance callback leaves a run's randomness, modes and batches alone (and Path-SGD's function trajectory)."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pl_pathsgd as P
from pl_pathsgd.callbacks.rebalance import Rebalance
from pl_pathsgd.paths import PathGeometryError
from pl_pathsgd.paths.balancing import (
    l2_rebalance,
    optimizer_problem,
    parameter_factors,
    pathnorm_rebalance,
    rebalance,
    rescale_gradients,
    rescale_optimizer_state,
)
from tests.test_callbacks_contract import ContractModule, Scenario, assert_identical, fit_and_capture, tensor_data

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*(log_every_n_steps|does not have many workers|LeafSpec|litlogger|litmodels|no `validation_step`"
    "|in eval mode).*"
)

FEATURES, CLASSES = 6, 3


def mlp(seed: int = 0, bias: bool = True) -> nn.Sequential:
    """A float64 MLP from the paper's unbalanced initialisation (units rescaled by up to ~10^3)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(FEATURES, 12, bias=bias), nn.ReLU(), nn.Linear(12, 8, bias=bias), nn.ReLU(),
                        nn.Linear(8, CLASSES, bias=bias)).double()
    P.balanced_init_(net, seed=seed)
    if bias:
        with torch.no_grad():
            for layer in net[::2]:
                layer.bias.uniform_(-0.5, 0.5)
    return P.unbalanced_init_(net, seed=seed + 1)


CONV_SHAPE = (2, 6, 6)


def convnet(seed: int = 0) -> nn.Sequential:
    """Convolution, BatchNorm (eval), grouped convolution, max pooling, transposed convolution, Linear: float64."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 3, groups=2), nn.ReLU(),
        nn.MaxPool2d(2), nn.ConvTranspose2d(6, 4, 2, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3),
    ).double().eval()
    with torch.no_grad():
        batchnorm = net[1]
        batchnorm.running_mean.uniform_(-1, 1)
        batchnorm.running_var.uniform_(0.5, 2)
        batchnorm.weight.uniform_(0.5, 2)
        batchnorm.bias.uniform_(-1, 1)
    return P.unbalanced_init_(net, seed=seed + 1, input_shape=CONV_SHAPE)


def inputs_for(net: nn.Module) -> torch.Tensor:
    shape = CONV_SHAPE if isinstance(net[0], nn.Conv2d) else (FEATURES,)
    return torch.randn(16, *shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)


def shape_of(net: nn.Module):
    return CONV_SHAPE if isinstance(net[0], nn.Conv2d) else None


def squared_norm(net: nn.Module) -> float:
    return float(sum(p.detach().square().sum() for p in net.parameters()))


def relative_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


NETWORKS = {"mlp": mlp, "convnet": convnet}


# ----------------------------------------------------------------------------- l2 rebalancing


@pytest.mark.parametrize("kind", NETWORKS)
def test_l2_rebalance_keeps_the_function_and_lowers_the_norm(kind):
    net = NETWORKS[kind]()
    x = inputs_for(net)
    with torch.no_grad():
        before, norm_before = net(x), squared_norm(net)
    result = l2_rebalance(net, input_shape=shape_of(net))
    with torch.no_grad():
        assert relative_gap(net(x), before) <= 1e-12
    assert result.converged and result.largest_factor > 10  # the unbalanced init was far from l2-balanced
    assert squared_norm(net) < 0.1 * norm_before
    assert result.squared_norm_before == pytest.approx(norm_before, rel=1e-12)
    assert result.squared_norm_after == pytest.approx(squared_norm(net), rel=1e-12)


@pytest.mark.parametrize("kind", NETWORKS)
def test_l2_objective_never_increases_sweep_by_sweep(kind):
    net = NETWORKS[kind]()
    norms = [squared_norm(net)]
    for _ in range(25):
        l2_rebalance(net, input_shape=shape_of(net), max_sweeps=1)
        norms.append(squared_norm(net))
    assert all(later <= earlier * (1 + 1e-14) for earlier, later in zip(norms, norms[1:])), norms
    assert norms[-1] < norms[1] < norms[0]


def test_l2_rebalanced_mlp_has_equal_incoming_and_outgoing_norms_at_every_hidden_unit():
    """The first-order condition of min over c of c^2 A + B / c^2, checked on the weights themselves."""
    net = mlp()
    l2_rebalance(net)
    for layer, following in ((net[0], net[2]), (net[2], net[4])):
        incoming = layer.weight.detach().square().sum(dim=1) + layer.bias.detach().square()
        outgoing = following.weight.detach().square().sum(dim=0)
        torch.testing.assert_close(incoming, outgoing, rtol=1e-9, atol=0)


@pytest.mark.parametrize("kind", NETWORKS)
def test_l2_rebalance_is_a_fixed_point(kind):
    net = NETWORKS[kind]()
    l2_rebalance(net, input_shape=shape_of(net), tolerance=1e-12)
    state = copy.deepcopy(net.state_dict())
    again = l2_rebalance(net, input_shape=shape_of(net), tolerance=1e-12)
    assert again.sweeps == 1 and again.largest_factor - 1 <= 1e-11
    for key, value in net.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=1e-11, atol=1e-14)


@pytest.mark.parametrize("method", ["l2", "pathnorm"])
def test_two_rescaled_copies_end_in_the_same_network(method):
    net = mlp(bias=method == "l2")
    other = copy.deepcopy(net)
    generator = torch.Generator().manual_seed(9)
    factors = {name: torch.exp(4 * torch.rand(count, generator=generator, dtype=torch.float64) - 2)
               for name, count in P.rescalable_units(other).items()}
    P.rescale_units(other, factors)
    assert relative_gap(other[0].weight.detach(), net[0].weight.detach()) > 0.5  # really a different network
    rebalance(net, method)
    rebalance(other, method)
    for (key, value), theirs in zip(net.state_dict().items(), other.state_dict().values()):
        torch.testing.assert_close(theirs, value, rtol=1e-9, atol=1e-12, msg=key)


def test_a_unit_without_incoming_or_outgoing_weights_keeps_its_scale():
    """c^2 A + B / c^2 has no minimiser when A or B is 0: such a unit keeps c = 1, and nothing becomes NaN."""
    net = mlp()
    with torch.no_grad():
        net[0].weight[3].zero_()
        net[0].bias[3] = 0.0  # unit 3 of the first layer receives nothing
        net[4].weight[:, 5].zero_()  # unit 5 of the second layer sends nothing
    x = inputs_for(net)
    with torch.no_grad():
        before = net(x)
    result = l2_rebalance(net)
    assert result.factors["0"][3] == 1.0 and result.factors["2"][5] == 1.0
    assert all(bool(torch.isfinite(p).all()) for p in net.parameters())
    with torch.no_grad():
        assert relative_gap(net(x), before) <= 1e-12


def test_parameter_factors_are_the_ratios_of_the_weights():
    net = mlp()
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    result = l2_rebalance(net)
    ratios = parameter_factors(net, result.factors)
    assert set(ratios) == set(before) - {"4.bias"}  # the output bias is on no rescaled unit's path
    for name, parameter in net.named_parameters():
        ratio = ratios.get(name, torch.ones_like(parameter))
        torch.testing.assert_close(before[name] * ratio, parameter.detach(), rtol=1e-13, atol=0)


# ----------------------------------------------------------------------------- Lemma 4.1


def test_pathnorm_rebalance_is_lemma_4_1():
    """Without biases and with one output, the balanced network's mu_{2,inf}^depth equals phi_2."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 9, bias=False), nn.ReLU(), nn.Linear(9, 7, bias=False), nn.ReLU(),
                        nn.Linear(7, 1, bias=False)).double()
    P.unbalanced_init_(P.balanced_init_(net, seed=0), seed=1)
    x = torch.randn(10, 5, dtype=torch.float64)
    with torch.no_grad():
        before, mu_before = net(x), P.max_unit_norm(net)
    originals = {name: p.detach().clone() for name, p in net.named_parameters()}
    result = pathnorm_rebalance(net)
    with torch.no_grad():
        assert relative_gap(net(x), before) <= 1e-12
    phi = P.path_norm(net, p=2)
    assert float(P.max_unit_norm(net)) ** 3 == pytest.approx(float(phi), rel=1e-10)
    assert P.max_unit_norm(net) < mu_before  # the objective went down
    ratios = parameter_factors(net, result.factors)  # the factors it reports are the ones it applied
    for name, parameter in net.named_parameters():
        torch.testing.assert_close(originals[name] * ratios[name], parameter.detach(), rtol=1e-12, atol=0)
    again = pathnorm_rebalance(net)
    assert again.largest_factor - 1 <= 1e-12  # a fixed point


def test_rebalancing_refuses_what_it_cannot_do_exactly():
    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.RNN(3, 4, nonlinearity="relu", batch_first=True)
            self.out = nn.Linear(4, 2)

        def forward(self, x):
            return self.out(self.rnn(x)[0][:, -1])

    with pytest.raises(PathGeometryError, match="recurren"):
        l2_rebalance(Recurrent(), input_shape=(5, 3))
    with pytest.raises(PathGeometryError, match="layered networks of Linear layers"):
        pathnorm_rebalance(convnet(), input_shape=CONV_SHAPE)
    with pytest.raises(ValueError, match="unknown method"):
        rebalance(mlp(), "equinorm")
    with pytest.raises(ValueError, match="max_sweeps"):
        l2_rebalance(mlp(), max_sweeps=0)


# ----------------------------------------------------------------------------- optimizer state


def loss_of(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(net(x), y)


def gradients_at(net: nn.Module, x, y) -> dict[str, torch.Tensor]:
    net.zero_grad()
    loss_of(net, x, y).backward()
    return {name: p.grad.detach().clone() for name, p in net.named_parameters()}


BATCH = (torch.randn(32, FEATURES, generator=torch.Generator().manual_seed(3), dtype=torch.float64),
         torch.randint(CLASSES, (32,), generator=torch.Generator().manual_seed(4)))


@pytest.mark.parametrize("name, make, expected", [
    ("SGD momentum", lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9), {"momentum_buffer": lambda g: g}),
    ("Adam", lambda p: torch.optim.Adam(p, lr=0.01), {"exp_avg": lambda g: 0.1 * g, "exp_avg_sq": lambda g: 0.001 * g * g}),
    ("AdamW with decay", lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
     {"exp_avg": lambda g: 0.1 * g, "exp_avg_sq": lambda g: 0.001 * g * g}),
    ("Adagrad", lambda p: torch.optim.Adagrad(p, lr=0.01), {"sum": lambda g: g * g}),
])
def test_state_after_a_rebalance_is_the_state_in_the_new_coordinates(name, make, expected):
    """After one step the state is a function of the first gradient g0 at w0.  Rebalancing maps the weights
    by T; the carried state must be that function of the gradient at T(w0), the same loss in the new coordinates."""
    net = mlp()
    start = copy.deepcopy(net)
    optimizer = make(net.parameters())
    gradients_at(net, *BATCH)
    optimizer.step()
    result = l2_rebalance(net)
    rescale_optimizer_state(optimizer, net, result.factors)
    P.rescale_units(start, result.factors)  # T(w0)
    moved = gradients_at(start, *BATCH)
    for parameter_name, parameter in net.named_parameters():
        for key, of_gradient in expected.items():
            torch.testing.assert_close(optimizer.state[parameter][key], of_gradient(moved[parameter_name]),
                                       rtol=1e-10, atol=1e-300, msg=f"{name} {key} of {parameter_name}")


def test_held_gradients_follow_the_rescaling():
    net = mlp()
    gradients_at(net, *BATCH)
    result = l2_rebalance(net)
    rescale_gradients(net, result.factors)
    held = {name: p.grad.clone() for name, p in net.named_parameters()}
    fresh = gradients_at(net, *BATCH)  # the gradient at the rebalanced weights
    for name in held:
        torch.testing.assert_close(held[name], fresh[name], rtol=1e-10, atol=1e-300)


@pytest.mark.parametrize("method", ["l2", "pathnorm"])
def test_pathsgd_with_momentum_keeps_its_function_trajectory_through_rebalancing(method):
    """Theorem 5.1 with momentum: rebalancing every step changes nothing of the function computed, provided the
    momentum buffer is multiplied by r; left alone (or divided by r like SGD's) the trajectories part."""
    def trajectory(transform):
        net = mlp(bias=method == "l2")
        optimizer = P.PathSGD(net.parameters(), lr=0.05, momentum=0.9, model=net)
        outputs = []
        for _ in range(10):
            gradients_at(net, *BATCH)
            optimizer.step()
            if transform is not None:
                result = rebalance(net, method)
                transform(optimizer, net, result.factors)
            with torch.no_grad():
                outputs.append(net(BATCH[0]))
        return torch.stack(outputs)

    reference = trajectory(None)
    assert relative_gap(trajectory(rescale_optimizer_state), reference) <= 1e-11

    def divided_like_sgd(optimizer, net, factors):  # the buffer treated as a gradient: divided by r
        ratios = parameter_factors(net, factors)
        for name, parameter in net.named_parameters():
            if name in ratios:
                optimizer.state[parameter]["momentum_buffer"].div_(ratios[name])

    assert relative_gap(trajectory(lambda optimizer, net, factors: None), reference) > 1e-4  # left behind
    assert relative_gap(trajectory(divided_like_sgd), reference) > 1e-4


def test_optimizers_whose_state_cannot_follow_are_refused():
    parameters = [nn.Parameter(torch.zeros(2))]
    assert optimizer_problem(torch.optim.SGD(parameters, lr=0.1)) is None
    assert optimizer_problem(torch.optim.SGD(parameters, lr=0.1, weight_decay=0.1)) is None  # no state
    assert optimizer_problem(torch.optim.AdamW(parameters, weight_decay=0.1)) is None  # decoupled
    assert optimizer_problem(P.PathSGD(parameters, lr=0.1, momentum=0.9)) is None
    assert "not supported" in optimizer_problem(torch.optim.RMSprop(parameters))
    assert "weight_decay" in optimizer_problem(torch.optim.SGD(parameters, lr=0.1, momentum=0.9, weight_decay=0.1))
    assert "weight_decay" in optimizer_problem(torch.optim.Adam(parameters, weight_decay=0.1))
    assert "weight_decay" in optimizer_problem(P.PathSGD(parameters, lr=0.1, momentum=0.5, weight_decay=0.1))
    assert "initial_accumulator_value" in optimizer_problem(torch.optim.Adagrad(parameters, initial_accumulator_value=1))
    with pytest.raises(ValueError, match="RMSprop is not supported"):
        rescale_optimizer_state(torch.optim.RMSprop(parameters), mlp(), {})


# ----------------------------------------------------------------------------- the callback


class Recorder(pl.LightningModule):
    """A float64 MLP from the unbalanced init; records its outputs on a fixed probe after every batch."""

    def __init__(self, optimizer: str = "pathsgd", network: nn.Module | None = None):
        super().__init__()
        self.net = network if network is not None else mlp()
        self.optimizer_name = optimizer
        self.probe = torch.randn(8, FEATURES, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        self.outputs: list[torch.Tensor] = []
        self.steps = 0

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        self.steps += 1
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        with torch.no_grad():
            self.outputs.append(self.net(self.probe).clone())

    def configure_optimizers(self):
        if self.optimizer_name == "pathsgd":
            return P.PathSGD(self.parameters(), lr=0.05, momentum=0.9, model=self.net)
        if self.optimizer_name == "adam-decay":
            return torch.optim.Adam(self.parameters(), lr=0.01, weight_decay=0.1)
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


def run(tmp_path, callbacks, module: Recorder | None = None, **trainer_args) -> tuple[pl.Trainer, Recorder]:
    pl.seed_everything(0, verbose=False)
    module = module or Recorder()
    data = TensorDataset(torch.randn(64, FEATURES, dtype=torch.float64), torch.randint(CLASSES, (64,)))
    arguments = dict(max_epochs=2, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer = pl.Trainer(default_root_dir=tmp_path, callbacks=callbacks, logger=CSVLogger(tmp_path),
                         **{**arguments, **trainer_args})
    trainer.fit(module, DataLoader(data, batch_size=8, shuffle=True))
    return trainer, module


@pytest.mark.parametrize("method", ["l2", "pathnorm"])
def test_callback_keeps_pathsgd_function_trajectory(tmp_path, method):
    """PathSGD with momentum under gradient accumulation, rebalanced after every optimizer step: the outputs after
    every batch are those of the same run without the callback."""
    make = (lambda: Recorder(network=mlp(bias=False))) if method == "pathnorm" else Recorder
    _, reference = run(tmp_path / "reference", [], module=make(), accumulate_grad_batches=2)
    callback = Rebalance(method=method, every_n_steps=1)
    trainer, rebalanced = run(tmp_path / "rebalanced", [callback], module=make(), accumulate_grad_batches=2)
    assert callback.rebalances == trainer.global_step == 8
    assert relative_gap(torch.stack(rebalanced.outputs), torch.stack(reference.outputs)) <= 1e-10
    assert relative_gap(rebalanced.net[0].weight.detach(), reference.net[0].weight.detach()) > 0.1  # moved
    assert "rebalance/largest_factor" in trainer.callback_metrics


def test_callback_schedule(tmp_path):
    every_epoch = Rebalance(every_n_epochs=1, at_fit_start=True)
    run(tmp_path / "a", [every_epoch], max_epochs=3)
    assert every_epoch.rebalances == 1 + 3
    every_three_steps = Rebalance(every_n_steps=3)
    trainer, _ = run(tmp_path / "b", [every_three_steps], limit_train_batches=5)  # 10 steps: at 3, 6, 9
    assert trainer.global_step == 10 and every_three_steps.rebalances == 3


@pytest.mark.parametrize("optimizer", ["sgd", "pathsgd"])
def test_callback_changes_only_the_weights_and_the_optimizer_state(tmp_path_factory, optimizer):
    """The observer contract's run (dropout, a frozen BatchNorm, momentum, data that draw from every global
    generator, gradient accumulation) with and without Rebalance: the same batches reach the same steps in the
    same modes and every random state ends the same; only the weights and the optimizer state differ, and with
    Path-SGD the network still computes the same function."""
    scenario = Scenario(optimizer, accumulate=2)
    reference = fit_and_capture(scenario, [], tmp_path_factory.mktemp("reference"))
    callback = Rebalance(every_n_steps=1)
    rebalanced = fit_and_capture(scenario, [callback], tmp_path_factory.mktemp("rebalanced"))
    assert callback.rebalances == 4
    for what in ("steps (modes, batch)", "torch rng", "cuda rng", "numpy rng", "python rng"):
        assert_identical(rebalanced[what], reference[what], what)
    weights, reference_weights = rebalanced["weights and buffers"], reference["weights and buffers"]
    assert not torch.equal(weights["net.0.weight"], reference_weights["net.0.weight"])
    if optimizer == "pathsgd":
        outputs = []
        for state in (weights, reference_weights):
            module = ContractModule(optimizer)
            module.load_state_dict(state)
            module.eval()
            with torch.no_grad():
                outputs.append(module(tensor_data(1, 24).tensors[0]))
        assert relative_gap(outputs[0], outputs[1]) <= 1e-4  # float32 rounding over 4 steps


def test_callback_refuses_before_the_first_step(tmp_path):
    with pytest.raises(ValueError, match="not both"):
        Rebalance(every_n_steps=1, every_n_epochs=1)
    with pytest.raises(ValueError, match="method"):
        Rebalance(method="equinorm")
    with pytest.raises(ValueError, match="every_n_steps"):
        Rebalance(every_n_steps=0)
    module = Recorder("adam-decay")
    with pytest.raises(ValueError, match="weight_decay"):
        run(tmp_path, [Rebalance()], module=module)
    assert module.steps == 0
    module = Recorder("sgd", network=convnet_flat())
    with pytest.raises(PathGeometryError, match="layered networks"):
        run(tmp_path, [Rebalance(method="pathnorm")], module=module)
    assert module.steps == 0


def test_callback_warns_when_nothing_can_be_rescaled(tmp_path):
    callback = Rebalance(every_n_steps=1)
    single_layer = nn.Sequential(nn.Linear(FEATURES, CLASSES)).double()
    with pytest.warns(UserWarning, match="no hidden units that can be rescaled"):
        trainer, module = run(tmp_path, [callback], module=Recorder("sgd", network=single_layer), max_epochs=1)
    assert callback.rebalances == 0 and module.steps == 8


def convnet_flat() -> nn.Module:
    """A network taking FEATURES-vectors with a 1-d convolution inside (not a layered MLP)."""
    return nn.Sequential(nn.Unflatten(1, (1, FEATURES)), nn.Conv1d(1, 2, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(2 * (FEATURES - 2), CLASSES)).double()
