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

import importlib.util
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..data import Calibration
from ..models import decoder_layers
from ..progress import Bar
from ..quant import Hessians, gptq, group_divides, scales, to_grid

PRODUCES = "quantized"
BACKENDS = {"rtn": ("torchao",), "gptq": ("torchao",), "bnb": ("bitsandbytes",)}


class Scheme(BaseModel):
    """The integer format, shared by `quantize` and `qat`."""

    model_config = ConfigDict(extra="forbid")

    bits: Literal[4, 8] = 4
    group_size: int | None = Field(64, ge=8, description="input columns per scale; null = one scale per row")
    activations: Literal["none", "int8"] = Field("none", description="int8: dynamic per-token INT8 activations")
    lm_head: bool = Field(False, description="quantize the output projection too (untied heads only)")


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


def check_scheme(cfg: Scheme, shape: dict, backend: str) -> None:
    """What a backend cannot run here, against the model's dimensions."""
    if importlib.util.find_spec(backend) is None:  # backends are named after their packages
        raise ValueError(f"backend {backend} needs the `{backend}` package, not installed here (pip install {backend})")
    widths = {"hidden_size": shape["hidden_size"], "intermediate_size": shape["intermediate_size"]}
    widths["attention output"] = shape["num_attention_heads"] * shape.get(
        "head_dim", shape["hidden_size"] // shape["num_attention_heads"]
    )
    if backend == "bitsandbytes":
        bad = {k: v for k, v in widths.items() if v % 64} if cfg.bits == 4 else {}
        if bad:
            raise ValueError(f"bnb 4-bit packs blocks of 64 input columns; {bad} do not divide by 64; use method rtn")
        return
    why = group_divides(widths, cfg.group_size)
    if why:
        raise ValueError(why)
    if cfg.lm_head and shape.get("tie_word_embeddings"):
        raise ValueError("lm_head: true, but the head is tied to the embeddings, which stay in float")


def check(cfg: Config, shape: dict, teacher_shape: dict) -> dict:
    if cfg.method == "bnb" and cfg.bits == 8 and cfg.group_size not in (None, 64):
        raise ValueError("bnb 8-bit (LLM.int8) has one scale per row: leave group_size out")
    check_scheme(cfg, shape, cfg.backend)
    return shape


# --- which Linear layers ------------------------------------------------------------------------


def quantized_linears(model: torch.nn.Module, lm_head: bool) -> dict[str, torch.nn.Linear]:
    """Every Linear of the decoder layers (and the head if asked), by full module name."""
    head = model.get_output_embeddings()
    return {
        name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and (m is not head or lm_head)
    }


def run_gptq(model: torch.nn.Module, cfg: Config, blocks: torch.Tensor, device) -> dict:
    """GPTQ codes and scales for every quantized Linear, decoder layer by decoder layer."""
    names = {m: name for name, m in quantized_linears(model, cfg.lm_head).items()}
    batches = blocks[: cfg.calibration.samples].split(cfg.calibration.batch_size)
    groups = [{names[m]: m for m in layer.modules() if m in names} for layer in decoder_layers(model)]
    if cfg.lm_head:
        head = model.get_output_embeddings()
        groups.append({names[head]: head})
    out = {}
    bar = Bar("gptq", len(groups), unit="layer")
    for mods in groups:
        hessians = Hessians(mods)
        last = list(mods.values())[-1]

        def stop(*_):
            raise _Enough

        handle = last.register_forward_hook(stop)  # nothing after this layer is needed yet
        with torch.no_grad():
            for batch in batches:
                try:
                    model(input_ids=batch.to(device))
                except _Enough:
                    pass
        handle.remove()
        for name, h in hessians.close().items():
            m = mods[name]
            codes, s = gptq(m.weight, h, cfg.bits, cfg.group_size, cfg.act_order, cfg.damp)
            g = codes.shape[1] // s.shape[1]
            m.weight.data = (codes * s.repeat_interleave(g, dim=1)).to(m.weight)
            out[name] = (codes.cpu(), s.cpu())
        bar.update(1, linears=len(out))
    bar.close()
    return out


