"""Stage kinds. Each module holds one technique: a pydantic `Config`, `check(cfg, shape,
teacher_shape)` that validates it against the models' dimensions before any work (returning
the dimensions after the stage), and `apply(model, tokenizer, ctx) -> model`.

A stage never reads the recipe, never writes outside `ctx.scratch`, and never measures: the
pipeline saves and measures every artifact the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

import torch
from pydantic import BaseModel

from . import distill, prune, qat, quantize, recover

# kind -> module; a module may set PRODUCES = "quantized" (the model cannot be trained or
# pruned afterwards), NEEDS_FLOAT = True (it cannot follow a quantized stage) and define
# white_box_fields(cfg) -> the setting that needs the teacher's logits (refused with openai:).
STAGES = {"distill": distill, "prune": prune, "recover": recover, "quantize": quantize, "qat": qat}


@dataclass
class StageContext:
    """What a stage may use: the teacher, training data, device, seed and a scratch folder."""

    name: str
    config: BaseModel  # the stage's validated Config
    device: torch.device
    seed: int
    scratch: Path  # survives a crash: checkpoints go here
    load_teacher: Callable[[], object]  # -> models.Loaded, loaded on first use
    train_blocks: Callable[[int], torch.Tensor]  # seq_len -> packed training blocks [N, seq_len]
    seq_len: int
    cache_key: str  # identifies (teacher, data): prefix for caches such as teacher generations
    info: dict = field(default_factory=dict)  # facts the stage reports (sizes, roundings, ...)

    @cached_property
    def teacher(self):
        return self.load_teacher()
