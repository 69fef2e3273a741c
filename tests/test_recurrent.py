"""ReLU recurrent networks against the enumeration of every path of the unrolled network.

The reference lists every path of a tiny unrolled RNN (2 inputs, 3 units, T = 4) edge by edge;
from each path's edges it derives phi_p and, per parameter entry used k times with
t = |w|^p, the path's term k * P / t towards kappa^(1) and k (k - 1) * P / t towards kappa^(2)
(P the path's product of |w|^p): the first and second derivatives of phi_p^p in t.
"""

from __future__ import annotations

import copy
import math
from collections import Counter

from hypothesis import given
from hypothesis import strategies as st
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pl_pathsgd as P
from pl_pathsgd.paths.norms import recurrence_ratio, recurrent_kappas

DTYPE = torch.float64
T, INPUTS, UNITS = 4, 2, 3


class Recurrent(nn.Module):
    """nn.RNN (ReLU) read out at the last step (or at every step) by a Linear layer."""

    def __init__(self, bias=True, batch_first=True, layers=1, every_step=False, seed=0, inputs=INPUTS, units=UNITS,
                 outputs=2):
        super().__init__()
        torch.manual_seed(seed)
        self.rnn = nn.RNN(inputs, units, num_layers=layers, nonlinearity="relu", bias=bias, batch_first=batch_first)
        self.out = nn.Linear(units * (T if every_step else 1), outputs, bias=bias)
        self.batch_first, self.every_step = batch_first, every_step

    def forward(self, x):
        sequence = x if self.batch_first else x.transpose(0, 1)
        states, _ = self.rnn(sequence)
        if not self.batch_first:
            states = states.transpose(0, 1)
        return self.out(states.flatten(1) if self.every_step else states[:, -1])


class HandWritten(nn.Module):
    """The same network written as a loop over steps with Linear layers."""

    def __init__(self, reference: Recurrent):
        super().__init__()
        rnn = reference.rnn
        bias = rnn.bias
        self.input = nn.Linear(INPUTS, UNITS, bias=bias)
        self.recurrent = nn.Linear(UNITS, UNITS, bias=bias)
        self.out = copy.deepcopy(reference.out)
        with torch.no_grad():
            self.input.weight.copy_(rnn.weight_ih_l0)
            self.recurrent.weight.copy_(rnn.weight_hh_l0)
            if bias:
                self.input.bias.copy_(rnn.bias_ih_l0)
                self.recurrent.bias.copy_(rnn.bias_hh_l0)

    def forward(self, x):
        h = torch.zeros(x.shape[0], UNITS, dtype=x.dtype)
        for step in range(x.shape[1]):
            h = torch.relu(self.input(x[:, step]) + self.recurrent(h))
        return self.out(h)


def paths(net: Recurrent, steps: int = T):
    """Every path of the unrolled network (one layer, read-out of the last state) as a list of (name, index)."""
    rnn, out = net.rnn, net.out
    bias = rnn.bias
    units, inputs = rnn.hidden_size, rnn.input_size

    def continue_from(step: int, unit: int, edges: list):
        """Paths from unit ``unit`` of state ``step`` onwards."""
        for k in range(out.out_features):  # the read-out, at the last step
            if step == steps:
                yield edges + [("out.weight", (k, unit))]
        if step < steps:
            for nxt in range(units):
                yield from continue_from(step + 1, nxt, edges + [("rnn.weight_hh_l0", (nxt, unit))])

    for step in range(1, steps + 1):
        for unit in range(units):
            for i in range(inputs):
                yield from continue_from(step, unit, [("rnn.weight_ih_l0", (unit, i))])
            if bias:
                for name in ("rnn.bias_ih_l0", "rnn.bias_hh_l0"):
                    yield from continue_from(step, unit, [(name, (unit,))])
    if bias:
        for k in range(out.out_features):
            yield [("out.bias", (k,))]


def enumerate_geometry(net: Recurrent, p: float, steps: int = T):
    values = {name: t.detach() for name, t in net.named_parameters()}
    total = 0.0
    kappa1 = {n: torch.zeros_like(t) for n, t in values.items()}
    kappa2 = {n: torch.zeros_like(t) for n, t in values.items()}
    for path in paths(net, steps):
        product = math.prod(abs(float(values[n][i])) ** p for n, i in path)
        total += product
        for (name, index), k in Counter(path).items():
            t = abs(float(values[name][index])) ** p
            if t > 0:
                kappa1[name][index] += k * product / t
                kappa2[name][index] += k * (k - 1) * product / t
    return total ** (1 / p), kappa1, kappa2


