"""Peak memory of each step of a run, estimated from the models' shapes and the recipe before any
work: a run that cannot fit the machine is refused in one line, naming what would make it fit,
instead of dying in its third hour. An estimate is a sum of named parts in bytes (the report of
a refusal lists the largest); `bench/scale.py` measures it against the peak resident memory of
the same work.

The parts, all float32 unless a dtype says otherwise:
- runtime: Python, torch and transformers with a model's code loaded (measured: RUNTIME), and in
  a run, lm-eval with its tasks' data and the recipe's text and tokens (RUN);
- weights: every parameter once (a stage works on float32 weights);
- training: gradients and Adam's two moments (3 more copies of the student), the teacher in its
  dtype, the activations kept for the backward pass, and the loss's [chunk × vocabulary] buffers;
- GPTQ: a second copy of the weights while the checkpoint loads or the result saves, the integer
  codes, every calibration block's hidden states (kept, and the next layer's being made), one
  decoder layer's work: its forward with eager attention and the value projections' mixed inputs
  beside all its Hessians, or GPTQ on its widest Linear, whichever is larger; and the logits of one
  batch when the head is quantized; layer by layer, one layer (or the embeddings) instead of the
  model;
- measurement: one batch's decoder activations and a slice of logits (`scoring.CHUNK_BYTES`); layer
  by layer (eval.layerwise), one decoder layer, the embeddings and head instead of the model.
"""

from __future__ import annotations

import os
from pathlib import Path

from .launch import world
from .models import head_dim
from .sharding import requested as sharding_requested

GIB = 1 << 30
RUNTIME = 500 << 20  # resident after importing torch + transformers and building a model (bench/scale.py)
# what `compressor run` holds besides: lm-eval and its tasks' data, the recipe's text and tokens
# (bench/scale.py's run part: ~1,000 MiB resident before a stage's first layer)
RUN = 500 << 20
DTYPE_BYTES = {"float32": 4, "auto": 4, "bfloat16": 2, "float16": 2}  # "auto" is float32 on CPU
# float32 values the backward pass keeps per token and layer, in units of the hidden width and of
# the MLP width: norms, q/k/v/o, residuals; gate, up, activation, product (sdpa keeps no scores)
SAVED_PER_HIDDEN, SAVED_PER_MLP = 10, 4


def parameters(shape: dict) -> int:
    """Parameters of a decoder of this shape: embeddings, attention, gated MLP, norms, head."""
    h, vocab = shape["hidden_size"], shape["vocab_size"]
    head = 0 if shape.get("tie_word_embeddings", True) else vocab * h
    return vocab * h + shape["num_hidden_layers"] * layer_parameters(shape) + h + head


def layer_parameters(shape: dict) -> int:
    """Parameters of one decoder layer: attention, gated MLP, two norms."""
    h, i = shape["hidden_size"], shape["intermediate_size"]
    heads, kv = shape["num_attention_heads"], shape.get("num_key_value_heads") or shape["num_attention_heads"]
    return h * head_dim(shape) * 2 * (heads + kv) + 3 * h * i + 2 * h


