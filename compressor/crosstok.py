"""Distillation across tokenizers: a teacher of another family keeps its own tokenizer.

The student's rows are text cut into its tokens. For the teacher, each row's text is decoded
and tokenized again by the teacher's tokenizer (`Aligner`); special tokens (a document's EOS or
BOS) split a row into segments, each re-tokenized on its own and joined by the teacher's own
document separator. Two positions are ALIGNED when both models, having read the same text,
predict the token that starts at the same character: the character offsets where both
tokenizations start a token (a clean prefix on both sides). Only there do the two next-token
distributions describe the same event; inside a span one tokenizer cuts and the other does not,
the student's positions get cross-entropy only. (TRL's GOLD instead merges each span's
positions into one distribution by a product of their probabilities; matching only the aligned
positions needs no such assumption, and on English text most word starts align.)

At an aligned position the teacher's top-k (ids, log-probs, tail log-mass: the same tuple the
teacher-logit cache stores, so live and cached training run the same loss) meets the student's
full distribution through one of three losses (`CrossTokenizer.loss`):

- `uld`: Universal Logit Distillation (Boizard et al. 2024): the L1 distance between the two
  distributions sorted by probability (the closed form of Wasserstein-1 under a uniform cost),
  here over the top k ranks of each plus the difference of the masses left outside them;
- `mapped`: an exact vocabulary map (token texts equal, e.g. " the" in both) turns the
  teacher's top-k into student tokens: the forward KL over those tokens and one bucket for all
  else (the teacher's unmapped and tail mass, the student's rest), exact for the buckets;
- `hybrid` (GOLD's split): `mapped` weighted by the teacher's mass the map covers, plus `uld`
  between the unmapped rest of each, weighted by the rest.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field


class CrossTokenizer(BaseModel):
    """`cross_tokenizer: {loss: hybrid}`: logit distillation from a teacher with its own tokenizer."""

    model_config = ConfigDict(extra="forbid")

    loss: Literal["uld", "hybrid", "mapped"] = "hybrid"
    top_k: int = Field(64, ge=1, le=1024, description="the teacher's tokens kept per aligned position")


def _decode(tokenizer, rows: list[list[int]]) -> list[str]:
    return tokenizer.batch_decode(rows, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def token_texts(tokenizer, size: int) -> list[str | None]:
    """Each id's text as it reads inside a sequence (after another token, so a leading space is
    kept); None for special tokens, ids past the tokenizer, and byte pieces of a character."""
    anchor = tokenizer("a", add_special_tokens=False).input_ids
    prefix = _decode(tokenizer, [anchor])[0]
    known = min(size, len(tokenizer))
    texts = _decode(tokenizer, [anchor + [i] for i in range(known)])
    special = set(tokenizer.all_special_ids)
    out: list[str | None] = [None] * size
    for i, text in enumerate(texts):
        piece = text[len(prefix) :] if text.startswith(prefix) else ""
        if i not in special and piece and "\ufffd" not in piece:
            out[i] = piece
    return out


def vocabulary_map(teacher_tokenizer, teacher_vocab: int, student_tokenizer, student_vocab: int) -> torch.Tensor:
    """[teacher_vocab] student id whose text equals the teacher token's, or -1."""
    student_ids: dict[str, int] = {}
    for i, text in enumerate(token_texts(student_tokenizer, student_vocab)):
        if text is not None:
            student_ids.setdefault(text, i)
    texts = token_texts(teacher_tokenizer, teacher_vocab)
    return torch.tensor([student_ids.get(t, -1) if t is not None else -1 for t in texts], dtype=torch.int64)


@dataclass
class Crossing:
    """What a training step needs to distill across tokenizers."""

    aligner: "Aligner"
    vmap: torch.Tensor  # [teacher vocabulary] -> student id or -1
    loss: str
    k: int
    reader: str  # the student tokenizer's digest: cached teacher captures of its rows are named by it


def crossing(cfg: CrossTokenizer, student: torch.nn.Module, tokenizer, teacher) -> Crossing:
    """The aligner and vocabulary map of a student (its tokenizer) and a teacher (models.Loaded)."""
    from .families import sequence_bos

    vocab = teacher.model.get_output_embeddings().weight.shape[0]
    vmap = vocabulary_map(teacher.tokenizer, vocab, tokenizer, student.get_output_embeddings().weight.shape[0])
    aligner = Aligner(tokenizer, teacher.tokenizer, sequence_bos(teacher.model.config, teacher.tokenizer))
    reader = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()
    return Crossing(aligner, vmap, cfg.loss, cfg.top_k, reader)


