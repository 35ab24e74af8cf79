"""A whole model on GGUF types: which type each tensor gets (one `type` for every Linear, or a
llama.cpp `mix` for every matrix, embeddings and output included), and the quantization itself
(round to nearest with or without importance, or GPTQ), leaving the model computing with the
values the file will hold. `quantize: {type:|mix:}` is the stage around it."""

from __future__ import annotations

import torch

from .fit import quantize
from .mixes import preset_types
from .types import Blocks, type_for_row


def tensors(model: torch.nn.Module) -> list[tuple[str, str, int | None, int]]:
    """(module name, llama.cpp role, layer, row length) of every matrix a GGUF file quantizes."""
    from ..families import family_of
    from ..models import decoder_layers

    family = family_of(model)
    names = {m: n for n, m in model.named_modules()}
    out = []
    for i, layer in enumerate(decoder_layers(model)):
        for hf, role in family.gguf_linears.items():
            module = layer.get_submodule(hf)
            out.append((names[module], role, i, module.in_features))
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    out.append((names[emb], "token_embd", None, emb.weight.shape[1]))
    if head is not None and head.weight is not emb.weight:
        out.append((names[head], "output", None, head.in_features))
    return out


def shape_tensors(shape: dict) -> list[tuple[str, str, int | None, int]]:
    """The same from a config's dimensions alone (for validation before any model is loaded):
    the row lengths are what a mix's types must tile."""
    from ..models import head_dim

    hidden, attn = shape["hidden_size"], shape["num_attention_heads"] * head_dim(shape)
    rows = {"attn_q": hidden, "attn_k": hidden, "attn_v": hidden, "attn_output": attn}
    rows |= {"ffn_gate": hidden, "ffn_up": hidden, "ffn_down": shape["intermediate_size"]}
    out = [(f"blk.{i}.{r}", r, i, n) for i in range(shape["num_hidden_layers"]) for r, n in rows.items()]
    out.append(("token_embd", "token_embd", None, hidden))
    if not shape.get("tie_word_embeddings"):
        out.append(("output", "output", None, hidden))
    return out


def shape_sizes(shape: dict) -> list[tuple[int, int]]:
    """(rows, row length) of every matrix a GGUF file quantizes, from a config's dimensions."""
    from ..models import head_dim

    hidden, inter, hd = shape["hidden_size"], shape["intermediate_size"], head_dim(shape)
    heads = shape["num_attention_heads"]
    kv = shape.get("num_key_value_heads") or heads
    layer = [(heads * hd, hidden), (kv * hd, hidden), (kv * hd, hidden), (hidden, heads * hd)]
    layer += [(inter, hidden), (inter, hidden), (hidden, inter)]
    out = layer * shape["num_hidden_layers"] + [(shape["vocab_size"], hidden)]
    return out + ([] if shape.get("tie_word_embeddings") else [(shape["vocab_size"], hidden)])


def activation_importance(model: torch.nn.Module, linears: dict, blocks: torch.Tensor, batch_size: int) -> dict:
    """{name: mean squared input per column} of `linears` over the calibration blocks, in one pass.
    The output head is not run: its input is the decoder's last hidden state, and its logits (a
    262k vocabulary's are ~2 GB a batch) would be thrown away."""
    from ..progress import Bar
    from ..quant import Importance

    head = model.get_output_embeddings()
    head_name = next((n for n, m in linears.items() if m is head), None)
    hooks = Importance(linears)  # the head's hook never fires: its input is counted below
    batches = blocks.split(batch_size)
    try:
        with torch.no_grad(), Bar("activation importance", len(batches), unit="calibration batch") as bar:
            for batch in batches:
                ids = batch.to(next(model.parameters()).device)
                hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
                if head_name:
                    hooks.add(head_name, hidden)
                bar.update(1)
    finally:
        found = hooks.close()
    return found


