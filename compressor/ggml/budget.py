"""Mixed precision under a byte budget: each matrix's GGUF type chosen from its measured
sensitivity per byte, so a file of `target_bits` per weight spends its bytes where the error costs.

Sensitivity: each candidate type's importance-weighted squared error on the matrix,
Σ_col importance[col] · Σ_row (w − q)², importance being the mean squared input of the column on
the calibration blocks. That is the error the matrix adds to its output on that data (the Hessian's
diagonal part), so errors of different matrices are in the units of their outputs. The token
embedding tied to the output is weighed as the output (by the final hidden states: logits are
where its error lands); an untied embedding by the first layer's input importance.

Allocation: every matrix starts at its cheapest candidate; the upgrade with the largest error
drop per added byte is taken while it fits (a greedy walk of each matrix's lower convex hull).
"""

from __future__ import annotations

import torch

from .fit import quantize
from .types import type_for_row

CANDIDATES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")


def _bytes(kind: str, rows: int, n_in: int) -> int:
    t = type_for_row(kind, n_in)
    return rows * n_in // t.block * t.bytes


def options(rows: int, n_in: int, candidates=CANDIDATES) -> list[str]:
    """The distinct types the candidates become on rows of n_in (after llama.cpp's fallback)."""
    out = []
    for c in candidates:
        t = type_for_row(c, n_in)
        if t is not None and t.name not in out:
            out.append(t.name)
    return sorted(out, key=lambda k: _bytes(k, rows, n_in))


def smallest_bits(sizes: list[tuple[int, int]], candidates=CANDIDATES) -> float:
    """Bits per weight of the smallest mix of matrices of these (rows, row length)."""
    weights = sum(r * n for r, n in sizes)
    return 8 * sum(_bytes(options(r, n, candidates)[0], r, n) for r, n in sizes) / weights


def allocate(errors: dict[str, dict[str, float]], sizes: dict[str, int], budget: int) -> dict[str, str]:
    """{matrix: type} within `budget` bytes, greedy by error drop per byte; `errors[m]` and `sizes[m]`
    map each candidate type of matrix m to its weighted error and its bytes."""
    choice = {m: min(sizes[m], key=sizes[m].get) for m in errors}
    spent = sum(sizes[m][choice[m]] for m in choice)
    if spent > budget:
        raise ValueError(f"the smallest mix is {spent:,} bytes, over the budget of {budget:,}")
    while True:
        best, best_gain = None, 0.0
        for m, cur in choice.items():
            for kind, size in sizes[m].items():
                extra = size - sizes[m][cur]
                drop = errors[m][cur] - errors[m][kind]
                if extra > 0 and drop > 0 and spent + extra <= budget and drop / extra > best_gain:
                    best, best_gain = (m, kind), drop / extra
        if best is None:
            return choice
        m, kind = best
        spent += sizes[m][kind] - sizes[m][choice[m]]
        choice[m] = kind


def sensitivities(weights: dict[str, torch.Tensor], importance: dict[str, torch.Tensor], candidates=CANDIDATES):
    """({matrix: {type: weighted error}}, {matrix: {type: bytes}}) for every candidate type."""
    from ..progress import Bar

    errors, sizes = {}, {}
    bar = Bar("sensitivity per type", len(weights), unit="matrix")
    for name, w in weights.items():
        w = w.detach().float()
        imp = importance[name].float()
        errors[name], sizes[name] = {}, {}
        for kind in options(w.shape[0], w.shape[1], candidates):
            q = quantize(type_for_row(kind, w.shape[1]), w, imp).dequantize()
            errors[name][kind] = float((((w - q) ** 2).sum(0) * imp).sum())
            sizes[name][kind] = _bytes(kind, w.shape[0], w.shape[1])
        bar.update(1)
    bar.close()
    return errors, sizes
