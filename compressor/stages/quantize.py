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

import shutil
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator

from ..data import Calibration
from ..ggml.choice import GgufChoice, check_gguf, choose_types, keep_blocks, report_gguf
from ..gptq_model import DAMP, run_gptq
from ..layerwise import Checkpoint, Streamed
from ..memory import RUNTIME, for_gptq, measuring, module_at_work, parameters
from ..quantized import Scheme, bnb_config, check_scheme, ggml_kinds, requantize, rtn_codes, torchao_config
from .base import StageContext, StageKind, layerwise_field

BACKENDS = {"rtn": ("torchao",), "gptq": ("torchao",), "bnb": ("bitsandbytes",)}


class Config(Scheme, GgufChoice):
    method: Literal["rtn", "gptq", "bnb"]
    backend: Literal["torchao", "bitsandbytes"] | None = Field(None, description="default: the method's own")
    format: Literal["nf4", "fp4"] = Field("nf4", description="bnb 4-bit data type")
    act_order: bool = Field(False, description="gptq: quantize columns by decreasing Hessian diagonal")
    damp: float = Field(DAMP, gt=0, lt=1, description="gptq: dampening, fraction of the mean Hessian diagonal")
    calibration: Calibration = Calibration(samples=64)
    importance: bool = Field(False, description="rtn on GGUF types: weigh errors by calibration activations")
    layerwise: bool = layerwise_field("GGUF types: read the input a decoder layer at a time, write each as it is done")

    @model_validator(mode="after")
    def _runs(self) -> "Config":
        gguf = self.gguf()
        if gguf is not None:
            if self.method == "bnb":
                raise ValueError(f"{gguf}: GGUF types are quantized by method rtn or gptq, not bnb")
            self.refuse_grid_fields(("bits", "group_size", "activations", "backend", "format"))
        if self.importance and (gguf is None or self.method != "rtn"):
            raise ValueError("importance: for method rtn with a GGUF type or mix (gptq always weighs by its Hessian)")
        if self.layerwise:
            self._layer_by_layer(gguf)
        backends = BACKENDS[self.method]
        if self.backend is None:
            self.backend = backends[0]
        if self.backend not in backends:
            raise ValueError(f"backend {self.backend} does not run {self.method}; it runs on {', '.join(backends)}")
        if self.method == "bnb" and self.activations != "none":
            raise ValueError("activations: int8 is a torchao path (method rtn or gptq); bnb quantizes weights only")
        return self

    def _layer_by_layer(self, gguf: str | None) -> None:
        """What cannot run a decoder layer at a time, refused."""
        if gguf is None or self.method == "bnb":
            raise ValueError(
                "layerwise: writes GGUF types (type: or mix:, method rtn or gptq); the torchao and bitsandbytes "
                "formats are made by loading the whole model (type: Q4_0 or Q8_0 is llama.cpp's INT4 or INT8 grid)"
            )
        if self.target_bits is not None:
            raise ValueError("layerwise: target_bits ranks every matrix of the whole model; give a type or mix")
        if self.importance:
            raise ValueError(
                "layerwise: importance weighs by the whole model's activations; method gptq weighs "
                "each layer by its own Hessian as it goes"
            )


class Quantize(StageKind):
    Config = Config
    produces = "quantized"
    needs_float = False  # after another quantization it is refused as a second one, not for this
    # 2: llama.cpp's grid (max|w| / -8), value projections fitted through attention;
    # 3: σ² per type as llama.cpp weighs an imatrix; 4: GPTQ's lazy batches (the same sums in another order)
    algorithm = 4

    def check(self, cfg: Config, shape: dict, teacher_shape: dict) -> dict:
        if cfg.gguf() is not None:
            check_gguf(cfg, shape)
            return shape
        if cfg.method == "bnb" and cfg.bits == 8 and cfg.group_size not in (None, 64):
            raise ValueError("bnb 8-bit (LLM.int8) has one scale per row: leave group_size out")
        check_scheme(cfg, shape, cfg.backend)
        return shape

    def memory(self, cfg: Config, before: dict, after: dict, teacher: dict, run) -> tuple[dict, list[str]]:
        streamable = cfg.method != "bnb" and not (cfg.layerwise or cfg.target_bits or cfg.importance)
        layerwise = ["layerwise: true" + ("" if cfg.gguf() else " with a type or mix")] if streamable else []
        if cfg.method == "gptq":
            parts, fixes = for_gptq(before, cfg.calibration, run.seq_len, cfg.lm_head, cfg.layerwise)
            return parts, fixes + layerwise
        if cfg.layerwise:
            return {"runtime": RUNTIME, "the module at work": module_at_work(before)}, []
        parts = measuring(before, cfg.calibration.batch_size, run.seq_len)
        if cfg.method == "rtn":
            parts["integer codes"] = parameters(before)  # a byte per weight until the artifact is written
        return parts, layerwise

    def streams(self, cfg: Config) -> bool:
        return cfg.layerwise

    def apply(self, model: torch.nn.Module, tokenizer, ctx: StageContext) -> torch.nn.Module | Path:
        cfg: Config = ctx.config
        if cfg.layerwise:
            return on_ggml_types(model, cfg, ctx)
        model = model.float()
        folder = ctx.scratch / "float"
        if cfg.method == "bnb":
            # saved before any forward pass: a bnb 4-bit model saved after one reloads wrong on CPU
            return requantize(model, folder, bnb_config(cfg, cfg.format), ctx.device)
        if cfg.gguf() is not None:
            return on_ggml_types(model, cfg, ctx)
        if cfg.method == "gptq":
            codes = run_gptq(model, cfg, ctx.train_blocks(ctx.seq_len), ctx.device)
            ctx.info.update(calibration_samples=cfg.calibration.samples)
        else:
            codes = rtn_codes(model, cfg)
        return requantize(model, folder, torchao_config(cfg), ctx.device, codes)


def on_ggml_types(model: torch.nn.Module, cfg: Config, ctx: StageContext) -> torch.nn.Module | Path:
    """rtn or gptq on GGUF types (one `type`, llama.cpp's `mix`, or a budget); the model keeps the
    values the file will hold, the blocks go to ggml.safetensors beside them. `layerwise`: `model`
    is the input's skeleton, read from `ctx.source` a decoder layer at a time and written, with its
    blocks, into the folder returned."""
    from ..ggml.model import quantize_model

    calibrate = lambda: ctx.train_blocks(ctx.seq_len)[: cfg.calibration.samples]  # noqa: E731
    imatrix = cfg.method == "gptq" or cfg.importance  # what llama.cpp's mix rules call "has an imatrix"
    listed, types = choose_types(model, cfg, calibrate, imatrix)
    stream = None
    if cfg.layerwise:
        out = ctx.scratch / "layerwise"
        shutil.rmtree(out, ignore_errors=True)  # a killed attempt's layers
        stream = Streamed(model, Checkpoint(ctx.source), out, ctx.device)
    found = quantize_model(model, types, cfg.method, calibrate, cfg, stream)
    if cfg.method == "gptq" or cfg.importance or cfg.target_bits:
        ctx.info.update(calibration_samples=cfg.calibration.samples)
    if stream is None:
        report_gguf(keep_blocks(found, ctx), listed, cfg, ctx)
        return model
    stream.finish()
    report_gguf(ggml_kinds(out), listed, cfg, ctx)
    return out
