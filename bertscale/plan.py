"""`bertscale plan`: will it fit? Memory per GPU for ZeRO-1 (one node, the `single_node` preset),
ZeRO-2 / ZeRO-3 / ZeRO-3+offload, and a config.

Model states come from DeepSpeed's own estimators (parameter counts only, so nothing is built on a
GPU), activations from memory_model (checked against measurements in tests/test_plan.py). Works
offline and without a GPU: parameters are counted on the meta device from the model's config.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from . import ds_config, memory_model, models, tasks
from .args import OptimArgs
from .errors import UserError
from .files import write_json_atomic

# Configs of the usual hub models, so planning works without network (vocabularies: uncased 30522, cased 28996).
_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
_LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
PRESETS = {
    "bert-base-uncased": dict(_BASE, vocab_size=30522),
    "bert-base-cased": dict(_BASE, vocab_size=28996),
    "bert-large-uncased": dict(_LARGE, vocab_size=30522),
    "bert-large-cased": dict(_LARGE, vocab_size=28996),
    "bert-large-uncased-whole-word-masking": dict(_LARGE, vocab_size=30522),
    "bert-large-cased-whole-word-masking": dict(_LARGE, vocab_size=28996),
}

# In the order they are recommended. ZeRO-1 is the single_node preset: offered for one node, and
# only where each GPU holds the whole model states (no partitioning needed), so partitioning stays
# for what does not fit.
STAGES = ("ZeRO-1", "ZeRO-2", "ZeRO-3", "ZeRO-3+offload")
STAGE_PRESET = {"ZeRO-1": "single_node", "ZeRO-2": "zero2", "ZeRO-3": "zero3", "ZeRO-3+offload": "zero3_offload"}
MAX_MICRO_BATCH = 32
# Below this many sequences per forward a GPU's matrix units idle; checkpointing (about a third more
# compute) to run a bigger micro batch is then the faster choice.
MIN_EFFICIENT_MICRO_BATCH = 4
HEADROOM = 0.12  # allocator fragmentation, cuBLAS/NCCL workspaces, eval batches
CUDA_CONTEXT = 0.5 * 2**30  # taken by the driver before PyTorch allocates anything
GiB = 2**30


def parse_memory(text: str) -> int:
    """'16GB', '80GiB', '24G', '16000MB' -> bytes. GPU makers' 'GB' are GiB (a '16GB' V100 has 16 GiB)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)\s*", str(text), re.IGNORECASE)
    if not m or (m.group(3) and not m.group(2)):
        raise UserError(f"--gpu-memory {text}: not a memory size; write it like 16GB, 80GiB or 24000MB")
    unit = m.group(2).upper() or "G"
    value = float(m.group(1)) * 1024 ** "KMGT".index(unit) * 1024
    if value <= 0:
        raise UserError(f"--gpu-memory {text}: must be more than zero")
    return int(value)


def load_model_config(model: str):
    """The model's BertConfig: 'tiny', a local dir, a known hub id (offline), or any hub id."""
    from transformers import BertConfig

    name = model.removeprefix("google-bert/")
    if not models.is_tiny(model) and not Path(model).is_dir() and name in PRESETS:
        config = BertConfig(**PRESETS[name])
    else:
        config = models.load_config(model)
    if getattr(config, "model_type", "bert") != "bert":
        raise UserError(f"--model {model}: a {config.model_type} model; bertscale plans BERT models only")
    return config


def count_params(config, model_class: str = "BertForQuestionAnswering") -> tuple[int, int]:
    """(total parameters, parameters of the largest module) of a transformers class, counted on the
    meta device."""
    import torch
    import transformers

    with torch.device("meta"):
        model = getattr(transformers, model_class)(config)
    total = sum(p.numel() for p in model.parameters())  # tied weights are yielded once
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, largest


