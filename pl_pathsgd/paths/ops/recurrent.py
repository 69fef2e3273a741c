"""ReLU recurrent networks (``nn.RNN(nonlinearity="relu")``), unrolled over the sequence.

An RNN unrolled over T steps is a feed-forward network whose input, recurrent and bias weights
are shared across time: h_s = relu(W_ih x_s + b_ih + W_hh h_(s-1) + b_hh), s = 1..T, layer after
layer.  A path starts at an input at some step, at a bias at some step, or at the initial state,
and runs through the unrolled network to an output.  The twin is the same recursion on twins
(ReLU -> identity), so its gradient with respect to the shared |w|^p sums gamma_in * gamma_out
over every edge the weight stands for: kappa^(1) of RNN Path-SGD (Neyshabur, Wu, Salakhutdinov,
Srebro 2016).  A path can use a recurrent weight several times; the *exact* Path-SGD divisor adds
kappa^(2) for those paths (:func:`kappa2_of`).  Other recurrent cells (tanh, LSTM, GRU) are refused.

Units: the hidden units of each layer (the last dimension of the outputs) can be rescaled by a
positive diagonal D: W_ih -> D W_ih, W_hh -> D W_hh D^-1, biases -> D b, and the next layer's (or
read-out's) input weights -> W D^-1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pl_pathsgd.paths.ops.linear import _divide_along, parameter_name, weight_twin
from pl_pathsgd.paths.ops.registry import NONE, Call, Consumer, Kind, Producer, Rule, TwinRun, register, same_value_per

aten = torch.ops.aten


def _options(call: Call) -> dict:
    has_biases, num_layers, dropout, train, bidirectional, batch_first = call.args[3:9]
    return dict(has_biases=bool(has_biases), num_layers=int(num_layers), bidirectional=bool(bidirectional),
                batch_first=bool(batch_first))


def _layer_parameters(call: Call, layer: int) -> tuple:
    """The (w_ih, w_hh, b_ih, b_hh) argument nodes of one layer (biases None without biases)."""
    options = _options(call)
    per_layer = 4 if options["has_biases"] else 2
    chunk = list(call.args[2][layer * per_layer: (layer + 1) * per_layer])
    return tuple(chunk + [None, None]) if per_layer == 2 else tuple(chunk)


@register(aten.rnn_relu)
class ReluRNN(Rule):
    """``nn.RNN(nonlinearity="relu")``: any number of layers, with or without biases, batch first or not."""

    def check(self, call: Call) -> str | None:
        if call.target is not aten.rnn_relu.input:
            return "nn.RNN on packed sequences is not supported; pad the sequences instead"
        options = _options(call)
        if options["bidirectional"]:
            return ("a bidirectional nn.RNN is not supported; use two nn.RNN layers, one of them on the reversed "
                    "sequence")
        if call.kind_of(call.args[0]) != Kind.ACT:
            return "nn.RNN of weights only"
        for node in call.args[2]:
            if call.kind_of(node) == Kind.ACT:
                return "nn.RNN's weights depend on the input"
            if call.kind_of(node) == Kind.PARAM and parameter_name(node, call) is None:
                return "nn.RNN's weights are computed in forward; pass the parameters themselves"
        return None

    def twin(self, call, run, x, hx, params, *rest):
        options = _options(call)
        twins = [weight_twin(call, run, node, value) for node, value in zip(call.args[2], params)]
        per_layer = 4 if options["has_biases"] else 2
        sequence = x if options["batch_first"] else x.transpose(0, 1)  # (batch, time, features)
        initial = run.power(hx) if call.kind_of(call.args[1]) <= Kind.CONST else hx
        finals = []
        for layer in range(options["num_layers"]):
            w_ih, w_hh, *biases = twins[layer * per_layer: (layer + 1) * per_layer]
            bias = _combine(biases, run) if biases else None
            states = [initial[layer]]
            for step in range(sequence.shape[1]):
                states.append(_cell(sequence[:, step], states[-1], w_ih, w_hh, bias, run))
            if run.track and run.recurrences is not None:
                run.recurrences.append((call.args[2][layer * per_layer + 1].name, states, w_hh.detach()))
            sequence = torch.stack(states[1:], dim=1)
            finals.append(states[-1])
        output = sequence if options["batch_first"] else sequence.transpose(0, 1)
        return output, torch.stack(finals)

    def produces(self, call: Call) -> list[Producer] | str:
        hx = call.args[1]
        if getattr(hx, "target", None) not in (aten.zeros.default, aten.new_zeros.default, aten.zeros_like.default):
            return "an nn.RNN whose initial state is given cannot have its units rescaled (the state would not follow)"
        options = _options(call)
        producers = []
        for layer in range(options["num_layers"]):
            nodes = _layer_parameters(call, layer)
            if any(node is not None and (parameter_name(node, call) is None or list(node.users) != [call.node])
                   for node in nodes):
                return "an nn.RNN whose weights are computed in forward or shared cannot have its units rescaled"
            following = _layer_parameters(call, layer + 1)[0] if layer + 1 < options["num_layers"] else None
            producers.append(_layer_producer(call, layer, nodes, following, options))
        return producers

    def consumes(self, call: Call, ids: Tensor, *rest) -> Consumer | str:
        w_ih = _layer_parameters(call, 0)[0]
        if parameter_name(w_ih, call) is None or list(w_ih.users) != [call.node]:
            return "the nn.RNN's input weight is computed in forward or shared"
        columns = same_value_per(ids, -1)
        if bool(torch.isnan(columns).any()):
            return "its units are mixed with other positions before the nn.RNN reads them"

        def divide(parameters: dict[str, Tensor], buffers: dict[str, Tensor], factors: Tensor) -> None:
            _divide_along(parameters[w_ih.name], 1, columns, factors)

        return Consumer(parameters=(w_ih.name,), divide=divide)


def _combine(biases: list, run: TwinRun) -> Tensor:
    """Two bias edges into each unit (b_ih and b_hh): their twins add (or the larger wins for p = inf)."""
    first, second = biases
    return first + second if run.mode == "sum" else torch.maximum(first, second)


def _cell(x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor, bias: Tensor | None, run: TwinRun) -> Tensor:
    """One step of the twin: W_ih x + W_hh h + b, with ReLU the identity."""
    if run.mode == "sum":
        out = x @ w_ih.T + h @ w_hh.T
        return out if bias is None else out + bias
    out = torch.maximum((x.unsqueeze(-2) * w_ih).amax(-1), (h.unsqueeze(-2) * w_hh).amax(-1))
    return out if bias is None else torch.maximum(out, bias)


def _layer_producer(call: Call, layer: int, nodes: tuple, following, options: dict) -> Producer:
    w_ih, w_hh, b_ih, b_hh = nodes
    count = int(call.shape(w_hh)[0])
    last = layer == options["num_layers"] - 1
    fqn = call.extra.get("parameter_names", {}).get(w_hh.name, w_hh.name)
    name = fqn.replace(f"weight_hh_l{layer}", f"l{layer}")

    def scale(parameters: dict[str, Tensor], factors: Tensor) -> None:
        for node in (w_ih, w_hh, b_ih, b_hh):
            if node is not None:
                tensor = parameters[node.name]
                tensor.mul_(factors.to(tensor).reshape((-1,) + (1,) * (tensor.dim() - 1)))
        parameters[w_hh.name].div_(factors.to(parameters[w_hh.name])[None, :])  # its own recurrence
        if following is not None:
            parameters[following.name].div_(factors.to(parameters[following.name])[None, :])  # the next layer

    def place(meta) -> tuple:
        output, h_n = meta[0], meta[1]
        units = torch.arange(count, dtype=torch.float64)
        out_ids = torch.full(_at_batch_one(output.shape), NONE, dtype=torch.float64)
        if last:
            out_ids[...] = units
        state_ids = torch.full(_at_batch_one(h_n.shape), NONE, dtype=torch.float64)
        state_ids[layer] = units
        return out_ids, state_ids

    return Producer(count=count, axis=-1, parameters=tuple(n.name for n in nodes if n is not None), scale=scale,
                    name=name, place=place, absorbed_inside=True)


def _at_batch_one(shape) -> list[int]:
    return [1 if isinstance(s, torch.SymInt) else int(s) for s in shape]


def kappa2_of(states: list[Tensor], gamma_out: list[Tensor | None], recurrent_twin: Tensor) -> Tensor:
    """kappa^(2) of a recurrent weight matrix R = |W_hh|^p, from one layer's unrolled twin.

    A path that uses entry (a, b) of W_hh at steps s < s' (from unit b at step s-1 to unit a at step s,
    and again at step s') contributes, for that ordered pair of uses and the reverse one,
    t_ab * gamma_in(b @ s-1) * (R^(s'-1-s))[b, a] * gamma_out(a @ s'), with t_ab = |w_ab|^p: the second
    derivative of the twin's total with respect to t_ab, times t_ab.  With
    Y_s' = sum_{s < s'} diag(gamma_in(@ s-1)) R^(s'-1-s), which satisfies
    Y_(s'+1) = Y_s' R + diag(gamma_in(@ s'-1)), this is
    kappa2[a, b] = 2 t_ab sum_s' gamma_out(a @ s') Y_s'[b, a]: T products of (units x units) matrices,
    O(T n^3) for n units, next to the O(T n^2) of the twin itself.

    ``states``: the twin's states h_0 ... h_T, each (1, n); ``gamma_out``: the twin's gradients at
    h_0 ... h_T (None where no path leaves).
    """
    n = recurrent_twin.shape[0]
    accumulated = torch.zeros(n, n, dtype=recurrent_twin.dtype, device=recurrent_twin.device)
    y = torch.zeros_like(accumulated)
    for step in range(1, len(states)):
        out = gamma_out[step]
        if out is not None and step >= 2:
            accumulated += out.reshape(-1)[:, None] * y.T  # [a, b] += gamma_out(a) * Y[b, a]
        y = y @ recurrent_twin + torch.diag(states[step - 1].detach().reshape(-1))
    return 2 * recurrent_twin * accumulated