def shrink(net: nn.Module, scale: float = 0.8) -> nn.Module:
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.mul_(scale)
    return net.double()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("p", [1, 2, 3])
def test_path_norm_and_both_kappas_equal_the_enumeration_of_every_path(bias, p):
    net = shrink(Recurrent(bias=bias, seed=p))
    phi, kappa1, kappa2 = enumerate_geometry(net, p)
    assert float(P.path_norm(net, p, (T, INPUTS))) == pytest.approx(phi, rel=1e-12)
    divisors = P.path_scaling(net, p, (T, INPUTS))
    for name, value in kappa1.items():
        torch.testing.assert_close(divisors[name], value.pow(2 / p).clamp_min(torch.finfo(DTYPE).tiny), rtol=1e-12,
                                   atol=0, msg=name)
    exact = recurrent_kappas(net, p, (T, INPUTS))
    assert set(exact) == {"rnn.weight_hh_l0"}
    got1, got2 = exact["rnn.weight_hh_l0"]
    torch.testing.assert_close(got1, kappa1["rnn.weight_hh_l0"], rtol=1e-12, atol=0)
    torch.testing.assert_close(got2, kappa2["rnn.weight_hh_l0"], rtol=1e-12, atol=0)
    for name in ("rnn.weight_ih_l0", "out.weight"):  # every path uses them once
        assert float(kappa2[name].abs().max()) == 0.0
    optimizer = P.PathSGD(net.parameters(), lr=0.1, p=p, model=net, input_shape=(T, INPUTS), recurrent="exact")
    x = torch.randn(5, T, INPUTS, dtype=DTYPE)
    before = {n: t.detach().clone() for n, t in net.named_parameters()}
    F.mse_loss(net(x), torch.zeros(5, 2, dtype=DTYPE)).backward()
    grads = {n: t.grad.clone() for n, t in net.named_parameters()}
    optimizer.step()
    for name, value in kappa1.items():
        divisor = (value + kappa2[name]).pow(2 / p).clamp_min(torch.finfo(DTYPE).tiny)
        torch.testing.assert_close(before[name] - net.get_parameter(name), 0.1 * grads[name] / divisor,
                                   rtol=1e-10, atol=1e-14, msg=name)


@given(inputs=st.integers(1, 2), units=st.integers(1, 3), outputs=st.integers(1, 2), steps=st.integers(1, 4),
       bias=st.booleans(), p=st.sampled_from([1.0, 1.5, 2.0, 3.0]), seed=st.integers(0, 2**16))
def test_generated_rnns_equal_the_enumeration_of_every_path(inputs, units, outputs, steps, bias, p, seed):
    """Random sizes, lengths, biases and p: phi_p, every kappa1 divisor and the exact kappa2 of the recurrent
    weights against the enumeration of every path of the unrolled network."""
    net = shrink(Recurrent(bias=bias, seed=seed, inputs=inputs, units=units, outputs=outputs))
    phi, kappa1, kappa2 = enumerate_geometry(net, p, steps)
    shape = (steps, inputs)
    assert float(P.path_norm(net, p, shape)) == pytest.approx(phi, rel=1e-10, abs=1e-300)
    divisors = P.path_scaling(net, p, shape)
    for name, value in kappa1.items():
        torch.testing.assert_close(divisors[name], value.pow(2 / p).clamp_min(torch.finfo(DTYPE).tiny), rtol=1e-10,
                                   atol=0, msg=name)
    got1, got2 = recurrent_kappas(net, p, shape)["rnn.weight_hh_l0"]
    torch.testing.assert_close(got1, kappa1["rnn.weight_hh_l0"], rtol=1e-10, atol=1e-300)
    torch.testing.assert_close(got2, kappa2["rnn.weight_hh_l0"], rtol=1e-10, atol=1e-300)


def test_a_near_identity_recurrence_makes_kappa2_large():
    net = Recurrent(bias=False).double()
    with torch.no_grad():
        net.rnn.weight_hh_l0.copy_(torch.eye(UNITS) + 0.05 * torch.randn(UNITS, UNITS))
        net.rnn.weight_ih_l0.abs_()
    ratio = recurrence_ratio(net, 2, (T, INPUTS))["rnn.weight_hh_l0"]
    assert ratio > 1.0  # kappa1 alone is a poor approximation here


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("layers", [1, 2])
def test_layouts_and_layers_equal_the_hand_written_or_stacked_reference(batch_first, layers):
    net = shrink(Recurrent(batch_first=batch_first, layers=layers, every_step=True))
    reference = shrink(Recurrent(batch_first=True, layers=layers, every_step=True), 1.0)
    reference.load_state_dict(net.state_dict())
    shape = (T, INPUTS)
    assert float(P.path_norm(net, 2, shape)) == pytest.approx(float(P.path_norm(reference, 2, shape)), rel=1e-12)
    if layers == 2:
        assert set(P.rescalable_units(net, shape)) == {"rnn.l0", "rnn.l1"}


