"""Knowledge-distillation losses, computed in chunks of tokens.

Logits are the memory wall of KD: batch x seq x vocab, for student and teacher, plus their
softmaxes and gradients. `kd_loss` never builds them whole: it takes the final hidden states
and projects, compares and differentiates one chunk of tokens at a time during the forward
pass, keeping only the gradients of the hidden states and of the head, so peak memory is
O(chunk x vocab) and each head runs once. `kd_loss_naive` is the same formula on whole
logits; tests hold the two equal, value and gradients.

Per token:  alpha * T^2 * D(teacher_T, student_T) + (1 - alpha) * CE(student, label)
with D one of forward KL(t||s), reverse KL(s||t), generalized JSD(beta), total variation.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

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


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot product [N, V] x [N, V] -> [N] as a batched matmul: no [N, V] temporary."""
    return (a.unsqueeze(1) @ b.unsqueeze(2)).flatten()


class Workspace:
    """[chunk, V] fp32 buffers reused from chunk to chunk and, held by a training step, from step
    to step. On a CPU a fresh 200 MB tensor costs more in page faults than the softmax pass that
    fills it (1024 x 49152: 77 ms to allocate, 35 ms to fill), and inside a training step, beside
    the student's activations, a SmolLM2 KD step's loss took 1 to 2.5 s longer with fresh tensors
    than with these (measured 2026-11-28, 2 threads)."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
        """Buffer `name` as an fp32 [rows, cols] tensor on `device`; contents undefined."""
        rows, cols = shape
        buf = self._buffers.get(name)
        if buf is None or buf.shape[0] < rows or buf.shape[1] != cols or buf.device != device:
            self._buffers.pop(name, None)  # the old one goes before the new one is allocated
            buf = self._buffers[name] = torch.empty(rows, cols, dtype=torch.float32, device=device)
        return buf[:rows]


def head_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """A head's logits of hidden states `h` [N, H], in fp32, written into `out` [N, V] (the head
    may live on another device, e.g. a teacher's: it computes there)."""
    h = h.to(device=weight.device, dtype=weight.dtype)
    if weight.dtype == torch.float32 and weight.device == out.device:
        torch.matmul(h, weight.t(), out=out)
        if bias is not None:
            out.add_(bias)
    else:  # half-precision heads compute in their dtype, as the model would
        out.copy_(F.linear(h, weight, bias))
    return out


