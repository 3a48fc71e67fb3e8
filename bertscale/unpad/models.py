"""Unpadded versions of the stock BERT heads: same modules, parameter names and checkpoints, but
every layer runs on the batch's real tokens only (see encoder.py, attention.py).

Each forward takes the stock keyword arguments plus the optional packing that a collator made on
the CPU (packing.packing_kwargs: indices, cu_seqlens, max_seqlen, and masked_indices for MLM);
without it the packing is computed from attention_mask. Outputs have the stock shapes. Where
the stock model outputs padded positions (QA span logits, MLM logits without labels), those
hold PADDING_LOGIT, so a softmax over the sequence gives padding no weight. Asked for hidden
states or attentions (or built as a decoder), a model runs the stock padded forward instead.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from transformers import BertForPreTraining, BertForQuestionAnswering, BertForSequenceClassification
from transformers.modeling_outputs import QuestionAnsweringModelOutput, SequenceClassifierOutput
from transformers.models.bert.modeling_bert import BertForPreTrainingOutput
from transformers.utils.generic import can_return_tuple

from ..tasks.pretraining_model import BertForPreTrainingOnMasked, MaskedPreTrainingOutput
from .encoder import encode_packed
from .losses import masked_lm_loss, sequence_classification_loss, span_loss
from .packing import Packing, masked_token_indices

# Logit of padded positions: exp(-1e4 - max) is 0 in fp32, fp16 and bf16, and -1e4 fits in fp16.
PADDING_LOGIT = -1e4

log = logging.getLogger(__name__)
_SAID = set()  # fallbacks already logged, so that a run logs each once


def stock_class(model_class: type) -> type:
    """The first transformers class in the MRO: what a checkpoint of `model_class` loads into."""
    import transformers

    return next(c for c in model_class.__mro__ if getattr(transformers, c.__name__, None) is c)


def packing_options(model) -> dict | None:
    """add_packing's keywords for the batches of `model` (the module, not a DeepSpeed engine):
    None for a model that is not unpadded, which takes padded batches as they are."""
    if not isinstance(model, _Unpadded):
        return None
    return {"mlm": isinstance(model, UnpaddedBertForPreTraining)}


class _Unpadded:
    """What the unpadded heads share: packing, the stock fallback, and saving as the stock class."""

    def _packing(self, input_ids, inputs_embeds, attention_mask, indices, cu_seqlens, max_seqlen) -> Packing:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        ref = input_ids if input_ids is not None else inputs_embeds
        return Packing.of_batch(attention_mask, tuple(ref.shape[:2]), ref.device, indices, cu_seqlens, max_seqlen)

    def _runs_padded(self, kwargs: dict) -> bool:
        """True when the caller wants what only the stock forward gives (per-layer outputs, a decoder)."""
        wanted = [
            k for k in ("output_attentions", "output_hidden_states") if kwargs.get(k, getattr(self.config, k, False))
        ]
        if self.config.is_decoder:
            wanted.append("is_decoder")
        if wanted and (type(self), *wanted) not in _SAID:
            _SAID.add((type(self), *wanted))
            log.warning("%s runs the padded stock forward for %s", type(self).__name__, ", ".join(wanted))
        return bool(wanted)

    def _encode(self, packing: Packing, input_ids, token_type_ids, position_ids, inputs_embeds) -> torch.Tensor:
        return encode_packed(self.bert, packing, input_ids, token_type_ids, position_ids, inputs_embeds)

    def _pooled(self, hidden: torch.Tensor, packing: Packing) -> torch.Tensor:
        """BertPooler on every row's [CLS] token (the pooler reads position 0 of [rows, 1, hidden])."""
        return self.bert.pooler(hidden.index_select(0, packing.cls_positions())[:, None])

    def save_pretrained(self, save_directory, is_main_process: bool = True, **kwargs):
        super().save_pretrained(save_directory, is_main_process=is_main_process, **kwargs)
        # transformers records this class's name; the checkpoint must name the stock class to load anywhere.
        # (With push_to_hub=True the uploaded config still names this class: push a saved directory instead.)
        self.config.architectures = [stock_class(type(self)).__name__]
        if is_main_process:
            self.config.save_pretrained(save_directory)


