"""Phi-3 / Phi-4-mini: fused projections. `qkv_proj` holds the query, key and value rows one
after another, `gate_up_proj` the gate rows then the up rows (up · act(gate)); a pruned head or
channel is sliced out of both halves. GPTQ and QAT treat each fused Linear as one matrix with
one Hessian. llama.cpp's `phi3` graph reads them fused (`attn_qkv`, `ffn_up` of 2 × n_ff rows),
half-split rotary, heads × head_dim = hidden, and ignores the sliding window."""

from __future__ import annotations

from .base import Family


class Phi3(Family):
    name = "phi3"
    model_types = ("phi3",)
    gguf_arch = "phi3"
    fused = {"qkv": "self_attn.qkv_proj", "gate_up": "mlp.gate_up_proj"}
    projections = {}
    gguf_heads_fill_hidden = True
    gguf_linears = {
        "self_attn.qkv_proj": "attn_qkv",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
