"""GPTQ over a whole model, decoder layer by decoder layer (the per-Linear algorithm is
`quant.gptq`). Shared by `quantize: {method: gptq}` and `qat: {init: gptq}`; `cfg` is any config
with the Scheme fields plus `act_order`, `damp` and `calibration`."""

from __future__ import annotations

import torch

from .models import decoder_layers
from .progress import Bar
from .quant import Hessians, ValueHessians, gptq
from .quantized import quantized_linears

DAMP = 0.01  # dampening, as a fraction of the mean Hessian diagonal


def run_gptq(model: torch.nn.Module, cfg, blocks: torch.Tensor, device) -> dict:
    """GPTQ codes and scales for every quantized Linear, decoder layer by decoder layer: each
    layer's calibration inputs are the outputs of the layers before it, already quantized, and
    are computed once (the layer's own inputs are kept, not recomputed from the embeddings).
    Value projections are fitted per KV head to the inputs as attention mixes them
    (quant.ValueHessians), so calibration runs with eager attention."""
    names = {m: name for name, m in quantized_linears(model, cfg.lm_head).items()}
    batches = blocks[: cfg.calibration.samples].split(cfg.calibration.batch_size)
    layers = decoder_layers(model)
    kv_heads = getattr(model.config, "num_key_value_heads", None) or getattr(model.config, "num_attention_heads", None)
    attention = model.config._attn_implementation
    model.set_attn_implementation("eager")
    out = {}
    bar = Bar("gptq", len(layers) + cfg.lm_head, unit="layer")
    try:
        inputs = _first_layer_inputs(model, layers[0], batches, device)
        with torch.no_grad():
            for layer in layers:
                mods = {names[m]: m for m in layer.modules() if m in names}
                value = getattr(getattr(layer, "self_attn", None), "v_proj", None)
                value = names.get(value) if kv_heads else None
                hessians = Hessians({k: m for k, m in mods.items() if k != value})
                mixed = ValueHessians(layer.self_attn, mods[value], kv_heads) if value else None
                for args, kwargs in inputs:
                    layer(*args, **kwargs)
                found = hessians.close() | ({value: mixed.close()} if mixed else {})
                _quantize(mods, found, cfg, out)
                inputs = [((_hidden(layer(*args, **kwargs)), *args[1:]), kwargs) for args, kwargs in inputs]
                bar.update(1, linears=len(out))
            if cfg.lm_head:
                head = model.get_output_embeddings()
                hessians = Hessians({names[head]: head})
                for args, _ in inputs:
                    head(model.model.norm(args[0]))
                _quantize({names[head]: head}, hessians.close(), cfg, out)
                bar.update(1, linears=len(out))
    finally:
        model.set_attn_implementation(attention)
    bar.close()
    return out


def _first_layer_inputs(model, first: torch.nn.Module, batches, device) -> list[tuple[tuple, dict]]:
    """The arguments the first decoder layer receives for each calibration batch."""
    captured = []

    def grab(_module, args, kwargs):
        captured.append((args, kwargs))
        raise _Enough

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    model(input_ids=batch.to(device), use_cache=False)
                except _Enough:
                    pass
    finally:
        handle.remove()
    return captured


def _hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _quantize(mods: dict, hessians: dict, cfg, out: dict) -> None:
    """GPTQ each Linear on its Hessian (a stack of them: one per block of rows, e.g. per KV head);
    the layer then computes with the quantized weights."""
    for name, h in hessians.items():
        m = mods[name]
        rows = zip(m.weight.chunk(len(h)), h) if h.dim() == 3 else [(m.weight, h)]
        parts = [gptq(w, part, cfg.bits, cfg.group_size, cfg.act_order, cfg.damp) for w, part in rows]
        codes, s = torch.cat([c for c, _ in parts]), torch.cat([s for _, s in parts])
        g = codes.shape[1] // s.shape[1]
        m.weight.data = (codes * s.repeat_interleave(g, dim=1)).to(m.weight)
        out[name] = (codes.cpu(), s.cpu())


class _Enough(Exception):
    """Stops a calibration forward once the first decoder layer has its inputs."""
