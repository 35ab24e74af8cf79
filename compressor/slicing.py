"""Exact structural surgery on every supported decoder family (`compressor.families`).

Each function keeps a subset of heads, MLP channels, hidden channels or layers by slicing the
weights that carry them (biases too) and rewrites the config to match, so `save_pretrained` ->
`from_pretrained` rebuilds exactly the pruned model and `generate` with a KV cache works. The
family says where the projections live: a fused Linear (Phi-3's `qkv_proj`, `gate_up_proj`)
keeps the same heads or channels in each of its row blocks; q/k norms are one head wide and
stay; every norm over the hidden width is sliced (Gemma's four).

Why not torch-pruning's dependency graph: with attention heads or hidden size in play its
`get_all_groups` never finishes on transformers 5 Llama (a cycle through the rotary
`rotate_half` ops, VainF/Torch-Pruning#527); for MLP channels alone it works, but one exact,
tested slicing path for every target and family is simpler than two.
"""

from __future__ import annotations

import torch
from torch import nn

from .families import Rows, family_of
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


def _replace(layer: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put `new` where `old` sits inside `layer`."""
    for name, module in layer.named_modules():
        if module is old:
            parent, _, attr = name.rpartition(".")
            setattr(layer.get_submodule(parent) if parent else layer, attr, new)
            return
    raise LookupError(f"{type(old).__name__} is not inside this layer")


def _keep_rows(layer: nn.Module, kept: list[tuple[Rows, torch.Tensor]]) -> None:
    """Keep rows `idx` of each logical projection; the projections that share one fused Linear
    are sliced together, each block of rows in its place."""
    by_linear: dict[int, list[tuple[Rows, torch.Tensor]]] = {}
    for rows, idx in kept:
        by_linear.setdefault(id(rows.linear), []).append((rows, idx))
    for parts in by_linear.values():
        parts.sort(key=lambda p: p[0].start)
        linear = parts[0][0].linear
        out_idx = torch.cat([rows.start + idx for rows, idx in parts])
        _replace(layer, linear, _linear(linear, out_idx=out_idx))


def _rows(heads: torch.Tensor, size: int) -> torch.Tensor:
    """Row indices of whole heads of `size` rows each."""
    return (heads[:, None] * size + torch.arange(size)[None]).flatten()


def keep_mlp_channels(model: nn.Module, keep: list[torch.Tensor]) -> None:
    """Keep, in every layer l, the intermediate channels keep[l] (same count in each layer)."""
    sizes = {len(k) for k in keep}
    assert len(sizes) == 1, "every layer keeps the same number of channels (one intermediate_size)"
    family = family_of(model)
    for layer, idx in zip(decoder_layers(model), keep):
        idx = idx.sort().values
        parts = family.parts(layer, model.config)
        _keep_rows(layer, [(parts["gate"], idx), (parts["up"], idx)])
        down = layer.get_submodule(family.down_proj)
        _replace(layer, down, _linear(down, in_idx=idx))
    model.config.intermediate_size = sizes.pop()


def keep_heads(model: nn.Module, keep_kv: list[torch.Tensor], keep_q: list[torch.Tensor]) -> None:
    """Keep, in every layer l, the KV heads keep_kv[l] and the query heads keep_q[l].

    Query heads must come in equal numbers from each kept KV group (HF maps query head h to KV
    head h // (n_q / n_kv)); they are reordered group by group to keep that mapping.
    """
    cfg = model.config
    family = family_of(model)
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
        assert len(ordered) == n_q and all(((q // group) == g).sum() == n_q // n_kv for g in kv), (
            "each kept KV group keeps the same number of its own query heads"
        )
        parts = family.parts(layer, cfg)
        _keep_rows(layer, [(parts["q"], _rows(ordered, hd)), (parts["k"], _rows(kv, hd)), (parts["v"], _rows(kv, hd))])
        o_proj = layer.get_submodule(family.o_proj)
        _replace(layer, o_proj, _linear(o_proj, in_idx=_rows(ordered, hd)))
        attn = layer.get_submodule(family.o_proj.rpartition(".")[0])
        for name, value in (
            ("num_heads", n_q),
            ("num_attention_heads", n_q),
            ("num_key_value_heads", n_kv),
            ("num_key_value_groups", n_q // n_kv),
        ):
            if hasattr(attn, name):
                setattr(attn, name, value)
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
    projection that reads or writes the stream, and the (tied or untied) LM head.

    A family that scales its embeddings by √hidden (Gemma) gets √(new hidden) on reload, since
    transformers derives it from the config: the embedding rows are rescaled to keep their
    product, and with a tied head the final norm's effective weight is divided by the same
    factor, so the logits are unchanged."""
    idx = idx.sort().values
    cfg = model.config
    family = family_of(model)
    tied = model.get_output_embeddings() is not None and (
        model.get_output_embeddings().weight is model.get_input_embeddings().weight
    )
    old_scale = family.embed_scale(cfg)
    emb = model.get_input_embeddings()
    emb.weight = nn.Parameter(emb.weight.data.index_select(1, idx.to(emb.weight.device)).clone())
    emb.embedding_dim = len(idx)
    for layer in decoder_layers(model):
        for linear in family.readers(layer, cfg):
            _replace(layer, linear, _linear(linear, in_idx=idx))
        for linear in family.writers(layer):
            _replace(layer, linear, _linear(linear, out_idx=idx))
        for name in family.hidden_norms:
            _norm(layer.get_submodule(name), idx)
    _norm(model.model.norm, idx)
    head = model.get_output_embeddings()
    if tied:
        head.weight = emb.weight
    else:
        model.set_output_embeddings(_linear(head, in_idx=idx))
    cfg.head_dim = head_dim(cfg)
    cfg.hidden_size = len(idx)
    new_scale = family.embed_scale(cfg)
    if new_scale != old_scale:
        factor = old_scale / new_scale
        with torch.no_grad():
            emb.weight.mul_(factor)
            if tied:  # the head reads the rescaled rows: the final norm gives the factor back
                norm = model.model.norm.weight
                norm.copy_((family.norm_offset + norm) / factor - family.norm_offset)
        if hasattr(emb, "embed_scale"):
            emb.embed_scale.fill_(new_scale)
        if hasattr(emb, "scalar_embed_scale"):
            emb.scalar_embed_scale = new_scale
