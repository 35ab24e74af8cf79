"""`quantize` (PTQ): store the Linear weights of the decoder layers as INT8 or INT4.

Methods:
- `rtn`: round to nearest on a symmetric per-channel or per-group grid (the baseline);
- `gptq`: the same grid, columns quantized in turn with the rounding error spread over the rest
  through the inverse Hessian of the layer's calibration inputs, decoder layer by layer (each
  layer sees the inputs the already-quantized layers before it produce);
- `bnb`: bitsandbytes load-time quantization, LLM.int8 (8 bits) or NF4/FP4 (4 bits, packed).

GGUF types (`type: Q4_K`, any of llama.cpp's types in `compressor.ggml`): rtn or gptq on the
type's own grid, its fp16 and sub-block scales included, so the values GPTQ feeds its error
back with are the ones the file dequantizes to; a row a 256-weight type does not tile takes
llama.cpp's fallback type (the report says which). The artifact holds the dequantized weights in
float32 (what `from_pretrained` loads and torch measures) and `ggml.safetensors`, each tensor's
blocks as the GGUF file will hold them, which `--format gguf` writes untouched. `importance:
true` weights rtn's scale search by each input column's mean squared activation on calibration
blocks (what llama.cpp's imatrix measures); gptq always weights it by its Hessian's diagonal.

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
from ..ggml import TYPES, ggml_type, quantize, type_for_row
from ..gptq_model import DAMP, run_gptq
from ..models import head_dim
from ..quant import Importance
from ..quantized import (
    GGML_FILE,
    Scheme,
    bnb_config,
    check_scheme,
    ggml_summary,
    quantized_linears,
    requantize,
    rtn_codes,
    torchao_config,
    write_ggml,
)
from .base import StageContext, StageKind

BACKENDS = {"rtn": ("torchao",), "gptq": ("torchao",), "bnb": ("bitsandbytes",)}


class Config(Scheme):
    method: Literal["rtn", "gptq", "bnb"]
    backend: Literal["torchao", "bitsandbytes"] | None = Field(None, description="default: the method's own")
    format: Literal["nf4", "fp4"] = Field("nf4", description="bnb 4-bit data type")
    act_order: bool = Field(False, description="gptq: quantize columns by decreasing Hessian diagonal")
    damp: float = Field(DAMP, gt=0, lt=1, description="gptq: dampening, fraction of the mean Hessian diagonal")
    calibration: Calibration = Calibration(samples=64)
    type: str | None = Field(None, description=f"a GGUF type, llama.cpp's grid: {', '.join(TYPES)}")
    importance: bool = Field(False, description="rtn on a GGUF type: weigh errors by calibration activations")

    @model_validator(mode="after")
    def _runs(self) -> "Config":
        if self.type is not None:
            self.type = ggml_type(self.type).name
            if self.method == "bnb":
                raise ValueError(f"type {self.type}: a GGUF type is quantized by method rtn or gptq, not bnb")
            grid_fields = ("bits", "group_size", "activations", "backend", "format")
            clash = [f for f in grid_fields if f in self.model_fields_set]
            if clash:
                raise ValueError(f"{clash[0]}: type {self.type} is the whole grid; leave {clash[0]} out")
        if self.importance and (self.type is None or self.method != "rtn"):
            raise ValueError("importance: for method rtn with a GGUF type (gptq always weighs by its Hessian)")
        backends = BACKENDS[self.method]
        if self.backend is None:
            self.backend = backends[0]
        if self.backend not in backends:
            raise ValueError(f"backend {self.backend} does not run {self.method}; it runs on {', '.join(backends)}")
        if self.method == "bnb" and self.activations != "none":
            raise ValueError("activations: int8 is a torchao path (method rtn or gptq); bnb quantizes weights only")
        return self


class Quantize(StageKind):
    Config = Config
    produces = "quantized"
    needs_float = False  # after another quantization it is refused as a second one, not for this
    algorithm = 2  # 2: llama.cpp's grid (max|w| / -8), value projections fitted through attention

    def check(self, cfg: Config, shape: dict, teacher_shape: dict) -> dict:
        if cfg.type is not None:
            check_rows(cfg.type, shape, cfg.lm_head)
            return shape
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
        if cfg.type is not None:
            return on_ggml_type(model, cfg, ctx)
        if cfg.method == "gptq":
            codes = run_gptq(model, cfg, ctx.train_blocks(ctx.seq_len), ctx.device)
            ctx.info.update(calibration_samples=cfg.calibration.samples)
        else:
            codes = rtn_codes(model, cfg)
        return requantize(model, folder, torchao_config(cfg), ctx.device, codes)


def check_rows(name: str, shape: dict, lm_head: bool) -> None:
    """Every quantized Linear's rows must take the type, or llama.cpp's fallback for it."""
    widths = {"hidden_size": shape["hidden_size"], "intermediate_size": shape["intermediate_size"]}
    widths["attention output"] = shape["num_attention_heads"] * head_dim(shape)
    bad = {k: v for k, v in widths.items() if type_for_row(name, v) is None}
    if bad:
        raise ValueError(
            f"type {name}: rows of {', '.join(f'{k} {v}' for k, v in bad.items())} weights fit no GGUF block "
            "(a multiple of 32 is needed)"
        )
    if lm_head and shape.get("tie_word_embeddings"):
        raise ValueError("lm_head: true, but the head is tied to the embeddings, which stay in float")


def on_ggml_type(model: torch.nn.Module, cfg: Config, ctx: StageContext) -> torch.nn.Module:
    """rtn or gptq on a GGUF type; the model keeps the dequantized weights, the blocks go to
    ggml.safetensors beside them."""
    if cfg.method == "gptq":
        found = run_gptq(model, cfg, ctx.train_blocks(ctx.seq_len), ctx.device)
        ctx.info.update(calibration_samples=cfg.calibration.samples)
    else:
        linears = quantized_linears(model, cfg.lm_head)
        importance = activation_importance(model, linears, cfg, ctx) if cfg.importance else {}
        found = {}
        for name, m in linears.items():
            found[name] = quantize(type_for_row(cfg.type, m.in_features), m.weight, importance.get(name))
            m.weight.data = found[name].dequantize().to(m.weight)
    ctx.info["gguf_types"] = ggml_summary(found)
    fallbacks = sorted({n.rpartition(".")[2] for n, b in found.items() if b.type.name != cfg.type})
    if fallbacks:
        ctx.info["gguf_fallback"] = (
            f"{', '.join(fallbacks)}: rows not a multiple of {TYPES[cfg.type].block}, written as "
            f"{', '.join(sorted({b.type.name for b in found.values()} - {cfg.type}))} (llama.cpp's rule)"
        )
    ctx.files[GGML_FILE] = lambda path: write_ggml(path, found)
    return model


def activation_importance(model, linears: dict, cfg: Config, ctx: StageContext) -> dict:
    """Each Linear's mean squared input per column over the calibration blocks (float model)."""
    blocks = ctx.train_blocks(ctx.seq_len)[: cfg.calibration.samples]
    hooks = Importance(linears)
    try:
        with torch.no_grad():
            for batch in blocks.split(cfg.calibration.batch_size):
                model(input_ids=batch.to(ctx.device), use_cache=False)
    finally:
        found = hooks.close()
    ctx.info.update(calibration_samples=len(blocks))
    return found
