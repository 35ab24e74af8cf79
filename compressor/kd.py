"""Distillation as a library: the knobs every stage that trains against a teacher shares, the
training step, and the driver that runs it. `distill`, `recover` and `qat` use it; it is not a
stage itself.

Three knobs, all recipe fields (`Knobs`):
- WHAT is matched: logits at every position (`loss`), optionally hidden states of chosen layers
  (`hidden`: a student->teacher layer map, MSE or cosine, a learned projection when widths
  differ), and whole teacher-generated sequences (`sequences`);
- HOW the gap is measured: `loss` (forward/reverse KL, JSD(beta), TVD; temperature with T^2;
  alpha mix with CE; teacher top-k), computed chunk-wise over tokens;
- WHERE the data comes from: the fixed text, the teacher's generations (`sequences`), or the
  student's own samples with probability `on_policy.fraction` per batch (GKD's lambda), scored
  by the teacher (reverse KL with fraction 1 is the MiniLLM setting).
"""

from __future__ import annotations

import copy
import random
from typing import Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from . import launch
from .crosstok import Crossing, CrossTokenizer, cross_tokenizer_loss, crossing, fraction
from .data import Batches, Sequences, continue_prompts, teacher_sequences
from .losses import LossConfig, Workspace, hidden_loss, kd_loss, shift_labels
from .models import count_params
from .seeds import epoch_seed
from .sharding import sharded
from .teacher_cache import KEYS, TeacherCache, capture, folder, teacher_states, topk_at
from .train import Batch, LossFn, TrainConfig, train


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
    teacher_cache: TeacherCache | None = Field(  # off, it is left out of stage keys: keys made before stay valid
        None,
        description="train from the teacher's top-k log-probabilities, captured once into the shared cache",
        exclude_if=lambda cache: cache is None,
    )
    cross_tokenizer: CrossTokenizer | None = Field(
        None,
        description="the teacher keeps its own tokenizer: logits matched at aligned positions (crosstok)",
        exclude_if=lambda cross: cross is None,
    )

    @model_validator(mode="after")
    def _coherent(self) -> "Knobs":
        if self.on_policy is not None and self.on_policy.prompt_tokens >= (self.seq_len or 1 << 30):
            raise ValueError("on_policy.prompt_tokens must be shorter than seq_len")
        if self.loss.alpha == 0 and (self.on_policy is not None and self.on_policy.fraction > 0):
            raise ValueError("on_policy needs a divergence term: alpha is 0 (plain CE)")
        if self.teacher_cache is not None:
            self._cacheable()
            self.teacher_cache = self.teacher_cache.resolved(across_tokenizers=self.cross_tokenizer is not None)
        if self.cross_tokenizer is not None:
            self._crossable()
        return self

    def same_tokens_field(self) -> str | None:
        """The first setting that reads the teacher in the data's own tokens (None: the
        cross-tokenizer losses read it across, or nothing reads it)."""
        if self.cross_tokenizer is not None:
            return None
        if self.loss.alpha > 0:
            return "loss"
        return next((n for n in ("hidden", "on_policy", "sequences") if getattr(self, n) is not None), None)

    def _crossable(self) -> None:
        """What the cross-tokenizer losses replace or cannot serve."""
        cross = self.cross_tokenizer
        if self.loss.divergence != "forward_kl":
            raise ValueError(
                f"cross_tokenizer: its loss ({cross.loss}) measures the gap across tokenizers; "
                f"leave loss.divergence ({self.loss.divergence}) out"
            )
        if self.loss.top_k is not None:
            raise ValueError("cross_tokenizer: its top_k is the teacher's top-k; leave loss.top_k out")
        if self.teacher_cache is not None and self.teacher_cache.k != cross.top_k:
            raise ValueError(
                f"teacher_cache.k ({self.teacher_cache.k}) differs from cross_tokenizer.top_k ({cross.top_k}): "
                "the cache holds the top-k the loss reads; give them the same value"
            )
        if self.teacher_cache is not None and self.teacher_cache.tail_samples:
            raise ValueError(
                f"teacher_cache.tail_samples ({self.teacher_cache.tail_samples}): the cross-tokenizer losses "
                "read the tail as one bucket (they are not linear in the teacher's probabilities); set it to 0"
            )

    def _cacheable(self) -> None:
        """What a cache of the teacher's top-k log-probabilities on fixed rows cannot serve."""
        if self.loss.alpha == 0:
            raise ValueError("teacher_cache: alpha is 0 (plain cross-entropy): there are no teacher logits to cache")
        if self.loss.divergence != "forward_kl":
            raise ValueError(
                f"teacher_cache: trains on forward_kl only (its exact top-k form), not {self.loss.divergence}"
            )
        if self.loss.top_k is not None:
            raise ValueError("teacher_cache: its k is the top-k; leave loss.top_k out")
        for name, why in (("hidden", "the teacher's hidden states"), ("on_policy", "the teacher scoring new samples")):
            if getattr(self, name) is not None:
                raise ValueError(f"teacher_cache: {name} needs {why} at every step; leave one of them out")


