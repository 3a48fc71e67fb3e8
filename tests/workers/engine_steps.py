"""Rank worker for test_engine.py: build real engines with bertscale.engine.build and step them.

    engine_steps.py STEPS DS_CONFIG:PRECISION...

Trains BertForQuestionAnswering (tiny preset) on one fixed random batch, so the loss must fall,
and prints one JSON line per step from rank 0: combo, loss, loss scale, skipped steps. Several
combos share one launch because starting 2 ranks costs ~15 s on 2 cores.
"""

import json
import sys

import cpuinfo.cpuinfo
import torch
from transformers import AutoModelForQuestionAnswering

from bertscale import distributed as dist
from bertscale import ds_config
from bertscale import engine as engines
from bertscale.args import ModelArgs, OptimArgs
from bertscale.tasks.base import Task

# py-cpuinfo spawns a Python process for each answer (get_cpu_info -> get_cpu_info_json); count them
CPUINFO_SPAWNS = []
_spawn = cpuinfo.cpuinfo.get_cpu_info_json
cpuinfo.cpuinfo.get_cpu_info_json = lambda: CPUINFO_SPAWNS.append(1) or _spawn()


class FixedBatchQA(Task):
    names = ("fixed-batch-qa",)

    def model_class(self):
        return AutoModelForQuestionAnswering


def train(config_name: str, precision: str, steps: int):
    torch.manual_seed(0)
    optim = OptimArgs(
        ds_config=config_name, precision=precision, learning_rate=2e-3, micro_batch_size=4, warmup_ratio=0.0
    )
    cfg = ds_config.fill_schedule(engines.resolve_config(optim, dist.world_size()), optim, steps)
    engine = engines.build(
        ModelArgs(model="tiny", gradient_checkpointing=True), optim.weight_decay, FixedBatchQA(None), cfg
    )
    g = torch.Generator().manual_seed(dist.rank())
    batch = {
        "input_ids": torch.randint(1000, 5000, (4, 32), generator=g),
        "start_positions": torch.tensor([3, 5, 7, 9]),
        "end_positions": torch.tensor([4, 8, 7, 12]),
    }
    batch = {k: v.to(engine.device) for k, v in batch.items()}
    for _ in range(steps):
        out = engine(**batch)
        engine.backward(out.loss)
        engine.step()
        if dist.is_main():
            scale = engine.optimizer.loss_scale if precision == "fp16" else None
            print(
                "STEP "
                + json.dumps(
                    {
                        "combo": f"{config_name}:{precision}",
                        "loss": out.loss.item(),
                        "scale": scale,
                        "skipped": engine.skipped_steps,
                        "zero": engines.zero_stage(cfg),
                        "dtype": str(next(engine.module.parameters()).dtype),
                        "model": type(engine.module).__name__,
                        "optimizer": type(engine.optimizer).__name__,
                        "basic_optimizer": type(engine.basic_optimizer).__name__,
                        "check_grad_overflow": getattr(engine.optimizer, "check_grad_overflow", None),
                        "cpuinfo_spawns": len(CPUINFO_SPAWNS),
                    }
                ),
                flush=True,
            )


def main(steps: int, combos: list[str]):
    dist.setup()
    for combo in combos:
        config_name, precision = combo.rsplit(":", 1)
        train(config_name, precision, steps)
    dist.teardown()
    dist.exit_process(0)  # see its docstring: finalization can abort a finished rank


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # added by the launcher
    main(int(args[0]), args[1:])