def model_state_bytes(stage: str, total: int, largest: int, gpus: int, nodes: int, precision: str) -> tuple[int, int]:
    """(per GPU, per node's CPU) bytes of parameters, gradients and Adam states, from DeepSpeed.
    ZeRO-1 is counted unpartitioned, as on one GPU: the single_node preset is for models whose
    states each GPU can hold whole (on several GPUs ZeRO-1 needs less). In fp32 that preset runs
    ZeRO-0, whose states are exactly the fp32 count below on any number of GPUs."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    if stage == "ZeRO-1":
        return model_state_bytes("ZeRO-2", total, largest, 1, 1, precision)
    if stage == "ZeRO-2":
        cpu, gpu = estimate_zero2_model_states_mem_needs(total, gpus, nodes, cpu_offload=False)
    else:
        offload = stage == "ZeRO-3+offload"
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            total, largest, gpus, nodes, cpu_offload=offload, cpu_offload_params=offload, zero_init=True
        )
    if precision == "fp32":
        # The estimators count 16-bit weights and gradients plus fp32 master weights (18 bytes a
        # parameter). In fp32 there is no 16-bit copy: 4 bytes of weights + 4 of gradients + 8 of Adam.
        world = gpus * nodes
        gpu = {
            "ZeRO-2": 4 * total + 12 * total / world,
            "ZeRO-3": 4 * largest + 16 * total / world,
            "ZeRO-3+offload": 4 * largest,
        }[stage]
    return int(gpu), int(cpu)


def buffer_bytes(stage: str, precision: str, total: int) -> int:
    """DeepSpeed's communication buckets, sized by the preset configs (`total`: parameters)."""
    zero = ds_config.load(STAGE_PRESET[stage])[1]["zero_optimization"]
    p = memory_model.PRECISION_BYTES[precision]
    if stage == "ZeRO-1" and ds_config.auto_stage(precision) == 0:
        # single_node in fp32 runs ZeRO-0: the gradients are all-reduced after the backward through
        # flat copies of at most 5e8 elements (DeepSpeed's MEMORY_OPT_ALLREDUCE_SIZE)
        return min(total, 500_000_000) * p
    reduce = int(zero.get("reduce_bucket_size", 5e8)) * p
    if stage in ("ZeRO-1", "ZeRO-2"):  # overlap_comm double-buffers the gradient bucket
        return reduce * (2 if zero.get("overlap_comm") else 1)
    return reduce + int(zero.get("stage3_prefetch_bucket_size", 5e7)) * p


@dataclass
class Option:
    stage: str
    micro_batch: int
    checkpointing: bool
    model_states: int  # per GPU
    activations: int  # per GPU
    buffers: int  # per GPU
    cpu_per_node: int  # model states DeepSpeed keeps in each node's RAM
    fits: bool = False

    @property
    def total(self) -> int:
        return self.model_states + self.activations + self.buffers + int(CUDA_CONTEXT)


@dataclass
class Plan:
    model: str
    params: int
    largest_layer: int
    gpus: int
    nodes: int
    gpu_memory: int
    seq_len: int
    precision: str
    task: str
    options: dict  # stage -> (largest Option without checkpointing, with checkpointing)
    choice: Option | None
    grad_accum: int = 0
    global_batch: int = 0
    ds_config: dict | None = None