def ce_only(cfg: Knobs) -> Knobs:
    """The same settings with the distillation term off: plain cross-entropy (alpha 0)."""
    return cfg.model_copy(update={"loss": cfg.loss.model_copy(update={"alpha": 0.0})})


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


def kd_step(
    teacher: torch.nn.Module | None,
    cfg: Knobs,
    seed: int,
    proj: torch.nn.ModuleDict | None,
    cross: Crossing | None = None,
) -> LossFn:
    """The training step of every distillation stage. The teacher may be None for plain CE;
    `cross`: the teacher reads its own tokens of the text (compressor.crosstok)."""
    t_head = teacher.get_output_embeddings() if teacher is not None else None
    on_policy = cfg.on_policy if cfg.on_policy is not None and cfg.on_policy.fraction > 0 else None
    student_loss = cfg.loss.model_copy(update={"alpha": 1.0})  # on student samples: divergence only
    workspace = Workspace()  # the loss's [chunk, vocab] buffers, allocated once for the whole training
    t_workspace = Workspace()  # the teacher's top-k across tokenizers

    def step(model: torch.nn.Module, batch: Batch, step_index: int):
        ids = batch["input_ids"]
        labels = batch["labels"] if "labels" in batch else shift_labels(ids)
        loss_cfg, logs = cfg.loss, {}
        if on_policy is not None and random.Random(epoch_seed(seed, step_index)).random() < on_policy.fraction:
            sampled = continue_prompts(
                _unwrap(model),
                ids[:, : on_policy.prompt_tokens],
                on_policy.new_tokens,
                {"do_sample": True, "temperature": on_policy.temperature, "top_k": 0},
            )
            ids, labels, loss_cfg = sampled["input_ids"], sampled["labels"], student_loss
            logs["on_policy"] = 1.0
        s_out = model(input_ids=ids, output_hidden_states=True, logits_to_keep=1)
        if cross is not None:
            return crossed(model, s_out, batch, ids, labels, loss_cfg, logs)
        t_out, cached = None, None
        if KEYS[0] in batch:  # the teacher's top-k from the cache: no teacher forward
            cached = tuple(batch[k] for k in KEYS)
        elif teacher is not None and (loss_cfg.alpha > 0 or cfg.hidden is not None):
            with torch.no_grad():
                t_out = teacher(input_ids=ids.to(teacher.device), output_hidden_states=True, logits_to_keep=1)
        t_final = t_out.hidden_states[-1].to(s_out.hidden_states[-1].device) if t_out is not None else None
        loss = kd_loss(
            s_out.hidden_states[-1],
            _unwrap(model).get_output_embeddings(),
            t_final,
            t_head,
            labels,
            loss_cfg,
            workspace,
            cached,
        )
        if cfg.hidden is not None:
            mask = labels != -100
            loss = loss + hidden_term(s_out, mask, lambda layer: t_out.hidden_states[layer][mask], logs)
        return loss, logs

    def hidden_term(s_out, mask, teacher_at: Callable[[int], torch.Tensor], logs: dict) -> torch.Tensor:
        """The weighted hidden-state term over the student's positions `mask`; `teacher_at(i)`: the
        teacher's states of layer output i at the matching positions."""
        parts = []
        for s_layer, t_layer in cfg.hidden.layer_map.items():
            s_h = s_out.hidden_states[s_layer + 1][mask]
            if proj is not None:
                s_h = proj[str(s_layer)](s_h)
            parts.append(hidden_loss(s_h, teacher_at(t_layer + 1).to(s_h.device), cfg.hidden.loss))
        matched = torch.stack(parts).mean()
        logs["hidden"] = matched.item()
        return cfg.hidden.weight * matched

    def crossed(model, s_out, batch, ids, labels, loss_cfg, logs):
        """The step across tokenizers: the teacher's top-k at the positions aligned with the
        student's (live, or from the cache), hidden states matched there too."""
        view = cross.aligner(ids.cpu())
        aligned = (view.positions >= 0).to(ids.device)
        cached, t_states = None, None
        if KEYS[0] in batch:
            cached = tuple(batch[k] for k in KEYS)
        elif teacher is not None and (loss_cfg.alpha > 0 or cfg.hidden is not None):
            with torch.no_grad():
                t_states = teacher_states(teacher, view)
                cached = topk_at(t_head, t_states[-1], view.positions, cross.k, loss_cfg.temperature, t_workspace)
        head = _unwrap(model).get_output_embeddings()
        loss = cross_tokenizer_loss(
            s_out.hidden_states[-1], head, labels, aligned, cached, cross.vmap, loss_cfg, cross.loss
        )
        logs["aligned"] = fraction(aligned, labels)
        if cfg.hidden is not None:  # at the aligned positions
            mask = aligned & (labels != -100)
            on = mask.to(t_states[0].device)
            rows = torch.arange(len(on), device=on.device)[:, None].expand_as(on)[on]
            at = view.positions.to(on.device)[on]
            loss = loss + hidden_term(s_out, mask, lambda layer: t_states[layer][rows, at], logs)
        return loss, logs

    return step