class UnpaddedBertForQuestionAnswering(_Unpadded, BertForQuestionAnswering):
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        start_positions: torch.Tensor | None = None,
        end_positions: torch.Tensor | None = None,
        indices: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        **kwargs,
    ) -> QuestionAnsweringModelOutput:
        if self._runs_padded(kwargs):
            return super().forward(
                input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                start_positions=start_positions,
                end_positions=end_positions,
                **kwargs,
            )
        packing = self._packing(input_ids, inputs_embeds, attention_mask, indices, cu_seqlens, max_seqlen)
        hidden = self._encode(packing, input_ids, token_type_ids, position_ids, inputs_embeds)
        logits = packing.unpack(self.qa_outputs(hidden), fill=PADDING_LOGIT)  # [batch, seq, 2]
        start_logits, end_logits = (t.squeeze(-1).contiguous() for t in logits.split(1, dim=-1))
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = span_loss(start_logits, end_logits, start_positions, end_positions)
        return QuestionAnsweringModelOutput(loss=loss, start_logits=start_logits, end_logits=end_logits)


class UnpaddedBertForSequenceClassification(_Unpadded, BertForSequenceClassification):
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        indices: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput:
        if self._runs_padded(kwargs):
            return super().forward(
                input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                labels=labels,
                **kwargs,
            )
        packing = self._packing(input_ids, inputs_embeds, attention_mask, indices, cu_seqlens, max_seqlen)
        hidden = self._encode(packing, input_ids, token_type_ids, position_ids, inputs_embeds)
        logits = self.classifier(self.dropout(self._pooled(hidden, packing)))
        loss = None
        if labels is not None:
            loss = sequence_classification_loss(self.config, self.num_labels, logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


class UnpaddedBertForPreTraining(_Unpadded, BertForPreTrainingOnMasked):
    """Like BertForPreTrainingOnMasked, whose place it takes: with labels, `prediction_logits` holds
    one row per scored token in `labels[labels != -100]` order, and the output carries mlm_loss and
    nsp_loss; labels on padding positions are not scored. Without labels: the stock output."""

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        next_sentence_label: torch.Tensor | None = None,
        indices: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        masked_indices: torch.Tensor | None = None,
        **kwargs,
    ) -> MaskedPreTrainingOutput:
        if self._runs_padded(kwargs):
            return super().forward(
                input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                labels=labels,
                next_sentence_label=next_sentence_label,
                **kwargs,
            )
        packing = self._packing(input_ids, inputs_embeds, attention_mask, indices, cu_seqlens, max_seqlen)
        hidden = self._encode(packing, input_ids, token_type_ids, position_ids, inputs_embeds)
        nsp_logits = self.cls.seq_relationship(self._pooled(hidden, packing))
        if labels is None:  # plain inference: every position, as the stock model gives it
            prediction_logits = packing.unpack(self.cls.predictions(hidden), fill=PADDING_LOGIT)
            return BertForPreTrainingOutput(prediction_logits=prediction_logits, seq_relationship_logits=nsp_logits)
        packed_labels = packing.pack(labels)
        if masked_indices is None:
            masked_indices = masked_token_indices(packed_labels)
        masked_indices = masked_indices.to(hidden.device)
        prediction_logits = self.cls.predictions(hidden.index_select(0, masked_indices))  # [scored tokens, vocab]
        mlm_loss = masked_lm_loss(prediction_logits, packed_labels.index_select(0, masked_indices))
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


_UNPADDED = {
    BertForQuestionAnswering: UnpaddedBertForQuestionAnswering,
    BertForSequenceClassification: UnpaddedBertForSequenceClassification,
    BertForPreTraining: UnpaddedBertForPreTraining,
    BertForPreTrainingOnMasked: UnpaddedBertForPreTraining,
}


def unpadded_class(model_class: type, config=None) -> type | None:
    """The unpadded version of a model class, or None when there is none (the caller runs padded).

    An Auto class (AutoModelForQuestionAnswering...) names no architecture by itself: pass the
    model's config to resolve it (a non-BERT config gives None)."""
    if model_class in _UNPADDED.values():
        return model_class
    if config is not None and (config.is_decoder or getattr(config, "add_cross_attention", False)):
        return None
    if hasattr(model_class, "_model_mapping"):
        if config is None:
            return None
        try:
            model_class = model_class._model_mapping[type(config)]
        except KeyError:
            return None
    return _UNPADDED.get(model_class)
