"""The stock BertModel's embeddings and layers, run on packed real tokens.

Every submodule with parameters is called as a module (never by reading its .weight), so DeepSpeed
ZeRO-3's forward hooks gather partitioned parameters as they do for the stock forward. The Linear,
LayerNorm and GELU modules are shape-agnostic: they take [tokens, hidden] unchanged. What differs:
self-attention's query/key/value projections feed the varlen kernel, and the dropouts
(`packed_dropout`): on the CPU each mask is drawn over the padded grid that the stock model's mask
covers, in the same order, and the real tokens read their part of it. So on the CPU a seeded run
draws the same masks with --unpad as with --no-unpad, and the two modes train the same model up to
the order of float sums. (On CUDA the stock modules run on the packed tokens: the varlen attention
kernels draw their own masks anyway, and a padded draw would cost what unpadding saves.)
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint

from .attention import varlen_attention
from .cpu_kernels import keep_mask
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
        position_ids = packing.indices % packing.seq_len
    else:
        position_ids = packing.pack(position_ids)
    hidden = packed_embeddings(
        bert.embeddings,
        packing,
        input_ids=None if input_ids is None else packing.pack(input_ids),
        token_type_ids=None if token_type_ids is None else packing.pack(token_type_ids),
        position_ids=position_ids,
        inputs_embeds=None if inputs_embeds is None else packing.pack(inputs_embeds),
    )
    for layer in bert.encoder.layer:
        hidden = run_layer(layer, hidden, packing)
    return hidden


def packed_embeddings(embeddings, packing: Packing, input_ids, token_type_ids, position_ids, inputs_embeds):
    """BertEmbeddings.forward on packed tokens (every argument [tokens] or [tokens, hidden]), with its
    dropout drawn by packed_dropout."""
    if inputs_embeds is None:
        inputs_embeds = embeddings.word_embeddings(input_ids)
    if token_type_ids is None:  # the stock default: type 0 everywhere
        token_type_ids = torch.zeros_like(position_ids)
    hidden = inputs_embeds + embeddings.token_type_embeddings(token_type_ids)
    hidden = hidden + embeddings.position_embeddings(position_ids)
    return packed_dropout(embeddings.dropout, embeddings.LayerNorm(hidden), packing)


def packed_dropout(dropout: torch.nn.Dropout, hidden: torch.Tensor, packing: Packing) -> torch.Tensor:
    """The stock `dropout` module applied to [tokens, hidden]. On the CPU its mask is drawn over the
    padded [batch * seq, hidden] grid, as the stock module draws it on the padded batch, and the
    real tokens' rows are kept: the same mask for the same seed, at the cost of drawing the padding's
    share too (a few percent with the trainer's length-grouped batches)."""
    if not dropout.training or dropout.p == 0:
        return hidden
    if hidden.device.type != "cpu":
        return dropout(hidden)
    keep, scale = keep_mask((packing.batch_size * packing.seq_len, hidden.shape[-1]), dropout.p)
    return hidden * keep.index_select(0, packing.indices) * scale


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
    attention_output = dense_dropout_norm(layer.attention.output, context, hidden, packing)
    return dense_dropout_norm(layer.output, layer.intermediate(attention_output), attention_output, packing)


def dense_dropout_norm(block, hidden: torch.Tensor, residual: torch.Tensor, packing: Packing) -> torch.Tensor:
    """BertSelfOutput.forward / BertOutput.forward on [tokens, hidden], with packed_dropout."""
    return block.LayerNorm(packed_dropout(block.dropout, block.dense(hidden), packing) + residual)


def packed_self_attention(self_attention, hidden: torch.Tensor, packing: Packing) -> torch.Tensor:
    heads = (hidden.shape[0], self_attention.num_attention_heads, self_attention.attention_head_size)
    query = self_attention.query(hidden).view(heads)
    key = self_attention.key(hidden).view(heads)
    value = self_attention.value(hidden).view(heads)
    dropout_p = self_attention.dropout.p if self_attention.training else 0.0
    context = varlen_attention(query, key, value, packing, dropout_p=dropout_p, scale=self_attention.scaling)
    return context.reshape(hidden.shape[0], -1)