def distill_train(
    student: torch.nn.Module,
    tokenizer,
    teacher: torch.nn.Module | None,
    cfg: Knobs,
    ctx,
    rows: dict | None = None,
) -> dict:
    """Train `student` (whose tokenizer is `tokenizer`) in place with the knobs of `cfg` (on
    `rows` when given); return the training summary."""
    if rows is None:
        blocks = ctx.train_blocks(cfg.seq_len or ctx.seq_len)
        if cfg.sequences is not None:
            rows = teacher_sequences(teacher, blocks, cfg.sequences, ctx.seed, ctx.cache / "generations", ctx.cache_key)
            ctx.info["teacher_sequences"] = len(rows["input_ids"])
        else:
            rows = blocks
    batches = Batches(rows, cfg.batch_size, ctx.seed)
    cross = None
    if cfg.cross_tokenizer is not None:
        cross = crossing(cfg.cross_tokenizer, student, tokenizer, ctx.teacher)
        first = batches(0)
        labels = first["labels"] if "labels" in first else shift_labels(first["input_ids"])
        ctx.info["cross_tokenizer"] = {
            "loss": cross.loss,
            "top_k": cross.k,
            "mapped_teacher_tokens": int((cross.vmap >= 0).sum()),
            "aligned_first_batch": round(fraction(cross.aligner(first["input_ids"]).positions >= 0, labels), 4),
        }
    if cfg.teacher_cache is not None:
        batches, teacher = from_cache(teacher, batches, cfg, ctx, cross), None  # the teacher runs no more
    proj = projections(cfg, student, teacher, ctx.seed)
    frozen = teacher if isinstance(teacher, torch.nn.Module) else None  # a text-only teacher has no weights
    with sharded([student, frozen], ctx.device) as (student_replica, teacher_replica):
        summary = train(
            student_replica,
            kd_step(teacher_replica if frozen is not None else teacher, cfg, ctx.seed, proj, cross),
            batches,
            cfg,
            device=ctx.device,
            seed=ctx.seed,
            description=ctx.name,
            checkpoint_dir=ctx.checkpoints or ctx.scratch,
            extra_module=proj,
        )
    if launch.rank() > 0:
        raise launch.Trained
    return summary


