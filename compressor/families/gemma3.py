"""Gemma 3 (text): what differs most from Llama.
- Norms compute x̂ · (1 + w): the stored weight is an offset, so llama.cpp's file holds 1 + w.
- Four norms per layer, a sandwich around each sub-block: `input_layernorm` → attention →
  `post_attention_layernorm` (on the attention's output, not before the MLP as in Llama), then
  `pre_feedforward_layernorm` → MLP → `post_feedforward_layernorm`; q/k norms over each head.
- Token embeddings are multiplied by √hidden (transformers derives it from the config, so a
  hidden-pruned model's embeddings are rescaled to keep the product).
- head_dim 256 whatever the width; queries scaled by query_pre_attn_scalar^-½ (llama.cpp uses
  head_dim^-½: they must be equal); GELU-tanh MLP.
- Sliding-window layers (window 512) with their own rope base, every sixth layer global: the
  per-layer pattern and both bases go to llama.cpp, which implements both.
- Every sequence must start with BOS: without it the 270M model scores 310 instead of 73 on the
  same WikiText-2 tokens.
"""

from __future__ import annotations

from ..models import head_dim
from .base import Family, config_get


class Gemma3(Family):
    name = "gemma3"
    model_types = ("gemma3_text",)
    gguf_arch = "gemma3"
    hidden_norms = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "post_attention_norm",
        "pre_feedforward_layernorm": "ffn_norm",
        "post_feedforward_layernorm": "post_ffw_norm",
    }
    head_norms = {"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
    norm_offset = 1.0
    bos_first = True
    gguf_sliding_window = True

    def problems(self, config) -> str | None:
        scalar = config_get(config, "query_pre_attn_scalar")
        if scalar is not None and scalar != head_dim(config):
            return f"query_pre_attn_scalar {scalar} ≠ head_dim {head_dim(config)} (Gemma 3 27B's scaling)"
        if config_get(config, "attn_logit_softcapping"):
            return "attn_logit_softcapping"
        if config_get(config, "use_bidirectional_attention"):
            return "use_bidirectional_attention (an encoder, e.g. EmbeddingGemma)"
        return super().problems(config)

    def embed_scale(self, config) -> float:
        return float(config_get(config, "hidden_size")) ** 0.5

    def gguf_metadata(self, config) -> dict:
        out = super().gguf_metadata(config)
        types = config_get(config, "layer_types") or []
        if config_get(config, "sliding_window") and "sliding_attention" in types:
            out["attention.sliding_window"] = int(config_get(config, "sliding_window"))
            out["attention.sliding_window_pattern"] = [t == "sliding_attention" for t in types]
            out["rope.freq_base_swa"] = float(self.rope(config, "sliding_attention").get("rope_theta", 10000.0))
        out["rope.freq_base"] = float(self.rope(config, "full_attention").get("rope_theta", 1_000_000.0))
        return out