def test_the_hand_written_loop_has_the_same_geometry_and_refuses_exact_kappa2():
    net = shrink(Recurrent())
    loop = HandWritten(net).double()
    shape = (T, INPUTS)
    for p in (1, 2, 3):
        assert float(P.path_norm(loop, p, shape)) == pytest.approx(float(P.path_norm(net, p, shape)), rel=1e-12)
    ours, theirs = P.path_scaling(loop, 2, shape), P.path_scaling(net, 2, shape)
    for mine, other in (("input.weight", "rnn.weight_ih_l0"), ("recurrent.weight", "rnn.weight_hh_l0"),
                        ("input.bias", "rnn.bias_ih_l0"), ("out.weight", "out.weight")):
        torch.testing.assert_close(ours[mine], theirs[other], rtol=1e-12, atol=0)
    with pytest.raises(P.PathGeometryError, match="recurrent.weight is used more than once along a path"):
        P.PathSGD(loop.parameters(), lr=0.1, model=loop, input_shape=shape, recurrent="exact")


@pytest.mark.parametrize("recurrent", ["kappa1", "exact"])
def test_rescaled_recurrent_nets_compute_the_same_function_for_100_steps(recurrent):
    net = shrink(Recurrent(every_step=True, seed=3), 0.5)
    rescaled = copy.deepcopy(net)
    shape = (T, INPUTS)
    assert P.rescalable_units(net, shape) == {"rnn.l0": UNITS}
    P.rescale_units(rescaled, {"rnn.l0": torch.tensor([30.0, 0.05, 4.0], dtype=DTYPE)}, shape)
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(32, T, INPUTS, dtype=DTYPE, generator=generator)
    y = x.sum(dim=1)
    optimizers = [P.PathSGD(m.parameters(), lr=0.05, model=m, input_shape=shape, recurrent=recurrent)
                  for m in (net, rescaled)]
    for _ in range(100):
        outputs = []
        for model, optimizer in zip((net, rescaled), optimizers):
            optimizer.zero_grad()
            out = model(x)
            F.mse_loss(out, y).backward()
            optimizer.step()
            outputs.append(out.detach())
        torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-9, atol=1e-12)
    assert not torch.allclose(net.rnn.weight_hh_l0, rescaled.rnn.weight_hh_l0)  # different weights, same function


def test_other_recurrent_cells_are_refused_by_name():
    for cell, reason in ((nn.RNN(2, 3, nonlinearity="tanh", batch_first=True), "tanh"),
                         (nn.LSTM(2, 3, batch_first=True), "gates"), (nn.GRU(2, 3, batch_first=True), "gates"),
                         (nn.RNN(2, 3, nonlinearity="relu", batch_first=True, bidirectional=True), "bidirectional")):
        class Wrapped(nn.Module):
            def __init__(self):
                super().__init__()
                self.cell = cell

            def forward(self, x):
                return self.cell(x)[0]

        with pytest.raises(P.UnsupportedModelError, match=reason):
            P.path_norm(Wrapped(), 2, (T, INPUTS))


def test_the_path_norm_monitor_logs_the_kappa2_ratio_of_a_recurrent_network(tmp_path):
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader, TensorDataset

    from pl_pathsgd.callbacks import PathNormMonitor

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = shrink(Recurrent())

        @property
        def path_network(self):
            return self.net

        def training_step(self, batch, batch_idx):
            return F.mse_loss(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    x = torch.rand(16, T, INPUTS, dtype=DTYPE)
    module = Module()
    module.example_input_array = x[:1]
    trainer = pl.Trainer(max_epochs=1, logger=CSVLogger(tmp_path), callbacks=[PathNormMonitor(p=2)],
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(TensorDataset(x, x.sum(1)), batch_size=8))
    logged = float(trainer.callback_metrics["recurrence/kappa2_ratio/rnn.weight_hh_l0"])
    assert logged == pytest.approx(recurrence_ratio(module.net, 2, (T, INPUTS))["rnn.weight_hh_l0"], rel=1e-12)
    assert logged > 0