def same_tokenizer(a, b) -> bool:
    """Whether two tokenizers turn text into the same ids (same vocabulary, same special tokens)."""
    return a.get_vocab() == b.get_vocab() and a.all_special_ids == b.all_special_ids


@dataclass
class View:
    """The teacher's side of a batch of student rows [B, L]."""

    input_ids: torch.Tensor  # [B, Lt], right-padded
    attention_mask: torch.Tensor  # [B, Lt]
    positions: torch.Tensor  # [B, L]: the teacher position aligned with each student position, or -1


class Aligner:
    """Student rows -> the teacher's tokens of the same text and the aligned positions."""

    def __init__(self, student_tokenizer, teacher_tokenizer, teacher_bos: int | None):
        self.student, self.teacher = student_tokenizer, teacher_tokenizer
        self.specials = set(student_tokenizer.all_special_ids)
        self.bos = teacher_bos  # a family whose sequences start with BOS (Gemma): its documents too
        separator = teacher_bos if teacher_bos is not None else teacher_tokenizer.eos_token_id
        self.separator = separator
        pad = teacher_tokenizer.pad_token_id
        self.pad = pad if pad is not None else (separator if separator is not None else 0)

    def __call__(self, ids: torch.Tensor) -> View:
        rows = [self._row(row.tolist()) for row in ids]
        width = max(len(t) for t, _ in rows)
        t_ids = torch.full((len(rows), width), self.pad, dtype=torch.int64)
        mask = torch.zeros((len(rows), width), dtype=torch.int64)
        positions = torch.full(ids.shape, -1, dtype=torch.int64)
        for b, (t, pairs) in enumerate(rows):
            t_ids[b, : len(t)] = torch.tensor(t)
            mask[b, : len(t)] = 1
            for s, j in pairs:
                positions[b, s] = j
        return View(t_ids, mask, positions)

    def _row(self, ids: list[int]) -> tuple[list[int], list[tuple[int, int]]]:
        """The teacher's ids of a student row and its (student, teacher) aligned position pairs."""
        teacher = [self.bos] if self.bos is not None else []
        pairs: list[tuple[int, int]] = []
        start = 0
        for end in [i for i, t in enumerate(ids) if t in self.specials] + [len(ids)]:
            if end > start:
                if start > 0 and self.separator is not None and (teacher[-1:] != [self.separator]):
                    teacher.append(self.separator)
                s_before = start - 1 if start > 0 else None  # the special before the segment
                t_before = len(teacher) - 1 if teacher else None
                if s_before is not None and t_before is not None:
                    pairs.append((s_before, t_before))  # both predict the segment's first token
                segment = self._segment(ids[start:end])
                if segment is not None:
                    t_ids, matched = segment
                    pairs += [(start + i - 1, len(teacher) + j - 1) for i, j in matched]
                    teacher += t_ids
            start = end + 1
        return teacher, pairs

    def _segment(self, ids: list[int]) -> tuple[list[int], list[tuple[int, int]]] | None:
        """The teacher's ids of a run of the student's ordinary tokens, and the (i, j) token
        indices where both tokenizations start a token at the same character (i, j > 0)."""
        text = _decode(self.student, [ids])[0]
        t_ids = self.teacher(text, add_special_tokens=False).input_ids
        if not t_ids:
            return None
        s_starts = _starts(self.student, ids, text)
        t_text = _decode(self.teacher, [t_ids])[0]
        shift = text.find(t_text) if t_text else -1  # a decoder may strip a leading space
        if shift < 0 or len(t_text) + shift != len(text):
            return t_ids, []
        t_starts = {at + shift: j for j, at in _starts(self.teacher, t_ids, t_text).items()}
        return t_ids, [(i, t_starts[at]) for i, at in s_starts.items() if at in t_starts]


def _starts(tokenizer, ids: list[int], text: str) -> dict[int, int]:
    """{token index i > 0: the character of `text` where it starts}, for the tokens whose prefix
    decodes cleanly (a prefix of the text; not inside a character's bytes)."""
    prefixes = _decode(tokenizer, [ids[:i] for i in range(1, len(ids))])
    return {i: len(p) for i, p in enumerate(prefixes, start=1) if p and text.startswith(p)}


# --- the losses --------------------------------------------------------------------------------


