"""GPTQ over a whole model, decoder layer by decoder layer (the per-Linear algorithm is
`quant.gptq`). Shared by `quantize: {method: gptq}` and `qat: {init: gptq}`; `cfg` is any config
with the Scheme fields plus `act_order`, `damp` and `calibration`."""

from __future__ import annotations

import torch

from .families import family_of
from .ggml import Blocks, type_for_row
from .ggml.grid import GgmlGrid
from .layerwise import Streamed
from .models import decoder_layers
from .progress import Bar
from .quant import Hessians, IntGrid, ValueHessians, gptq
from .quantized import quantized_linears

DAMP = 0.01  # dampening, as a fraction of the mean Hessian diagonal


def run_gptq(
    model: torch.nn.Module, cfg, blocks: torch.Tensor, device, types: dict | None = None, stream: Streamed | None = None
) -> dict:
    """GPTQ codes and scales for every quantized Linear, decoder layer by decoder layer: each
    layer's calibration inputs are the outputs of the layers before it, already quantized, and
    are computed once (the layer's own inputs are kept, not recomputed from the embeddings).
    Value projections are fitted per KV head to the inputs as attention mixes them
    (quant.ValueHessians), so calibration runs with eager attention. `types` ({module name: GGUF
    type}) quantizes the Linear layers it names, each on its type, instead of `cfg`'s grid.
    With `stream` the model's parameters are on the meta device: each module's weights are read
    when the work reaches it, written quantized with its integers, then dropped
    (layerwise.Streamed); nothing is returned, `stream.codes()` reads the integers back."""
    if types is None:
        names = {m: name for name, m in quantized_linears(model, cfg.lm_head).items()}
    else:
        names = {m: n for n, m in model.named_modules() if n in types and isinstance(m, torch.nn.Linear)}
    head = model.get_output_embeddings()
    batches = blocks[: cfg.calibration.samples].split(cfg.calibration.batch_size)
    layers = decoder_layers(model)
    family = family_of(model)
    kv_heads = getattr(model.config, "num_key_value_heads", None) or getattr(model.config, "num_attention_heads", None)
    attention = model.config._attn_implementation
    model.set_attn_implementation("eager")
    out, done = {}, 0
    bar = Bar("gptq", len(layers) + (head in names), unit="layer")
    try:
        hidden, per_layer = _layer_inputs(model, layers, batches, device, stream)
        with torch.no_grad():
            for layer, calls in zip(layers, per_layer):
                if stream:
                    stream.load(layer)
                mods = {names[m]: m for m in layer.modules() if m in names}
                value = names.get(family.value(layer))
                attn = layer.get_submodule(family.o_proj.rpartition(".")[0])
                hessians = Hessians({k: m for k, m in mods.items() if k != value})
                mixed = ValueHessians(attn, mods[value], kv_heads) if value else None
                for x, (args, kwargs) in zip(hidden, calls):
                    layer(x, *args, **kwargs)
                found = hessians.close() | ({value: mixed.close()} if mixed else {})
                done += len(found)  # before _quantize empties it
                _quantize(mods, found, cfg, out, types)
                hidden = [_hidden(layer(x, *args, **kwargs)) for x, (args, kwargs) in zip(hidden, calls)]
                if stream:
                    stream.done(layer, changed=True, found=out)
                bar.update(1, linears=done)
            if head in names:
                if stream:
                    stream.load(model.model.norm)
                    stream.load(head)
                hessians = Hessians({names[head]: head})
                for x in hidden:
                    head(model.model.norm(x))
                _quantize({names[head]: head}, hessians.close(), cfg, out, types)
                done += 1
                if stream:
                    stream.done(model.model.norm, changed=False)
                    stream.done(head, changed=True, found=out)
                bar.update(1, linears=done)
    finally:
        model.set_attn_implementation(attention)
    bar.close()
    return out


def _layer_inputs(
    model, layers, batches, device, stream: Streamed | None
) -> tuple[list[torch.Tensor], list[list[tuple[tuple, dict]]]]:
    """The first decoder layer's hidden states for each calibration batch, and the other
    arguments every layer receives (masks and rotary embeddings differ between sliding-window
    and global layers: Gemma 3), captured in one forward pass in which every decoder layer passes
    its input through untouched: what a layer receives besides the hidden states does not depend
    on them, and only the embeddings' weights are needed."""
    hidden: list[torch.Tensor] = []
    calls: list[list[tuple[tuple, dict]]] = [[] for _ in layers]

    def grab(i):
        def hook(_module, args, kwargs):
            if i == 0:
                hidden.append(args[0] if args else kwargs["hidden_states"])
            rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            calls[i].append((tuple(args[1:]), rest))
            if i == len(layers) - 1:
                raise _Enough

        return hook

    handles = [layer.register_forward_pre_hook(grab(i), with_kwargs=True) for i, layer in enumerate(layers)]
    for layer in layers:
        layer.forward = _passthrough
    embed = model.get_input_embeddings()
    if stream:
        stream.load(embed)
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    model(input_ids=batch.to(device), use_cache=False)
                except _Enough:
                    pass
    finally:
        for h in handles:
            h.remove()
        for layer in layers:
            del layer.forward
        if stream:
            stream.done(embed, changed=False)
    return hidden, calls


def _passthrough(hidden_states, *args, **kwargs):
    return hidden_states


def _hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _quantize(mods: dict, hessians: dict, cfg, out: dict, types: dict | None) -> None:
    """GPTQ each Linear on its Hessian (a stack of them: one per block of rows, e.g. per KV head);
    the layer then computes with the quantized weights. `hessians` is emptied as it goes, the
    narrowest first: each is GPTQ's workspace and freed after, so the widest works alone (a
    Hessian two Linears share is copied for the first)."""
    for name in sorted(hessians, key=lambda k: hessians[k].numel()):
        h = hessians.pop(name)
        if any(other is h for other in hessians.values()):  # shared (quant.Hessians): the last one works in it
            h = h.clone()
        m = mods[name]
        rows = zip(m.weight.chunk(len(h)), h) if h.dim() == 3 else [(m.weight, h)]
        kind = None if types is None else types[name]
        parts = [gptq(w, part, grid(cfg, w, kind), cfg.act_order, cfg.damp, overwrite=True) for w, part in rows]
        if isinstance(parts[0], Blocks):  # a GGUF type: the file's fields and codes
            blocks = Blocks.cat(parts, dim=0)
            m.weight.data = blocks.dequantize().to(m.weight)
            out[name] = blocks
            continue
        codes, s = torch.cat([c for c, _ in parts]), torch.cat([s for _, s in parts])
        g = codes.shape[1] // s.shape[1]
        m.weight.data = (codes * s.repeat_interleave(g, dim=1)).to(m.weight)
        out[name] = (codes.to(torch.int8).cpu(), s.cpu())


def grid(cfg, w: torch.Tensor, kind: str | None):
    """The grid a weight is quantized on: the GGUF type `kind` (llama.cpp's fallback for rows its
    blocks do not tile), or our INT grid of `cfg.bits` and `cfg.group_size`."""
    if kind is None:
        return IntGrid(cfg.bits, cfg.group_size)
    return GgmlGrid(type_for_row(kind, w.shape[1]), w.shape[0], w.shape[1])


class _Enough(Exception):
    """Stops a calibration forward once the last decoder layer has its arguments."""
