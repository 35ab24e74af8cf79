"""The stage contract. A stage kind is one technique: a pydantic `Config`, a `check` that
validates it against the model's dimensions before any work (returning the dimensions after
the stage), and an `apply` that turns the input model into the output model.

A stage never reads the recipe and never measures: the pipeline saves and measures every
artifact the same way. It writes only into the folders its context hands it: `ctx.scratch`
(its own checkpoints, kept across a crash until the artifact is saved) and `ctx.cache` (data
other stages and runs may reuse, named by content: teacher generations and answers).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, ClassVar, Literal

import torch
from pydantic import BaseModel


@dataclass
class StageContext:
    """What a stage may use: the teacher, training data, device, seed and its two folders."""

    name: str
    config: BaseModel  # the stage's validated Config
    device: torch.device
    seed: int
    scratch: Path  # this stage's work folder (checkpoints, files on the way); survives a crash
    cache: Path  # shared, content-named caches (teacher generations, answers)
    load_teacher: Callable[[], object]  # -> models.Loaded, or a text teacher (answers.Teacher)
    train_blocks: Callable[[int], torch.Tensor]  # seq_len -> packed training blocks [N, seq_len]
    seq_len: int
    cache_key: str  # identifies (teacher, data): prefix of the names of cached data
    info: dict = field(default_factory=dict)  # facts the stage reports (sizes, roundings, ...)
    files: dict = field(default_factory=dict)  # artifact files besides the model: name -> write(path)
    # training checkpoints, when not in `scratch`: a launch's followers read the main process's
    # (compressor.launch) and keep their other files apart
    checkpoints: Path | None = None
    # the input's checkpoint folder, for a stage that reads it a layer at a time (`StageKind.streams`)
    source: Path | None = None

    @cached_property
    def teacher(self):
        return self.load_teacher()


def layerwise_field(description: str):
    """A stage's `layerwise` setting (`StageKind.streams`): off, it is left out of the stage's key,
    so keys made before it existed stay valid."""
    from pydantic import Field

    return Field(False, description=description, exclude_if=lambda on: not on)


class StageKind(ABC):
    """One stage kind, registered by name in `compressor/stages/__init__.py`."""

    Config: ClassVar[type[BaseModel]]
    # "quantized": the weights are stored as integers, nothing trains or prunes them afterwards
    produces: ClassVar[Literal["float", "quantized"]] = "float"
    # True: needs float weights, so it cannot follow a stage that produces "quantized"
    needs_float: ClassVar[bool] = True
    # bumped when the same settings build a different artifact: part of the stage's cache key
    algorithm: ClassVar[int] = 1
    # True: it trains (kd.distill_train), so a launch's other processes build it beside the main one
    trains: ClassVar[bool] = False

    @abstractmethod
    def check(self, cfg: BaseModel, shape: dict, teacher_shape: dict) -> dict:
        """Raise ValueError with what cannot work; return the model's dimensions after the stage."""

    @abstractmethod
    def apply(self, model: torch.nn.Module, tokenizer, ctx: StageContext) -> torch.nn.Module | Path:
        """The output model (may be `model`, changed in place); a stage that `streams` gets the
        input's skeleton and returns the folder it wrote the output to."""

    def streams(self, cfg: BaseModel) -> bool:
        """True: it reads its input a decoder layer at a time from `ctx.source` (compressor.layerwise)
        instead of taking it loaded, and writes its output as it goes."""
        return False

    def memory(self, cfg: BaseModel, before: dict, after: dict, teacher: dict, run) -> tuple[dict, list[str]]:
        """Its estimated peak, in bytes by part (`compressor.memory`), from the model's shape
        before and after it; and the settings that would lower it. `run` holds the recipe's
        `seq_len` and `teacher_dtype`. Default: the model in float32, as measuring it holds it."""
        from ..memory import measuring

        return measuring(after, 1, run.seq_len), []

    def same_tokens_field(self, cfg: BaseModel) -> str | None:
        """The first setting that reads the teacher token by token in the data's tokens (refused
        when the teacher has a tokenizer of its own); None when it reads no teacher, or across."""
        return None

    def white_box_fields(self, cfg: BaseModel) -> str | None:
        """The first setting that needs the teacher's logits or weights (refused with a
        text-only teacher); None when text answers are enough or no teacher is used."""
        return None
