"""What the integer-checkpoint formats (compressed-tensors, GPTQ) share: the stage's quantized
Linears as our codes and scales, everything else in fp16, and the folder around them (config
with its `quantization_config`, tokenizer, generation config, model card).

The integers are the stage's own (GPTQ's, QAT's); the scales are rounded to fp16, the only
change, as in GGUF.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import UserError
from ..models import Loaded
from .base import Export, model_card


def pack_int32(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes [..., n] -> int32 [..., n * bits / 32]: 32/bits consecutive codes per word,
    the first in the lowest bits (compressed-tensors and GPTQ both lay words out so)."""
    k = 32 // bits
    lanes = q.to(torch.int64).view(*q.shape[:-1], q.shape[-1] // k, k)
    words = (lanes << (torch.arange(k, dtype=torch.int64) * bits)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # the same 32 bits, signed


def require_integer_grid(job: Export, fmt: str) -> str:
    """The stage's kernel, when it computes with our symmetric integer grid; else one line."""
    kernel = job.stage["metrics"].get("kernel", "")
    if "torchao int" not in kernel:
        raise UserError(
            f"stage {job.stage['name']!r} computes with {kernel or 'float weights'}: {fmt} holds our integer grid; "
            "export a quantize (rtn or gptq) or qat stage"
        )
    return kernel


@dataclass
class IntegerModel:
    """A loaded stage whose Linear layers hold one integer scheme."""

    loaded: Loaded
    linears: dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (codes [out, in] int8, scales [out, groups])
    bits: int
    group: int | None  # None: one scale per output row
    activations: bool  # int8 dynamic activations (W8A8)

    @property
    def unquantized(self) -> list[str]:
        """Linear layers left in floating point (a tied or skipped head)."""
        return [
            n for n, m in self.loaded.model.named_modules() if isinstance(m, torch.nn.Linear) and n not in self.linears
        ]

    def float_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor but the quantized Linears' weights (their biases included), in fp16 (a tied
        head is the embedding)."""
        model = self.loaded.model
        tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
        out, floats = {}, (torch.float32, torch.float16, torch.bfloat16)
        for name, value in model.state_dict().items():
            owner, _, part = name.rpartition(".")
            if (part == "weight" and owner in self.linears) or value.dtype not in floats:
                continue  # a quantized Linear's weight is written as its codes; its bias stays
            if name == "lm_head.weight" and tied:
                continue
            out[name] = value.detach().to(torch.float16).contiguous()
        return out


def read_integer_model(job: Export) -> IntegerModel:
    from ..models import load_pretrained
    from ..quantized import integer_weight

    loaded = load_pretrained(str(job.artifact), torch.device("cpu"), dtype="auto")
    linears, found = {}, set()
    for name, module in loaded.model.named_modules():
        got = integer_weight(module) if isinstance(module, torch.nn.Linear) else None
        if got is None:
            continue
        codes, scales, bits = got
        found.add((bits, bool(module.weight.activation_quantization)))
        linears[name] = (codes, scales)
    # a Linear only one group wide has a single scale per row whatever the group size
    groups = {c.shape[1] // s.shape[1] for c, s in linears.values() if s.shape[1] > 1}
    group = next(iter(groups), None)
    one_wide = {c.shape[1] for c, s in linears.values() if s.shape[1] == 1}
    if len(found) != 1 or len(groups) > 1 or (group is not None and one_wide - {group}):
        raise UserError(f"stage {job.stage['name']!r}: its Linear layers hold several integer schemes; one is written")
    bits, acts = found.pop()
    return IntegerModel(loaded, linears, bits, group, acts)


def write_folder(
    job: Export, out: Path, got: IntegerModel, tensors: dict, quantization_config: dict, usage: list, pins: list
) -> None:
    """model.safetensors, config.json (fp16, with the quantization config), tokenizer, README."""
    from safetensors.torch import save_file

    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"), metadata={"format": "pt"}
    )
    config = json.loads((job.artifact / "config.json").read_text())
    config["quantization_config"] = quantization_config
    config["dtype"] = "float16"
    config.pop("torch_dtype", None)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    got.loaded.tokenizer.save_pretrained(out)
    if (job.artifact / "generation_config.json").is_file():
        (out / "generation_config.json").write_bytes((job.artifact / "generation_config.json").read_bytes())
    versions = job.record.get("versions", {})
    pins = [*pins, f"transformers=={versions.get('transformers', '')}".rstrip("=")]
    (out / "README.md").write_text(model_card(job, usage, pins))
