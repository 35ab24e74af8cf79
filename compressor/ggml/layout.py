"""The bytes of each GGUF block type: `pack` writes a tensor's `Blocks` as llama.cpp lays them out
(ggml-common.h's block structs), `unpack` reads them back. Tested against gguf-py's numpy
`dequantize` of the same bytes, and its `quantize` where it has one."""

from __future__ import annotations

import numpy as np
import torch

from .types import QK_K, TYPES, Blocks, GgmlType


def _f16(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().to(torch.float16).numpy().reshape(-1, 1).view(np.uint8)


def _bits(q: np.ndarray, width: int) -> np.ndarray:
    """[nb, k, n] codes of `width` bits -> [nb, n] bytes, plane i in bits width·i."""
    return np.bitwise_or.reduce(q << (width * np.arange(q.shape[1], dtype=np.uint8))[None, :, None], axis=1)


def _unbits(b: np.ndarray, width: int, k: int) -> np.ndarray:
    """Inverse of _bits: [nb, n] bytes -> [nb, k, n] codes."""
    shifts = (width * np.arange(k, dtype=np.uint8))[None, :, None]
    return (b[:, None, :] >> shifts) & np.uint8((1 << width) - 1)


def _k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's 12 bytes of eight 6-bit scales and mins."""
    out = np.empty((sc.shape[0], 12), np.uint8)
    out[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)
    return out


def _k_unscales(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sc = np.concatenate([b[:, 0:4] & 63, (b[:, 8:12] & 15) | ((b[:, 0:4] >> 2) & 48)], axis=1)
    mn = np.concatenate([b[:, 4:8] & 63, (b[:, 8:12] >> 4) | ((b[:, 4:8] >> 2) & 48)], axis=1)
    return sc, mn


def _nibbles(q: np.ndarray, half: int = 16) -> np.ndarray:
    """[nb, 2·half·k] 4-bit codes -> [nb, half·k] bytes: per 2·half weights, the first half in the
    low nibbles, the next half in the high ones (half 16: Q4_0/IQ4 blocks; 32: Q4_K/Q5_K)."""
    q = q.reshape(q.shape[0], -1, 2, half)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(q.shape[0], -1)


def _unnibbles(b: np.ndarray, half: int = 16) -> np.ndarray:
    b = b.reshape(b.shape[0], -1, 1, half)
    return np.concatenate([b & 15, b >> 4], axis=2).reshape(b.shape[0], -1)


def pack(blocks: Blocks) -> np.ndarray:
    """uint8 [rows, n / block · bytes]: the tensor as a GGUF file stores it."""
    t = blocks.type
    rows, n = blocks.shape
    nb = rows * n // t.block
    q = blocks.q.detach().cpu().numpy().astype(np.uint8).reshape(nb, t.block)
    d = _f16(blocks.d)
    per = t.block // t.sub
    sc = None if blocks.sc is None else blocks.sc.detach().cpu().numpy().astype(np.int16).reshape(nb, per)
    mn = None if blocks.mn is None else blocks.mn.detach().cpu().numpy().astype(np.int16).reshape(nb, per)
    name = t.name
    if name in ("Q4_0", "IQ4_NL"):
        parts = [d, _nibbles(q)]
    elif name == "Q4_1":
        parts = [d, _f16(blocks.dmin), _nibbles(q)]
    elif name in ("Q5_0", "Q5_1"):
        qh = np.packbits((q >> 4).astype(np.uint8), axis=1, bitorder="little")
        parts = [d] + ([_f16(blocks.dmin)] if name == "Q5_1" else []) + [qh, _nibbles(q & 15)]
    elif name == "Q8_0":
        parts = [d, (q.astype(np.int16) - 128).astype(np.int8).view(np.uint8)]
    elif name == "Q2_K":
        qs = _bits(q.reshape(nb, 2, 4, 32).reshape(nb * 2, 4, 32), 2).reshape(nb, 64)
        parts = [(sc | (mn << 4)).astype(np.uint8), qs, d, _f16(blocks.dmin)]
    elif name == "Q3_K":
        hmask = _bits((q >> 2).reshape(nb, 8, 32), 1)
        qs = _bits((q & 3).reshape(nb * 2, 4, 32), 2).reshape(nb, 64)
        raw = (sc + 32).astype(np.uint8)
        scales = np.concatenate([(raw[:, :8] & 15) | ((raw[:, 8:] & 15) << 4), _bits(raw.reshape(nb, 4, 4) >> 4, 2)], 1)
        parts = [hmask, qs, scales, d]
    elif name == "Q4_K":
        parts = [d, _f16(blocks.dmin), _k_scales(sc.astype(np.uint8), mn.astype(np.uint8)), _nibbles(q, 32)]
    elif name == "Q5_K":
        qh = _bits((q >> 4).reshape(nb, 8, 32), 1)
        parts = [d, _f16(blocks.dmin), _k_scales(sc.astype(np.uint8), mn.astype(np.uint8)), qh, _nibbles(q & 15, 32)]
    elif name == "Q6_K":
        low = (q & 15).reshape(nb * 2, 2, 64)
        ql = (low[:, 0] | (low[:, 1] << 4)).reshape(nb, 128)
        qh = _bits((q >> 4).reshape(nb * 2, 4, 32), 2).reshape(nb, 64)
        parts = [ql, qh, sc.astype(np.int8).view(np.uint8), d]
    elif name == "IQ4_XS":
        raw = (sc + 32).astype(np.uint16)
        scales_h = np.bitwise_or.reduce((raw >> 4) << (2 * np.arange(8, dtype=np.uint16)), axis=1)
        scales_l = ((raw[:, 0::2] & 15) | ((raw[:, 1::2] & 15) << 4)).astype(np.uint8)
        parts = [d, scales_h.astype("<u2").reshape(nb, 1).view(np.uint8), scales_l, _nibbles(q)]
    else:
        raise ValueError(f"no layout for {name}")
    out = np.concatenate(parts, axis=1)
    assert out.shape[1] == t.bytes, (name, out.shape)
    return out.reshape(rows, -1)


def unpack(type_: GgmlType | str, data: np.ndarray, shape: tuple[int, int]) -> Blocks:
    """The Blocks a GGUF tensor of `shape` [rows, n] holds in `data` (its bytes)."""
    t = TYPES[type_] if isinstance(type_, str) else type_
    rows, n = shape
    nb = rows * n // t.block
    b = np.ascontiguousarray(data, dtype=np.uint8).reshape(nb, t.bytes)
    cut = np.cumsum(_sizes(t))[:-1]
    parts = np.split(b, cut, axis=1)
    f16 = lambda x: torch.from_numpy(x.copy().view(np.float16).reshape(rows, -1))  # noqa: E731
    ints = lambda x: torch.from_numpy(x.astype(np.int16).reshape(rows, -1))  # noqa: E731
    dmin = sc = mn = None
    name = t.name
    if name in ("Q4_0", "IQ4_NL"):
        d, qs = parts
        q = _unnibbles(qs)
    elif name == "Q4_1":
        d, m, qs = parts
        q, dmin = _unnibbles(qs), f16(m)
    elif name in ("Q5_0", "Q5_1"):
        d, *m, qh, qs = parts
        q = _unnibbles(qs) | (np.unpackbits(qh, axis=1, bitorder="little") << 4)
        dmin = f16(m[0]) if m else None
    elif name == "Q8_0":
        d, qs = parts
        q = (qs.view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    elif name == "Q2_K":
        scales, qs, d, dm = parts
        q = _unbits(qs.reshape(nb * 2, 32), 2, 4).reshape(nb, 256)
        sc, mn, dmin = ints(scales & 15), ints(scales >> 4), f16(dm)
    elif name == "Q3_K":
        hmask, qs, scales, d = parts
        q = _unbits(qs.reshape(nb * 2, 32), 2, 4).reshape(nb, 256) | (_unbits(hmask, 1, 8).reshape(nb, 256) << 2)
        low = np.concatenate([scales[:, :8] & 15, scales[:, :8] >> 4], axis=1)
        high = _unbits(scales[:, 8:12], 2, 4).reshape(nb, 16)
        sc = ints((low | (high << 4)).astype(np.int16) - 32)
    elif name in ("Q4_K", "Q5_K"):
        d, dm, scales, *qh, qs = parts
        q = _unnibbles(qs, 32)
        if qh:
            q = q | (_unbits(qh[0], 1, 8).reshape(nb, 256) << 4)
        s, m = _k_unscales(scales)
        sc, mn, dmin = ints(s), ints(m), f16(dm)
    elif name == "Q6_K":
        ql, qh, scales, d = parts
        low = ql.reshape(nb * 2, 1, 64)
        low = np.concatenate([low & 15, low >> 4], axis=1).reshape(nb, 256)
        q = low | (_unbits(qh.reshape(nb * 2, 32), 2, 4).reshape(nb, 256) << 4)
        sc = ints(scales.view(np.int8))
    elif name == "IQ4_XS":
        d, sh, sl, qs = parts
        h = (sh.copy().view("<u2").astype(np.uint16) >> (2 * np.arange(8, dtype=np.uint16))) & 3
        low = np.stack([sl & 15, sl >> 4], axis=2).reshape(nb, 8)
        sc = ints((low | (h << 4)).astype(np.int16) - 32)
        q = _unnibbles(qs)
    else:
        raise ValueError(f"no layout for {name}")
    q = torch.from_numpy(np.ascontiguousarray(q, dtype=np.uint8).reshape(rows, n))
    return Blocks(t, q, f16(d), dmin, sc, mn)


def _sizes(t: GgmlType) -> list[int]:
    """Byte sizes of a block's fields, in file order."""
    return {
        "Q4_0": [2, 16],
        "IQ4_NL": [2, 16],
        "Q4_1": [2, 2, 16],
        "Q5_0": [2, 4, 16],
        "Q5_1": [2, 2, 4, 16],
        "Q8_0": [2, 32],
        "Q2_K": [16, 64, 2, 2],
        "Q3_K": [32, 64, 12, 2],
        "Q4_K": [2, 2, 12, 128],
        "Q5_K": [2, 2, 12, 32, 128],
        "Q6_K": [128, 64, 16, 2],
        "IQ4_XS": [2, 2, 4, 128],
    }[t.name]


assert all(sum(_sizes(t)) == t.bytes for t in TYPES.values())
assert QK_K == 256
