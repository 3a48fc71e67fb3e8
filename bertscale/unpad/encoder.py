"""The stock BertModel's embeddings and layers, run on packed real tokens.

Every submodule with parameters is called as a module (never by reading its .weight), so DeepSpeed
ZeRO-3's forward hooks gather partitioned parameters as they do for the stock forward. The Linear,
LayerNorm and GELU modules are shape-agnostic: they take [tokens, hidden] unchanged. What differs:
self-attention's query/key/value projections feed the varlen kernel (the layers' hidden dropout is
the stock nn.Dropout modules, on [tokens, hidden]).
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint

from .attention import varlen_attention
from .packing import Packing


def encode_packed(
    bert,
    packing: Packing,
    input_ids: torch.Tensor | None = None,
    token_type_ids: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """Last hidden states of the real tokens, [tokens, hidden], of a transformers BertModel."""
    if position_ids is None:  # the stock default: 0..seq-1 in every row, padding or not
        position_ids = (packing.indices % packing.seq_len)[None]
    else:
        position_ids = packing.pack(position_ids)[None]
    hidden = bert.embeddings(
        input_ids=None if input_ids is None else packing.pack(input_ids)[None],
        token_type_ids=None if token_type_ids is None else packing.pack(token_type_ids)[None],
        position_ids=position_ids,
        inputs_embeds=None if inputs_embeds is None else packing.pack(inputs_embeds)[None],
    )[0]
    for layer in bert.encoder.layer:
        hidden = run_layer(layer, hidden, packing)
    return hidden


def run_layer(layer, hidden: torch.Tensor, packing: Packing) -> torch.Tensor:
    """One BertLayer, activation-checkpointed when transformers has switched it on for this layer
    (gradient_checkpointing_enable / activation_checkpointing_enable set the flag and function)."""
    forward = functools.partial(packed_layer_forward, layer, packing=packing)
    if getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled():
        checkpoint_fn = getattr(layer, "_gradient_checkpointing_func", None)
        if checkpoint_fn is None:
            checkpoint_fn = functools.partial(checkpoint, use_reentrant=False)
        return checkpoint_fn(forward, hidden)
    return forward(hidden)


def packed_layer_forward(layer, hidden: torch.Tensor, packing: Packing) -> torch.Tensor:
    """BertLayer.forward on [tokens, hidden]: attention, residual + LayerNorm, feed-forward."""
    context = packed_self_attention(layer.attention.self, hidden, packing)
    attention_output = layer.attention.output(context, hidden)  # BertSelfOutput: shape-agnostic
    return layer.output(layer.intermediate(attention_output), attention_output)


def packed_self_attention(self_attention, hidden: torch.Tensor, packing: Packing) -> torch.Tensor:
    heads = (hidden.shape[0], self_attention.num_attention_heads, self_attention.attention_head_size)
    query = self_attention.query(hidden).view(heads)
    key = self_attention.key(hidden).view(heads)
    value = self_attention.value(hidden).view(heads)
    dropout_p = self_attention.dropout.p if self_attention.training else 0.0
    context = varlen_attention(query, key, value, packing, dropout_p=dropout_p, scale=self_attention.scaling)
    return context.reshape(hidden.shape[0], -1)
