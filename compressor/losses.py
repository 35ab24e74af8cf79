"""Knowledge-distillation losses, computed in chunks of tokens.

Logits are the memory wall of KD: batch x seq x vocab, for student and teacher, plus their
softmaxes and gradients. `kd_loss` never builds them whole: it takes the final hidden states
and projects, compares and back-propagates one chunk of tokens at a time (the chunk is
recomputed in backward), so peak memory is O(chunk x vocab). `kd_loss_naive` is the same
formula on whole logits; tests hold the two equal, value and gradients.

Per token:  alpha * T^2 * D(teacher_T, student_T) + (1 - alpha) * CE(student, label)
with D one of forward KL(t||s), reverse KL(s||t), generalized JSD(beta), total variation.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.checkpoint import checkpoint

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")


class LossConfig(BaseModel):
    """HOW the gap between teacher and student is measured."""

    model_config = ConfigDict(extra="forbid")

    divergence: Literal["forward_kl", "reverse_kl", "jsd", "tvd"] = "forward_kl"
    beta: float = Field(0.5, ge=0, le=1, description="JSD mixture weight: 0 = forward KL, 1 = reverse KL")
    temperature: float = Field(1.0, gt=0, le=100)
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the KD term; 1 - alpha goes to CE on labels")
    top_k: int | None = Field(None, ge=1, description="keep only the teacher's top-k logits per token")
    chunk_tokens: int = Field(1024, ge=1, description="tokens per chunk; peak memory ~ chunk x vocab")


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits are upcast: softmax differences vanish in half precision."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def divergence(s_logits: torch.Tensor, t_logits: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """Per-token divergence [N] between teacher and student logits [N, V] at temperature T.

    With top_k, the teacher keeps its k largest logits (renormalised). Forward KL then scores
    the student's full-vocabulary log-probs on those k tokens (the usual sparse-KD form); the
    other divergences compare both distributions renormalised over the same k tokens.
    """
    s = _at_least_fp32(s_logits) / cfg.temperature
    t = _at_least_fp32(t_logits) / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < t.shape[-1]:
        t, idx = t.topk(cfg.top_k, dim=-1)
        if cfg.divergence == "forward_kl":
            s_logp = s.log_softmax(-1).gather(-1, idx)
        else:
            s_logp = s.gather(-1, idx).log_softmax(-1)
    else:
        s_logp = s.log_softmax(-1)
    t_logp = t.log_softmax(-1)
    kind, beta = cfg.divergence, cfg.beta
    if kind == "jsd" and beta in (0.0, 1.0):
        kind = "forward_kl" if beta == 0.0 else "reverse_kl"
    if kind == "forward_kl":
        return (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    if kind == "reverse_kl":
        return (s_logp.exp() * (s_logp - t_logp)).sum(-1)
    if kind == "jsd":
        m_logp = torch.logsumexp(torch.stack([t_logp + math.log(beta), s_logp + math.log(1 - beta)]), dim=0)
        kl_t = (t_logp.exp() * (t_logp - m_logp)).sum(-1)
        kl_s = (s_logp.exp() * (s_logp - m_logp)).sum(-1)
        return beta * kl_t + (1 - beta) * kl_s
    return 0.5 * (t_logp.exp() - s_logp.exp()).abs().sum(-1)


def token_losses(
    s_logits: torch.Tensor, t_logits: torch.Tensor | None, labels: torch.Tensor, cfg: LossConfig
) -> torch.Tensor:
    """The summed per-token loss of a set of positions (labels -100 are skipped). With
    alpha = 0 it is plain cross-entropy and the teacher's logits are not needed."""
    valid = labels != -100
    total = s_logits.new_zeros((), dtype=torch.float32)
    if cfg.alpha > 0:
        kd = divergence(s_logits, t_logits, cfg) * cfg.temperature**2
        total = total + cfg.alpha * (kd * valid).sum()
    if cfg.alpha < 1:
        ce = F.cross_entropy(_at_least_fp32(s_logits), labels.clamp(min=0), reduction="none")
        total = total + (1 - cfg.alpha) * (ce * valid).sum()
    return total


def shift_labels(input_ids: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token labels aligned with positions: position i predicts token i+1."""
    labels = input_ids.new_full(input_ids.shape, -100)
    labels[:, :-1] = input_ids[:, 1:]
    if pad_mask is not None:
        labels[:, :-1][~pad_mask[:, 1:]] = -100
    return labels


def kd_loss(
    s_hidden: torch.Tensor,
    s_head: Callable[[torch.Tensor], torch.Tensor],
    t_hidden: torch.Tensor | None,
    t_head: Callable[[torch.Tensor], torch.Tensor] | None,
    labels: torch.Tensor,
    cfg: LossConfig,
) -> torch.Tensor:
    """Mean loss over valid tokens from final hidden states [B, L, H], chunk by chunk
    (teacher states may be None when alpha = 0: plain cross-entropy)."""
    y = labels.flatten()
    keep = y != -100
    s_flat, y = s_hidden.flatten(0, 1)[keep], y[keep]
    t_flat = t_hidden.flatten(0, 1)[keep] if cfg.alpha > 0 else None
    n = y.numel()
    if n == 0:
        return s_hidden.sum() * 0.0

    def chunk(sh: torch.Tensor, th: torch.Tensor | None, yy: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t_logits = t_head(th) if th is not None else None
        return token_losses(s_head(sh), t_logits, yy, cfg)

    total = s_hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, n, cfg.chunk_tokens):
        part = slice(start, start + cfg.chunk_tokens)
        th = t_flat[part] if t_flat is not None else None
        total = total + checkpoint(chunk, s_flat[part], th, y[part], use_reentrant=False)
    return total / n


def hidden_loss(s_hidden: torch.Tensor, t_hidden: torch.Tensor, kind: str) -> torch.Tensor:
    """Distance between (projected) student and teacher hidden states [N, D]: mean squared
    error, or 1 - cosine similarity averaged over tokens."""
    s, t = _at_least_fp32(s_hidden), _at_least_fp32(t_hidden)
    if kind == "mse":
        return F.mse_loss(s, t)
    return (1 - F.cosine_similarity(s, t, dim=-1)).mean()


def kd_loss_naive(
    s_logits: torch.Tensor, t_logits: torch.Tensor, labels: torch.Tensor, cfg: LossConfig
) -> torch.Tensor:
    """The same loss on whole logits [B, L, V]: the reference for tests and the benchmark."""
    y = labels.flatten()
    n = (y != -100).sum().clamp(min=1)
    return token_losses(s_logits.flatten(0, 1), t_logits.flatten(0, 1), y, cfg) / n
