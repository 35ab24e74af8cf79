"""Choosing a GGUF type's stored fields for given weights: round to nearest after a weighted
search for each sub-block's scale (and min), then the type's own quantization of those scales,
then the codes against the scales as stored.

The search follows llama.cpp's quantizers (ggml-quants.c: make_qx_quants, make_qkx2_quants,
the IQ4 search): a few candidate scales per sub-block, each refitted by weighted least squares to
the levels it rounds to, the lowest weighted error kept. The weight of a weight is what makes its
error costly: with an importance per input column (the diagonal of our calibration Hessian,
what llama.cpp's imatrix estimates) it is importance · sqrt(σ² + w²) with σ² taken per type as
llama.cpp takes it (GgmlType.sigma_span, sigma_gain); without one, σ² + w² over the row (bigger
weights matter more). The codes are always rounded against the scales the file will hold (fp16 d,
the sub-block integers), so nothing is lost in writing.
"""

from __future__ import annotations

import torch

from .types import Blocks, GgmlType

CHUNK = 1 << 13  # sub-blocks searched at once: × 21 candidates × 32 weights, ~22 MB a temporary (of ~5)
ROWS_WEIGHTS = 1 << 22  # weights quantized at once by `quantize` (16 MB): its temporaries are a few times that


def element_weights(t: GgmlType, x: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
    """[rows, n] weight of each weight's squared error in t's scale search."""
    if importance is None:
        return (x * x).mean(dim=1, keepdim=True) + x * x
    imp = importance.float().clamp(min=0)[None, :]
    if t.sigma_gain == 0:
        return imp.expand_as(x).contiguous()
    rows, n = x.shape
    x2 = (x * x).reshape(rows, -1, t.sigma_span or n)
    sigma2 = t.sigma_gain * x2.mean(dim=2, keepdim=True)
    return imp * torch.sqrt(sigma2 + x2).reshape(rows, n)


def _nearest(v: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level (sorted table) to each value."""
    mids = (levels[1:] + levels[:-1]) / 2
    return torch.bucketize(v.contiguous(), mids)


def _symmetric(x: torch.Tensor, w: torch.Tensor, levels: torch.Tensor, uniform: bool) -> torch.Tensor:
    """Best scale per row of x [B, s] for value = scale · level: candidates put the largest-
    magnitude weight on the extreme level (and nearby), each refitted by least squares."""
    amax_idx = x.abs().argmax(dim=1, keepdim=True)
    vmax = x.gather(1, amax_idx)  # signed
    lo, hi = levels[0], levels[-1]
    if uniform:  # ggml's make_qx_quants: iscale = -(nmax + 0.1 k) / max
        steps = torch.arange(-9, 10, dtype=x.dtype, device=x.device) * 0.1
        iscales = -(-lo + steps)[None, :] / vmax
    else:  # ggml's IQ4 search: the extreme weight on or near the first level, or mirrored (its start)
        steps = torch.arange(-7, 8, dtype=x.dtype, device=x.device)
        iscales = torch.cat([-lo[None, None] / vmax, (lo + steps)[None, :] / vmax], dim=1)
    iscales = torch.where(vmax == 0, torch.zeros_like(iscales), iscales)
    y = x[:, None, :] * iscales[:, :, None]  # [B, C, s]
    idx = torch.clamp(torch.round(y), lo, hi) - lo if uniform else _nearest(y, levels)
    lv = levels[idx.long()]
    wl = w[:, None, :] * lv
    sxl = (wl * x[:, None, :]).sum(-1)
    sll = (wl * lv).sum(-1)
    score = torch.where(sll > 0, sxl * sxl / sll.clamp(min=1e-30), torch.zeros_like(sxl))
    best = score.argmax(dim=1, keepdim=True)
    scale = (sxl.gather(1, best) / sll.gather(1, best).clamp(min=1e-30)).squeeze(1)
    return torch.where(sll.gather(1, best).squeeze(1) > 0, scale, torch.zeros_like(scale))


def _asymmetric(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Best (scale ≥ 0, bias ≤ 0) per row of x [B, s] for value = scale · lv + bias, lv in [0,
    nmax]: ggml's make_qkx2_quants, candidates over the range, each refitted by weighted least
    squares, bias kept ≤ 0."""
    lo = x.amin(dim=1, keepdim=True).clamp(max=0)
    span = (x.amax(dim=1, keepdim=True) - lo).clamp(min=1e-30)
    steps = rmin + rdelta * torch.arange(nstep + 1, dtype=x.dtype, device=x.device)
    iscales = torch.cat([torch.full_like(span, nmax) / span, (steps[None, :] + nmax) / span], dim=1)  # [B, C]
    lv = torch.clamp(torch.round(iscales[:, :, None] * (x - lo)[:, None, :]), 0, nmax)  # [B, C, s]
    wx = w[:, None, :]
    sw, sx = w.sum(-1, keepdim=True), (w * x).sum(-1, keepdim=True)
    sl, sll, sxl = (wx * lv).sum(-1), (wx * lv * lv).sum(-1), (wx * lv * x[:, None, :]).sum(-1)
    det = sw * sll - sl * sl
    ok = det > 0
    scale = torch.where(ok, (sw * sxl - sx * sl) / det.where(ok, torch.ones_like(det)), torch.zeros_like(det))
    bias = torch.where(ok, (sll * sx - sl * sxl) / det.where(ok, torch.ones_like(det)), torch.zeros_like(det))
    clipped = bias > 0
    scale = torch.where(clipped, sxl / sll.clamp(min=1e-30), scale)
    bias = torch.where(clipped, torch.zeros_like(bias), bias)
    # the first candidate as is (ggml's starting point): scale = span / nmax, bias = min
    scale[:, 0], bias[:, 0] = (span / nmax).squeeze(1), lo.squeeze(1)
    err = (wx * (scale[:, :, None] * lv + bias[:, :, None] - x[:, None, :]) ** 2).sum(-1)
    err = torch.where(ok | (torch.arange(err.shape[1], device=x.device) == 0), err, torch.full_like(err, float("inf")))
    best = err.argmin(dim=1, keepdim=True)
    return scale.gather(1, best).squeeze(1).clamp(min=0), bias.gather(1, best).squeeze(1)


def _chunked(fn, x: torch.Tensor, w: torch.Tensor, *args):
    outs = [fn(x[i : i + CHUNK], w[i : i + CHUNK], *args) for i in range(0, len(x), CHUNK)]
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outs))
    return torch.cat(outs)