def from_cache(
    teacher: torch.nn.Module, batches: Batches, cfg: Knobs, ctx, cross: Crossing | None = None
) -> Callable[[int], dict]:
    """`batches` with the teacher's top-k log-probabilities of their rows beside them, from the
    shared cache (the rows the training visits captured first where they are not there yet);
    ctx.info["teacher_cache"] says what it held, made and saved."""
    micro_batches = cfg.steps * cfg.grad_accum
    visited = sorted({r for step in range(micro_batches) for r in batches.indices(step).tolist()})
    ids, T = batches.rows["input_ids"], cfg.loss.temperature
    reader, aligner = (cross.reader, cross.aligner) if cross is not None else (None, None)
    path = folder(ctx.cache, ctx.cache_key, ids, cfg.teacher_cache.k, T, reader, cfg.teacher_cache.tail_samples)
    with torch.no_grad():
        captured, stats = capture(teacher, ids, visited, cfg.teacher_cache, T, path, aligner)
    ctx.info["teacher_cache"] = {
        "k": cfg.teacher_cache.k,
        **stats,
        "rows": len(visited),
        "teacher_forwards_saved": micro_batches,  # each of batch_size rows
        "folder": path.name,
    }

    def batch(step: int) -> dict:
        return batches(step) | captured.take(batches.indices(step).tolist())

    return batch


# --- which teacher a recovery distills from ------------------------------------------------------


class Recovery(Knobs):
    """Distillation that heals a model: from the ORIGINAL teacher (default), the model as it was
    before this stage (`input`), or no teacher at all (`none`: plain cross-entropy)."""

    teacher: Literal["original", "input", "none"] = "original"

    def teacher_shape(self, before: dict, teacher: dict | None) -> dict | None:
        """The shape of the model this stage distills from (None: no teacher is loaded)."""
        return {"original": teacher, "input": before, "none": None}[self.teacher]

    @model_validator(mode="after")
    def _cached_original(self) -> "Recovery":
        if self.teacher_cache is not None and self.teacher != "original":
            raise ValueError(
                f"teacher_cache: holds the original teacher's logits, shared by every stage; teacher: {self.teacher} "
                "has none to share (use teacher: original, or leave teacher_cache out)"
            )
        if self.cross_tokenizer is not None and self.teacher != "original":
            raise ValueError(
                f"cross_tokenizer: teacher: {self.teacher} is the stage's own input, which has the student's "
                "tokenizer (use teacher: original, or leave cross_tokenizer out)"
            )
        if self.cross_tokenizer is not None and self.sequences is not None:
            raise ValueError(
                "cross_tokenizer: the teacher's sequences across tokenizers are written as text by a distill "
                "stage; leave sequences out here"
            )
        return self

    def same_tokens_field(self) -> str | None:
        return super().same_tokens_field() if self.teacher == "original" else None

    def logits_field(self) -> str | None:
        """The setting that needs the teacher's logits (a text-only teacher has none)."""
        return "teacher" if self.teacher == "original" else None

    @model_validator(mode="after")
    def _teacherless(self) -> "Recovery":
        if self.teacher == "none":
            used = [k for k in ("hidden", "sequences", "on_policy") if getattr(self, k) is not None]
            if used:
                raise ValueError(f"teacher: none (plain cross-entropy) cannot use {', '.join(used)}")
        return self


def check_recovery(cfg: Recovery, shape: dict, teacher_shape: dict) -> dict:
    """Check the knobs against the model it distills from; a recovery keeps the shape."""
    check_knobs(cfg, shape, shape if cfg.teacher == "input" else teacher_shape)
    return shape


def recovery_start(model: torch.nn.Module, ctx) -> tuple[torch.nn.Module, torch.nn.Module | None, Recovery]:
    """The model to train (in fp32), the model to distill it from, and the config to train with
    (CE only when there is no teacher); ctx.info records the choice."""
    model, cfg = model.float(), ctx.config
    ctx.info.update(teacher=cfg.teacher, params=count_params(model))
    if cfg.teacher == "none":
        return model, None, ce_only(cfg)
    if cfg.teacher == "input":
        return model, copy.deepcopy(model).eval().requires_grad_(False), cfg
    return model, ctx.teacher.model, cfg
