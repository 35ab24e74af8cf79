"""`recover`: heal a pruned (or otherwise damaged) model by distillation.

By default from the ORIGINAL teacher ("prune, then distill from the original"), or from the
stage's input model as it was before recovery (`teacher: input`), or with plain cross-entropy
for comparison (`teacher: none`). Every distillation knob of `compressor.kd` applies.
"""

from __future__ import annotations

import torch

from ..kd import Recovery, check_recovery, distill_train, recovery_start
from ..memory import for_training
from .base import StageContext, StageKind


class Recover(StageKind):
    Config = Recovery
    trains = True

    def check(self, cfg: Recovery, shape: dict, teacher_shape: dict) -> dict:
        return check_recovery(cfg, shape, teacher_shape)

    def memory(self, cfg: Recovery, before: dict, after: dict, teacher: dict, run) -> tuple[dict, list[str]]:
        return for_training(cfg, after, cfg.teacher_shape(before, teacher), run)

    def same_tokens_field(self, cfg: Recovery) -> str | None:
        return cfg.same_tokens_field()

    def white_box_fields(self, cfg: Recovery) -> str | None:
        return cfg.logits_field()

    def apply(self, model: torch.nn.Module, tokenizer, ctx: StageContext) -> torch.nn.Module:
        model, teacher, cfg = recovery_start(model, ctx)
        ctx.info.update(distill_train(model, tokenizer, teacher, cfg, ctx))
        return model
