"""bertscale command line: finetune, pretrain, prepare, evaluate, predict, export, plan, report.

Runs as `bertscale ...`, `python -m bertscale ...` and `deepspeed bertscale/cli.py ...` (the
launcher puts --local_rank=N before the subcommand, so the group accepts it).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file by the deepspeed launcher: import the package instead
    here = Path(__file__).resolve().parent
    sys.path = [p for p in sys.path if Path(p or ".").resolve() != here]
    sys.path.insert(0, str(here.parent))

import os

import click

from bertscale import console
from bertscale.cli_options import RunCommand, predict_options
from bertscale.errors import PreemptedExit, UserError


class CleanErrors(click.Group):
    """Turn UserError into one line on stderr and exit code 2 (no traceback); end the ranks of a
    distributed run through `exit_process`, which skips the finalization that can abort them."""

    def invoke(self, ctx):
        from bertscale import distributed as dist

        code = 0
        try:
            result = super().invoke(ctx)
            dist.teardown()  # ranks leave together: one exiting early can abort its peer's shutdown
        except UserError as e:
            if e.echo:
                click.echo(f"bertscale: error: {e}", err=True)
            code = e.exit_code
        except PreemptedExit:
            code = PreemptedExit.CODE
        finally:
            dist.release_shm()
        if code or dist.joined():
            dist.exit_process(code)
        return result


@click.group(cls=CleanErrors, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option(
    "--local_rank",
    "--local-rank",
    "local_rank",
    type=int,
    default=None,
    expose_value=True,
    help="Set by the deepspeed launcher; you do not pass it yourself.",
)
def main(local_rank):
    """Train BERT at scale with DeepSpeed: SQuAD/classification fine-tuning and MLM/NSP pretraining."""
    if local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
    console.setup("--verbose" in sys.argv[1:])  # before the libraries load (the command parses --verbose later)


@main.command(cls=RunCommand, command_key="finetune")
def finetune(run):
    """Fine-tune BERT on SQuAD v1.1/v2.0, a classification task, or your own task (--task file.py:Class)."""
    from bertscale.trainer import train

    train(run)


@main.command(cls=RunCommand, command_key="pretrain", fixed_task="pretrain")
def pretrain(run):
    """Continue BERT's MLM + NSP pretraining on your text."""
    from bertscale.trainer import train

    train(run)


@main.command(cls=RunCommand, command_key="prepare")
@click.option("--output-dir", required=True, help="Directory for the prepared data; it appears whole or not at all.")
@click.option(
    "--preprocessing-workers",
    type=click.IntRange(min=1),
    default=os.cpu_count() or 1,
    envvar="BERTSCALE_PREPROCESSING_WORKERS",
    help="Worker processes that prepare (default: all cores).",
)
@click.option("--overwrite", is_flag=True, help="Replace data prepared from other inputs or settings in --output-dir.")
@click.option(
    "--parts",
    type=click.IntRange(min=1),
    default=1,
    help="Split the work into this many parts, one per Slurm array task (slurm/prepare.sh).",
)
@click.option("--part", type=int, default=None, help="With --parts: prepare only this part (0 to parts - 1).")
@click.option("--finalize", is_flag=True, help="With --parts: check that every part is done, then publish.")
def prepare(run, output_dir, preprocessing_workers, overwrite, parts, part, finalize):
    """Prepare training data once (e.g. a pretraining corpus, for `pretrain --prepared-data`)."""
    from bertscale import models, tasks

    task = tasks.build(run, models.load_tokenizer(run.model.model))
    task.prepare(
        Path(output_dir), workers=preprocessing_workers, overwrite=overwrite, part=part, parts=parts, finalize=finalize
    )


@main.command(cls=RunCommand, command_key="evaluate")
def evaluate(run):
    """Evaluate a trained model (HF dir) without training; writes eval_results.json."""
    from bertscale.evaluation import evaluate_model

    evaluate_model(run)


@main.command(cls=RunCommand, command_key="predict", options=predict_options)
def predict(model, task, max_seq_length, **inputs):
    """Answer one question, classify one text, or run your own task's prediction with an exported model."""
    from bertscale.prediction import predict as run_predict

    click.echo(run_predict(model, task, inputs, max_seq_length))


@main.command()
@click.option(
    "--checkpoint",
    required=True,
    help="OUTPUT_DIR/checkpoints/step-N, its universal/ conversion, or an output dir (newest).",
)
@click.option("--output", required=True, help="Directory for the Hugging Face model + tokenizer.")
def export(checkpoint, output):
    """Consolidate a (ZeRO-2/3 or universal) checkpoint into a Hugging Face model directory."""
    from bertscale.checkpoint import export as do_export

    path = do_export(checkpoint, output)
    click.echo(f"exported to {path} (load with from_pretrained)")


@main.command()
@click.option("--model", default="bert-large-cased-whole-word-masking", help="Hub id, local dir, or tiny.")
@click.option("--gpus", default=1, type=int, help="GPUs per node.")
@click.option("--nodes", default=1, type=int, help="Number of nodes (GPUs in all = nodes x gpus).")
@click.option("--gpu-memory", default="16GB", help="Memory per GPU, e.g. 16GB, 80GiB.")
@click.option("--seq-len", default=384, type=int, help="Sequence length.")
@click.option("--micro-batch", default=None, type=int, help="Micro batch to check (default: largest that fits).")
@click.option("--global-batch", default=32, type=int, help="Target global batch (sets accumulation).")
@click.option("--precision", default="fp16", type=click.Choice(["fp16", "bf16", "fp32"]), help="Training precision.")
@click.option("--output", default=None, help="Write the recommended DeepSpeed JSON here.")
@click.option(
    "--task",
    default=None,
    help="Task whose head is planned: squad (default), squad_v2, classify, "
    "glue:NAME, pretrain (pretrain needs --total-steps).",
)
@click.option(
    "--total-steps",
    type=int,
    default=None,
    help="LR schedule length written to --output (default: 2 epochs of the task's usual data set at "
    "the planned global batch).",
)
def plan(**kw):
    """Predict memory per GPU for ZeRO-2/3/offload and recommend a DeepSpeed config."""
    from bertscale.plan import plan_command

    plan_command(**kw)


@main.command()
@click.argument("output_dirs", nargs=-1, required=True)
@click.option("--out", default=None, help="Folder for the PNGs (default: the first output dir).")
def report(output_dirs, out):
    """Plot loss, lr, loss scale, throughput and eval metrics from metrics.jsonl (runs overlaid)."""
    from bertscale.report import make_report

    for path in make_report(output_dirs, out):
        click.echo(path)


if __name__ == "__main__":
    main()
