"""`recover`: heal a pruned (or otherwise damaged) model by distillation.

By default from the ORIGINAL teacher ("prune, then distill from the original"), or from the
stage's input model as it was before recovery (`teacher: input`), or with plain cross-entropy
for comparison (`teacher: none`). Every distillation knob of `distill` applies; the loop and the
loss are distill's.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from pydantic import model_validator

from ..models import count_params
from .distill import Knobs, check_knobs, distill_train

NEEDS_FLOAT = True


class Config(Knobs):
    teacher: Literal["original", "input", "none"] = "original"

    @model_validator(mode="after")
    def _teacherless(self) -> "Config":
        if self.teacher == "none":
            used = [k for k in ("hidden", "sequences", "on_policy") if getattr(self, k) is not None]
            if used:
                raise ValueError(f"teacher: none (plain cross-entropy) cannot use {', '.join(used)}")
        return self


def white_box_fields(cfg: Config) -> str | None:
    """The setting that needs the teacher's logits (an openai: teacher has none)."""
    return "teacher" if cfg.teacher == "original" else None


def check(cfg: Config, shape: dict, teacher_shape: dict) -> dict:
    check_knobs(cfg, shape, shape if cfg.teacher == "input" else teacher_shape)
    return shape


def pick_teacher(model: torch.nn.Module, cfg: Config, ctx) -> tuple[torch.nn.Module | None, Config]:
    """The model to distill from, and the config to train with (alpha 0 when there is none)."""
    if cfg.teacher == "none":
        return None, cfg.model_copy(update={"loss": cfg.loss.model_copy(update={"alpha": 0.0})})
    if cfg.teacher == "input":
        return copy.deepcopy(model).eval().requires_grad_(False), cfg
    return ctx.teacher.model, cfg


def apply(model: torch.nn.Module, tokenizer, ctx) -> torch.nn.Module:
    model = model.float()
    teacher, cfg = pick_teacher(model, ctx.config, ctx)
    ctx.info.update(teacher=cfg.teacher, params=count_params(model))
    ctx.info.update(distill_train(model, teacher, cfg, ctx))
    return model
