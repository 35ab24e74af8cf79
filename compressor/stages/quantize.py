"""`quantize` (PTQ): store the Linear weights of the decoder layers as INT8 or INT4.

Methods:
- `rtn`: round to nearest on a symmetric per-channel or per-group grid (the baseline);
- `gptq`: the same grid, columns quantized in turn with the rounding error spread over the rest
  through the inverse Hessian of the layer's calibration inputs, decoder layer by layer (each
  layer sees the inputs the already-quantized layers before it produce);
- `bnb`: bitsandbytes load-time quantization, LLM.int8 (8 bits) or NF4/FP4 (4 bits, packed).

GGUF types (`type: Q4_K`, any of llama.cpp's types in `compressor.ggml`, for every Linear; or
`mix: Q4_K_M`, llama.cpp's rule for which type each matrix gets, embeddings and output
included): rtn or gptq on the type's own grid, its fp16 and sub-block scales included, so the
values GPTQ feeds its error back with are the ones the file dequantizes to; a row a 256-weight
type does not tile takes llama.cpp's fallback type (the report says which). `target_bits: 4.8`
instead picks each matrix's type by its measured sensitivity per byte (ggml/budget.py). The
artifact holds the dequantized weights in float32 (what `from_pretrained` loads and torch
measures) and `ggml.safetensors`, each tensor's blocks as the GGUF file will hold them, which
`--format gguf` writes untouched. `importance:
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
from ..ggml import TYPES, ggml_type
from ..ggml import model as ggml_model
from ..ggml.mixes import PRESETS
from ..gptq_model import DAMP, run_gptq
from ..quantized import (
    GGML_FILE,
    Scheme,
    bnb_config,
    check_scheme,
    ggml_summary,
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
    type: str | None = Field(None, description=f"one GGUF type for every Linear: {', '.join(TYPES)}")
    mix: str | None = Field(None, description=f"llama.cpp's mix for every matrix: {', '.join(PRESETS)}")
    target_bits: float | None = Field(
        None, gt=2, le=8.5, description="GGUF types per matrix by measured sensitivity, to this many bits per weight"
    )
    importance: bool = Field(False, description="rtn on GGUF types: weigh errors by calibration activations")

    @model_validator(mode="after")
    def _runs(self) -> "Config":
        given = [f for f in ("type", "mix", "target_bits") if getattr(self, f) is not None]
        if len(given) > 1:
            raise ValueError(
                f"{' and '.join(given)}: give one (type: one GGUF type for the Linears; mix: llama.cpp's rule; "
                "target_bits: a budget)"
            )
        gguf = self.type or self.mix or (f"target_bits {self.target_bits}" if self.target_bits else None)
        if self.type is not None:
            self.type = ggml_type(self.type).name
        if self.mix is not None:
            if self.mix.upper() not in PRESETS:
                raise ValueError(f"mix {self.mix!r} is not one of llama.cpp's we follow; mixes: {', '.join(PRESETS)}")
            self.mix = self.mix.upper()
        if gguf is not None:
            what = f"type {self.type}" if self.type else f"mix {self.mix}" if self.mix else gguf
            if self.method == "bnb":
                raise ValueError(f"{what}: GGUF types are quantized by method rtn or gptq, not bnb")
            grid_fields = ("bits", "group_size", "activations", "backend", "format")
            grid_fields += ("lm_head",) if self.type is None else ()
            clash = [f for f in grid_fields if f in self.model_fields_set]
            if clash:
                raise ValueError(f"{clash[0]}: {what} is the whole grid; leave {clash[0]} out")
        if self.importance and (gguf is None or self.method != "rtn"):
            raise ValueError("importance: for method rtn with a GGUF type or mix (gptq always weighs by its Hessian)")
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
        if cfg.target_bits is not None:
            from ..ggml.budget import smallest_bits

            least = smallest_bits(ggml_model.shape_sizes(shape))
            if cfg.target_bits < least:
                raise ValueError(
                    f"target_bits {cfg.target_bits}: no mix of GGUF types is that small for this model; "
                    f"the smallest is {least:.2f} bits per weight (every matrix in Q2_K or its fallback)"
                )
            return shape
        if cfg.type is not None or cfg.mix is not None:
            if cfg.lm_head and shape.get("tie_word_embeddings"):
                raise ValueError("lm_head: true, but the head is tied to the embeddings (a mix quantizes both)")
            ggml_model.assign(ggml_model.shape_tensors(shape), shape, cfg.type, cfg.mix, cfg.lm_head, True)
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
        if cfg.type is not None or cfg.mix is not None or cfg.target_bits is not None:
            return on_ggml_types(model, cfg, ctx)
        if cfg.method == "gptq":
            codes = run_gptq(model, cfg, ctx.train_blocks(ctx.seq_len), ctx.device)
            ctx.info.update(calibration_samples=cfg.calibration.samples)
        else:
            codes = rtn_codes(model, cfg)
        return requantize(model, folder, torchao_config(cfg), ctx.device, codes)


def on_ggml_types(model: torch.nn.Module, cfg: Config, ctx: StageContext) -> torch.nn.Module:
    """rtn or gptq on GGUF types (one `type`, or llama.cpp's `mix`); the model keeps the values the
    file will hold, the blocks go to ggml.safetensors beside them."""
    listed = ggml_model.tensors(model)
    calibrate = lambda: ctx.train_blocks(ctx.seq_len)[: cfg.calibration.samples]  # noqa: E731
    if cfg.target_bits is not None:
        types = ggml_model.budgeted(model, listed, cfg.target_bits, calibrate, cfg.calibration.batch_size)
    else:
        imatrix = cfg.method == "gptq" or cfg.importance  # what llama.cpp's mix rules call "has an imatrix"
        types = ggml_model.assign(listed, model.config.to_dict(), cfg.type, cfg.mix, cfg.lm_head, imatrix)
    found = ggml_model.quantize_model(model, types, cfg.method, calibrate, cfg)
    if cfg.method == "gptq" or cfg.importance or cfg.target_bits:
        ctx.info.update(calibration_samples=cfg.calibration.samples)
    ctx.info["gguf_types"] = ggml_summary(found)
    ctx.info["gguf_allocation"] = ggml_model.allocation(found, listed)
    weights = sum(b.shape[0] * b.shape[1] for b in found.values())
    ctx.info["gguf_bits_per_weight"] = round(8 * sum(b.nbytes() for b in found.values()) / weights, 3)
    if cfg.type is not None:
        fallbacks = sorted({n.rpartition(".")[2] for n, b in found.items() if b.type.name != cfg.type})
        if fallbacks:
            ctx.info["gguf_fallback"] = (
                f"{', '.join(fallbacks)}: rows not a multiple of {TYPES[cfg.type].block}, written as "
                f"{', '.join(sorted({b.type.name for b in found.values()} - {cfg.type}))} (llama.cpp's rule)"
            )
    ctx.files[GGML_FILE] = lambda path: write_ggml(path, found)
    return model
