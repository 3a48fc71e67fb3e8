"""The pretraining model that scores only masked positions is the stock BertForPreTraining in
everything but cost: same loss, same gradients, same weights on export."""

import torch
from transformers import BertForPreTraining

from bertscale import memory_model, models
from bertscale.tasks.pretraining_model import BertForPreTrainingOnMasked


def test_same_loss_and_gradients_as_the_stock_model():
    torch.manual_seed(0)
    stock = models.build_model("tiny", BertForPreTraining)
    ours = BertForPreTrainingOnMasked(stock.config)
    ours.load_state_dict(stock.state_dict())
    ours.tie_weights()
    batch = memory_model.synthetic_batch(stock.config, 64, 4, "masked_lm")
    stock.eval(), ours.eval()  # no dropout: the two forward passes must see the same network
    expected, got = stock(**batch), ours(**batch)
    masked = batch["labels"] != -100
    assert got.prediction_logits.shape == (int(masked.sum()), stock.config.vocab_size)
    torch.testing.assert_close(got.prediction_logits, expected.prediction_logits[masked])
    torch.testing.assert_close(got.loss, expected.loss)
    # The parts the trainer logs: the stock model's MLM and NSP cross-entropies.
    torch.testing.assert_close(
        got.mlm_loss, torch.nn.functional.cross_entropy(expected.prediction_logits[masked], batch["labels"][masked])
    )
    torch.testing.assert_close(
        got.nsp_loss, torch.nn.functional.cross_entropy(expected.seq_relationship_logits, batch["next_sentence_label"])
    )
    expected.loss.backward()
    got.loss.backward()
    stock_grads = dict(stock.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, stock_grads[name].grad, msg=name)


def test_without_labels_it_scores_every_position():
    torch.manual_seed(0)
    model = BertForPreTrainingOnMasked(models.load_config("tiny")).eval()
    batch = memory_model.synthetic_batch(model.config, 32, 2, "masked_lm")
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert out.prediction_logits.shape == (2, 32, model.config.vocab_size)
