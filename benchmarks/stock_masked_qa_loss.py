"""`bertscale` with one change, for an experiment: the stock BertForQuestionAnswering (the `--no-unpad`
path) takes its QA loss over each row's real positions only, as the unpadded model does, instead of
putting the padded positions into its softmax. It isolates what the loss does to the acceptance run:

    deepspeed --num_gpus 2 benchmarks/stock_masked_qa_loss.py finetune --task squad --no-unpad ...

(the flags of benchmarks/unpad_acceptance.sh). Without dropout, the unpadded run and this one agree
to the digits printed (docs/unpadding.md): the loss is then the only difference between the modes.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transformers import BertForQuestionAnswering  # noqa: E402

from bertscale.unpad.losses import span_loss  # noqa: E402
from bertscale.unpad.models import PADDING_LOGIT  # noqa: E402

stock_forward = BertForQuestionAnswering.forward


def forward_with_masked_loss(
    self, input_ids=None, attention_mask=None, token_type_ids=None, start_positions=None, end_positions=None, **kw
):
    out = stock_forward(self, input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, **kw)
    if start_positions is not None and attention_mask is not None:
        padded = attention_mask == 0
        start, end = (logits.masked_fill(padded, PADDING_LOGIT) for logits in (out.start_logits, out.end_logits))
        out.loss = span_loss(start, end, start_positions, end_positions)
    return out


BertForQuestionAnswering.forward = forward_with_masked_loss

if __name__ == "__main__":
    from bertscale.cli import main

    main()
