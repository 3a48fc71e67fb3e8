"""BertForPreTraining that scores only the masked positions, as NVIDIA's and Google's BERT recipes do.

The stock head projects every position onto the vocabulary: a [batch, seq, vocab] tensor of which
about 15% is ever read by the loss. Gathering the masked positions first saves that compute and
memory (the logits and their gradient), which for BERT-large at seq 128 is about a tenth of a
step's FLOPs and for a small model most of them. Weights, names and loss are the stock model's,
so checkpoints export as plain BertForPreTraining.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import BertForPreTraining
from transformers.models.bert.modeling_bert import BertForPreTrainingOutput

from .masking import IGNORE_INDEX


@dataclass
class MaskedPreTrainingOutput(BertForPreTrainingOutput):
    """The stock output plus the two parts of `loss`, so the trainer logs them without computing
    the cross-entropy over [masked tokens, vocab] a second time."""

    mlm_loss: torch.FloatTensor | None = None
    nsp_loss: torch.FloatTensor | None = None


class BertForPreTrainingOnMasked(BertForPreTraining):
    """`prediction_logits` holds one row per masked token, in `labels[labels != -100]` order."""

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        next_sentence_label=None,
        **kwargs,
    ):
        if labels is None:  # plain inference: every position, as the stock model gives it
            return super().forward(
                input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                next_sentence_label=next_sentence_label,
                **kwargs,
            )
        sequence_output, pooled_output = self.bert(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            return_dict=True,
            **kwargs,
        )[:2]
        masked = labels != IGNORE_INDEX
        prediction_logits = self.cls.predictions(sequence_output[masked])  # [masked tokens, vocab]
        nsp_logits = self.cls.seq_relationship(pooled_output)
        # Mean over masked tokens as the stock loss; a batch without any stays finite (0, not NaN).
        mlm_loss = F.cross_entropy(prediction_logits.float(), labels[masked], reduction="sum") / masked.sum().clamp(
            min=1
        )
        nsp_loss = None
        if next_sentence_label is not None:
            nsp_loss = F.cross_entropy(nsp_logits.float(), next_sentence_label.view(-1))
        return MaskedPreTrainingOutput(
            loss=mlm_loss if nsp_loss is None else mlm_loss + nsp_loss,
            prediction_logits=prediction_logits,
            seq_relationship_logits=nsp_logits,
            mlm_loss=mlm_loss,
            nsp_loss=nsp_loss,
        )
