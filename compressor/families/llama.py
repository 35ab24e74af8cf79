"""Llama (1/2/3.x, SmolLM, TinyLlama, ...): the reference layout. llama.cpp's `llama` graph uses
interleaved rotary pairs, so HF's half-split query/key rows are permuted on export; Llama 3's
rope scaling travels as llama.cpp's `rope_freqs` factors."""

from __future__ import annotations

import math

import numpy as np

from ..models import head_dim
from .base import Family


class Llama(Family):
    name = "llama"
    model_types = ("llama",)
    gguf_arch = "llama"
    gguf_interleaved_rotary = True
    rope_types = ("llama3",)

    def gguf_extra_tensors(self, config) -> dict:
        rope = self.rope(config)
        if rope.get("rope_type") != "llama3":
            return {}
        return {"rope_freqs.weight": llama3_rope_factors(rope, head_dim(config))}


def llama3_rope_factors(rope: dict, dim: int) -> np.ndarray:
    """What llama.cpp divides each rotary frequency by to compute Llama 3's scaled rope (the
    frequencies transformers' `llama3` rope type computes)."""
    base, factor = rope.get("rope_theta", 10000.0), rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    out = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * base ** (i / dim)
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)
