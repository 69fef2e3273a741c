"""Operations refused with a reason of their own (beyond those of the rule modules)."""

from __future__ import annotations

import torch

from pl_pathsgd.paths.ops.registry import refuse

aten = torch.ops.aten

refuse("multiplies activations together (attention weights times values), which has no path decomposition",
       aten.scaled_dot_product_attention, aten._scaled_dot_product_flash_attention,
       aten._scaled_dot_product_efficient_attention, aten._native_multi_head_attention)
refuse("looks up rows by the input's values; the path geometry needs a linear map of the input (use a Linear "
       "layer on one-hot inputs)", aten.embedding, aten.embedding_bag, aten._embedding_bag)
refuse("gates its state with sigmoids and tanh (products of activations), which has no path decomposition; "
       "use nn.RNN(nonlinearity='relu')", aten.lstm, aten.gru, aten.lstm_cell, aten.gru_cell)
refuse("uses tanh, which is not positively homogeneous; use nn.RNN(nonlinearity='relu')", aten.rnn_tanh,
       aten.rnn_tanh_cell)
refuse("draws random numbers in forward; the path geometry needs a fixed network", aten.rand, aten.randn,
       aten.rand_like, aten.randn_like, aten.randint, aten.randint_like, aten.bernoulli, aten.normal, aten.randperm,
       aten.multinomial, aten.uniform, aten.exponential)
refuse("compares or rounds values, which is no sum over paths", aten.eq, aten.ne, aten.lt, aten.le, aten.gt, aten.ge,
       aten.round, aten.floor, aten.ceil, aten.trunc, aten.argmax, aten.argmin)
refuse("accumulates along a dimension (each output depends on the order of positions in a non-linear way or "
       "mixes the batch)", aten.cumsum, aten.cumprod, aten.logsumexp)
