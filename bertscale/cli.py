"""bertscale command line: finetune, pretrain, evaluate, predict, export, plan, report.

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

import dataclasses
import os
import typing

import click

from bertscale.config import RunConfig, fields_for
from bertscale.errors import PreemptedExit, UserError


def _click_type(hint):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args else hint
    return {int: int, float: float, str: str, bool: bool, tuple: str}.get(base, str), base


def run_options(command: str):
    """Click options for every RunConfig field exposed by `command` (help + default shown)."""
    hints = typing.get_type_hints(RunConfig)

    def decorate(fn):
        for f in reversed(fields_for(command)):
            flag = "--" + f.name.replace("_", "-")
            envvar = f"BERTSCALE_{f.name.upper()}"
            ctype, base = _click_type(hints[f.name])
            extra = dict(f.metadata.get("click", {}))
            choices = extra.pop("type_choices", None)
            if f.name == "precision":
                for p in reversed(choices):
                    fn = click.option(f"--{p}", "precision", flag_value=p,
                                      help=f"Train in {p} (default: as --ds-config says; fp16 on GPU, fp32 on CPU "
                                      "when it says \"auto\").")(fn)
                continue
            if base is bool:
                fn = click.option(f"{flag}/--no-{flag[2:]}", f.name, default=f.default, envvar=envvar,
                                  show_default=True, help=f.metadata["help"])(fn)
                continue
            fn = click.option(flag, f.name, type=click.Choice(choices) if choices else ctype, default=f.default,
                              envvar=envvar, show_default=True, show_envvar=False, help=f.metadata["help"],
                              **extra)(fn)
        return fn

    return decorate


def make_run(**kwargs) -> RunConfig:
    names = {f.name for f in dataclasses.fields(RunConfig)}
    return RunConfig(**{k: v for k, v in kwargs.items() if k in names})


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
@click.option("--local_rank", "--local-rank", "local_rank", type=int, default=None, expose_value=True,
              help="Set by the deepspeed launcher; you do not pass it yourself.")
def main(local_rank):
    """Train BERT at scale with DeepSpeed: SQuAD/classification fine-tuning and MLM/NSP pretraining."""
    if local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(local_rank))


@main.command()
@run_options("finetune")
def finetune(**kw):
    """Fine-tune BERT on SQuAD v1.1/v2.0 or a classification task."""
    from bertscale.trainer import train

    run = make_run(**kw)
    train(run, run.task)


@main.command()
@run_options("pretrain")
def pretrain(**kw):
    """Continue BERT's MLM + NSP pretraining on your text."""
    from bertscale.trainer import train

    kw.setdefault("task", "pretrain")
    train(make_run(**kw), "pretrain")


@main.command()
@run_options("evaluate")
def evaluate(**kw):
    """Evaluate a trained model (HF dir) without training; writes eval_results.json."""
    from bertscale.evaluation import evaluate_model

    evaluate_model(make_run(**kw))


@main.command()
@click.option("--model", required=True, help="Exported model directory (e.g. OUTPUT_DIR/final).")
@click.option("--question", default=None, help="SQuAD models: the question.")
@click.option("--context", default=None, help="SQuAD models: the passage to find the answer in.")
@click.option("--text", default=None, help="Classification models: the text.")
@click.option("--text-pair", default=None, help="Classification models: the second text of a pair.")
@click.option("--max-seq-length", default=384, show_default=True, help="Tokens per window.")
@click.option("--squad-v2/--no-squad-v2", default=False, show_default=True,
              help="SQuAD models: may answer '' (no answer) as SQuAD v2.0 models do.")
def predict(model, question, context, text, text_pair, max_seq_length, squad_v2):
    """Answer one question, or classify one text, with an exported model."""
    from bertscale.prediction import predict as run_predict

    run_predict(model, question=question, context=context, text=text, text_pair=text_pair,
                max_seq_length=max_seq_length, squad_v2=squad_v2)


@main.command()
@click.option("--checkpoint", required=True, help="OUTPUT_DIR/checkpoints/step-N, or an output dir (newest).")
@click.option("--output", required=True, help="Directory for the Hugging Face model + tokenizer.")
def export(checkpoint, output):
    """Consolidate a (ZeRO-2/3) checkpoint into a Hugging Face model directory."""
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
@click.option("--task", type=click.Choice(["squad", "pretrain"]), default="squad",
              help="Head whose parameters and activations are planned; pretrain needs --total-steps.")
@click.option("--total-steps", type=int, default=None,
              help="LR schedule length written to --output (default: 2 epochs of SQuAD v1.1 train at the "
              "planned global batch).")
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
