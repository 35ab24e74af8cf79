"""`llamacpp`: llama.cpp's own quantizer as a stage, so the file a llama.cpp user would make sits
beside ours in every report and in `compare`, measured by the same code on the same tokens.

The input model is written as an F32 GGUF by our exporter and quantized by `llama-quantize`
(built from the llama.cpp source vendored in the installed llama-cpp-python:
`python -m compressor.llamacpp_tools`) to one of its file types, with an importance matrix from
our calibration pass written in llama.cpp's own format (`imatrix: true`, what a llama.cpp user
runs; ggml/imatrix.py) or without one. The file is read back (exporters/gguf.read_blocks): the
model holds its values and ggml.safetensors its blocks, so `--format gguf` and the llama.cpp
runtime hand llama.cpp the very tensors its quantizer wrote.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..data import Calibration
from ..ggml.choice import keep_blocks, report_gguf
from ..ggml.mixes import PRESETS
from .base import StageContext, StageKind

TOOL = "llama-quantize"


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: str = Field(description=f"llama-quantize's file type: {', '.join(PRESETS)}")
    imatrix: bool = Field(True, description="weigh its scale search by our calibration's importance matrix")
    calibration: Calibration = Calibration(samples=64)

    @model_validator(mode="after")
    def _known(self) -> "Config":
        if self.type.upper() not in PRESETS:
            raise ValueError(f"type {self.type!r}: llama-quantize's types we read back are {', '.join(PRESETS)}")
        self.type = self.type.upper()
        if "calibration" in self.model_fields_set and not self.imatrix:
            raise ValueError("calibration: only an imatrix calibrates (imatrix is false)")
        return self


class LlamaCppQuantize(StageKind):
    Config = Config
    produces = "quantized"

    def check(self, cfg: Config, shape: dict, teacher_shape: dict) -> dict:
        from ..families import family_of
        from ..llamacpp_tools import missing_tool

        why = missing_tool(TOOL) or family_of(shape).gguf_refusal(shape)
        if why:
            raise ValueError(why)
        return shape

    def apply(self, model: torch.nn.Module, tokenizer, ctx: StageContext) -> torch.nn.Module:
        from ..exporters.gguf import read_blocks, write_gguf
        from ..ggml.imatrix import write_imatrix
        from ..ggml.model import activation_importance, tensors
        from ..llamacpp_tools import run_tool
        from ..progress import say

        cfg: Config = ctx.config
        model = model.float()
        work = ctx.scratch / "llamacpp"
        work.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(work)  # the exporter reads the vocabulary from tokenizer.json
        f32 = write_gguf(model, tokenizer, work, work / "f32.gguf", {"weights": "f32", "embeddings": "f32"}, ctx.name)
        listed, modules = tensors(model), dict(model.named_modules())
        extra = []
        if cfg.imatrix:
            blocks = ctx.train_blocks(ctx.seq_len)[: cfg.calibration.samples]
            linears = {name: modules[name] for name, _, layer, _ in listed if layer is not None}
            importance = activation_importance(model, linears, blocks, cfg.calibration.batch_size)
            dataset = f"{ctx.name}: {len(blocks)} calibration blocks of {blocks.shape[1]} tokens"
            path = write_imatrix(work / "imatrix.gguf", importance, blocks.numel(), listed, blocks.shape[1], dataset)
            extra = ["--imatrix", str(path)]
            ctx.info["calibration_samples"] = len(blocks)
        say(f"{TOOL} {cfg.type}" + (" with our importance matrix" if cfg.imatrix else " without an importance matrix"))
        out = work / f"{cfg.type}.gguf"
        run_tool(TOOL, *extra, str(f32), str(out), cfg.type, str(torch.get_num_threads()))
        found = read_blocks(model, out)
        for name, blocks in found.items():
            weight = modules[name].weight
            weight.data = blocks.dequantize().to(weight)
        ctx.info["llamacpp"] = {"type": cfg.type, "imatrix": cfg.imatrix, "file_bytes": out.stat().st_size}
        report_gguf(keep_blocks(found, ctx), listed, SimpleNamespace(type=None), ctx)
        f32.unlink()
        return model
