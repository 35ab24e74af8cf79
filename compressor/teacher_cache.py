"""The teacher's logits, paid for once: k slots per token of the training rows, captured into the
shared cache and reused by every stage and ordering that distills from the same teacher on the
same rows.

A KD step's teacher forward is half a CE step on SmolLM2 (reports/smollm2_lab.md); from the
cache a step runs none. The slots hold the teacher's top k - m tokens with their log-probabilities
and m tokens drawn from the rest (the tail) by systematic sampling, each weighing 1/m of the tail's
mass (`_tail_draws`; m = `tail_samples`, half the slots by default); the loss on them
(`losses.kd_loss(..., cached=)`) is the forward KL from that distribution to the student's, whose
gradient is the full-vocabulary one in expectation. With m = 0 the top k are kept and the rest is
one bucket, whose log-mass is stored: the loss is then the exact forward KL over k + 1 buckets,
which teaches the tail's total but not its shape (+4 to 6% perplexity against live KD on SmolLM2,
where the draws are within 1%: docs/distillation.md). Stored fp16 log-probabilities are
renormalised over the slots first, so the loss is exact for what is stored.

A folder is named by content: the teacher and data identity (`ctx.cache_key`), a hash of all the
training rows' token ids, k, m and the temperature; a different teacher or text never reads
another's. In it, only the rows a training visits are captured (a few steps over a large text
visit a sliver of it), in parts of `PART` rows, each written to a temporary file renamed into
place; a later stage that visits other rows captures only those. A capture killed mid-way
resumes with the parts it wrote, and the rest falls into the same parts as an unkilled run's
(the missing rows, sorted, `PART` at a time; a part's draws seeded by its rows), so the cache is
the same bytes. Token ids are stored as uint16 where the vocabulary fits (k x 4 + 4 bytes per
token), else int32 (k x 6 + 4).
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors import safe_open
from safetensors.torch import save_file

from .losses import Workspace, head_logits
from .storage import digest

PART = 16  # rows per file: what a killed capture loses at most
KEYS = ("topk_ids", "topk_logp", "tail_logp")  # the batch fields a cached KD step reads


class TeacherCache(BaseModel):
    """`teacher_cache: {k: 64}`: train from the teacher's log-probabilities captured once."""

    model_config = ConfigDict(extra="forbid")

    k: int = Field(64, ge=1, le=1024, description="teacher tokens kept per position (its top ones and tail draws)")
    tail_samples: int | None = Field(  # 0 is left out of stage keys: bucketed caches' keys stay valid
        None,
        ge=0,
        description="of the k slots, how many are drawn from the tail (0: the tail is one bucket; default k // 2)",
        exclude_if=lambda n: n == 0,
    )
    batch_size: int = Field(4, ge=1, description="rows per teacher forward while capturing")

    @model_validator(mode="after")
    def _head_left(self) -> "TeacherCache":
        if self.tail_samples is not None and self.tail_samples >= self.k:
            raise ValueError(
                f"tail_samples ({self.tail_samples}) must leave some of the k ({self.k}) slots to the top tokens"
            )
        return self

    def resolved(self, across_tokenizers: bool = False) -> "TeacherCache":
        """The default `tail_samples` made explicit: half the slots, none across tokenizers (the
        cross-tokenizer losses read the tail as one bucket: they are not linear in its probabilities)."""
        if self.tail_samples is not None:
            return self
        return self.model_copy(update={"tail_samples": 0 if across_tokenizers else self.k // 2})


def folder(
    cache: Path,
    cache_key: str,
    ids: torch.Tensor,
    k: int,
    temperature: float,
    reader: str | None = None,
    tail_samples: int = 0,
) -> Path:
    """Where captures of (teacher and data, these token ids, k, temperature, tail samples) live;
    `reader` names the student's tokenizer when the teacher reads the rows' text with its own
    (compressor.crosstok): the same ids are other text under another tokenizer."""
    rows = hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
    parts = [cache_key, rows, list(ids.shape), k, temperature] + ([reader] if reader is not None else [])
    parts += [f"tail_samples={tail_samples}"] if tail_samples else []  # bucketed caches keep their names
    return cache / "teacher-logits" / digest(parts)


class Captured:
    """The captures of one folder, read a batch's rows at a time (a long training's rows need not
    fit in memory: only the batch's are read, each from its part)."""

    def __init__(self, where: dict[int, tuple[Path, int]], bytes_per_token: int):
        self.where, self.bytes_per_token = where, bytes_per_token

    def take(self, rows: list[int]) -> dict[str, torch.Tensor]:
        """{"topk_ids", "topk_logp", "tail_logp"} of `rows`, stacked in their order."""
        out: dict[str, list] = {key: [] for key in KEYS}
        for r in rows:
            file, i = self.where[r]
            with safe_open(file, "pt") as f:
                for key in KEYS:
                    out[key].append(f.get_slice(key)[i : i + 1])
        return {key: torch.cat(parts) for key, parts in out.items()}


def capture(
    teacher: torch.nn.Module,
    ids: torch.Tensor,
    rows: list[int],
    cfg: TeacherCache,
    temperature: float,
    path: Path,
    aligner=None,
) -> tuple[Captured, dict]:
    """The teacher's top-k log-probabilities at `temperature` and the tail's log-mass at every
    position of the rows `rows` of `ids` [N, L] (with an `aligner`, at the teacher's positions
    aligned with them: compressor.crosstok): those not in `path` yet are computed into it.
    Returns what reads them, and {"captured_rows", "capture_seconds", "bytes_per_token", "tail_samples"}
    (the draws per position: none where k holds the whole vocabulary)."""
    from .progress import Bar

    cfg = cfg.resolved(across_tokenizers=aligner is not None)
    head = teacher.get_output_embeddings()
    vocab = head.weight.shape[0]
    wide, k = vocab > 1 << 16, min(cfg.k, vocab)
    samples = cfg.tail_samples if cfg.k < vocab else 0  # k holds the whole vocabulary: no tail
    path.mkdir(parents=True, exist_ok=True)
    where = _held(path)
    missing = sorted(set(rows) - where.keys())
    start, ws = time.time(), Workspace()
    if missing:
        with Bar("teacher logits (cache)", len(missing), unit="row") as bar:
            for p in range(0, len(missing), PART):
                part = missing[p : p + PART]
                draws = torch.Generator().manual_seed(int(digest(part)[:15], 16))  # a part's draws: resumes alike
                out = [
                    _topk(teacher, head, b, k, temperature, ws, aligner, samples, draws)
                    for b in ids[part].split(cfg.batch_size)
                ]
                tensors = {key: torch.cat([o[i] for o in out]) for i, key in enumerate(KEYS)}
                tensors["topk_ids"] = tensors["topk_ids"].to(torch.int32 if wide else torch.uint16)
                tensors["row"] = torch.tensor(part)
                name = path / f"{digest(part)}.safetensors"
                tmp = name.with_suffix(f".{os.getpid()}.tmp")  # a launch's processes capture side by side
                save_file(tensors, tmp)
                tmp.replace(name)
                where.update({r: (name, i) for i, r in enumerate(part)})
                bar.update(len(part))
    per_token = k * (4 if wide else 2) + k * 2 + 4  # ids, fp16 log-probs, fp32 tail
    stats = {
        "captured_rows": len(missing),
        "capture_seconds": time.time() - start if missing else 0.0,
        "bytes_per_token": per_token,
        "tail_samples": samples,
    }
    return Captured(where, per_token), stats


def _held(path: Path) -> dict[int, tuple[Path, int]]:
    """{row: (its file, its place there)} of the parts already in `path`."""
    where = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            where.update({r: (file, i) for i, r in enumerate(f.get_tensor("row").tolist())})
    return where


@torch.no_grad()
def _topk(teacher, head, ids, k: int, temperature: float, ws: Workspace, aligner=None, samples=0, draws=None):
    """(top-k ids, their log-probs in fp16, the tail's log-mass) of a batch of rows [B, L]; with
    an `aligner` (compressor.crosstok) the teacher reads its own tokens of the rows' text and
    each student position gets the top-k of its aligned teacher position (zeros where none)."""
    if aligner is None:
        h = teacher(input_ids=ids.to(teacher.device), output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
        return topk_of(head, h.flatten(0, 1), k, temperature, ws, ids.shape, samples=samples, draws=draws)
    view = aligner(ids)
    h = teacher_states(teacher, view)[-1]
    return topk_at(head, h, view.positions, k, temperature, ws)


def teacher_states(teacher, view) -> tuple[torch.Tensor, ...]:
    """The teacher's hidden states (every layer's) on its side of a batch (crosstok.View)."""
    return teacher(
        input_ids=view.input_ids.to(teacher.device),
        attention_mask=view.attention_mask.to(teacher.device),
        output_hidden_states=True,
        logits_to_keep=1,
    ).hidden_states


def topk_at(head, h: torch.Tensor, positions: torch.Tensor, k: int, temperature: float, ws: Workspace):
    """`topk_of` the teacher's final states h [B, Lt, H] at `positions` [B, L] (-1: none, zeros)."""
    on = positions >= 0
    rows = torch.arange(len(h))[:, None].expand_as(positions)
    found = topk_of(head, h[rows[on], positions[on]], k, temperature, ws, (int(on.sum()),))
    out = []
    for part, dtype in zip(found, (torch.int64, torch.float16, torch.float32)):
        full = torch.zeros((*positions.shape, *part.shape[1:]), dtype=dtype)
        full[on] = part.to(dtype)
        out.append(full)
    return tuple(out)


@torch.no_grad()
def topk_of(
    head, flat: torch.Tensor, k: int, temperature: float, ws: Workspace, shape, chunk: int = 1024, samples=0, draws=None
):
    """(top-k ids, log-probs in fp16, the tail's log-mass) of final states [N, H], reshaped to
    `shape`, a chunk of tokens at a time through the head (a 262k vocabulary's logits are the memory).
    With `samples` m, the last m of the k slots are tail tokens drawn by `_tail_draws`."""
    top, logp, tail = [], [], []
    for part in flat.split(chunk):
        size = (len(part), head.weight.shape[0])
        z = head_logits(part, head.weight, getattr(head, "bias", None), ws.take("z", size, part.device))
        z = torch.log_softmax(z.div_(temperature), -1, out=ws.take("logp", size, part.device))
        values, idx = z.topk(k - samples, dim=-1)
        rest = z.scatter_(-1, idx, float("-inf")).logsumexp(-1)  # z is the tail's log-probs
        if samples:
            drawn, weight = _tail_draws(z, rest, samples, draws)  # z is spent
            idx, values, rest = (
                torch.cat([idx, drawn], -1),
                torch.cat([values, weight], -1),
                torch.full_like(rest, float("-inf")),
            )
        top.append(idx.cpu())
        logp.append(values.to(torch.float16).cpu())
        tail.append(rest.cpu())
    return (
        torch.cat(top).reshape(*shape, k),
        torch.cat(logp).reshape(*shape, k),
        torch.cat(tail).reshape(shape),
    )


def _tail_draws(tail_logp: torch.Tensor, mass: torch.Tensor, m: int, draws: torch.Generator):
    """m tokens drawn from each row's tail (log-probs [n, V], -inf on the top tokens; log-mass [n])
    by systematic sampling, each with log-weight mass - log m: ids and log-weights [n, m].

    A tail token of probability p_j is drawn m p_j / mass times in expectation, so the drawn
    slots' weights sum, token by token, to an unbiased estimate of the tail, and the KD gradient
    on them (q - p~) is an unbiased estimate of the full-vocabulary gradient, where one bucket
    teaches only the tail's total (Anshumann et al. 2025 show top-k alone biases the student).
    One uniform offset per row and m evenly spaced points (not m independent draws): every token
    holding more than 1/m of the tail is drawn, and the estimate's variance is lower."""
    n = len(mass)
    cdf = tail_logp.sub_(mass[:, None]).exp_().cumsum_(-1)  # in place: the tail's CDF
    offset = torch.rand(n, generator=draws).to(cdf.device)
    points = (offset[:, None] + torch.arange(m, device=cdf.device)) / m * cdf[:, -1:]
    ids = torch.searchsorted(cdf, points, right=True).clamp_(max=cdf.shape[1] - 1)
    weight = (mass - torch.log(torch.tensor(float(m))))[:, None].expand(n, m)
    empty = ~torch.isfinite(mass)  # no tail (k covers the vocabulary's mass): no weight
    return ids.masked_fill_(empty[:, None], 0), weight.masked_fill(empty[:, None], float("-inf"))
