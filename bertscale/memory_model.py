"""Activation memory of one BERT training step: a formula, and the measurement that checks it.

The formula counts, tensor by tensor, what autograd keeps for the backward pass of Hugging Face's
BertLayer (sdpa attention), after Korthikanti et al. 2022 ("Reducing Activation Recomputation in
Large Transformer Models", s*b*h*(34 + 5*a*s/h) bytes per layer in 16-bit). Two things depend on
the device, so they are parameters instead of constants:
  - attention: CUDA's flash / memory-efficient SDPA kernels keep no s*s score matrix; the math
    kernel (what CPUs run when attention dropout is on) keeps softmax, dropout mask and output.
  - dropout masks: CUDA's fused dropout keeps a 1-byte bool mask; CPU keeps a mask of the
    activation dtype.
tests/test_plan.py and benchmarks/activation_memory.py compare it with measure_step_peak on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

PRECISION_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}


@dataclass(frozen=True)
class BertShape:
    layers: int
    hidden: int
    heads: int
    intermediate: int
    vocab: int

    @classmethod
    def of(cls, config) -> BertShape:
        return cls(
            config.num_hidden_layers,
            config.hidden_size,
            config.num_attention_heads,
            config.intermediate_size,
            config.vocab_size,
        )


@dataclass(frozen=True)
class Kernels:
    """How the device runs attention and dropout (see the module docstring)."""

    efficient_attention: bool
    bool_dropout_mask: bool


CUDA = Kernels(efficient_attention=True, bool_dropout_mask=True)
CPU = Kernels(efficient_attention=False, bool_dropout_mask=False)


@dataclass(frozen=True)
class ActivationEstimate:
    """Bytes kept for backward, by part; peak() says which parts are alive together."""

    layers: int
    per_layer: int  # everything one BertLayer keeps
    layer_input: int  # the part of per_layer that checkpointing keeps
    layer_grads: int  # gradients alive at once while a layer runs backward
    embeddings: int
    head: int  # task head and loss
    head_grads: int  # gradients alive at once while the head runs backward
    embedding_grad: int  # the word embeddings' gradient, made whole before ZeRO takes it
    held_grad: int = 0  # kept from the head's backward to the embeddings': the tied MLM decoder's
    # weight gradient, which autograd sums with the embeddings' own

    def peak(self, checkpointing: bool) -> int:
        """The largest of three moments: the head's backward, the last layer's backward, and the
        embeddings' backward (which matters only for small batches)."""
        if checkpointing:  # every layer's input, plus one layer recomputed in full in its backward
            kept = self.layers * self.layer_input + self.embeddings
            in_layer = self.per_layer - self.layer_input + self.layer_grads
        else:
            kept = self.layers * self.per_layer + self.embeddings
            in_layer = self.layer_grads
        return max(
            kept + max(self.head + self.head_grads, in_layer + self.held_grad),
            self.embeddings + self.embedding_grad + 2 * self.held_grad,
        )  # held + embeddings' + their sum


