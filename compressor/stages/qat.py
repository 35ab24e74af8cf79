"""`qat`: quantization-aware distillation. The decoder's Linear weights compute through the
INT8/INT4 grid in the forward pass (straight-through gradients to the float weights), optionally
with dynamic INT8 activations, while the model is distilled from the teacher with every knob
of `compressor.kd` (the teacher chosen as in `recover`). Then the weights are converted to the
same stored format `quantize` produces, so export and measurement treat both alike.

`init: gptq` starts the training from GPTQ's solution instead of the float weights (whose first
forward is round-to-nearest): the weights are set to GPTQ's dequantized codes, so training
starts where `quantize: {method: gptq}` ends and only has to improve on it. The grid's scales are
recomputed from the weights as training moves them; `info.init_scales_kept` says for what share
of the groups GPTQ's own scales are the ones the first step computes with.

GGUF types (`type:`, `mix:` or `target_bits:`, as in `quantize`): training starts from
`quantize`'s solution on those types (`init: rtn`, with importance from the calibration blocks,
or `init: gptq`), keeps each block's stored fields (fp16 d, sub-block scales and mins) and rounds
every weight against them in the forward pass (ggml.grid.OnFields), so the values trained
through are the file's; the codes are re-rounded at the end and stored as `quantize` stores
them. The token embedding (and a head tied to it) keeps its starting quantization: a lookup has
no rounding to train through, and the tied head's logits must be the file's.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch.nn.utils import parametrize

from ..data import Calibration
from ..ggml.choice import GgufChoice, check_gguf, choose_types, keep_blocks, report_gguf
from ..gptq_model import DAMP, run_gptq
from ..kd import Recovery, check_recovery, distill_train, recovery_start
from ..memory import for_gptq, for_training, parameters
from ..quant import FakeQuant, fake_quant_activations, scales
from ..quantized import Scheme, check_scheme, quantized_linears, requantize, rtn_codes, torchao_config
from .base import StageContext, StageKind


class Config(Recovery, Scheme, GgufChoice):
    init: Literal["rtn", "gptq"] = Field("rtn", description="where training starts: the float weights, or GPTQ's")
    calibration: Calibration = Field(Calibration(samples=64), description="init gptq: its calibration blocks")

    @model_validator(mode="after")
    def _calibrated(self) -> "Config":
        if self.gguf() is not None:
            self.refuse_grid_fields(("bits", "group_size", "activations"))
        elif "calibration" in self.model_fields_set and self.init != "gptq":
            raise ValueError("calibration: only init: gptq calibrates on the INT grid (init is rtn)")
        return self


def gptq_start(model: torch.nn.Module, cfg: Config, ctx: StageContext) -> float:
    """Set the Linear weights to GPTQ's dequantized codes (act-order, as `quantize` runs it);
    returns the share of groups whose recomputed scale is GPTQ's."""
    settings = SimpleNamespace(
        bits=cfg.bits,
        group_size=cfg.group_size,
        lm_head=cfg.lm_head,
        calibration=cfg.calibration,
        act_order=True,
        damp=DAMP,
    )
    found = run_gptq(model, settings, ctx.train_blocks(ctx.seq_len), ctx.device)
    linears = quantized_linears(model, cfg.lm_head)
    kept = [
        torch.isclose(scales(linears[name].weight, cfg.bits, cfg.group_size).cpu(), s).float()
        for name, (_, s) in found.items()
    ]
    return float(torch.cat([k.flatten() for k in kept]).mean())


