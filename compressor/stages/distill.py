"""`distill`: make a smaller student and train it to match the teacher.

Every distillation knob of `compressor.kd` (what is matched, how the gap is measured, where the
data comes from) applies; this stage adds how the student is made (`student`), filtered
chain-of-thought rationales as data (`cot`) and low-rank adapters (`lora`).

A black-box teacher (`openai:`) answers in text only: its distill stage trains on its answers to
prompts from the data (`sequences`) or on its kept rationales (`cot`) by cross-entropy, and may
train LoRA adapters (`lora`) instead of every weight, merged into the saved model. A teacher
with a tokenizer of its own (`cross_tokenizer`, compressor.crosstok) writes its sequences as
text the same way.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .. import UserError
from ..answers import Local, Request
from ..cot import CoT, keep
from ..data import sample_prompts
from ..kd import Knobs, ce_only, check_knobs, distill_train
from ..memory import for_training
from ..models import Loaded, count_params, evenly_spaced, fresh_model, keep_layers
from ..progress import say
from ..storage import digest
from .base import StageContext, StageKind


class StudentSpec(BaseModel):
    """How the student is made; at most one of keep_layers / num_layers / config."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    init: Literal["input", "teacher"] = Field("input", alias="from")
    keep_layers: list[int] | None = Field(None, min_length=1)
    num_layers: int | None = Field(None, ge=1, description="keep this many evenly spaced layers")
    config: dict[str, int | float] | None = Field(
        None, description="a freshly initialised model of the same family with these config changes"
    )

    @model_validator(mode="after")
    def _one_way(self) -> "StudentSpec":
        given = [k for k in ("keep_layers", "num_layers", "config") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of keep_layers, num_layers, config; got {', '.join(given)}")
        return self


class Lora(BaseModel):
    """Train low-rank adapters on these projections only (peft), merged into the weights at the end."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: list[str] = Field(["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1)


class Config(Knobs):
    student: StudentSpec = StudentSpec()
    cot: CoT | None = Field(None, description="train on the teacher's rationales that reach the reference answer")
    lora: Lora | None = None

    @model_validator(mode="after")
    def _one_source(self) -> "Config":
        if self.cot is not None and self.sequences is not None:
            raise ValueError("give one of sequences, cot: both are the stage's training data")
        return self


def student_shape(spec: StudentSpec, shape: dict, teacher_shape: dict) -> dict:
    base = teacher_shape if spec.init == "teacher" else shape
    layers = base["num_hidden_layers"]
    if spec.keep_layers is not None:
        bad = [i for i in spec.keep_layers if not 0 <= i < layers]
        if bad or len(set(spec.keep_layers)) != len(spec.keep_layers):
            raise ValueError(
                f"student.keep_layers: must be distinct indices in [0, {layers - 1}], got {spec.keep_layers}"
            )
        return dict(base, num_hidden_layers=len(spec.keep_layers))
    if spec.num_layers is not None:
        if spec.num_layers > layers:
            raise ValueError(f"student.num_layers: the model has {layers} layers, got {spec.num_layers}")
        return dict(base, num_hidden_layers=spec.num_layers)
    if spec.config is not None:
        if "vocab_size" in spec.config and spec.config["vocab_size"] != base["vocab_size"]:
            raise ValueError("student.config.vocab_size: the student must keep the teacher's vocabulary")
        new = dict(base, **{k: v for k, v in spec.config.items() if k in base})
        if new["num_attention_heads"] % new["num_key_value_heads"]:
            raise ValueError("student.config: num_attention_heads must be a multiple of num_key_value_heads")
        return new
    return base


def build_student(model: torch.nn.Module, teacher: torch.nn.Module, spec: StudentSpec, seed: int) -> torch.nn.Module:
    base = teacher if spec.init == "teacher" else model
    if spec.keep_layers is not None:
        return keep_layers(base, spec.keep_layers)
    if spec.num_layers is not None:
        return keep_layers(base, evenly_spaced(base.config.num_hidden_layers, spec.num_layers))
    if spec.config is not None:
        return fresh_model(base, spec.config, seed)
    return keep_layers(base, list(range(base.config.num_hidden_layers)))


def answer_rows(tokenizer, pairs: list[tuple[str, str]], seq_len: int) -> dict[str, torch.Tensor]:
    """prompt + answer + EOS per row, labels on the answer (and EOS) only, right-padded."""
    eos = tokenizer.eos_token_id
    rows, labels = [], []
    for prompt, answer in pairs:
        p = tokenizer(prompt).input_ids
        a = tokenizer(answer, add_special_tokens=False).input_ids + ([eos] if eos is not None else [])
        ids = (p + a)[:seq_len]
        rows.append(ids)
        labels.append(([-100] * len(p) + a + [-100])[1 : len(ids) + 1])  # next-token targets
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
    return {
        "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
        "labels": torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels]),
    }


def text_rows(cfg: Config, teacher, tokenizer, ctx) -> dict[str, torch.Tensor]:
    """Training rows from the teacher's text answers: to prompts cut from the data
    (`sequences`), or its rationales that reach the reference answer (`cot`)."""
    seq_len = cfg.seq_len or ctx.seq_len
    if cfg.cot is not None:
        settings = cfg.cot
        problems = settings.load(ctx.seed)
        prompts = [settings.template.format(question=p["question"]) for p in problems]
        samples, max_tokens = settings.samples, settings.new_tokens
        temperature, top_p = settings.temperature, settings.top_p
    else:
        settings = cfg.sequences
        prompts = tokenizer.batch_decode(
            sample_prompts(ctx.train_blocks(seq_len), settings, ctx.seed), skip_special_tokens=True
        )
        samples, max_tokens, top_p = 1, settings.new_tokens, settings.top_p
        temperature = 0.0 if settings.method == "greedy" else settings.temperature
    requests = [Request(i, j, prompt) for i, prompt in enumerate(prompts) for j in range(samples)]
    name = digest([ctx.cache_key, settings.model_dump(mode="json"), prompts, ctx.seed])
    cache = ctx.cache / "answers" / f"{name}.jsonl"
    answers = teacher.answers(requests, cache, max_tokens, temperature, top_p, ctx.seed)
    if cfg.cot is None:
        pairs = [(prompt, answers[(i, 0)]) for i, prompt in enumerate(prompts)]
        ctx.info["teacher_answers"] = len(pairs)
    else:
        pairs = []
        solved = 0
        for i, (prompt, problem) in enumerate(zip(prompts, problems)):
            kept = keep([answers[(i, j)] for j in range(samples)], problem["answer"], cfg.cot)
            pairs += [(prompt, rationale) for rationale in kept]
            solved += bool(kept)
        ctx.info.update(
            cot_problems=len(prompts), cot_generated=len(requests), cot_kept=len(pairs), cot_problems_solved=solved
        )
        say(f"chain of thought: kept {len(pairs)} of {len(requests)} rationales ({solved}/{len(prompts)} problems)")
        if not pairs:
            raise UserError(
                f"cot: none of the {len(requests)} rationales reached the reference answer "
                "(check answer_regex against the teacher's answers, or raise samples)",
                code=1,
            )
    return answer_rows(tokenizer, pairs, seq_len)


def with_lora(model: torch.nn.Module, cfg: Lora) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(
        model, LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.targets)
    )


class Distill(StageKind):
    Config = Config
    trains = True

    def check(self, cfg: Config, shape: dict, teacher_shape: dict) -> dict:
        out = student_shape(cfg.student, shape, teacher_shape)
        check_knobs(cfg, out, teacher_shape)
        return out

    def memory(self, cfg: Config, before: dict, after: dict, teacher: dict, run) -> tuple[dict, list[str]]:
        return for_training(cfg, after, teacher, run)

    def same_tokens_field(self, cfg: Config) -> str | None:
        return "student.from" if cfg.student.init == "teacher" else cfg.same_tokens_field()

    def white_box_fields(self, cfg: Config) -> str | None:
        for name in ("teacher_cache", "cross_tokenizer"):
            if getattr(cfg, name) is not None:
                return name
        if cfg.sequences is None and cfg.cot is None:
            return "sequences"
        if cfg.sequences is not None and cfg.sequences.method == "beam":
            return "sequences.method"
        for name in ("hidden", "on_policy"):
            if getattr(cfg, name) is not None:
                return name
        return "student.from" if cfg.student.init == "teacher" else None

    def apply(self, model: torch.nn.Module, tokenizer, ctx: StageContext) -> torch.nn.Module:
        cfg: Config = ctx.config
        white_box = isinstance(ctx.teacher, Loaded)  # else a text-only teacher: answers, no logits
        teacher = ctx.teacher.model if white_box else None
        student = build_student(model, teacher if teacher is not None else model, cfg.student, ctx.seed).float()
        ctx.info.update(
            input_params=count_params(model),
            student_params=count_params(student),
            student_layers=student.config.num_hidden_layers,
        )
        rows = None
        crossing = cfg.cross_tokenizer is not None and cfg.sequences is not None  # the teacher writes text
        if not white_box or cfg.cot is not None or crossing:
            source = Local(teacher, ctx.teacher.tokenizer) if white_box else ctx.teacher
            rows = text_rows(cfg, source, tokenizer, ctx)
        trained = with_lora(student, cfg.lora) if cfg.lora is not None else student
        if cfg.lora is not None:
            ctx.info["lora_trainable_params"] = sum(p.numel() for p in trained.parameters() if p.requires_grad)
        ctx.info.update(distill_train(trained, tokenizer, teacher, cfg if white_box else ce_only(cfg), ctx, rows))
        return trained.merge_and_unload() if cfg.lora is not None else student
