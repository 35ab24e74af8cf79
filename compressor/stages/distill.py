"""`distill`: make a smaller student and train it to match the teacher.

The student starts from the stage's input model (or the teacher): a subset of its layers
(listed, or evenly spaced), or a freshly initialised config of the same family. Training is
word-level KD: alpha * T^2 * D(teacher_T || student_T) + (1 - alpha) * CE, chunked over tokens.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..data import Batches
from ..losses import LossConfig, kd_loss, shift_labels
from ..models import count_params, evenly_spaced, fresh_model, keep_layers
from ..train import LossFn, TrainConfig, train


class StudentSpec(BaseModel):
    """How the student is made; at most one of keep_layers / num_layers / config."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    init: Literal["input", "teacher"] = Field("input", alias="from")
    keep_layers: list[int] | None = Field(None, min_length=1)
    num_layers: int | None = Field(None, ge=1, description="keep this many evenly spaced layers")
    config: dict[str, int | float] | None = Field(
        None, description="a new model of the same family with these config changes"
    )

    @model_validator(mode="after")
    def _one_way(self) -> "StudentSpec":
        given = [k for k in ("keep_layers", "num_layers", "config") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of keep_layers, num_layers, config; got {', '.join(given)}")
        return self


class Config(TrainConfig):
    student: StudentSpec = StudentSpec()
    loss: LossConfig = LossConfig(temperature=2.0, alpha=0.5)
    seq_len: int | None = Field(None, ge=8, description="training sequence length (default: data.seq_len)")


def check(cfg: Config, shape: dict) -> dict:
    layers = shape["num_hidden_layers"]
    spec = cfg.student
    if spec.keep_layers is not None:
        bad = [i for i in spec.keep_layers if not 0 <= i < layers]
        if bad or len(set(spec.keep_layers)) != len(spec.keep_layers):
            raise ValueError(
                f"student.keep_layers: must be distinct indices in [0, {layers - 1}], got {spec.keep_layers}"
            )
        return dict(shape, num_hidden_layers=len(spec.keep_layers))
    if spec.num_layers is not None:
        if spec.num_layers > layers:
            raise ValueError(f"student.num_layers: the input has {layers} layers, got {spec.num_layers}")
        return dict(shape, num_hidden_layers=spec.num_layers)
    if spec.config is not None:
        if "vocab_size" in spec.config and spec.config["vocab_size"] != shape["vocab_size"]:
            raise ValueError("student.config.vocab_size: the student must keep the teacher's vocabulary")
        new = dict(shape, **{k: v for k, v in spec.config.items() if k in shape})
        if new["num_attention_heads"] % new["num_key_value_heads"]:
            raise ValueError("student.config: num_attention_heads must be a multiple of num_key_value_heads")
        return new
    return shape


def build_student(model: torch.nn.Module, teacher: torch.nn.Module, spec: StudentSpec, seed: int) -> torch.nn.Module:
    base = teacher if spec.init == "teacher" else model
    if spec.keep_layers is not None:
        return keep_layers(base, spec.keep_layers)
    if spec.num_layers is not None:
        return keep_layers(base, evenly_spaced(base.config.num_hidden_layers, spec.num_layers))
    if spec.config is not None:
        return fresh_model(base, spec.config, seed)
    return keep_layers(base, list(range(base.config.num_hidden_layers)))


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def kd_step(teacher: torch.nn.Module, loss_cfg: LossConfig) -> LossFn:
    """The training step of every distillation stage: final hidden states of student and
    teacher, projected and compared chunk by chunk (see losses.kd_loss)."""
    t_head = teacher.get_output_embeddings()

    def step(model: torch.nn.Module, ids: torch.Tensor, _step: int):
        labels = shift_labels(ids)
        s_hidden = model(input_ids=ids, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
        with torch.no_grad():
            t_hidden = (
                teacher(input_ids=ids.to(teacher.device), output_hidden_states=True, logits_to_keep=1)
                .hidden_states[-1]
                .to(s_hidden.device)
            )
        loss = kd_loss(
            s_hidden,
            _unwrap(model).get_output_embeddings(),
            t_hidden,
            lambda h: t_head(h.to(t_head.weight.dtype)),
            labels,
            loss_cfg,
        )
        return loss, {}

    return step


def apply(model: torch.nn.Module, tokenizer, ctx) -> torch.nn.Module:
    cfg: Config = ctx.config
    teacher = ctx.teacher.model
    student = build_student(model, teacher, cfg.student, ctx.seed).float()
    ctx.info.update(
        input_params=count_params(model),
        student_params=count_params(student),
        student_layers=student.config.num_hidden_layers,
    )
    blocks = ctx.train_blocks(cfg.seq_len or ctx.seq_len)
    ctx.info.update(
        train(
            student,
            kd_step(teacher, cfg.loss),
            Batches(blocks, cfg.batch_size, ctx.seed),
            cfg,
            device=ctx.device,
            seed=ctx.seed,
            description=ctx.name,
            checkpoint_dir=ctx.scratch,
        )
    )
    return student
