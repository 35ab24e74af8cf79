"""llama.cpp's weight types as grids: what values each GGUF type can hold, and the arithmetic by
which a file's bytes become weights.

Every type here dequantizes to the same shape of formula, per sub-block of `sub` weights:

    w = scale · level[q] + bias

- `level` is the type's table of integer levels indexed by the stored code q (uniform ranges;
  IQ4's sixteen non-uniform values);
- 32-weight types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL) store scale = d (fp16) per block,
  and Q4_1/Q5_1 a bias = m (fp16);
- 256-weight K types store one fp16 d (and dmin) per super-block and a small integer per
  sub-block: scale = d · sc, bias = −dmin · mn (Q2_K 4-bit sc and mn over 16 weights, Q3_K signed
  6-bit sc over 16, Q4_K/Q5_K 6-bit sc and mn over 32, Q6_K int8 sc over 16, IQ4_XS signed 6-bit
  sc over 32).

`Blocks.dequantize` computes it in float32 in the order ggml does (d·sc first, then times the
level, then the bias), so the values equal gguf's own `dequantize` of the written bytes bit for
bit: the values GPTQ's error feedback and QAT's forward see are the file's values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

QK_K = 256
IQ4_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


@dataclass(frozen=True)
class GgmlType:
    name: str  # llama.cpp's name, upper case (the GGMLQuantizationType member)
    block: int  # weights per stored block (32, or QK_K for the K and IQ4_XS types)
    sub: int  # weights sharing one scale
    levels: tuple[int, ...]  # level value of each code
    bytes: int  # bytes per block
    block_min: bool = False  # Q4_1/Q5_1: an fp16 bias per block
    sc: tuple[int, int] | None = None  # range of the stored sub-block scale (K types)
    mn: tuple[int, int] | None = None  # range of the stored sub-block min (K types with mins)
    fit_range: tuple[int, int] | None = None  # levels our quantizer uses, when narrower (Q8_0: ±127)
    # how llama.cpp weighs an imatrix in this type's scale search: importance · sqrt(σ² + w²), σ² =
    # sigma_gain · mean w² over `sigma_span` weights (0: the whole row); sigma_gain 0: importance alone
    sigma_span: int = 0
    sigma_gain: float = 1.0

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes / self.block

    @property
    def uniform(self) -> bool:
        return self.levels == tuple(range(self.levels[0], self.levels[-1] + 1))

    @property
    def asymmetric(self) -> bool:
        return self.block_min or self.mn is not None

    def level_tensor(self, device=None) -> torch.Tensor:
        return torch.tensor(self.levels, dtype=torch.float32, device=device)


def _range(lo: int, hi: int) -> tuple[int, ...]:
    return tuple(range(lo, hi + 1))


TYPES: dict[str, GgmlType] = {
    t.name: t
    for t in (
        GgmlType("Q8_0", 32, 32, _range(-128, 127), 34, fit_range=(-127, 127)),
        GgmlType("Q6_K", QK_K, 16, _range(-32, 31), 210, sc=(-128, 127), sigma_gain=0.0),
        GgmlType("Q5_K", QK_K, 32, _range(0, 31), 176, sc=(0, 63), mn=(0, 63), sigma_span=QK_K, sigma_gain=2.0),
        GgmlType("Q5_1", 32, 32, _range(0, 31), 24, block_min=True),
        GgmlType("Q5_0", 32, 32, _range(-16, 15), 22),
        GgmlType("Q4_K", QK_K, 32, _range(0, 15), 144, sc=(0, 63), mn=(0, 63), sigma_span=QK_K, sigma_gain=2.0),
        GgmlType("Q4_1", 32, 32, _range(0, 15), 20, block_min=True),
        GgmlType("Q4_0", 32, 32, _range(-8, 7), 18),
        GgmlType("IQ4_NL", 32, 32, IQ4_LEVELS, 18, sigma_span=32, sigma_gain=2.0),
        GgmlType("IQ4_XS", QK_K, 32, IQ4_LEVELS, 136, sc=(-32, 31), sigma_span=QK_K, sigma_gain=2.0),
        GgmlType("Q3_K", QK_K, 16, _range(-4, 3), 110, sc=(-32, 31), sigma_span=QK_K, sigma_gain=2.0),
        GgmlType("Q2_K", QK_K, 16, _range(0, 3), 84, sc=(0, 15), mn=(0, 15), sigma_span=QK_K),
    )
}

# llama.cpp's rule (llama-quant.cpp, tensor_type_fallback) for a row whose length a 256-weight
# type does not divide: the 32-weight type it writes instead
FALLBACK = {"IQ4_XS": "IQ4_NL", "Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def ggml_type(name: str) -> GgmlType:
    """The type named (any case); ValueError listing the types when it is not one of ours."""
    t = TYPES.get(name.upper())
    if t is None:
        raise ValueError(f"GGUF type {name!r} is not one we write; types: {', '.join(TYPES)}")
    return t


def type_for_row(name: str, n_in: int) -> GgmlType | None:
    """The type a row of `n_in` weights gets when `name` is asked: the type itself, llama.cpp's
    fallback when its blocks do not tile the row, or None when no 32-weight type fits either."""
    t = ggml_type(name)
    if n_in % t.block:
        t = TYPES[FALLBACK[t.name]] if t.name in FALLBACK else t
    return t if n_in % t.block == 0 else None


DEQUANTIZE_WEIGHTS = 1 << 20  # weights `Blocks.dequantize` makes at once (its temporaries: ~20 bytes each)


@dataclass
class Blocks:
    """One tensor on a GGUF type: the codes and the stored scale fields, as the file holds them."""

    type: GgmlType
    q: torch.Tensor  # uint8 [rows, n]: index into type.levels
    d: torch.Tensor  # float16 [rows, n / block]
    dmin: torch.Tensor | None = None  # float16 [rows, n / block]: Q4_1/Q5_1's m, or the K types' dmin
    sc: torch.Tensor | None = None  # int16 [rows, n / sub]: stored sub-block scales (K types)
    mn: torch.Tensor | None = None  # int16 [rows, n / sub]: stored sub-block mins (K types with mins)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def scale_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-sub-block (scale, bias) [rows, n / sub] in float32, computed as ggml does."""
        t, per = self.type, self.type.block // self.type.sub
        d = self.d.float()
        if t.sc is None:  # 32-weight types: one scale (and min) per block
            return d, (self.dmin.float() if t.block_min else None)
        scale = d.repeat_interleave(per, dim=1) * self.sc.float()
        if t.mn is None:
            return scale, None
        return scale, -(self.dmin.float().repeat_interleave(per, dim=1) * self.mn.float())

    def dequantize(self) -> torch.Tensor:
        """The float32 values the file holds, made a few rows at a time into one tensor (every
        field is per row; a whole embedding's temporaries, an 8-byte index per weight among
        them, would be several times its values)."""
        rows, n = self.shape
        out = torch.empty(rows, n, device=self.q.device)
        step = max(1, DEQUANTIZE_WEIGHTS // n)
        for i in range(0, rows, step):
            out[i : i + step] = self.rows(slice(i, i + step))._values()
        return out

    def _values(self) -> torch.Tensor:
        scale, bias = self.scale_bias()
        sub = self.type.sub
        values = scale.repeat_interleave(sub, dim=1) * self.type.level_tensor(self.q.device)[self.q.long()]
        return values if bias is None else values + bias.repeat_interleave(sub, dim=1)

    @staticmethod
    def cat(parts: list[Blocks], dim: int) -> Blocks:
        """One tensor from parts side by side: blocks of rows (dim 0: GPTQ fits a value projection
        per KV head) or spans of columns (dim 1: GPTQ fits each span as it reaches it)."""

        def join(name: str):
            if getattr(parts[0], name) is None:
                return None
            return torch.cat([getattr(p, name) for p in parts], dim)

        return Blocks(parts[0].type, join("q"), join("d"), join("dmin"), join("sc"), join("mn"))

    def rows(self, index: torch.Tensor | slice) -> Blocks:
        """The same tensor with its rows taken in `index`'s order (every field is per row)."""
        pick = lambda x: None if x is None else x[index]  # noqa: E731
        return Blocks(self.type, self.q[index], self.d[index], pick(self.dmin), pick(self.sc), pick(self.mn))

    def to(self, device) -> Blocks:
        """The same tensor with every field on `device`."""
        move = lambda x: None if x is None else x.to(device)  # noqa: E731
        return Blocks(self.type, move(self.q), move(self.d), move(self.dmin), move(self.sc), move(self.mn))

    def nbytes(self) -> int:
        rows, n = self.shape
        return rows * n // self.type.block * self.type.bytes