class _Enough(Exception):
    """Stops a calibration forward once the layer being quantized has seen its inputs."""


# --- storage --------------------------------------------------------------------------------


def torchao_config(cfg: Scheme):
    from torchao.quantization import (
        Int8DynamicActivationIntxWeightConfig,
        IntxWeightOnlyConfig,
        MappingType,
        PerAxis,
        PerGroup,
    )
    from transformers import TorchAoConfig

    dtype = torch.int4 if cfg.bits == 4 else torch.int8
    granularity = PerAxis(0) if cfg.group_size is None else PerGroup(cfg.group_size)
    if cfg.activations == "int8":
        base = Int8DynamicActivationIntxWeightConfig(
            weight_dtype=dtype,
            weight_granularity=granularity,
            weight_mapping_type=MappingType.SYMMETRIC,
            act_mapping_type=MappingType.ASYMMETRIC,  # the only one it runs; what qat simulates
        )
    else:
        base = IntxWeightOnlyConfig(weight_dtype=dtype, granularity=granularity, mapping_type=MappingType.SYMMETRIC)
    return TorchAoConfig(base, modules_to_not_convert=None if cfg.lm_head else ["lm_head"])


def bnb_config(cfg: Config):
    from transformers import BitsAndBytesConfig

    skip = None if cfg.lm_head else ["lm_head"]
    if cfg.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.format,
        bnb_4bit_compute_dtype=torch.float32,
        llm_int8_skip_modules=skip,
    )


def requantize(model: torch.nn.Module, folder, quantization_config, device, codes: dict | None = None):
    """Reload `model` through `from_pretrained` with a quantization config, so the result is what
    a user loading the artifact gets. `codes` (name -> (codes, scales)) pins the torchao grid to
    the given integers, for GPTQ."""
    from transformers import AutoModelForCausalLM

    model.save_pretrained(folder)
    quantized = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=quantization_config, dtype=torch.float32, device_map=str(device)
    )
    if codes:
        from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
            IntxUnpackedToInt8Tensor,
        )

        modules = dict(quantized.named_modules())
        for name, (q, s) in codes.items():
            m = modules[name]
            old = m.weight
            assert isinstance(old, IntxUnpackedToInt8Tensor), f"{name} was not quantized by torchao"
            pinned = IntxUnpackedToInt8Tensor(
                qdata=q.to(torch.int8).to(old.qdata.device),
                scale=s.reshape(old.scale.shape).to(old.scale),
                zero_point=torch.zeros_like(old.zero_point),
                target_dtype=old.target_dtype,
                block_size=old.block_size,
                dtype=old.dtype,
                activation_quantization=old.activation_quantization,
            )
            m.weight = torch.nn.Parameter(pinned, requires_grad=False)
    return quantized.eval()


def rtn_codes(model: torch.nn.Module, cfg: Scheme) -> dict:
    """Round-to-nearest codes and scales on the shared grid (what torchao itself computes)."""
    out = {}
    for name, m in quantized_linears(model, cfg.lm_head).items():
        s = scales(m.weight, cfg.bits, cfg.group_size)
        out[name] = (to_grid(m.weight.detach().float(), s, cfg.bits), s)
    return out


def apply(model: torch.nn.Module, tokenizer, ctx) -> torch.nn.Module:
    cfg: Config = ctx.config
    model = model.float()
    folder = ctx.scratch / "float"
    if cfg.method == "bnb":
        # saved before any forward pass: a bnb 4-bit model saved after one reloads wrong on CPU
        return requantize(model, folder, bnb_config(cfg), ctx.device)
    if cfg.method == "gptq":
        codes = run_gptq(model, cfg, ctx.train_blocks(ctx.seq_len), ctx.device)
        ctx.info.update(calibration_samples=cfg.calibration.samples)
    else:
        codes = rtn_codes(model, cfg)
    return requantize(model, folder, torchao_config(cfg), ctx.device, codes)
