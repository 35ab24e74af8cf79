"""Progress a person can watch: stage, step, loss and ETA.

On a terminal this is a live rich bar; in a log file (CI, nohup) it prints a plain line every
~10% or 30 s, so a long run is never silent.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True, highlight=False)


def say(message: str) -> None:
    """One line of status for the user (stderr, so stdout stays machine-readable)."""
    console.print(message, markup=False, soft_wrap=True)


class Bar:
    """A progress bar for `total` steps with a free-form postfix (loss, lr, ...). Into a log
    file it prints a line every ~10% or 30 s, once it has run QUIET_S seconds: a phase that
    finishes sooner leaves no lines."""

    QUIET_S = 3.0

    def __init__(self, description: str, total: int, unit: str = "step"):
        self.description, self.total, self.unit = description, total, unit
        self.done, self.start, self.postfix = 0, time.time(), ""
        self._last_log, self._next_pct, self._printed = self.start, 10, False
        self._live = console.is_terminal and sys.stderr.isatty()
        if self._live:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[postfix]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=console,
                transient=False,
            )
            self._task = self._progress.add_task(description, total=total, postfix="")
            self._progress.start()

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, advance: int = 1, **fields: float | str) -> None:
        self.done += advance
        if fields:
            self.postfix = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
        if self._live:
            self._progress.update(self._task, advance=advance, postfix=self.postfix)
            return
        pct = 100 * self.done / max(self.total, 1)
        now = time.time()
        elapsed = now - self.start
        due = pct >= self._next_pct or now - self._last_log > 30 or self.done == self.total
        while self._next_pct <= pct:
            self._next_pct += 10
        if due and (elapsed >= self.QUIET_S or (self._printed and self.done == self.total)):
            self._last_log, self._printed = now, True
            eta = elapsed / max(self.done, 1) * (self.total - self.done)
            say(
                f"{self.description}: {self.unit} {self.done}/{self.total} {self.postfix} "
                f"elapsed {elapsed:.0f}s eta {eta:.0f}s"
            )

    def close(self) -> None:
        if self._live:
            self._progress.stop()
            self._live = False


def quiet_libraries() -> None:
    """Our progress is the one to watch: mute library chatter (transformers' shard bars,
    datasets' split bars, lm-eval's warnings). Into a log file (not a terminal), tqdm bars of
    any library (lm-eval's per-document ones) would print a line per redraw: off. tqdm reads
    TQDM_DISABLE when first imported, which is why this runs before anything imports it."""
    import logging
    import os
    import sys

    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_DISABLE", "1")
    from transformers.utils import logging as hf_logging  # imports torch, which configures its loggers

    # Known-harmless noise, set after torch's logging is configured: torchao's CUDA-only kernels
    # that a CPU machine cannot load (`Failed to load .../_C_mxfp8...so`), torch's deprecation of
    # torchao's Enum registrations (`torch/utils/_pytree.py`), bitsandbytes' optional `kernels` package.
    for name in (
        "lm-eval",
        "lm_eval",
        "transformers",
        "datasets",
        "accelerate",
        "httpx",
        "torchao",
        "torch.utils._pytree",
        "bitsandbytes",
    ):
        logging.getLogger(name).setLevel(logging.ERROR)

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


# --- where a run is, for the line Ctrl-C prints ---------------------------------------------------

_where: dict = {}


@contextlib.contextmanager
def stage_progress(stage: str, recipe) -> Iterator[None]:
    """Marks the stage being built or measured; left set when the block is interrupted."""
    _where.clear()
    _where.update(stage=stage, recipe=str(recipe))
    yield
    _where.clear()


def checkpointed(step: int, total: int) -> None:
    """The running stage saved a resumable checkpoint after `step` of `total` steps."""
    _where.update(checkpoint=step, total=total)


def interrupted() -> str:
    """One line: what was interrupted, and where the same command will go on from."""
    if not _where:
        return "interrupted: nothing half-written is kept; rerun the same command to go on"
    resume = (
        f"from its checkpoint at step {_where['checkpoint']}/{_where['total']}"
        if "checkpoint" in _where
        else "from its start"
    )
    return (
        f"interrupted in stage {_where['stage']!r}: finished stages are kept; rerun the same command "
        f"to resume it {resume}"
    )
