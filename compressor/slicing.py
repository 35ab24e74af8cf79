"""Exact structural surgery on Llama-family models (Llama, Mistral, Qwen2/3-style blocks).

Each function keeps a subset of heads, MLP channels, hidden channels or layers by slicing the
weights that carry them and rewrites the config to match, so `save_pretrained` ->
`from_pretrained` rebuilds exactly the pruned model and `generate` with a KV cache works.

Why not torch-pruning's dependency graph: with attention heads or hidden size in play its
`get_all_groups` never finishes on transformers 5 Llama (a cycle through the rotary
`rotate_half` ops, VainF/Torch-Pruning#527); for MLP channels alone it works, but one exact,
tested slicing path for every target is simpler than two.
"""

from __future__ import annotations

import torch
from torch import nn

from .models import decoder_layers, head_dim


def _linear(old: nn.Linear, out_idx: torch.Tensor | None = None, in_idx: torch.Tensor | None = None) -> nn.Linear:
    w = old.weight.data
    if out_idx is not None:
        w = w.index_select(0, out_idx.to(w.device))
    if in_idx is not None:
        w = w.index_select(1, in_idx.to(w.device))
    new = nn.Linear(w.shape[1], w.shape[0], bias=old.bias is not None, device=w.device, dtype=w.dtype)
    new.weight.data.copy_(w)
    if old.bias is not None:
        b = old.bias.data if out_idx is None else old.bias.data.index_select(0, out_idx.to(w.device))
        new.bias.data.copy_(b)
    return new


def _rows(heads: torch.Tensor, size: int) -> torch.Tensor:
    """Row indices of whole heads of `size` rows each."""
    return (heads[:, None] * size + torch.arange(size)[None]).flatten()


def keep_mlp_channels(model: nn.Module, keep: list[torch.Tensor]) -> None:
    """Keep, in every layer l, the intermediate channels keep[l] (same count in each layer)."""
    sizes = {len(k) for k in keep}
    assert len(sizes) == 1, "every layer keeps the same number of channels (one intermediate_size)"
    for layer, idx in zip(decoder_layers(model), keep):
        mlp = layer.mlp
        idx = idx.sort().values
        mlp.gate_proj = _linear(mlp.gate_proj, out_idx=idx)
        mlp.up_proj = _linear(mlp.up_proj, out_idx=idx)
        mlp.down_proj = _linear(mlp.down_proj, in_idx=idx)
    model.config.intermediate_size = sizes.pop()


def keep_heads(model: nn.Module, keep_kv: list[torch.Tensor], keep_q: list[torch.Tensor]) -> None:
    """Keep, in every layer l, the KV heads keep_kv[l] and the query heads keep_q[l].

    Query heads must come in equal numbers from each kept KV group (HF maps query head h to KV
    head h // (n_q / n_kv)); they are reordered group by group to keep that mapping.
    """
    cfg = model.config
    hd, group = head_dim(cfg), cfg.num_attention_heads // cfg.num_key_value_heads
    counts = {(len(kv), len(q)) for kv, q in zip(keep_kv, keep_q)}
    assert len(counts) == 1, "every layer keeps the same number of heads"
    n_kv, n_q = counts.pop()
    assert n_q % n_kv == 0, "query heads must split evenly over the kept KV heads"
    if cfg.hidden_size % n_q:
        raise ValueError(
            f"{n_q} query heads: transformers' config requires hidden_size {cfg.hidden_size} "
            "divisible by the number of attention heads"
        )
    for layer, kv, q in zip(decoder_layers(model), keep_kv, keep_q):
        kv = kv.sort().values
        ordered = torch.cat([torch.sort(q[(q // group) == g]).values for g in kv])
        assert len(ordered) == n_q and all(
            ((q // group) == g).sum() == n_q // n_kv for g in kv
        ), "each kept KV group keeps the same number of its own query heads"
        attn = layer.self_attn
        attn.q_proj = _linear(attn.q_proj, out_idx=_rows(ordered, hd))
        attn.k_proj = _linear(attn.k_proj, out_idx=_rows(kv, hd))
        attn.v_proj = _linear(attn.v_proj, out_idx=_rows(kv, hd))
        attn.o_proj = _linear(attn.o_proj, in_idx=_rows(ordered, hd))
        for name in ("num_heads", "num_attention_heads"):
            if hasattr(attn, name):
                setattr(attn, name, n_q)
        for name in ("num_key_value_heads",):
            if hasattr(attn, name):
                setattr(attn, name, n_kv)
        if hasattr(attn, "num_key_value_groups"):
            attn.num_key_value_groups = n_q // n_kv
    cfg.head_dim = hd  # explicit, or RoPE derives it from the new hidden/heads ratio on reload
    cfg.num_attention_heads, cfg.num_key_value_heads = n_q, n_kv


def _norm(norm: nn.Module, idx: torch.Tensor) -> None:
    norm.weight = nn.Parameter(norm.weight.data.index_select(0, idx.to(norm.weight.device)).clone())
    if getattr(norm, "bias", None) is not None:
        norm.bias = nn.Parameter(norm.bias.data.index_select(0, idx.to(norm.bias.device)).clone())
    for name in ("normalized_shape",):
        if hasattr(norm, name):
            setattr(norm, name, (len(idx),))


def keep_hidden(model: nn.Module, idx: torch.Tensor) -> None:
    """Keep the residual-stream channels idx everywhere: embeddings, every norm, every
    projection that reads or writes the stream, and the (tied or untied) LM head."""
    idx = idx.sort().values
    cfg = model.config
    tied = model.get_output_embeddings() is not None and (
        model.get_output_embeddings().weight is model.get_input_embeddings().weight
    )
    emb = model.get_input_embeddings()
    emb.weight = nn.Parameter(emb.weight.data.index_select(1, idx.to(emb.weight.device)).clone())
    emb.embedding_dim = len(idx)
    for layer in decoder_layers(model):
        attn, mlp = layer.self_attn, layer.mlp
        attn.q_proj = _linear(attn.q_proj, in_idx=idx)
        attn.k_proj = _linear(attn.k_proj, in_idx=idx)
        attn.v_proj = _linear(attn.v_proj, in_idx=idx)
        attn.o_proj = _linear(attn.o_proj, out_idx=idx)
        mlp.gate_proj = _linear(mlp.gate_proj, in_idx=idx)
        mlp.up_proj = _linear(mlp.up_proj, in_idx=idx)
        mlp.down_proj = _linear(mlp.down_proj, out_idx=idx)
        _norm(layer.input_layernorm, idx)
        _norm(layer.post_attention_layernorm, idx)
    _norm(model.model.norm, idx)
    head = model.get_output_embeddings()
    if tied:
        head.weight = emb.weight
    else:
        model.set_output_embeddings(_linear(head, in_idx=idx))
    cfg.head_dim = head_dim(cfg)
    cfg.hidden_size = len(idx)
