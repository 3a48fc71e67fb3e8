"""What the console shows: bertscale's own lines, once (rank 0), and the libraries' only when asked.

By default the libraries' INFO lines, progress bars (except rank 0's on a terminal), load reports
and warnings a user cannot act on are silenced; errors always show. `--verbose` or
BERTSCALE_LOG=debug leaves every library as it is. What a library says that matters (a head that
is trained from scratch, an fp16 overflow) bertscale says itself, in plain words.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings

LIBRARIES = ("torch", "deepspeed", "transformers", "datasets", "accelerate", "wandb", "huggingface_hub")
_verbose = False


def verbose() -> bool:
    return (
        _verbose
        or os.environ.get("BERTSCALE_LOG", "").lower() in ("debug", "verbose")
        or os.environ.get("BERTSCALE_VERBOSE", "").lower() in ("1", "true", "yes")
    )


def setup(verbose_flag: bool = False) -> None:
    """Quiet the libraries for this process and the processes it starts (env), unless verbose."""
    global _verbose
    _verbose = _verbose or verbose_flag
    if verbose():
        os.environ["BERTSCALE_LOG"] = "debug"  # DataLoader workers and the launcher's ranks see it too
        return
    main = os.environ.get("RANK", "0") == "0"
    for key, value in (
        ("TRANSFORMERS_VERBOSITY", "error"),
        ("DATASETS_VERBOSITY", "error"),
        ("WANDB_SILENT", "true"),
        ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
        ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1"),
    ):
        os.environ.setdefault(key, value)
    if not (main and sys.stderr.isatty()):  # progress bars of other ranks, or into a log file, are noise
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=rf"({'|'.join(LIBRARIES)})(\.|$)")
    for name in ("transformers", "datasets", "accelerate", "torch.distributed", "DeepSpeed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    _quiet_loaded_libraries()


def _quiet_loaded_libraries() -> None:
    """Libraries that set their own level on import (DeepSpeed's logger, transformers' bars)."""
    if "deepspeed" in sys.modules:
        from deepspeed.utils import logger

        logger.setLevel(logging.ERROR)
    if "transformers" in sys.modules:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    if "datasets" in sys.modules and os.environ.get("HF_DATASETS_DISABLE_PROGRESS_BARS"):
        import datasets

        datasets.disable_progress_bars()


def after_import() -> None:
    """Call once DeepSpeed/transformers are imported: they reset their levels when they load."""
    if not verbose():
        _quiet_loaded_libraries()


@contextlib.contextmanager
def quiet_output():
    """Swallow what a library prints to stdout/stderr in this block (DeepSpeed's "built
    successfully", zero_to_fp32's progress); if the block fails, print it after all."""
    if verbose():
        yield
        return
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            yield
    except BaseException:
        sys.stderr.write(buffer.getvalue())
        raise