def _logit_grad(
    z: torch.Tensor,
    teacher_logits: Callable[[torch.Tensor], torch.Tensor] | None,
    labels: torch.Tensor,
    cfg: LossConfig,
    ws: Workspace,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed loss of a chunk of valid tokens (no -100 labels) and its gradient w.r.t. the
    student's logits z [N, V] (fp32, a workspace buffer this overwrites). `teacher_logits(out)`
    writes the teacher's logits into `out` and returns it.

    Forward KL (top-k or not) and cross-entropy have closed forms, alpha T (q_T - p) and
    (1 - alpha)(q - onehot), computed in a few in-place passes over workspace buffers: on a CPU
    those passes and their allocations, not the head's matmuls, were most of a KD step's loss
    under autograd. The other divergences go through autograd on the chunk's logits.
    """
    alpha, T = cfg.alpha, cfg.temperature
    if alpha > 0 and cfg.divergence != "forward_kl":
        t = teacher_logits(ws.take("t", z.shape, z.device))
        with torch.enable_grad():
            leaf = z.detach().requires_grad_(True)
            loss = token_losses(leaf, t, labels, cfg)
            (grad,) = torch.autograd.grad(loss, leaf)
        return loss.detach(), grad
    y = labels.unsqueeze(-1)
    shared = 0 < alpha < 1 and T == 1  # one softmax serves both terms
    logq = torch.log_softmax(z, -1, out=ws.take("q", z.shape, z.device)) if alpha < 1 and not shared else None
    loss = z.new_zeros(())
    if alpha > 0:
        logq_T = torch.log_softmax(z.div_(T) if T != 1 else z, -1, out=ws.take("q_T", z.shape, z.device))
        logq = logq_T if shared else logq
        t = teacher_logits(z)  # z is spent: the teacher's logits take its place
        t = t.div_(T) if T != 1 else t
        idx = None
        if cfg.top_k is not None and cfg.top_k < t.shape[-1]:
            t, idx = t.topk(cfg.top_k, dim=-1)
            t_logp = t.log_softmax(-1)
            p = t_logp.exp()
        else:
            t_logp = torch.log_softmax(t, -1, out=ws.take("p", z.shape, z.device))
            p = torch.exp(t_logp, out=t)
        s_logp = logq_T if idx is None else logq_T.gather(-1, idx)
        loss = loss + alpha * T * T * (_dot(p, t_logp) - _dot(p, s_logp)).sum()
    if alpha < 1:
        loss = loss - (1 - alpha) * logq.gather(-1, y).sum()
    # the log-probabilities become probabilities in place, then the gradient
    if shared or alpha == 0:
        grad = logq.exp_()  # q (shared: alpha q + (1 - alpha) q)
    else:
        grad = logq_T.exp_()
        if alpha * T != 1:
            grad.mul_(alpha * T)
        if alpha < 1:
            grad.add_(logq.exp_(), alpha=1 - alpha)
    if alpha > 0:  # d/dz of alpha T^2 KL(p || q_T) = alpha T (q_T - p)
        if idx is None:
            grad.sub_(p, alpha=alpha * T)
        else:
            grad.scatter_add_(-1, idx, p.mul_(-alpha * T))
    if alpha < 1:
        grad.scatter_add_(-1, y, grad.new_full(y.shape, -(1 - alpha)))
    return loss, grad


def _bucketed_grad(
    z: torch.Tensor, cached: tuple[torch.Tensor, ...], labels: torch.Tensor, cfg: LossConfig, ws: Workspace
) -> tuple[torch.Tensor, torch.Tensor]:
    """`_logit_grad` from a teacher-logit cache (compressor.teacher_cache): the forward KL between
    the teacher's and the student's distributions over k + 1 buckets, the teacher's top-k tokens
    and the rest as one, with `cached` = (ids [N, k], log-probs [N, k], tail log-mass [N]) at T,
    renormalised over the buckets. Its gradient is alpha T (q_T - p~): p~ is the teacher's
    probability on its top-k, and off them the tail's mass spread as the student spreads its own
    (p_tail q_j / q_tail), computed as an exp of log-probs so no ratio of small numbers is formed."""
    alpha, T = cfg.alpha, cfg.temperature
    ids, stored, stored_tail = cached
    buckets = torch.cat([stored.float(), stored_tail.float()[:, None]], 1).log_softmax(-1)
    t_logp, t_tail = buckets[:, :-1], buckets[:, -1]
    y = labels.unsqueeze(-1)
    grad = ws.take("q", z.shape, z.device)
    shared = T == 1  # one softmax serves both terms
    logq = torch.log_softmax(z, -1, out=grad) if alpha < 1 and not shared else None  # before z is divided
    logq_T = torch.log_softmax(z.div_(T) if T != 1 else z, -1, out=ws.take("q_T", z.shape, z.device))
    rest = ws.take("p", z.shape, z.device)
    rest.copy_(logq_T).scatter_(-1, ids, float("-inf"))
    s_tail = rest.logsumexp(-1)
    p, p_tail = t_logp.exp(), t_tail.exp()
    kl = _dot(p, t_logp - logq_T.gather(-1, ids)) + torch.where(p_tail > 0, p_tail * (t_tail - s_tail), 0.0)
    loss = alpha * T * T * kl.sum()
    if alpha < 1:
        loss = loss - (1 - alpha) * (logq_T if shared else logq).gather(-1, y).sum()
    if shared:  # (1 - alpha) q + alpha q
        torch.exp(logq_T, out=grad)
    else:
        if alpha < 1:
            grad.exp_().mul_(1 - alpha)
        else:
            grad.zero_()
        grad.add_(logq_T.exp_(), alpha=alpha * T)
    if alpha < 1:  # cross-entropy: (1 - alpha)(q - onehot)
        grad.scatter_add_(-1, y, grad.new_full(y.shape, -(1 - alpha)))
    shift = torch.where(p_tail > 0, t_tail - s_tail, float("-inf"))  # log(p_tail / q_tail); no tail: none
    grad.sub_(rest.add_(shift[:, None]).exp_(), alpha=alpha * T)
    grad.scatter_add_(-1, ids, p.mul_(-alpha * T))
    return loss, grad


class _ChunkedHeadLoss(torch.autograd.Function):
    """Projects, compares and differentiates one chunk of tokens at a time, in forward: what
    backward needs is then only d/d(hidden) [N, H] and d/d(head) [V, H], never the logits, and
    no chunk is computed twice (a checkpointed chunk redoes both heads and the loss)."""

    @staticmethod
    def forward(ctx, s_flat, weight, bias, t_flat, t_head, labels, cfg, ws, cached):
        total = torch.zeros((), dtype=torch.float32, device=s_flat.device)
        g_h = torch.empty_like(s_flat)
        g_w = torch.zeros_like(weight, dtype=torch.float32)
        g_b = torch.zeros_like(bias, dtype=torch.float32) if bias is not None else None
        t_bias = getattr(t_head, "bias", None)
        for start in range(0, labels.numel(), cfg.chunk_tokens):
            part = slice(start, start + cfg.chunk_tokens)
            h = s_flat[part]
            z = head_logits(h, weight, bias, ws.take("z", (h.shape[0], weight.shape[0]), h.device))
            if cached is not None:
                loss, g = _bucketed_grad(z, [c[part] for c in cached], labels[part], cfg, ws)
            else:
                teacher = None
                if t_flat is not None:
                    teacher = lambda out, rows=t_flat[part]: head_logits(rows, t_head.weight, t_bias, out)  # noqa: E731
                loss, g = _logit_grad(z, teacher, labels[part], cfg, ws)
            total += loss
            g_h[part] = (g.to(weight.dtype) @ weight).to(g_h.dtype)
            g_w.addmm_(g.T, h.to(torch.float32))
            if g_b is not None:
                g_b += g.sum(0)
        ctx.save_for_backward(g_h, g_w, g_b)
        ctx.head_dtype = weight.dtype  # gradients are accumulated in fp32, returned in the head's dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        g_h, g_w, g_b = ctx.saved_tensors
        scale = grad_out.to(torch.float32)
        g_w = (g_w * scale).to(ctx.head_dtype)
        g_b = (g_b * scale).to(ctx.head_dtype) if g_b is not None else None
        return g_h * scale.to(g_h.dtype), g_w, g_b, None, None, None, None, None, None


def kd_loss(
    s_hidden: torch.Tensor,
    s_head: torch.nn.Linear,
    t_hidden: torch.Tensor | None,
    t_head: torch.nn.Module | None,
    labels: torch.Tensor,
    cfg: LossConfig,
    workspace: Workspace | None = None,
    cached: tuple[torch.Tensor, ...] | None = None,
) -> torch.Tensor:
    """Mean loss over valid tokens from final hidden states [B, L, H], chunk by chunk (teacher
    states may be None when alpha = 0: plain cross-entropy, or with `cached`: the teacher's top-k
    ids and log-probs [B, L, k] and tail log-mass [B, L] from compressor.teacher_cache, forward KL
    only). A training loop passes one `workspace` to every step so that the chunks' buffers are
    allocated once."""
    y = labels.flatten()
    keep = y != -100
    s_flat, y = s_hidden.flatten(0, 1)[keep], y[keep]
    t_flat = t_hidden.flatten(0, 1)[keep] if cfg.alpha > 0 and cached is None else None
    if cached is not None:
        cached = [c.flatten(0, 1)[keep].to(s_flat.device) for c in cached]
        cached[0] = cached[0].long()
    n = y.numel()
    if n == 0:
        return s_hidden.sum() * 0.0
    ws = workspace if workspace is not None else Workspace()
    # Function.forward runs without autograd: the teacher's head needs no no_grad of its own
    return _ChunkedHeadLoss.apply(s_flat, s_head.weight, s_head.bias, t_flat, t_head, y, cfg, ws, cached) / n


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
