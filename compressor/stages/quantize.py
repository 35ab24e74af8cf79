"""`quantize` (PTQ): store the Linear weights of the decoder layers as INT8 or INT4.

Methods:
- `rtn`: round to nearest on a symmetric per-channel or per-group grid (the baseline);
- `gptq`: the same grid, columns quantized in turn with the rounding error spread over the rest
  through the inverse Hessian of the layer's calibration inputs, decoder layer by layer (each
  layer sees the inputs the already-quantized layers before it produce);
- `bnb`: bitsandbytes load-time quantization, LLM.int8 (8 bits) or NF4/FP4 (4 bits, packed).

Backends (what stores the result and runs it): `torchao` holds rtn and gptq as
`IntxUnpackedToInt8Tensor` (weight-only, or with `activations: int8` dynamic per-token INT8
activations); `bitsandbytes` holds bnb. Either way the artifact is a `from_pretrained` folder
with its quantization config and safetensors weights. The embeddings and `lm_head` stay in
float unless `lm_head: true`.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from ..data import Calibration
from ..models import decoder_layers
from ..progress import Bar
from ..quant import Hessians, ValueHessians, gptq
from ..quantized import Scheme, bnb_config, check_scheme, quantized_linears, requantize, rtn_codes, torchao_config
from .base import StageContext, StageKind

BACKENDS = {"rtn": ("torchao",), "gptq": ("torchao",), "bnb": ("bitsandbytes",)}


class Config(Scheme):
    method: Literal["rtn", "gptq", "bnb"]
    backend: Literal["torchao", "bitsandbytes"] | None = Field(None, description="default: the method's own")
    format: Literal["nf4", "fp4"] = Field("nf4", description="bnb 4-bit data type")
    act_order: bool = Field(False, description="gptq: quantize columns by decreasing Hessian diagonal")
    damp: float = Field(0.01, gt=0, lt=1, description="gptq: dampening, fraction of the mean Hessian diagonal")
    calibration: Calibration = Calibration(samples=64)

    @model_validator(mode="after")
    def _runs(self) -> "Config":
        backends = BACKENDS[self.method]
        if self.backend is None:
            self.backend = backends[0]
        if self.backend not in backends:
            raise ValueError(f"backend {self.backend} does not run {self.method}; it runs on {', '.join(backends)}")
        if self.method == "bnb" and self.activations != "none":
            raise ValueError("activations: int8 is a torchao path (method rtn or gptq); bnb quantizes weights only")
        return self


def run_gptq(model: torch.nn.Module, cfg: Config, blocks: torch.Tensor, device) -> dict:
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


def _quantize(mods: dict, hessians: dict, cfg: Config, out: dict) -> None:
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


class Quantize(StageKind):
    Config = Config
    produces = "quantized"
    needs_float = False  # after another quantization it is refused as a second one, not for this
    algorithm = 2  # 2: llama.cpp's grid (max|w| / -8), value projections fitted through attention

    def check(self, cfg: Config, shape: dict, teacher_shape: dict) -> dict:
        if cfg.method == "bnb" and cfg.bits == 8 and cfg.group_size not in (None, 64):
            raise ValueError("bnb 8-bit (LLM.int8) has one scale per row: leave group_size out")
        check_scheme(cfg, shape, cfg.backend)
        return shape

    def apply(self, model: torch.nn.Module, tokenizer, ctx: StageContext) -> torch.nn.Module:
        cfg: Config = ctx.config
        model = model.float()
        folder = ctx.scratch / "float"
        if cfg.method == "bnb":
            # saved before any forward pass: a bnb 4-bit model saved after one reloads wrong on CPU
            return requantize(model, folder, bnb_config(cfg, cfg.format), ctx.device)
        if cfg.method == "gptq":
            codes = run_gptq(model, cfg, ctx.train_blocks(ctx.seq_len), ctx.device)
            ctx.info.update(calibration_samples=cfg.calibration.samples)
        else:
            codes = rtn_codes(model, cfg)
        return requantize(model, folder, torchao_config(cfg), ctx.device, codes)
