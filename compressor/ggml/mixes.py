"""llama.cpp's named mixes (`llama-quantize ... Q4_K_M`) as presets: which GGUF type each tensor
gets, by its role and layer, so "llama.cpp's recipe with our integers" is `type: Q4_K_M`.

The rules are llama-quant.cpp's `llama_tensor_get_type_impl` for dense models (no experts, not
Falcon, not 70B): the output matrix (and the token embedding when tied to it) in Q6_K (Q8_0 when its
rows do not tile the base type's blocks), the value projection and `ffn_down` of chosen layers one or
two types up (`use_more_bits`: the first and last eighth and every third layer between), then
llama.cpp's fallback for rows a 256-weight type does not tile.
"""

from __future__ import annotations

from .types import TYPES, type_for_row

# preset -> the base type of its tensors
PRESETS = {
    "Q2_K": "Q2_K",
    "Q3_K_S": "Q3_K",
    "Q3_K_M": "Q3_K",
    "Q3_K_L": "Q3_K",
    "Q4_K_S": "Q4_K",
    "Q4_K_M": "Q4_K",
    "Q5_K_S": "Q5_K",
    "Q5_K_M": "Q5_K",
    "Q6_K": "Q6_K",
    "Q8_0": "Q8_0",
    "Q4_0": "Q4_0",
    "Q4_1": "Q4_1",
    "Q5_0": "Q5_0",
    "Q5_1": "Q5_1",
    "IQ4_NL": "IQ4_NL",
    "IQ4_XS": "IQ4_XS",
}


def use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _role_type(preset: str, base: str, role: str, layer: int, n_layers: int, n_gqa: int, imatrix: bool) -> str:
    """The type llama.cpp gives one decoder tensor of `role` (its GGUF short name) in `layer`."""
    if role == "attn_v":
        rules = {
            "Q2_K": "Q4_K" if n_gqa >= 4 else "Q3_K",
            "Q3_K_M": "Q5_K" if layer < 2 else "Q4_K",
            "Q3_K_L": "Q5_K",
            "IQ4_NL": "Q5_K" if n_gqa >= 4 else None,
            "IQ4_XS": "Q5_K" if n_gqa >= 4 else None,
            "Q4_K_M": "Q6_K" if use_more_bits(layer, n_layers) else None,
            "Q5_K_M": "Q6_K" if use_more_bits(layer, n_layers) else None,
            "Q4_K_S": "Q5_K" if layer < 4 else None,
        }
        return rules.get(preset) or base
    if role == "ffn_down":
        first_eighth = layer < n_layers // 8
        rules = {
            "Q2_K": "Q3_K",
            "Q3_K_M": "Q5_K" if layer < n_layers // 16 else "Q4_K",
            "Q3_K_L": "Q5_K",
            "Q4_K_M": "Q6_K" if use_more_bits(layer, n_layers) else None,
            "IQ4_NL": "Q5_K" if first_eighth and not imatrix else None,
            "IQ4_XS": "Q5_K" if first_eighth and not imatrix else None,
            "Q5_K_M": "Q6_K" if use_more_bits(layer, n_layers) else None,
            "Q4_K_S": "Q5_K" if first_eighth else None,
            "Q4_0": "Q4_1" if first_eighth and imatrix else None,
            "Q5_0": "Q5_1" if first_eighth and imatrix else None,
        }
        return rules.get(preset) or base
    if role == "attn_output":
        return {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(preset, base)
    if role == "attn_qkv":
        return {"Q3_K_M": "Q4_K", "Q3_K_L": "Q4_K", "Q4_K_M": "Q5_K", "Q5_K_M": "Q6_K"}.get(preset, base)
    return base


def preset_types(preset: str, tensors: list[tuple[str, str, int | None, int]], shape: dict, imatrix: bool) -> dict:
    """{tensor: type name} for `tensors` as (name, role, layer or None, row length): roles are
    llama.cpp's short names (attn_q, attn_v, ffn_down, ..., `token_embd`, `output`). `shape` gives
    the layer count, the heads per KV head, and whether the output is tied to the embedding."""
    base = PRESETS[preset]
    n_layers = shape["num_hidden_layers"]
    n_gqa = shape["num_attention_heads"] // (shape.get("num_key_value_heads") or shape["num_attention_heads"])
    tied = bool(shape.get("tie_word_embeddings"))
    out = {}
    for name, role, layer, n_in in tensors:
        if role == "output" or (role == "token_embd" and tied):
            kind = "Q8_0" if n_in % TYPES[base].block or base == "Q8_0" else "Q6_K"
        elif role == "token_embd":
            kind = base
        else:
            kind = _role_type(preset, base, role, layer, n_layers, n_gqa, imatrix)
        chosen = type_for_row(kind, n_in)
        if chosen is None:
            raise ValueError(f"{preset}: {name} has rows of {n_in} weights, which no GGUF block tiles")
        out[name] = chosen.name
    return out
