"""What a quantized model holds, in one place: the integer scheme a stage asks for, the
backend configs that store it (torchao, bitsandbytes), the reload that pins our integer codes
into the stored format, and the introspection measurement and exporters need (stored bytes,
the integer codes and scales of a Linear, the kernel that computes it).

`quantize` and `qat` write through this module; `measure` and every exporter read through it.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from .models import head_dim
from .quant import group_divides, scales, to_grid


class Scheme(BaseModel):
    """The integer format, shared by `quantize` and `qat`."""

    model_config = ConfigDict(extra="forbid")

    bits: Literal[4, 8] = 4
    group_size: int | None = Field(64, ge=8, description="input columns per scale; null = one scale per row")
    activations: Literal["none", "int8"] = Field("none", description="int8: dynamic per-token INT8 activations")
    lm_head: bool = Field(False, description="quantize the output projection too (untied heads only)")


def check_scheme(cfg: Scheme, shape: dict, backend: str) -> None:
    """What a backend cannot run here, against the model's dimensions."""
    if importlib.util.find_spec(backend) is None:  # backends are named after their packages
        raise ValueError(f"backend {backend} needs the `{backend}` package, not installed here (pip install {backend})")
    widths = {"hidden_size": shape["hidden_size"], "intermediate_size": shape["intermediate_size"]}
    widths["attention output"] = shape["num_attention_heads"] * head_dim(shape)
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


def quantized_linears(model: torch.nn.Module, lm_head: bool) -> dict[str, torch.nn.Linear]:
    """Every Linear of the decoder layers (and the head if asked), by full module name."""
    head = model.get_output_embeddings()
    return {
        name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and (m is not head or lm_head)
    }


# --- storing -------------------------------------------------------------------------------------


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


def bnb_config(cfg: Scheme, fmt: str = "nf4"):
    """bitsandbytes load-time quantization: LLM.int8 (8 bits) or NF4/FP4 `fmt` (4 bits, packed)."""
    from transformers import BitsAndBytesConfig

    skip = None if cfg.lm_head else ["lm_head"]
    if cfg.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=fmt,
        bnb_4bit_compute_dtype=torch.float32,
        llm_int8_skip_modules=skip,
    )


def requantize(model: torch.nn.Module, folder, quantization_config, device, codes: dict | None = None):
    """Reload `model` through `from_pretrained` with a quantization config, so the result is what
    a user loading the artifact gets. `codes` (name -> (codes, scales)) pins the given integers and
    scales (our grid, not torchao's own rounding) into the torchao tensors."""
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
    """Round-to-nearest codes and scales on the shared grid (what llama.cpp's quantizer writes)."""
    out = {}
    for name, m in quantized_linears(model, cfg.lm_head).items():
        s = scales(m.weight, cfg.bits, cfg.group_size)
        out[name] = (to_grid(m.weight.detach().float(), s, cfg.bits), s)
    return out


GGML_FILE = "ggml.safetensors"  # a stage on GGUF types: each tensor's blocks as the file holds them
GGML_SHARDS = "ggml"  # ... or, written a layer at a time (compressor.layerwise), one file per layer here


def write_ggml(path, found: dict) -> None:
    """`found` (module name -> ggml.Blocks) as raw GGUF bytes [rows, bytes per row], each tensor's
    type in the metadata: what the GGUF exporter writes, untouched."""
    from safetensors.torch import save_file

    from .ggml import pack

    tensors = {f"{name}.weight": torch.from_numpy(pack(b)) for name, b in found.items()}
    types = {f"{name}.weight": b.type.name for name, b in found.items()}
    shapes = {f"{name}.weight": f"{b.shape[0]}x{b.shape[1]}" for name, b in found.items()}
    meta = {"format": "compressor-ggml-1", **{f"type:{k}": v for k, v in types.items()}}
    meta |= {f"shape:{k}": v for k, v in shapes.items()}
    save_file(tensors, str(path), metadata=meta)


def ggml_files(folder) -> list:
    """The files of a stage's GGUF blocks: ggml.safetensors, or one per layer in ggml/; [] for none."""
    from pathlib import Path

    folder = Path(folder)
    single = folder / GGML_FILE
    return [single] if single.is_file() else sorted((folder / GGML_SHARDS).glob("*.safetensors"))


def read_ggml(folder) -> dict:
    """{tensor name: ggml.Blocks} of a stage on GGUF types; {} for any other artifact."""
    return {k: v for path in ggml_files(folder) for k, v in read_ggml_file(path).items()}


