"""`distill`: make a smaller student and train it to match the teacher.

Three knobs, all recipe fields (`Knobs`, shared with every stage that trains against a teacher):
- WHAT is matched: logits at every position (`loss`), optionally hidden states of chosen layers
  (`hidden`: a student->teacher layer map, MSE or cosine, a learned projection when widths
  differ), and whole teacher-generated sequences (`sequences`);
- HOW the gap is measured: `loss` (forward/reverse KL, JSD(beta), TVD; temperature with T^2;
  alpha mix with CE; teacher top-k), computed chunk-wise over tokens;
- WHERE the data comes from: the fixed text, the teacher's generations (`sequences`), the
  student's own samples with probability `on_policy.fraction` per batch (GKD's lambda), scored
  by the teacher (reverse KL with fraction 1 is the MiniLLM setting), or filtered
  chain-of-thought rationales (`cot`).

A black-box teacher (`openai:`) answers in text only: its distill stage trains on its answers to
prompts from the data (`sequences`) or on its kept rationales (`cot`) by cross-entropy, and may
train LoRA adapters (`lora`) instead of every weight, merged into the saved model.
"""

from __future__ import annotations

import random
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .. import UserError
from ..answers import Endpoint, Local, Request
from ..cot import CoT, keep
from ..data import Batches, Sequences, continue_prompts, sample_prompts, teacher_sequences
from ..losses import LossConfig, hidden_loss, kd_loss, shift_labels
from ..models import count_params, evenly_spaced, fresh_model, keep_layers
from ..progress import say
from ..storage import digest, home
from ..train import Batch, LossFn, TrainConfig, train

NEEDS_FLOAT = True


class HiddenMatch(BaseModel):
    """Match hidden states: the output of student layer i against teacher layer j."""

    model_config = ConfigDict(extra="forbid")

    layer_map: dict[int, int] = Field(min_length=1, description="student layer -> teacher layer (0-based)")
    loss: Literal["mse", "cosine"] = "mse"
    weight: float = Field(1.0, gt=0, description="added to the logit loss with this weight")


class OnPolicy(BaseModel):
    """GKD: with probability `fraction` a batch is replaced by the student's own samples
    (continuing the batch's first `prompt_tokens`), which the teacher then scores. Only the
    divergence is used on those batches (cross-entropy on one's own samples teaches nothing)."""

    model_config = ConfigDict(extra="forbid")

    fraction: float = Field(ge=0, le=1, description="lambda: 0 off-policy, 1 fully on-policy")
    new_tokens: int = Field(ge=1, description="the generation budget per sampled sequence")
    prompt_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, gt=0)


class Knobs(TrainConfig):
    """Distillation settings shared by every stage that trains against a teacher."""

    loss: LossConfig = LossConfig(temperature=2.0, alpha=0.5)
    hidden: HiddenMatch | None = None
    sequences: Sequences | None = Field(None, description="train on teacher generations instead of the text")
    on_policy: OnPolicy | None = None
    seq_len: int | None = Field(None, ge=8, description="training sequence length (default: data.seq_len)")

    @model_validator(mode="after")
    def _coherent(self) -> "Knobs":
        if self.on_policy is not None and self.on_policy.prompt_tokens >= (self.seq_len or 1 << 30):
            raise ValueError("on_policy.prompt_tokens must be shorter than seq_len")
        if self.loss.alpha == 0 and (self.on_policy is not None and self.on_policy.fraction > 0):
            raise ValueError("on_policy needs a divergence term: alpha is 0 (plain CE)")
        return self


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


def white_box_fields(cfg: Config) -> str | None:
    """The first setting that needs the teacher's logits or weights (None: text is enough)."""
    if cfg.sequences is None and cfg.cot is None:
        return "sequences"
    if cfg.sequences is not None and cfg.sequences.method == "beam":
        return "sequences.method"
    for name in ("hidden", "on_policy"):
        if getattr(cfg, name) is not None:
            return name
    return "student.from" if cfg.student.init == "teacher" else None


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


def check_knobs(cfg: Knobs, shape: dict, teacher_shape: dict) -> None:
    """What can only be checked against the models' dimensions (layer maps)."""
    if cfg.hidden is None:
        return
    s_layers, t_layers = shape["num_hidden_layers"], teacher_shape["num_hidden_layers"]
    for s, t in cfg.hidden.layer_map.items():
        if not 0 <= s < s_layers:
            raise ValueError(f"hidden.layer_map: student layer {s} does not exist (the student has {s_layers})")
        if not 0 <= t < t_layers:
            raise ValueError(f"hidden.layer_map: teacher layer {t} does not exist (the teacher has {t_layers})")


def check(cfg: Config, shape: dict, teacher_shape: dict) -> dict:
    out = student_shape(cfg.student, shape, teacher_shape)
    check_knobs(cfg, out, teacher_shape)
    return out


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


def projections(
    cfg: Knobs, student: torch.nn.Module, teacher: torch.nn.Module | None, seed: int
) -> torch.nn.ModuleDict | None:
    """Learned linear maps student width -> teacher width for hidden matching (None if equal)."""
    if cfg.hidden is None or teacher is None or student.config.hidden_size == teacher.config.hidden_size:
        return None
    torch.manual_seed(seed)
    return torch.nn.ModuleDict(
        {
            str(s): torch.nn.Linear(student.config.hidden_size, teacher.config.hidden_size, bias=False)
            for s in cfg.hidden.layer_map
        }
    )


