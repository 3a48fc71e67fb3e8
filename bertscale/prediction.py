"""`bertscale predict`: one question or one text through an exported model, on this process."""
from __future__ import annotations

import click
import torch

from . import models
from .config import RunConfig
from .errors import UserError


def predict(model_dir: str, question=None, context=None, text=None, text_pair=None, max_seq_length=384,
            squad_v2=False):
    config = models.load_config(model_dir)
    arch = (config.architectures or ["?"])[0]
    tokenizer = models.load_tokenizer(model_dir)
    if arch.endswith("ForQuestionAnswering"):
        if not (question and context):
            raise UserError(f"{model_dir} is a question-answering model: pass --question and --context")
        from transformers import AutoModelForQuestionAnswering

        from .tasks.squad import answer

        model = AutoModelForQuestionAnswering.from_pretrained(model_dir).eval()
        run = RunConfig(model=model_dir, max_seq_length=max_seq_length, task="squad_v2" if squad_v2 else "squad")
        with torch.no_grad():
            text_out, score = answer(model, tokenizer, question, context, run)
        click.echo(f"answer: {text_out!r}  score: {score:.3f}")
    elif arch.endswith("ForSequenceClassification"):
        if not text:
            raise UserError(f"{model_dir} is a classification model: pass --text (and --text-pair for pairs)")
        from transformers import AutoModelForSequenceClassification

        from .tasks.classify import predict_texts

        model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
        with torch.no_grad():
            label, prob = predict_texts(model, tokenizer, [text], [text_pair] if text_pair else None)[0]
        click.echo(f"label: {label}  probability: {prob:.3f}")
    else:
        raise UserError(f"{model_dir}: predict supports question-answering and classification models, "
                        f"not {arch}")