def machine_bytes() -> int:
    """Memory this process may use: the machine's, or its cgroup's limit when lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()  # "max" when unlimited
    except OSError:
        return total
    return min(total, int(limit)) if limit.isdigit() else total


def gptq(
    shape: dict, samples: int, batch: int, seq: int, lm_head: bool = False, layerwise: bool = False
) -> dict[str, int]:
    """GPTQ (and its calibration pass): the model in float32 and the calibration hidden states
    stay resident, one layer's work comes and goes. `layerwise` (compressor.layerwise): only the
    layer at work is resident, beside a copy being written; before the layers, the embeddings."""
    h, i, vocab = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    heads, kv = shape["num_attention_heads"], shape.get("num_key_value_heads") or shape["num_attention_heads"]
    width = heads * head_dim(shape)
    tokens = batch * seq
    # eager attention's scores and probabilities, and one KV head's value mixes (quant.ValueHessians)
    attention = 4 * (3 * batch * heads * seq * seq + batch * (heads // kv) * seq * h)
    mlp = 4 * tokens * 3 * i
    widest = max(h, i, width)
    # the calibration forward: every Hessian of the layer (q and k share one, gate and up another:
    # quant.Hessians) beside one batch's attention, or its MLP's activations with the widest input's
    # XᵀX on its way into its Hessian (quant.average_into)
    forward = 4 * (2 * h * h + kv * h * h + width * width + i * i) + max(attention, mlp + 4 * widest * widest)
    # then GPTQ, narrowest first, each Hessian its own workspace (quant.gptq): the widest, alone, with
    # one n × n temporary while it is reordered, and copies of its weight (reordered, codes)
    solve = 4 * (2 * widest * widest + 3 * h * i)
    p = parameters(shape)
    # loading maps the checkpoint while its tensors are copied in, saving serialises a copy: a
    # second model for a while; and the integers, a byte a weight, are held until saved
    weights = {"weights": 4 * p, "a second copy, loading or saving": 4 * p, "integer codes": p}
    if layerwise:
        weights = {"the module at work": module_at_work(shape)}
    parts = {
        "runtime": RUNTIME,
        **weights,
        "calibration hidden states": 4 * 2 * samples * seq * h,
        "one layer's work": max(forward, solve),
    }
    if lm_head:
        parts["head logits"] = 4 * tokens * vocab + 4 * h * h
    return parts


def module_at_work(shape: dict) -> int:
    """Layer by layer (compressor.layerwise): a decoder layer and the copy safetensors serialises
    when it is written, or the embeddings (or head) alone."""
    return 4 * max(2 * layer_parameters(shape), shape["vocab_size"] * shape["hidden_size"])


def cut_copy(before: dict, after: dict) -> int:
    """Pruning a layer at a time: a layer's cut copy and the copy safetensors serialises when it is
    written, or, when the hidden width shrinks, the cut embeddings (and head) beside the old."""
    tables = 1 if after.get("tie_word_embeddings", True) else 2
    cut_tables = (
        tables * after["vocab_size"] * after["hidden_size"] if after["hidden_size"] < before["hidden_size"] else 0
    )
    return 4 * max(2 * layer_parameters(after), cut_tables)


def training(
    shape: dict, teacher: dict | None, batch: int, seq: int, chunk_tokens: int, teacher_dtype: str, shards: int = 1
) -> dict[str, int]:
    """A distillation step: student, its gradients and Adam state, the teacher, the activations
    the backward pass keeps, and the chunked loss's logits (student, teacher, their softmaxes).
    Under FSDP over `shards` processes each holds 1/shards of the models and their state, but
    loads both whole first (compressor.sharding): the peak is the larger of the two."""
    p = parameters(shape)
    t = DTYPE_BYTES[teacher_dtype] * parameters(teacher) if teacher is not None else 0
    parts = {
        "runtime": RUNTIME,
        "student, gradients, Adam": 16 * p // shards,
        "activations": kept_activations(shape, batch * seq),
        "loss chunk": 4 * 4 * min(chunk_tokens, batch * seq) * shape["vocab_size"],
    }
    if teacher is not None:
        parts["teacher"] = t // shards
    if shards > 1:
        parts["models whole until sharded"] = max(0, 4 * p + t - (16 * p + t) // shards)
    return parts


def kept_activations(shape: dict, tokens: int) -> int:
    """What the backward pass keeps of a forward pass over `tokens` tokens."""
    per_token = SAVED_PER_HIDDEN * shape["hidden_size"] + SAVED_PER_MLP * shape["intermediate_size"]
    return 4 * tokens * shape["num_hidden_layers"] * per_token


def gradients(shape: dict, batch: int, seq: int) -> dict[str, int]:
    """One backward pass through the whole model without an optimiser (pruning's Taylor scores):
    weights and gradients, the kept activations, the batch's logits and their gradient."""
    return {
        "runtime": RUNTIME,
        "weights, gradients": 8 * parameters(shape),
        "activations": kept_activations(shape, batch * seq),
        "logits": 4 * 3 * batch * seq * shape["vocab_size"],
    }


def measuring(shape: dict, batch: int, seq: int, layerwise: bool = False) -> dict[str, int]:
    """Scoring a model: its weights, one batch through the decoder, one slice of logits.
    `layerwise` (eval.layerwise): embeddings, head and final norm stay, one decoder layer comes
    and goes (with the pages of the checkpoint it is copied from)."""
    from .scoring import CHUNK_BYTES

    h, vocab = shape["hidden_size"], shape["vocab_size"]
    if layerwise:
        tables = 1 if shape.get("tie_word_embeddings", True) else 2
        weights = {
            "embeddings, head": 4 * (tables * vocab * h + h),
            "one decoder layer": 4 * 2 * layer_parameters(shape),
        }
    else:
        weights = {"weights": 4 * parameters(shape)}
    return {
        "runtime": RUNTIME,
        **weights,
        "activations": 4 * batch * seq * (4 * h + 2 * shape["intermediate_size"]),
        "logits slice": min(CHUNK_BYTES, 4 * batch * seq * vocab),
    }


def _size(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2**20:.0f} MiB"


def for_training(cfg, student: dict, teacher: dict | None, run) -> tuple[dict[str, int], list[str]]:
    """A training stage's peak (`cfg` a kd.Knobs) and the settings that would lower it."""
    seq = cfg.seq_len or run.seq_len
    processes = world()  # each trains on 1/processes of the batch
    shards = processes if sharding_requested() else 1
    batch = -(-cfg.batch_size // processes)
    parts = training(student, teacher, batch, seq, cfg.loss.chunk_tokens, run.teacher_dtype, shards)
    fixes = []
    if teacher is not None and DTYPE_BYTES[run.teacher_dtype] == 4:
        fixes.append("teacher.dtype: bfloat16")
    if cfg.batch_size > 1:
        fixes.append(f"batch_size: {cfg.batch_size // 2} with grad_accum: {cfg.grad_accum * 2}")
    if parts["loss chunk"] > GIB:
        fixes.append(f"loss.chunk_tokens: {cfg.loss.chunk_tokens // 4}")
    if processes > 1:  # a launch's processes share this machine's memory
        parts = {f"{name} (x{processes} processes)": n * processes for name, n in parts.items()}
    return parts, fixes


def for_gptq(
    shape: dict, calibration, seq: int, lm_head: bool = False, layerwise: bool = False
) -> tuple[dict[str, int], list[str]]:
    """A GPTQ pass's peak (`calibration` a data.Calibration) and the settings that would lower it."""
    parts = gptq(shape, calibration.samples, calibration.batch_size, seq, lm_head, layerwise)
    fixes = []
    if calibration.samples > calibration.batch_size:
        fixes.append(f"calibration.samples: {max(calibration.batch_size, calibration.samples // 2)}")
    if calibration.batch_size > 1:
        fixes.append(f"calibration.batch_size: {calibration.batch_size // 2}")
    return parts, fixes


def in_a_run(parts: dict[str, int]) -> dict[str, int]:
    """An estimate of a step as `compressor run` takes it, its own holdings beside (RUN)."""
    return {**parts, "a run's lm-eval, text and tokens": RUN}


def fits(what: str, estimate: tuple[dict[str, int], list[str]]) -> None:
    """Raise ValueError with one line when `estimate` (parts, fixes) does not fit the machine:
    what needs how much, its three largest parts, the memory there is, the settings to try."""
    parts, fixes = estimate
    need, available = sum(parts.values()), machine_bytes()
    if need <= available:
        return
    largest = ", ".join(f"{k} {_size(v)}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1])[:3])
    fix = f"; try {' or '.join(fixes)}" if fixes else ""
    raise ValueError(
        f"{what} needs about {_size(need)} at its peak ({largest}), this machine has {_size(available)}{fix}"
    )
