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
from ..gptq_model import DAMP, run_gptq
from ..quantized import Scheme, bnb_config, check_scheme, requantize, rtn_codes, torchao_config
from .base import StageContext, StageKind

BACKENDS = {"rtn": ("torchao",), "gptq": ("torchao",), "bnb": ("bitsandbytes",)}


class Config(Scheme):
    method: Literal["rtn", "gptq", "bnb"]
    backend: Literal["torchao", "bitsandbytes"] | None = Field(None, description="default: the method's own")
    format: Literal["nf4", "fp4"] = Field("nf4", description="bnb 4-bit data type")
    act_order: bool = Field(False, description="gptq: quantize columns by decreasing Hessian diagonal")
    damp: float = Field(DAMP, gt=0, lt=1, description="gptq: dampening, fraction of the mean Hessian diagonal")
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