def plan(
    model: str,
    gpus: int,
    gpu_memory,
    seq_len: int,
    micro_batch: int | None = None,
    nodes: int = 1,
    global_batch: int = 32,
    precision: str = "fp16",
    task: str | None = None,
    total_steps: int | None = None,
) -> Plan:
    """Compute the plan without printing it (see plan_command)."""
    _check_inputs(gpus, nodes, seq_len, micro_batch, global_batch, precision)
    task = task or tasks.default_name()
    task_cls = planned_task(task)
    memory = gpu_memory if isinstance(gpu_memory, int) else parse_memory(gpu_memory)
    config = load_model_config(model)
    if seq_len > config.max_position_embeddings:
        raise UserError(f"--seq-len {seq_len}: {model} has {config.max_position_embeddings} positions at most")
    if task_cls.plan_head == "pooled":
        config.num_labels = 2
    total, largest = count_params(config, task_cls.plan_model_class)
    world = gpus * nodes
    cap = min(MAX_MICRO_BATCH, global_batch // world) if micro_batch is None else micro_batch
    if cap < 1:
        raise UserError(
            f"--global-batch {global_batch} is smaller than the {world} GPUs; give each GPU "
            f"at least one sequence (--global-batch {world} or more)"
        )
    shape = memory_model.BertShape.of(config)
    usable = memory * (1 - HEADROOM)

    def option(stage, mb, ckpt):
        gpu, cpu = model_state_bytes(stage, total, largest, gpus, nodes, precision)
        act = memory_model.estimate(shape, seq_len, mb, precision, memory_model.CUDA, task_cls.plan_head).peak(ckpt)
        opt = Option(stage, mb, ckpt, gpu, act, buffer_bytes(stage, precision, total), cpu)
        opt.fits = opt.total <= usable
        return opt

    sizes = [cap] if micro_batch is not None else [2**k for k in range(int(math.log2(cap)), -1, -1)]
    stages = STAGES if nodes == 1 else STAGES[1:]
    options = {stage: tuple(_largest_fitting(option, stage, ckpt, sizes) for ckpt in (False, True)) for stage in stages}
    result = Plan(
        model,
        total,
        largest,
        gpus,
        nodes,
        memory,
        seq_len,
        precision,
        task,
        options,
        _choose(options, min(MIN_EFFICIENT_MICRO_BATCH, cap)),
    )
    if result.choice:
        result.grad_accum = math.ceil(global_batch / (result.choice.micro_batch * world))
        result.global_batch = result.choice.micro_batch * world * result.grad_accum
        steps = total_steps or _default_steps(task_cls, task, result.global_batch)
        result.ds_config = ready_ds_config(result.choice, result.grad_accum, world, precision, steps)
    return result


def planned_task(name: str):
    """The task class whose model and head `plan` counts; refused when it declares none."""
    cls = tasks.resolve(name)
    if cls.plan_model_class is None:
        known = ", ".join(n for c in tasks.builtin() if c.plan_model_class for n in c.names)
        raise UserError(f"--task {name}: plan does not know this task's model; it knows {known}")
    return cls


def _default_steps(task_cls, name: str, global_batch: int) -> int:
    """LR schedule length for the written config: the default epochs over the task's usual data set."""
    if task_cls.plan_rows_per_epoch is None:
        raise UserError(f"--task {name}: give --total-steps, the length of the learning-rate schedule")
    return math.ceil(OptimArgs.epochs * task_cls.plan_rows_per_epoch / global_batch)


def _check_inputs(gpus, nodes, seq_len, micro_batch, global_batch, precision):
    for flag, value in (("--gpus", gpus), ("--nodes", nodes), ("--seq-len", seq_len), ("--global-batch", global_batch)):
        if value < 1:
            raise UserError(f"{flag} {value}: must be 1 or more")
    if micro_batch is not None and micro_batch < 1:
        raise UserError(f"--micro-batch {micro_batch}: must be 1 or more")
    if precision not in memory_model.PRECISION_BYTES:
        raise UserError(f"--precision {precision}: use fp16, bf16 or fp32")


def _largest_fitting(option, stage, ckpt, sizes):
    """The first micro batch in `sizes` (largest first) that fits, else the smallest, marked as not fitting."""
    for mb in sizes:
        opt = option(stage, mb, ckpt)
        if opt.fits:
            return opt
    return opt


def _choose(options, good_micro_batch):
    """The first stage (ZeRO-1 on one node, ZeRO-2, ZeRO-3, offload) that fits a good micro batch,
    checkpointing only where it is needed for one; failing that, the first option that fits at all."""
    fitting = [o for stage in options for o in options[stage] if o.fits]
    for stage in options:
        plain, ckpt = options[stage]
        if plain.fits and plain.micro_batch >= good_micro_batch:
            return plain
        if ckpt.fits and ckpt.micro_batch >= good_micro_batch:
            return ckpt
    return fitting[0] if fitting else None


def ready_ds_config(choice: Option, accum: int, world: int, precision: str, total_steps: int) -> dict:
    """The stage's preset from ds_configs/ with every "auto" filled (RunConfig's defaults for the rest)."""
    path, raw = ds_config.load(STAGE_PRESET[choice.stage])
    optim = OptimArgs(micro_batch_size=choice.micro_batch, grad_accum=accum, precision=precision)
    return ds_config.fill(path, raw, optim, world, total_steps)


def plan_command(
    model: str,
    gpus: int,
    gpu_memory,
    seq_len: int,
    micro_batch: int | None = None,
    nodes: int = 1,
    global_batch: int = 32,
    precision: str = "fp16",
    output: str | None = None,
    task: str | None = None,
    total_steps: int | None = None,
) -> Plan:
    """Print the memory table and the recommendation, write the DeepSpeed JSON to `output`."""
    result = plan(model, gpus, gpu_memory, seq_len, micro_batch, nodes, global_batch, precision, task, total_steps)
    print(format_plan(result, output))
    if output and result.ds_config:
        write_json_atomic(Path(output), result.ds_config)
        print(f"wrote {output}")
    if result.choice is None:
        raise UserError(
            f"{model} at --seq-len {seq_len} does not fit in {_gib(result.gpu_memory)} GiB per GPU "
            "even with ZeRO-3+offload, micro batch 1 and checkpointing; use a shorter --seq-len, "
            "more GPUs, or GPUs with more memory"
        )
    return result


def _command_line(task: str) -> str:
    """How to train what was planned: the command that runs the task (pretrain has its own)."""
    command = tasks.resolve(task).command
    return f"bertscale {command}" + (f" --task {task}" if command == "finetune" else "")


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def format_plan(p: Plan, output: str | None = None) -> str:
    world = p.gpus * p.nodes
    lines = [
        f"{p.model}: {p.params / 1e6:.1f}M parameters (largest layer {p.largest_layer / 1e6:.1f}M), "
        f"seq {p.seq_len}, {p.precision}, {p.nodes} node(s) x {p.gpus} GPU(s) of {_gib(p.gpu_memory)} GiB "
        f"({_gib(int(p.gpu_memory * (1 - HEADROOM)))} usable after {HEADROOM:.0%} headroom)",
        "",
        f"{'GiB per GPU':<16}{'ckpt':>5}{'micro':>7}{'model states':>14}{'activations':>13}{'DS buffers':>12}"
        f"{'CUDA ctx':>10}{'total':>8}  fits  {'CPU RAM/node':>12}",
    ]
    for stage in p.options:
        for opt in p.options[stage]:
            mark = "<- recommended" if opt is p.choice else ""
            lines.append(
                f"{stage:<16}{'on' if opt.checkpointing else 'off':>5}{opt.micro_batch:>7}"
                f"{_gib(opt.model_states):>14}{_gib(opt.activations):>13}{_gib(opt.buffers):>12}"
                f"{_gib(int(CUDA_CONTEXT)):>10}{_gib(opt.total):>8}  {'yes' if opt.fits else 'NO ':<4}"
                f"  {_gib(opt.cpu_per_node):>12} {mark}".rstrip()
            )
    c = p.choice
    if c is None:
        return "\n".join(lines)
    ckpt = "--gradient-checkpointing" if c.checkpointing else "--no-gradient-checkpointing"
    why = ""
    if c.stage == "ZeRO-1":
        zero0 = "; ZeRO-0 in fp32" if p.precision == "fp32" else ""
        why = f" (preset {STAGE_PRESET[c.stage]}: each GPU holds the whole model states{zero0})"
    lines += [
        "",
        f"recommended: {c.stage}{why}, micro batch {c.micro_batch}, gradient accumulation {p.grad_accum} "
        f"-> global batch {p.global_batch} ({c.micro_batch} x {p.grad_accum} x {world} GPUs), "
        f"activation checkpointing {'on' if c.checkpointing else 'off'}, {p.precision}",
        f"  {_command_line(p.task)} --model {p.model} "
        f"--max-seq-length {p.seq_len} --ds-config {output or 'PLAN.json'} --micro-batch-size {c.micro_batch} "
        f"--grad-accum {p.grad_accum} {ckpt} --{p.precision}",
    ]
    if not output:
        lines.append("  (write the DeepSpeed config with --output PLAN.json)")
    return "\n".join(lines)
