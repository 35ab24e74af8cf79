"""Qwen3: Llama's layout with RMS norms over each query and key head (`q_norm`, `k_norm`, one
head wide, applied before rotary), and optional attention biases. llama.cpp's `qwen3` graph:
half-split rotary, `attn_q_norm` / `attn_k_norm`, any head_dim."""

from __future__ import annotations

from .base import Family


class Qwen3(Family):
    name = "qwen3"
    model_types = ("qwen3",)
    gguf_arch = "qwen3"
    head_norms = {"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