def sub_fit(t: GgmlType, x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Continuous per-sub-block (scale, bias) [rows, n / sub] before the type stores them."""
    rows, n = x.shape
    xs, ws = x.reshape(-1, t.sub), w.reshape(-1, t.sub)
    if t.asymmetric:
        nmax = t.levels[-1]
        rmin, rdelta, nstep = (-1.0, 0.1, 20) if nmax == 15 else (-0.5, 0.1, 15)
        scale, bias = _chunked(_asymmetric, xs, ws, nmax, rmin, rdelta, nstep)
        return scale.view(rows, -1), bias.view(rows, -1)
    lo, hi = t.fit_range or (t.levels[0], t.levels[-1])
    levels = t.level_tensor(x.device)
    levels = levels[(levels >= lo) & (levels <= hi)]
    return _chunked(_symmetric, xs, ws, levels, t.uniform).view(rows, -1), None


def _store_sub(values: torch.Tensor, weight: torch.Tensor, rng: tuple[int, int], per: int):
    """Quantize per-sub-block values [rows, n/sub] to integers in `rng` times one fp16 d per
    super-block (`per` sub-blocks), d chosen among a few candidates by the weighted error."""
    rows = values.shape[0]
    v = values.reshape(rows, -1, per)
    wt = weight.reshape(rows, -1, per)
    lo, hi = rng
    if lo < 0:  # signed: the largest-magnitude value on the negative extreme, as ggml
        ref = v.gather(2, v.abs().argmax(2, keepdim=True))
        top = float(-lo)
        base = ref / -top
    else:
        ref = v.amax(2, keepdim=True)
        top = float(hi)
        base = ref / top
    best_d = torch.zeros_like(base)
    best_err = torch.full_like(base, float("inf"))
    for f in (1.0, 0.97, 0.985, 1.015, 1.03, 0.95, 1.05):  # 1.0 first: ggml's choice wins ties
        d = (base * f).to(torch.float16).float()
        ints = torch.clamp(torch.round(v / d.where(d != 0, torch.ones_like(d))), lo, hi)
        ints = torch.where(d == 0, torch.zeros_like(ints), ints)
        err = (wt * (d * ints - v) ** 2).sum(2, keepdim=True)
        take = err < best_err
        best_d, best_err = torch.where(take, d, best_d), torch.where(take, err, best_err)
    ints = torch.clamp(torch.round(v / best_d.where(best_d != 0, torch.ones_like(best_d))), lo, hi)
    ints = torch.where(best_d == 0, torch.zeros_like(ints), ints)
    return best_d.squeeze(2).to(torch.float16), ints.reshape(rows, -1).to(torch.int16)


def level_codes(t: GgmlType, y: torch.Tensor) -> torch.Tensor:
    """uint8 code of the level nearest each y (a weight divided by its stored scale, bias removed)."""
    if t.uniform:
        lo, hi = t.fit_range or (t.levels[0], t.levels[-1])
        return (torch.clamp(torch.round(y), lo, hi) - t.levels[0]).to(torch.uint8)
    return _nearest(y, t.level_tensor(y.device)).to(torch.uint8)


def codes(t: GgmlType, x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """uint8 codes [rows, n] of x against per-sub-block (scale, bias) as stored: the nearest level."""
    s = scale.repeat_interleave(t.sub, dim=1)
    y = x if bias is None else x - bias.repeat_interleave(t.sub, dim=1)
    return level_codes(t, torch.where(s != 0, y / s.where(s != 0, torch.ones_like(s)), torch.zeros_like(y)))


def fields(t: GgmlType, x: torch.Tensor, importance: torch.Tensor | None = None) -> Blocks:
    """The stored fields (codes zero) of weights x [rows, n] on type t: scales searched by the
    element weights, then quantized as the type stores them. `codes` fills q afterwards."""
    x = x.detach().float()
    rows, n = x.shape
    if n % t.block:
        raise ValueError(f"{t.name} needs rows that are a multiple of {t.block} weights, got {n}")
    w = element_weights(t, x, importance)
    scale, bias = sub_fit(t, x, w)
    q = torch.zeros(rows, n, dtype=torch.uint8)
    if t.sc is None:  # 32-weight types store the scale (and min) as fp16 directly
        return Blocks(t, q, scale.to(torch.float16), None if bias is None else bias.to(torch.float16))
    per = t.block // t.sub
    sw = w.reshape(rows, -1, t.sub).sum(2)  # a sub-block's total weight: how much its scale matters
    d, sc = _store_sub(scale, sw, t.sc, per)
    if t.mn is None:
        return Blocks(t, q, d, None, sc)
    dmin, mn = _store_sub(-bias, sw, t.mn, per)
    return Blocks(t, q, d, dmin, sc, mn)


def quantize(t: GgmlType, x: torch.Tensor, importance: torch.Tensor | None = None) -> Blocks:
    """x [rows, n] on type t: round to nearest after the importance-weighted scale search, a few
    rows at a time (every row is fitted on its own: a 262k-row embedding's search would hold
    several copies of it)."""
    rows = max(1, ROWS_WEIGHTS // x.shape[1])
    if x.shape[0] > rows:
        return Blocks.cat([quantize(t, x[i : i + rows], importance) for i in range(0, x.shape[0], rows)], dim=0)
    blocks = fields(t, x, importance)
    blocks.q = codes(t, x.detach().float(), *blocks.scale_bias())
    return blocks
