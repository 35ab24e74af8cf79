"""The teacher's logits, paid for once: its top-k log-probabilities and the log of the mass left
outside them (the tail), captured per token of the training rows into the shared cache and
reused by every stage and ordering that distills from the same teacher on the same rows.

A KD step's teacher forward is half a CE step on SmolLM2 (reports/smollm2_lab.md); from the
cache a step runs none. The loss on the cache (`losses.kd_loss(..., cached=)`) is the exact
forward KL between the teacher's and the student's distributions over k + 1 buckets: the
teacher's top-k tokens, one by one, and everything else as one bucket. The stored fp16
log-probabilities and fp32 tail are renormalised over those buckets first, so the loss is exact
for what is stored.

A folder is named by content: the teacher and data identity (`ctx.cache_key`), a hash of all the
training rows' token ids, k and the temperature; a different teacher or text never reads
another's. In it, only the rows a training visits are captured (a few steps over a large text
visit a sliver of it), in parts of `PART` rows, each written to a temporary file renamed into
place; a later stage that visits other rows captures only those. A capture killed mid-way
resumes with the parts it wrote, and the rest falls into the same parts as an unkilled run's
(the missing rows, sorted, `PART` at a time), so the cache is the same bytes. Token ids are
stored as uint16 where the vocabulary fits (k x 4 + 4 bytes per token), else int32 (k x 6 + 4).
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors import safe_open
from safetensors.torch import save_file

from .losses import Workspace, head_logits
from .storage import digest

PART = 16  # rows per file: what a killed capture loses at most
KEYS = ("topk_ids", "topk_logp", "tail_logp")  # the batch fields a cached KD step reads


class TeacherCache(BaseModel):
    """`teacher_cache: {k: 64}`: train from the teacher's top-k log-probabilities captured once."""

    model_config = ConfigDict(extra="forbid")

    k: int = Field(64, ge=1, le=1024, description="teacher tokens kept per position; the rest is one bucket")
    batch_size: int = Field(4, ge=1, description="rows per teacher forward while capturing")


def folder(
    cache: Path, cache_key: str, ids: torch.Tensor, k: int, temperature: float, reader: str | None = None
) -> Path:
    """Where captures of (teacher and data, these token ids, k, temperature) live; `reader`
    names the student's tokenizer when the teacher reads the rows' text with its own
    (compressor.crosstok): the same ids are other text under another tokenizer."""
    rows = hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
    parts = [cache_key, rows, list(ids.shape), k, temperature] + ([reader] if reader is not None else [])
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
    Returns what reads them, and {"captured_rows", "capture_seconds", "bytes_per_token"}."""
    from .progress import Bar

    head = teacher.get_output_embeddings()
    vocab = head.weight.shape[0]
    wide, k = vocab > 1 << 16, min(cfg.k, vocab)
    path.mkdir(parents=True, exist_ok=True)
    where = _held(path)
    missing = sorted(set(rows) - where.keys())
    start, ws = time.time(), Workspace()
    if missing:
        with Bar("teacher logits (cache)", len(missing), unit="row") as bar:
            for p in range(0, len(missing), PART):
                part = missing[p : p + PART]
                out = [_topk(teacher, head, b, k, temperature, ws, aligner) for b in ids[part].split(cfg.batch_size)]
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
def _topk(teacher, head, ids: torch.Tensor, k: int, temperature: float, ws: Workspace, aligner=None):
    """(top-k ids, their log-probs in fp16, the tail's log-mass) of a batch of rows [B, L]; with
    an `aligner` (compressor.crosstok) the teacher reads its own tokens of the rows' text and
    each student position gets the top-k of its aligned teacher position (zeros where none)."""
    if aligner is None:
        h = teacher(input_ids=ids.to(teacher.device), output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
        return topk_of(head, h.flatten(0, 1), k, temperature, ws, ids.shape)
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
def topk_of(head, flat: torch.Tensor, k: int, temperature: float, ws: Workspace, shape, chunk: int = 1024):
    """(top-k ids, log-probs in fp16, the tail's log-mass) of final states [N, H], reshaped to
    `shape`, a chunk of tokens at a time through the head (a 262k vocabulary's logits are the memory)."""
    top, logp, tail = [], [], []
    for part in flat.split(chunk):
        size = (len(part), head.weight.shape[0])
        z = head_logits(part, head.weight, getattr(head, "bias", None), ws.take("z", size, part.device))
        z = torch.log_softmax(z.div_(temperature), -1, out=ws.take("logp", size, part.device))
        values, idx = z.topk(k, dim=-1)
        rest = z.scatter_(-1, idx, float("-inf")).logsumexp(-1)  # z is spent
        top.append(idx.cpu())
        logp.append(values.to(torch.float16).cpu())
        tail.append(rest.cpu())
    return (
        torch.cat(top).reshape(*shape, k),
        torch.cat(logp).reshape(*shape, k),
        torch.cat(tail).reshape(shape),
    )
