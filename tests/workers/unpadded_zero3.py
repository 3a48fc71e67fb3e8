"""Rank worker for test_unpadded.py: the unpadded QA model in a real ZeRO-3 engine (bertscale.engine.build
builds it for a task whose class is the stock BertForQuestionAnswering).

    unpadded_zero3.py

ZeRO-3 leaves every parameter partitioned outside its module's forward, so the packed forward
only runs if it reaches each parameter through a module call. For activation checkpointing off
and on, each rank trains STEPS steps on its own mixed-length batch (packing added on the CPU by
evaluation.model_inputs, as in training); rank 0 prints one JSON line per rank: its losses and the loss a stock
BertForQuestionAnswering with the gathered weights gives at step 0 (over real positions).
"""

import json
import sys
from pathlib import Path

import deepspeed
import torch
from transformers import BertForQuestionAnswering

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from test_unpadded import NO_DROPOUT, make_batch

from bertscale import distributed as dist
from bertscale import ds_config
from bertscale import engine as engines
from bertscale.args import ModelArgs, OptimArgs
from bertscale.evaluation import model_inputs
from bertscale.tasks.base import Task
from bertscale.unpad import PADDING_LOGIT, UnpaddedBertForQuestionAnswering
from bertscale.unpad.losses import span_loss

STEPS = 5  # the learning rate warms up from 0: the first two steps leave the weights as they are


class StockQA(Task):
    names = ("stock-qa",)

    def model_class(self):
        return BertForQuestionAnswering  # engine.build_model builds its unpadded version (--unpad)

    def label_names(self):
        return ("start_positions", "end_positions")

    def model_config_overrides(self):
        return NO_DROPOUT


def stock_loss(model, batch, positions) -> float:
    stock = BertForQuestionAnswering(model.config)
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        stock.load_state_dict({k: v.detach().clone() for k, v in model.state_dict().items()})
    out = stock.train()(**batch)
    real = batch["attention_mask"].bool()
    start, end = (torch.where(real, x, torch.tensor(PADDING_LOGIT)) for x in (out.start_logits, out.end_logits))
    return span_loss(start, end, **positions).item()


def train(checkpointing: bool):
    torch.manual_seed(0)
    optim = OptimArgs(ds_config="zero3", precision="fp32", learning_rate=2e-3, micro_batch_size=5, warmup_ratio=0.0)
    cfg = ds_config.fill_schedule(engines.resolve_config(optim, dist.world_size()), optim, STEPS)
    model_args = ModelArgs(model="tiny", gradient_checkpointing=checkpointing)
    task = StockQA(None)
    engine = engines.build(model_args, optim.weight_decay, task, cfg)
    batch = make_batch(engine.module.config, seed=dist.rank())
    positions = {"start_positions": torch.tensor([3, 0, 20, 6, 40]), "end_positions": torch.tensor([5, 0, 22, 6, 9])}
    expected = stock_loss(engine.module, batch, positions)
    assert type(engine.module) is UnpaddedBertForQuestionAnswering, type(engine.module)
    partitioned = all(p.numel() == 0 for p in engine.module.parameters())
    losses = []
    for _ in range(STEPS):
        out = engine(**model_inputs({**batch, **positions}, task, engine.device))  # packed on the CPU, as in training
        engine.backward(out.loss)
        engine.step()
        losses.append(out.loss.item())
    row = {"rank": dist.rank(), "checkpointing": checkpointing, "partitioned": partitioned, "losses": losses}
    rows = [None] * dist.world_size()
    torch.distributed.all_gather_object(rows, {**row, "stock_loss": expected})
    if dist.is_main():  # one printer: the ranks' lines would interleave
        for r in rows:
            print("UNPADDED " + json.dumps(r), flush=True)


def main():
    dist.setup()
    for checkpointing in (False, True):
        train(checkpointing)
    dist.teardown()
    dist.exit_process(0)


if __name__ == "__main__":
    main()
