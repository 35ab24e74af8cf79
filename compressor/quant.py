"""Integer weight quantization on one grid: symmetric, per output channel or per group.

The grid is llama.cpp's, so our round-to-nearest codes are the ones its quantizer writes and a
GPTQ or QAT result is a Q4_0/Q8_0 file exactly:
- INT4 (Q4_0's rule): scale = the group's largest-magnitude weight / -8, so that weight lands
  exactly on code -8 and the step is max|w| / 8; the scale is negative when that weight is
  positive. (max|w| / 7.5, torchao's own rule, leaves the outlier that matters most half a step
  off the grid: +36% perplexity on SmolLM2-135M at group 32 against +13% for this rule.)
- INT8 (Q8_0's rule): scale = max|w| / 127, codes in [-127, 127].
q = clamp(round(w * (1 / scale))). torchao stores any scale, so every method pins its codes into
the `from_pretrained` format (quantized.requantize) and is measured with the kernel it loads with.
"""

from __future__ import annotations

import math
import weakref

import torch


def qrange(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def scales(w: torch.Tensor, bits: int, group: int | None) -> torch.Tensor:
    """[out, in/group] scales of a [out, in] weight (one group per row when `group` is None)."""
    g = w.shape[1] if group is None else group
    qmin, qmax = qrange(bits)
    x = w.detach().float().reshape(w.shape[0], -1, g)
    if bits == 8:
        s = x.abs().amax(-1) / qmax
    else:
        s = x.gather(-1, x.abs().argmax(-1, keepdim=True)).squeeze(-1) / qmin
    tiny = torch.finfo(torch.float32).eps  # an all-zero group: any scale gives codes 0
    return torch.where(s.abs() < tiny, torch.full_like(s, tiny), s)


def to_grid(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes of `w` [out, k·g] under per-group `scale` [out, k] (still a float tensor)."""
    qmin, qmax = qrange(bits)
    step = scale.repeat_interleave(w.shape[1] // scale.shape[1], dim=1)
    return torch.clamp(torch.round(w * (1.0 / step)), qmin, qmax)


def fake_quant(w: torch.Tensor, bits: int, group: int | None) -> torch.Tensor:
    """w rounded to the grid in the forward pass, identity in the backward (straight-through)."""
    s = scales(w, bits, group)
    q = to_grid(w, s, bits) * s.repeat_interleave(w.shape[1] // s.shape[1], dim=1)
    return w + (q - w).detach()


def fake_quant_activations(x: torch.Tensor) -> torch.Tensor:
    """Dynamic asymmetric per-token INT8 activations (what torchao's int8-dynamic path computes),
    straight-through."""
    lo = x.detach().amin(-1, keepdim=True).clamp(max=0)
    hi = x.detach().amax(-1, keepdim=True).clamp(min=0)
    s = ((hi - lo) / 255).clamp(min=torch.finfo(torch.float32).eps)
    zero = -128 - torch.round(lo / s)
    q = torch.clamp(torch.round(x.detach() / s) + zero, -128, 127)
    return x + ((q - zero) * s - x).detach()


class FakeQuant(torch.nn.Module):
    """A parametrization: the Linear trains its float weight but computes with the rounded one."""

    def __init__(self, bits: int, group: int | None):
        super().__init__()
        self.bits, self.group = bits, group

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return fake_quant(w, self.bits, self.group)


class IntGrid:
    """Our symmetric INT4/INT8 grid as GPTQ walks it: scales fixed from the weights before any
    error feedback (static groups), so they stay valid when act_order visits a group's columns
    out of order."""

    span = None  # fitted once, up front

    def __init__(self, bits: int, group: int | None):
        self.bits, self.group = bits, group

    def start(self, w: torch.Tensor, first: int, importance: torch.Tensor) -> None:
        self.s = scales(w, self.bits, self.group)
        self.col_scale = self.s.repeat_interleave(w.shape[1] // self.s.shape[1], dim=1)
        self.codes = torch.zeros_like(w)

    def column(self, j: int, col: torch.Tensor) -> torch.Tensor:
        qmin, qmax = qrange(self.bits)
        q = torch.clamp(torch.round(col * (1.0 / self.col_scale[:, j])), qmin, qmax)
        self.codes[:, j] = q
        return q * self.col_scale[:, j]

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.codes, self.s


LAZY = 128  # columns whose error reaches the rest of the matrix in one product (GPTQ's lazy batch)


def gptq(w: torch.Tensor, hessian: torch.Tensor, grid, act_order: bool, damp: float, overwrite: bool = False):
    """GPTQ (Frantar et al. 2022) for one Linear: quantize columns one by one, spreading each
    column's rounding error over the columns not yet quantized through the inverse Hessian of the
    layer's inputs. `grid` rounds a column to the values the stored format will dequantize to
    (IntGrid, or a GGUF type's ggml.grid.GgmlGrid); a grid with a `span` has its fields fitted
    when GPTQ reaches each span in natural order, from the weights as earlier error feedback left
    them, and once up front under act_order. Returns `grid.result()`; groups keep their natural
    column order even with act_order, so the result is stored like round to nearest's. The error
    of a column reaches the columns of its block of LAZY at once and the rest of the matrix with
    its block's, in one matrix product: the same sums in another order, 9-18x faster on 2 cores
    (2048 x 5632: 6 s, was 108 s) where a column at a time made each update a pass over the whole
    matrix. `overwrite`: the Hessian's memory is the workspace (it is left changed), so GPTQ's
    n × n matrices are one at a time, with at most one temporary beside it."""
    w = w.detach().float().clone()
    n_in = w.shape[1]
    h = hessian.float().to(w.device)
    if h is hessian and not overwrite:
        h = h.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    importance = torch.diag(h).clone()
    static = act_order or grid.span is None
    if static:
        grid.start(w, 0, importance)
    order = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(n_in, device=w.device)
    if act_order:
        w = w[:, order]
        h.copy_(h[order])
        h.copy_(h[:, order])
    h.diagonal().add_(damp * torch.mean(torch.diag(h)))
    # in place: a 5632-wide MLP's n × n is 127 MB
    torch.linalg.cholesky(h, out=h)
    torch.cholesky_inverse(h, out=h)
    hinv = torch.linalg.cholesky(h, upper=True, out=h)
    order = order.tolist()
    for b0 in range(0, n_in, LAZY):
        b1 = min(b0 + LAZY, n_in)
        err = torch.zeros(w.shape[0], b1 - b0, device=w.device)
        sent = b0  # this block's columns whose error has reached the columns after the block
        for i in range(b0, b1):
            j = order[i]
            if not static and j % grid.span == 0:  # natural order: column i is column j
                if j + grid.span > b1 and sent < i:  # the span reaches past the block: bring it up to date
                    w[:, b1:] -= err[:, sent - b0 : i - b0] @ hinv[sent:i, b1:]
                    sent = i
                grid.start(w[:, j : j + grid.span], j, importance[j : j + grid.span])
            col, d = w[:, i], hinv[i, i]
            err[:, i - b0] = (col - grid.column(j, col)) / d
            w[:, i + 1 : b1] -= err[:, i - b0, None] * hinv[i, i + 1 : b1][None, :]
        w[:, b1:] -= err[:, sent - b0 :] @ hinv[sent:b1, b1:]
    return grid.result()


def average_into(hessian: torch.Tensor, seen: int, gram: torch.Tensor, n: int) -> int:
    """Fold the Gram matrix XᵀX of n more rows into a running 2/N · XᵀX in place (a running mean
    keeps the sum's scale fixed however many batches come); returns N. `gram` is scaled in place:
    no third n × n matrix (a 5632-wide MLP's is 127 MB)."""
    hessian *= seen / (seen + n)
    hessian += gram.mul_(2 / (seen + n))
    return seen + n


class Hessians:
    """Accumulates 2/n · XᵀX of the inputs of chosen Linear modules over calibration batches.

    Modules called one after the other on the same tensor (q and k on the normed hidden states,
    gate and up on the MLP's input) share one Hessian: it is found on the first batch (the input
    is the very tensor the module before received) and made once, not once per module; on a
    2048-wide layer that is two 16 MB matrices fewer while the layer runs."""

    def __init__(self, modules: dict[str, torch.nn.Linear]):
        self.sums = {
            name: torch.zeros(m.in_features, m.in_features, device=m.weight.device) for name, m in modules.items()
        }
        self.counts = dict.fromkeys(modules, 0)
        self.owner: dict[str, str] = {}  # a module that shares its input -> the module whose Hessian it is
        self.last: tuple[weakref.ref, str] | None = None  # the input the latest hook saw, not kept alive
        self.handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def hook(_module, args):
            last, self.last = self.last, (weakref.ref(args[0]), name)
            same = last is not None and last[0]() is args[0]
            if self.counts[name] == 0 and name not in self.owner and same:  # first batch: found sharing
                self.owner[name] = self.owner.get(last[1], last[1])
                del self.sums[name]
            if name in self.owner:
                if not same:
                    raise RuntimeError(f"{name} shared its input with {self.owner[name]} on one batch, not another")
                self.last = last
                return
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            self.counts[name] = average_into(self.sums[name], self.counts[name], x.T @ x, x.shape[0])

        return hook

    def close(self) -> dict[str, torch.Tensor]:
        """The Hessians, handed over (this object keeps no reference: the caller may free them); a
        shared one is the same tensor under each name."""
        for h in self.handles:
            h.remove()
        sums, self.sums = self.sums, {}
        return sums | {name: sums[owner] for name, owner in self.owner.items()}


class Importance:
    """Mean squared input of each column of chosen Linear modules over calibration batches: the
    Hessian's diagonal without the rest of it, what llama.cpp's imatrix holds per tensor."""

    def __init__(self, modules: dict[str, torch.nn.Linear]):
        self.sums = {name: torch.zeros(m.in_features, device=m.weight.device) for name, m in modules.items()}
        self.counts = dict.fromkeys(modules, 0)
        self.handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        return lambda _module, args: self.add(name, args[0])

    def add(self, name: str, x: torch.Tensor) -> None:
        """Count inputs `x` [..., in_features] of module `name` (a hook calls it on every forward)."""
        x = x.detach().float().reshape(-1, x.shape[-1])
        self.sums[name] += (x * x).sum(0)
        self.counts[name] += x.shape[0]

    def close(self) -> dict[str, torch.Tensor]:
        for h in self.handles:
            h.remove()
        return {name: s / max(self.counts[name], 1) for name, s in self.sums.items()}


class ValueHessians:
    """Per-KV-head Hessians of a value projection over the inputs as attention mixes them.

    The error of value v_j reaches query i's output as a_ij · Δv_j, so head h's output error is
    ||ΔW_h X A_hᵀ||², whose Hessian is (A_h X)ᵀ(A_h X), summed over the query heads that share the
    KV head. Plain XᵀX weighs every token alike and lets GPTQ move error onto the attention sink
    (the first token, which nearly every query reads): on SmolLM2-135M, GPTQ on v_proj with XᵀX
    alone cost +27% perplexity where round to nearest costs +13%. Needs the attention module to
    return its probabilities (eager attention)."""

    def __init__(self, attention: torch.nn.Module, v_proj: torch.nn.Linear, kv_heads: int):
        n = v_proj.in_features
        self.kv_heads, self.x, self.seen = kv_heads, None, 0
        self.sums = torch.zeros(kv_heads, n, n, device=v_proj.weight.device)
        self.handles = [
            v_proj.register_forward_pre_hook(self._inputs),
            attention.register_forward_hook(self._mixed),
        ]

    def _inputs(self, _module, args):
        self.x = args[0].detach().float()

    def _mixed(self, _module, _args, output):
        probs = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if probs is None:
            raise RuntimeError("ValueHessians needs attention probabilities: run the model with eager attention")
        batch, heads, tokens, _ = probs.shape
        group = heads // self.kv_heads
        for k in range(self.kv_heads):  # a KV head at a time: all heads' mixes at once were 0.5 GB at width 2048
            y = probs[:, k * group : (k + 1) * group].float() @ self.x[:, None]  # [batch, group, tokens, in]
            y = y.reshape(-1, y.shape[-1])  # each query's mix of inputs
            seen = average_into(self.sums[k], self.seen, y.T @ y, y.shape[0])
        self.seen = seen

    def close(self) -> torch.Tensor:
        """The Hessians [kv_heads, n, n], handed over as Hessians.close hands them."""
        for h in self.handles:
            h.remove()
        sums, self.sums, self.x = self.sums, None, None
        return sums


def group_divides(features: dict[str, int], group: int | None) -> str | None:
    """Why `group` cannot quantize Linear layers with these input widths, or None."""
    if group is None:
        return None
    bad = {k: v for k, v in features.items() if v % group}
    if bad:
        fits = sorted(d for d in range(8, 1 + math.gcd(*features.values())) if math.gcd(*features.values()) % d == 0)
        return (
            f"group_size {group} must divide every quantized layer's input width "
            f"({', '.join(f'{k} {v}' for k, v in bad.items())}); sizes that fit: {fits or 'none'} or null (per channel)"
        )
    return None
