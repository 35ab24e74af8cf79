"""The model-family contract: what differs between the decoder architectures we compress,
declared once, so surgery, quantization, export and measurement ask the family instead of
assuming Llama's module names.

A family names, per decoder layer, where the query/key/value and gate/up projections live
(separate Linears, or one fused Linear whose rows are split: Phi-3's `qkv_proj` and
`gate_up_proj`), the norms over the hidden width (two for Llama, four for Gemma's sandwich),
the norms over one head's width (q/k norms), how a norm's stored weight scales (`1 + w` for
Gemma), the embedding scale (√hidden for Gemma), whether every sequence must start with BOS,
and how llama.cpp spells the architecture: its name, tensor names, metadata, rotary layout and
shape rules. Adding a family is one module with a `Family` subclass and one registry line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..models import head_dim


def config_get(config, key: str, default=None):
    """A field of a config object or a config dict."""
    if isinstance(config, dict):
        return config.get(key, default)
    value = getattr(config, key, default)
    return default if value is None else value


@dataclass(frozen=True)
class Rows:
    """Rows [start, stop) of a Linear: one logical projection (q, k, v, gate, up), the whole
    Linear or a slice of a fused one."""

    linear: nn.Linear
    start: int
    stop: int

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight[self.start : self.stop]

    @property
    def grad(self) -> torch.Tensor | None:
        g = self.linear.weight.grad
        return None if g is None else g[self.start : self.stop]


class Family:
    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]  # HF config model_type values this family reads
    gguf_arch: ClassVar[str]  # llama.cpp's architecture name
    # HF module paths inside a decoder layer: the logical projections, or one fused Linear each
    projections: ClassVar[dict[str, str]] = {
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "gate": "mlp.gate_proj",
        "up": "mlp.up_proj",
    }
    fused: ClassVar[dict[str, str]] = {}  # "qkv" / "gate_up" -> path, replacing those projections
    o_proj: ClassVar[str] = "self_attn.o_proj"
    down_proj: ClassVar[str] = "mlp.down_proj"
    # norms over the hidden width, HF name -> llama.cpp tensor name
    hidden_norms: ClassVar[dict[str, str]] = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    head_norms: ClassVar[dict[str, str]] = {}  # q/k norms over one head's width
    norm_offset: ClassVar[float] = 0.0  # a norm computes x̂ · (offset + w): 1 for Gemma
    bos_first: ClassVar[bool] = False  # every sequence must start with BOS (measured, calibrated, trained)
    rope_types: ClassVar[tuple[str, ...]] = ()  # rope scalings beyond "default" that export exactly
    # llama.cpp
    gguf_interleaved_rotary: ClassVar[bool] = False  # NORM rope (pairs): HF's q/k rows are permuted
    gguf_heads_fill_hidden: ClassVar[bool] = False  # its graph assumes heads × head_dim == hidden
    gguf_sliding_window: ClassVar[bool] = False  # its graph honours the config's sliding window
    gguf_linears: ClassVar[dict[str, str]] = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }

    # --- what a model of this family may be ----------------------------------------------------

    def problems(self, config) -> str | None:
        """Why a config of this family is a variant we do not model (None: it is supported)."""
        rope = self.rope(config)
        if rope.get("rope_type", "default") not in ("default", *self.rope_types):
            return (
                f"rope_type {rope.get('rope_type')!r} (supported: default{''.join(', ' + r for r in self.rope_types)})"
            )
        if config_get(config, "final_logit_softcapping"):
            return "final_logit_softcapping (logits are assumed to be the head's output)"
        return None

    def rope(self, config, layer_type: str = "full_attention") -> dict:
        """The rope parameters of a layer type (transformers 5 nests them per type for Gemma 3)."""
        params = config_get(config, "rope_parameters") or {}
        if layer_type in params and isinstance(params[layer_type], dict):
            return params[layer_type]
        if params and all(isinstance(v, dict) for v in params.values()):
            return next(iter(params.values()))
        if not params and config_get(config, "rope_theta") is not None:
            return {"rope_theta": config_get(config, "rope_theta"), "rope_type": "default"}
        return params

    # --- the layer's structure -----------------------------------------------------------------

    def parts(self, layer: nn.Module, config) -> dict[str, Rows]:
        """q, k, v, gate and up as rows of the layer's Linears."""
        hd, n_q = head_dim(config), config_get(config, "num_attention_heads")
        n_kv = config_get(config, "num_key_value_heads") or n_q
        out = {}
        if "qkv" in self.fused:
            fused = layer.get_submodule(self.fused["qkv"])
            q, k = n_q * hd, n_kv * hd
            out.update(q=Rows(fused, 0, q), k=Rows(fused, q, q + k), v=Rows(fused, q + k, q + 2 * k))
        if "gate_up" in self.fused:
            fused = layer.get_submodule(self.fused["gate_up"])
            inter = fused.out_features // 2
            out.update(gate=Rows(fused, 0, inter), up=Rows(fused, inter, 2 * inter))
        for name, path in self.projections.items():
            if name not in out:
                linear = layer.get_submodule(path)
                out[name] = Rows(linear, 0, linear.out_features)
        return out

    def readers(self, layer: nn.Module, config) -> list[nn.Linear]:
        """The Linears that read the residual stream (each once, fused or not)."""
        return list({id(p.linear): p.linear for p in self.parts(layer, config).values()}.values())

    def writers(self, layer: nn.Module) -> list[nn.Linear]:
        """The Linears that write the residual stream."""
        return [layer.get_submodule(self.o_proj), layer.get_submodule(self.down_proj)]

    def value(self, layer: nn.Module) -> nn.Linear | None:
        """The value projection when it is a Linear of its own (GPTQ fits it through attention)."""
        return None if "qkv" in self.fused else layer.get_submodule(self.projections["v"])

    def embed_scale(self, config) -> float:
        """What the model multiplies its token embeddings by."""
        return 1.0

    # --- llama.cpp -------------------------------------------------------------------------------

    def gguf_tensors(self) -> dict[str, str]:
        """HF parameter path inside a layer (without .weight/.bias) -> llama.cpp tensor name."""
        return {**self.gguf_linears, **self.hidden_norms, **self.head_norms}

    def gguf_refusal(self, config) -> str | None:
        """Why llama.cpp's graph for this architecture cannot run this config, or None."""
        hd, n_q = head_dim(config), config_get(config, "num_attention_heads")
        if self.gguf_heads_fill_hidden and n_q * hd != config_get(config, "hidden_size"):
            return (
                f"llama.cpp's {self.gguf_arch} graph needs num_attention_heads × head_dim = hidden_size "
                f"({n_q} × {hd} ≠ {config_get(config, 'hidden_size')}): prune heads and hidden together, or not at all"
            )
        return None

    def gguf_context_limit(self, config) -> int | None:
        """The longest context llama.cpp computes as transformers does: a sliding window its graph
        ignores makes every longer context differ."""
        window = config_get(config, "sliding_window")
        types = config_get(config, "layer_types") or []
        uses_window = window and (not types or "sliding_attention" in types)
        return None if self.gguf_sliding_window or not uses_window else int(window)

    def gguf_metadata(self, config) -> dict:
        """llama.cpp's hyperparameter keys (without the architecture prefix) for this config."""
        hd = head_dim(config)
        n_q = config_get(config, "num_attention_heads")
        rope = self.rope(config)
        out = {
            "context_length": int(config_get(config, "max_position_embeddings")),
            "embedding_length": int(config_get(config, "hidden_size")),
            "block_count": int(config_get(config, "num_hidden_layers")),
            "feed_forward_length": int(config_get(config, "intermediate_size")),
            "attention.head_count": int(n_q),
            "attention.head_count_kv": int(config_get(config, "num_key_value_heads") or n_q),
            "attention.key_length": int(hd),
            "attention.value_length": int(hd),
            "rope.dimension_count": int(hd * rope.get("partial_rotary_factor", 1.0)),
            "attention.layer_norm_rms_epsilon": float(config_get(config, "rms_norm_eps")),
            "rope.freq_base": float(rope.get("rope_theta", 10000.0)),
            "vocab_size": int(config_get(config, "vocab_size")),
        }
        return out

    def gguf_extra_tensors(self, config) -> dict:
        """Tensors llama.cpp reads beside the weights (e.g. rope frequency factors): name -> array."""
        return {}