def _sorted_l1(p: torch.Tensor, q: torch.Tensor, p_mass=1.0, q_mass=1.0) -> torch.Tensor:
    """ULD over the top ranks: sum |p_(r) - q_(r)| over the k ranks of two descending [N, k]
    probability vectors, plus the difference of the masses outside them (of totals p_mass, q_mass)."""
    return (p - q).abs().sum(-1) + ((p_mass - p.sum(-1)) - (q_mass - q.sum(-1))).abs()


def cross_divergence(
    s_logp: torch.Tensor, cached: tuple[torch.Tensor, ...], vmap: torch.Tensor, loss: str
) -> torch.Tensor:
    """Per-position divergence [N] between the teacher's top-k (ids in its vocabulary [N, k],
    log-probs [N, k], tail log-mass [N], at T) and the student's log-probs [N, V] at T."""
    ids, t_logp, t_tail = cached
    buckets = torch.cat([t_logp.float(), t_tail.float()[:, None]], 1).log_softmax(-1)  # as the cache
    p = buckets[:, :-1].exp()
    k = p.shape[1]
    if loss == "uld":
        return _sorted_l1(p, s_logp.topk(k, dim=-1).values.exp())
    mapped = vmap.to(ids.device)[ids]  # [N, k] student ids, -1 unmapped
    on = mapped >= 0
    # the teacher's mass per student token (two teacher tokens may read the same), dense over V
    p_s = torch.zeros_like(s_logp).scatter_add_(-1, mapped.clamp(min=0), torch.where(on, p, 0.0))
    covered = p_s.sum(-1)
    has = p_s > 0
    # the rest on each side: the student's tokens no mapped teacher token reads as (never log 0:
    # a student whose every token is mapped here keeps a floor), the teacher's unmapped and tail mass
    s_rest = s_logp.masked_fill(has, float("-inf")).logsumexp(-1).clamp(min=-69.0)
    t_rest = torch.where(on, 0.0, p).sum(-1) + buckets[:, -1].exp()
    kl = (p_s * (p_s.clamp(min=1e-30).log() - s_logp)).masked_fill(~has, 0.0).sum(-1)
    kl = kl + torch.where(t_rest > 0, t_rest * (t_rest.clamp(min=1e-30).log() - s_rest), 0.0)
    if loss == "mapped":
        return kl
    t_unmapped = torch.where(on, 0.0, p).sort(-1, descending=True).values
    s_unmapped = s_logp.masked_fill(has, float("-inf")).topk(k, dim=-1).values.exp()
    return covered * kl + (1 - covered) * _sorted_l1(t_unmapped, s_unmapped, t_rest, s_rest.exp())


def cross_tokenizer_loss(
    s_hidden: torch.Tensor,
    s_head: torch.nn.Linear,
    labels: torch.Tensor,
    aligned: torch.Tensor,
    cached: tuple[torch.Tensor, ...],
    vmap: torch.Tensor,
    cfg,
    loss: str,
) -> torch.Tensor:
    """alpha T^2 x the mean divergence over aligned positions + (1 - alpha) x the mean
    cross-entropy over labelled ones. `aligned` [B, L] marks the positions whose teacher top-k
    is in `cached` (tensors [B, L, ...]); the student's logits are made a chunk of positions at a
    time and recomputed in backward, so memory stays O(chunk x vocabulary)."""
    from torch.utils.checkpoint import checkpoint

    from .losses import kd_loss

    alpha, T = cfg.alpha, cfg.temperature
    total = s_hidden.new_zeros((), dtype=torch.float32)
    if alpha < 1:
        ce = cfg.model_copy(update={"alpha": 0.0})
        total = total + (1 - alpha) * kd_loss(s_hidden, s_head, None, None, labels, ce)
    mask = aligned & (labels != -100)
    n = int(mask.sum())
    if alpha == 0 or n == 0:
        return total
    h = s_hidden[mask]
    rows = [c[mask.to(c.device)].to(h.device) for c in cached]
    rows[0] = rows[0].long()

    def part(h_part, *c_part):
        z = torch.nn.functional.linear(h_part, s_head.weight, s_head.bias).float() / T
        return cross_divergence(z.log_softmax(-1), c_part, vmap, loss).sum()

    kd = h.new_zeros((), dtype=torch.float32)
    for start in range(0, n, cfg.chunk_tokens):
        piece = slice(start, start + cfg.chunk_tokens)
        kd = kd + checkpoint(part, h[piece], *[c[piece] for c in rows], use_reentrant=False)
    return total + alpha * T * T * kd / n


def fraction(aligned: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of the labelled positions that are aligned."""
    valid = labels != -100
    return float((aligned & valid).sum()) / max(1, int(valid.sum()))