class QAT(StageKind):
    Config = Config
    produces = "quantized"
    trains = True
    # 2: trains on and stores llama.cpp's grid (max|w| / -8); 3: σ² per type as llama.cpp weighs an imatrix;
    # 4: GPTQ's lazy batches (the same sums in another order)
    algorithm = 4

    def check(self, cfg: Config, shape: dict, teacher_shape: dict) -> dict:
        if cfg.gguf() is not None:
            check_gguf(cfg, shape)
        else:
            check_scheme(cfg, shape, "torchao")
        return check_recovery(cfg, shape, teacher_shape)

    def memory(self, cfg: Config, before: dict, after: dict, teacher: dict, run) -> tuple[dict, list[str]]:
        """Training through fake-quantized weights, or (when larger) the GPTQ start beside the teacher."""
        source = cfg.teacher_shape(before, teacher)
        parts, fixes = for_training(cfg, after, source, run)
        parts["fake-quantized weights"] = 4 * parameters(after)
        if cfg.init == "gptq":
            start, fewer = for_gptq(before, cfg.calibration, run.seq_len, cfg.lm_head)
            if "teacher" in parts:  # loaded before the start
                start["teacher"] = parts["teacher"]
            if sum(start.values()) > sum(parts.values()):
                return start, fewer
        return parts, fixes

    def same_tokens_field(self, cfg: Config) -> str | None:
        return cfg.same_tokens_field()

    def white_box_fields(self, cfg: Config) -> str | None:
        return cfg.logits_field()

    def apply(self, model: torch.nn.Module, tokenizer, ctx: StageContext) -> torch.nn.Module:
        model, teacher, cfg = recovery_start(model, ctx)
        if cfg.gguf() is not None:
            return on_ggml_types(model, tokenizer, teacher, cfg, ctx)
        if cfg.init == "gptq":
            ctx.info["init_scales_kept"] = gptq_start(model, cfg, ctx)
        linears = quantized_linears(model, cfg.lm_head)
        hooks = []
        for m in linears.values():
            parametrize.register_parametrization(m, "weight", FakeQuant(cfg.bits, cfg.group_size))
            if cfg.activations == "int8":
                hooks.append(m.register_forward_pre_hook(lambda _m, args: (fake_quant_activations(args[0]),)))
        ctx.info["fake_quantized"] = len(linears)
        ctx.info.update(distill_train(model, tokenizer, teacher, cfg, ctx))
        for h in hooks:
            h.remove()
        for m in linears.values():
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
        return requantize(model, ctx.scratch / "float", torchao_config(cfg), ctx.device, rtn_codes(model, cfg))


def on_ggml_types(model: torch.nn.Module, tokenizer, teacher, cfg: Config, ctx: StageContext) -> torch.nn.Module:
    """Distill through GGUF types' values from `quantize`'s solution on them, their fields kept."""
    from ..ggml.grid import OnFields
    from ..ggml.model import quantize_model

    calibrate = lambda: ctx.train_blocks(ctx.seq_len)[: cfg.calibration.samples]  # noqa: E731
    listed, types = choose_types(model, cfg, calibrate, imatrix=True)
    start = SimpleNamespace(
        calibration=cfg.calibration, act_order=True, damp=DAMP, lm_head=cfg.lm_head, importance=True
    )
    found = quantize_model(model, types, cfg.init, calibrate, start)
    ctx.info["calibration_samples"] = cfg.calibration.samples
    modules = dict(model.named_modules())
    trained = {n: OnFields(b) for n, b in found.items() if isinstance(modules[n], torch.nn.Linear)}
    for name in found.keys() - trained.keys():  # the embedding, and a head tied to it
        modules[name].weight.requires_grad_(False)
    for name, on in trained.items():
        parametrize.register_parametrization(modules[name], "weight", on)
    ctx.info["fake_quantized"] = len(trained)
    ctx.info.update(distill_train(model, tokenizer, teacher, cfg, ctx))
    for name, on in trained.items():
        found[name] = on.blocks(modules[name].parametrizations.weight.original).to("cpu")
        parametrize.remove_parametrizations(modules[name], "weight", leave_parametrized=False)
        modules[name].weight.data = found[name].dequantize().to(modules[name].weight)
    report_gguf(keep_blocks(found, ctx), listed, cfg, ctx)
    return model
