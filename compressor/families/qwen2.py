"""Qwen2 / Qwen2.5: Llama's layout with biases on the query, key and value projections.
llama.cpp's `qwen2` graph uses half-split rotary (HF's own layout) and takes the biases as
`attn_{q,k,v}.bias`; it assumes heads × head_dim = hidden, so a head-pruned Qwen2 cannot run
there. Its sliding window (off by default) is not in llama.cpp's graph."""

from __future__ import annotations

from .base import Family


class Qwen2(Family):
    name = "qwen2"
    model_types = ("qwen2",)
    gguf_arch = "qwen2"
    gguf_heads_fill_hidden = True