def read_ggml_file(path) -> dict:
    """{tensor name: ggml.Blocks} of a file `write_ggml` wrote."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {key: _blocks(f, key) for key in f.keys()}


def _blocks(f, key: str):
    from .ggml import unpack

    meta = f.metadata()
    rows, n = (int(v) for v in meta[f"shape:{key}"].split("x"))
    return unpack(meta[f"type:{key}"], f.get_tensor(key).numpy(), (rows, n))


class GgmlBlocks:
    """A stage's GGUF blocks read one tensor at a time (`get`), for a writer that holds one layer."""

    def __init__(self, folder):
        from safetensors import safe_open

        self.files = {}
        for path in ggml_files(folder):
            with safe_open(str(path), framework="pt") as f:
                self.files |= dict.fromkeys(f.keys(), path)

    def get(self, key: str):
        """The blocks of tensor `key`, or None when the stage has none for it."""
        from safetensors import safe_open

        if key not in self.files:
            return None
        with safe_open(str(self.files[key]), framework="pt") as f:
            return _blocks(f, key)


def ggml_kinds(folder) -> dict[str, tuple[str, tuple[int, int]]]:
    """{module name: (GGUF type, (rows, row length))} of a stage's blocks, from the files' metadata
    alone (no block is read)."""
    from safetensors import safe_open

    out = {}
    for path in ggml_files(folder):
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        for key, value in meta.items():
            if key.startswith("type:"):
                tensor = key.removeprefix("type:")
                rows, n = (int(v) for v in meta[f"shape:{tensor}"].split("x"))
                out[tensor.removesuffix(".weight")] = (value, (rows, n))
    return out


def ggml_types(folder) -> list[str]:
    """The GGUF types a stage's blocks hold; [] for none."""
    return sorted({kind for kind, _ in ggml_kinds(folder).values()})


def ggml_summary(kinds: dict) -> dict:
    """{type: tensor count} of a stage's GGUF blocks (`kinds` as ggml_kinds gives them)."""
    counts: dict[str, int] = {}
    for kind, _ in kinds.values():
        counts[kind] = counts.get(kind, 0) + 1
    return counts


# --- reading back ----------------------------------------------------------------------------------


def stored_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor occupies: a quantized tensor subclass (torchao) counts its inner integer
    data and scales, not its logical float shape."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(stored_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def integer_weight(m: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """(codes [out, in] int8, scales [out, in/group] fp32, bits) of a Linear stored on our symmetric
    grid (torchao Intx, zero point 0), or None when it holds something else (float, bitsandbytes)."""
    w = getattr(m, "weight", None)
    if type(w).__name__ != "IntxUnpackedToInt8Tensor" or bool((w.zero_point != 0).any()):
        return None
    bits = {torch.int4: 4, torch.int8: 8}.get(w.target_dtype)
    if bits is None:
        return None
    out, n_in = w.qdata.shape
    group = w.block_size[-1]
    return w.qdata.to(torch.int8), w.scale.reshape(out, n_in // group).float(), bits


def kernel(model: torch.nn.Module) -> str:
    """What computes the Linear layers as the artifact loads: the format latency is measured with."""
    kinds: dict[str, int] = {}
    for m in model.modules():
        if not isinstance(m, torch.nn.Linear):
            continue
        w, name = m.weight, type(m).__name__
        if name == "Linear4bit":
            kind = f"bitsandbytes {w.quant_state.quant_type}"
            if w.device.type == "cpu" and getattr(m, "support_avx512bf16_for_cpu", False):
                # repacked on the first forward without autograd, then computed in bf16
                kind += " (CPU AVX512-BF16 kernel, bf16 compute)"
        elif name == "Linear8bitLt":
            kind = "bitsandbytes LLM.int8"
        elif type(w).__name__ == "IntxUnpackedToInt8Tensor":
            acts = "int8 dynamic activations" if w.activation_quantization else "dequantized to fp32"
            kind = f"torchao {str(w.target_dtype).removeprefix('torch.')} weights, {acts}"
        elif type(w).__name__ not in ("Tensor", "Parameter"):
            kind = f"torchao {type(w).__name__}"
        else:
            kind = f"dense {str(w.dtype).removeprefix('torch.')}"
        kinds[kind] = kinds.get(kind, 0) + 1
    return ", ".join(f"{k} ×{n}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1]))