def estimate(
    shape: BertShape,
    seq_len: int,
    micro_batch: int,
    precision: str = "fp16",
    kernels: Kernels = CUDA,
    head: str = "span",
    padding_mask: bool = True,
    masked_tokens: int | None = None,
    max_predictions: int = 20,
) -> ActivationEstimate:
    """Bytes of activations for one micro batch (see ActivationEstimate.peak). Pretraining masks
    15% of each sequence up to `max_predictions`, unless `masked_tokens` gives the batch's count."""
    p = PRECISION_BYTES[precision]
    mask = 1 if kernels.bool_dropout_mask else p
    tokens = seq_len * micro_batch
    sbh, sbi = tokens * shape.hidden, tokens * shape.intermediate
    scores = shape.heads * seq_len * seq_len * micro_batch  # a*s*s*b
    layer_norm_stats = 2 * tokens * 4  # mean and rstd, fp32

    layer = (
        sbh * p  # input of the Q/K/V projections
        + 3 * sbh * p  # Q, K, V for attention's backward
        + sbh * p  # attention output (input of the output projection)
        + sbh * mask  # hidden dropout mask
        + sbh * p  # residual sum (LayerNorm input)
        + sbh * p  # LayerNorm output (input of the intermediate projection)
        + 2 * sbi * p  # GELU input and output
        + sbh * mask  # hidden dropout mask
        + sbh * p  # residual sum (LayerNorm input)
        + 2 * layer_norm_stats
    )
    if kernels.efficient_attention:
        layer += sbh * p + shape.heads * tokens * 4  # kernel's own output copy and fp32 logsumexp
        if padding_mask:
            layer += micro_batch * seq_len * seq_len * p  # additive mask built from the bool mask
    else:
        layer += scores * (2 * p + mask)  # softmax output, attention dropout mask and output

    embeddings = sbh * p + layer_norm_stats + sbh * mask  # LayerNorm input, dropout mask
    if head == "masked_lm":
        # Only masked positions reach the MLM head (tasks/pretraining_model.py): their gathered
        # hidden states, transform (dense, GELU, LayerNorm), logits and log-softmax over the
        # vocabulary. Backward scatters their gradient into a full [tokens, hidden] tensor.
        m = masked_tokens if masked_tokens is not None else micro_batch * min(max_predictions, round(seq_len * 0.15))
        head_bytes = 5 * m * shape.hidden * p + 2 * m * 4 + 2 * m * shape.vocab * p
        head_grads = m * shape.vocab * p + sbh * p
        held_grad = shape.vocab * shape.hidden * p
    elif head == "pooled":
        # The [CLS] rows only: pooler input, tanh output, dropout mask, classifier input.
        head_bytes = 4 * micro_batch * shape.hidden * p
        head_grads = sbh * p  # the sequence output's gradient is built whole (zeros off [CLS])
        held_grad = 0
    else:
        head_bytes = sbh * p + 2 * tokens * 2 * p  # last hidden state; start/end logits and log-softmax
        head_grads = sbh * p
        held_grad = 0
    # A layer frees what it kept as its backward goes on; what adds up is about one gradient of
    # its widest tensor. The efficient attention backward holds dO, dQ, dK, dV at once and, for
    # 16-bit inputs, fp32 accumulators for dQ, dK, dV (seen on an H100: docs/performance.md).
    if kernels.efficient_attention:
        attention_grads = 4 * sbh * p + (3 * sbh * 4 if p < 4 else 0)
    else:
        attention_grads = scores * p
    layer_grads = max(sbi * p, attention_grads)
    return ActivationEstimate(
        layers=shape.layers,
        per_layer=layer,
        layer_input=sbh * p,
        layer_grads=layer_grads,
        embeddings=embeddings,
        head=head_bytes,
        head_grads=head_grads,
        embedding_grad=shape.vocab * shape.hidden * p,
        held_grad=held_grad,
    )


def measure_step_peak(model, batch: dict) -> int:
    """Peak bytes allocated above the step's start, for forward + backward of `batch`.

    Parameter gradients are allocated before, and accumulated into, so what the measured step adds
    is activations and their gradients. On CUDA the caching allocator's peak counter measures it;
    on CPU torch.profiler's record of every allocation does.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    model.train()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    if next(model.parameters()).is_cuda:
        model(**batch).loss.backward()  # a first step allocates cuBLAS workspaces, kept for good
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        model(**batch).loss.backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(**batch).loss.backward()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()  # negative for frees
        peak = max(peak, live)
    return peak


def synthetic_batch(config, seq_len: int, micro_batch: int, head: str = "span", device="cpu", seed: int = 0):
    """Random token ids with a quarter of each row padding, labels for the head's loss (see estimate)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, config.vocab_size, (micro_batch, seq_len), generator=g)
    mask = torch.ones_like(ids)
    mask[:, seq_len * 3 // 4 :] = 0
    batch = dict(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids))
    if head == "masked_lm":
        labels = torch.full_like(ids, -100)
        labels[:, ::7] = ids[:, ::7]
        batch.update(labels=labels, next_sentence_label=torch.zeros(micro_batch, dtype=torch.long))
    elif head == "pooled":
        batch.update(labels=torch.randint(0, 2, (micro_batch,), generator=g))
    else:
        batch.update(
            start_positions=torch.randint(0, seq_len, (micro_batch,), generator=g),
            end_positions=torch.randint(0, seq_len, (micro_batch,), generator=g),
        )
    return {k: v.to(device) for k, v in batch.items()}