def budgeted(model: torch.nn.Module, listed, target_bits: float, calibrate, batch_size: int) -> dict:
    """{name: type} of every listed matrix, chosen by measured sensitivity per byte to fit
    `target_bits` per weight (budget.py)."""
    from .budget import allocate, sensitivities

    modules = dict(model.named_modules())
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    importance = activation_importance(model, linears, calibrate(), batch_size)
    names = {m: n for n, m in linears.items()}
    first = next(n for n, role, layer, _ in listed if role == "attn_q" and layer == 0)
    weights, weigh = {}, {}
    for name, role, _, _ in listed:
        weights[name] = modules[name].weight
        if role == "token_embd":  # tied: its error lands in the logits; untied: in the first layer's input
            tied = head is not None and head.weight is emb.weight
            weigh[name] = importance[names[head]] if tied else importance[first]
        else:
            weigh[name] = importance[name]
    errors, sizes = sensitivities(weights, weigh)
    total = sum(w.numel() for w in weights.values())
    return allocate(errors, sizes, int(target_bits * total / 8))


def assign(listed, shape: dict, type_: str | None, mix: str | None, lm_head: bool, imatrix: bool) -> dict:
    """{name: type name}: a mix's rule for every listed matrix, or `type_` (llama.cpp's fallback
    where its blocks do not tile a row) for the Linear layers (the untied output with `lm_head`).
    ValueError naming a row no GGUF block tiles."""
    if mix is not None:
        return preset_types(mix, listed, shape, imatrix)
    out = {}
    for name, role, _, n_in in listed:
        if role == "token_embd" or (role == "output" and not lm_head):
            continue
        chosen = type_for_row(type_, n_in)
        if chosen is None:
            raise ValueError(f"type {type_}: {name} has rows of {n_in} weights, which no GGUF block tiles")
        out[name] = chosen.name
    return out


def quantize_model(model: torch.nn.Module, types: dict, method: str, calibrate, settings, stream=None) -> dict:
    """Quantize every module `types` names; returns {module name: Blocks}. `calibrate()` gives the
    calibration blocks; gptq weighs by its Hessians, rtn by activation importance when
    `settings.importance`, the embedding by nothing (a lookup has no input to weigh). With
    `stream` (layerwise.Streamed) the model is a meta-device skeleton: each decoder layer (the
    head, the embeddings) is read when its turn comes, written quantized with its blocks and
    dropped; nothing is returned, the blocks are in the stream's folder."""
    from ..gptq_model import run_gptq
    from ..progress import Bar

    modules = dict(model.named_modules())
    linears = {n: modules[n] for n in types if isinstance(modules[n], torch.nn.Linear)}
    device = stream.device if stream else next(model.parameters()).device
    found: dict[str, Blocks] = {}
    if method == "gptq":
        found = run_gptq(model, settings, calibrate(), device, types=types, stream=stream)
    else:
        importance = {}
        if getattr(settings, "importance", False):
            importance = activation_importance(model, linears, calibrate(), settings.calibration.batch_size)
        with Bar("round to nearest", len(linears), unit="tensor") as bar:
            for owner, names in _owners(model, linears).items():
                if stream:
                    stream.load(owner)
                for name in names:
                    m = linears[name]
                    found[name] = quantize(type_for_row(types[name], m.in_features), m.weight, importance.get(name))
                    m.weight.data = found[name].dequantize().to(m.weight)
                    bar.update(1)
                if stream:
                    stream.done(owner, changed=True, found=found)
    for name in types:
        if name not in linears:  # the token embedding (and with it a tied head)
            if stream:
                stream.load(modules[name])
            weight = modules[name].weight
            found[name] = quantize(type_for_row(types[name], weight.shape[1]), weight)
            weight.data = found[name].dequantize().to(weight)
            if stream:
                stream.done(modules[name], changed=True, found=found)
    return found


def _owners(model: torch.nn.Module, linears: dict) -> dict[torch.nn.Module, list[str]]:
    """The named Linears by what is read and written as one: their decoder layer, or themselves."""
    from ..models import decoder_layers

    names = {m: n for n, m in model.named_modules()}
    layer_of = {n: layer for layer in decoder_layers(model) for n, _ in layer.named_modules(prefix=names[layer])}
    out: dict[torch.nn.Module, list[str]] = {}
    for name, m in linears.items():
        out.setdefault(layer_of.get(name, m), []).append(name)
    return out


def allocation(kinds: dict, listed) -> dict:
    """{role: {type: count}}: what a mix gave each kind of tensor (the report lists it); `kinds` is
    {module name: (type, shape)}."""
    roles = {name: role for name, role, _, _ in listed}
    out: dict[str, dict[str, int]] = {}
    for name, (kind, _) in kinds.items():
        per = out.setdefault(roles.get(name, name), {})
        per[kind] = per.get(kind, 0) + 1
    return out