def kd_step(teacher: torch.nn.Module | None, cfg: Knobs, seed: int, proj: torch.nn.ModuleDict | None) -> LossFn:
    """The training step of every distillation stage. The teacher may be None for plain CE."""
    t_head = teacher.get_output_embeddings() if teacher is not None else None
    on_policy = cfg.on_policy if cfg.on_policy is not None and cfg.on_policy.fraction > 0 else None
    student_loss = cfg.loss.model_copy(update={"alpha": 1.0})  # on student samples: divergence only

    def step(model: torch.nn.Module, batch: Batch, step_index: int):
        ids = batch["input_ids"]
        labels = batch["labels"] if "labels" in batch else shift_labels(ids)
        loss_cfg, logs = cfg.loss, {}
        if on_policy is not None and random.Random(seed * 1_000_003 + step_index).random() < on_policy.fraction:
            sampled = continue_prompts(
                _unwrap(model),
                ids[:, : on_policy.prompt_tokens],
                on_policy.new_tokens,
                {"do_sample": True, "temperature": on_policy.temperature, "top_k": 0},
            )
            ids, labels, loss_cfg = sampled["input_ids"], sampled["labels"], student_loss
            logs["on_policy"] = 1.0
        s_out = model(input_ids=ids, output_hidden_states=True, logits_to_keep=1)
        t_out = None
        if teacher is not None and (loss_cfg.alpha > 0 or cfg.hidden is not None):
            with torch.no_grad():
                t_out = teacher(input_ids=ids.to(teacher.device), output_hidden_states=True, logits_to_keep=1)
        t_final = t_out.hidden_states[-1].to(s_out.hidden_states[-1].device) if t_out is not None else None
        loss = kd_loss(
            s_out.hidden_states[-1],
            _unwrap(model).get_output_embeddings(),
            t_final,
            (lambda h: t_head(h.to(t_head.weight.dtype))) if t_head is not None else None,
            labels,
            loss_cfg,
        )
        if cfg.hidden is not None:
            mask = labels != -100
            parts = []
            for s_layer, t_layer in cfg.hidden.layer_map.items():
                s_h = s_out.hidden_states[s_layer + 1][mask]
                if proj is not None:
                    s_h = proj[str(s_layer)](s_h)
                parts.append(hidden_loss(s_h, t_out.hidden_states[t_layer + 1][mask].to(s_h.device), cfg.hidden.loss))
            matched = torch.stack(parts).mean()
            logs["hidden"] = matched.item()
            loss = loss + cfg.hidden.weight * matched
        return loss, logs

    return step


def distill_train(
    student: torch.nn.Module, teacher: torch.nn.Module | None, cfg: Knobs, ctx, rows: dict | None = None
) -> dict:
    """Train `student` in place with the knobs of `cfg` (on `rows` when given); return the
    training summary."""
    if rows is None:
        blocks = ctx.train_blocks(cfg.seq_len or ctx.seq_len)
        if cfg.sequences is not None:
            rows = teacher_sequences(teacher, blocks, cfg.sequences, ctx.seed, ctx.cache_key)
            ctx.info["teacher_sequences"] = len(rows["input_ids"])
        else:
            rows = blocks
    proj = projections(cfg, student, teacher, ctx.seed)
    return train(
        student,
        kd_step(teacher, cfg, ctx.seed, proj),
        Batches(rows, cfg.batch_size, ctx.seed),
        cfg,
        device=ctx.device,
        seed=ctx.seed,
        description=ctx.name,
        checkpoint_dir=ctx.scratch,
        extra_module=proj,
    )


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
    cache = home() / "answers" / f"{digest([ctx.cache_key, settings.model_dump(mode='json'), prompts, ctx.seed])}.jsonl"
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


def apply(model: torch.nn.Module, tokenizer, ctx) -> torch.nn.Module:
    cfg: Config = ctx.config
    remote = isinstance(ctx.teacher, Endpoint)
    teacher = None if remote else ctx.teacher.model
    student = build_student(model, teacher if teacher is not None else model, cfg.student, ctx.seed).float()
    ctx.info.update(
        input_params=count_params(model),
        student_params=count_params(student),
        student_layers=student.config.num_hidden_layers,
    )
    rows = None
    if remote or cfg.cot is not None:
        source = ctx.teacher if remote else Local(teacher, ctx.teacher.tokenizer)
        rows = text_rows(cfg, source, tokenizer, ctx)
    train_cfg = cfg.model_copy(update={"loss": cfg.loss.model_copy(update={"alpha": 0.0})}) if remote else cfg
    trained = with_lora(student, cfg.lora) if cfg.lora is not None else student
    if cfg.lora is not None:
        ctx.info["lora_trainable_params"] = sum(p.numel() for p in trained.parameters() if p.requires_grad)
    ctx.info.update(distill_train(trained, teacher, train_cfg, ctx, rows))
    return trained.merge_and_unload() if cfg.lora is not None else student
