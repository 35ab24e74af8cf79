"""`qat`: quantization-aware distillation. The decoder's Linear weights compute through the
INT8/INT4 grid in the forward pass (straight-through gradients to the float weights), optionally
with dynamic INT8 activations, while the model is distilled from the teacher with every knob
of `compressor.kd` (the teacher chosen as in `recover`). Then the weights are converted to the
same stored format `quantize` produces, so export and measurement treat both alike.
"""

from __future__ import annotations

import torch
from torch.nn.utils import parametrize

from ..kd import Recovery, check_recovery, distill_train, recovery_start
from ..quant import FakeQuant, fake_quant_activations
from ..quantized import Scheme, check_scheme, quantized_linears, requantize, rtn_codes, torchao_config
from .base import StageContext, StageKind


class Config(Recovery, Scheme):
    pass


class QAT(StageKind):
    Config = Config
    produces = "quantized"
    algorithm = 2  # 2: trains on and stores llama.cpp's grid (max|w| / -8)

    def check(self, cfg: Config, shape: dict, teacher_shape: dict) -> dict:
        check_scheme(cfg, shape, "torchao")
        return check_recovery(cfg, shape, teacher_shape)

    def white_box_fields(self, cfg: Config) -> str | None:
        return cfg.logits_field()

    def apply(self, model: torch.nn.Module, tokenizer, ctx: StageContext) -> torch.nn.Module:
        model, teacher, cfg = recovery_start(model, ctx)
        linears = quantized_linears(model, cfg.lm_head)
        hooks = []
        for m in linears.values():
            parametrize.register_parametrization(m, "weight", FakeQuant(cfg.bits, cfg.group_size))
            if cfg.activations == "int8":
                hooks.append(m.register_forward_pre_hook(lambda _m, args: (fake_quant_activations(args[0]),)))
        ctx.info["fake_quantized"] = len(linears)
        ctx.info.update(distill_train(model, teacher, cfg, ctx))
        for h in hooks:
            h.remove()
        for m in linears.values():
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
        return requantize(model, ctx.scratch / "float", torchao_config(cfg), ctx.device, rtn_codes(model, cfg))
