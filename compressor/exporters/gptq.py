"""`--format gptq`: a quantized stage as a GPTQ checkpoint (the layout AutoGPTQ defined, which
optimum + GPTQModel load through transformers today, and vLLM / TGI serve).

Per Linear of the decoder blocks, for `bits` b in {4, 8} and k = 32 / b codes per int32:
- `qweight` int32 [in / k, out]: input rows packed k to a word, row i*k + j in bits b*j..b*j+b-1,
  each code stored unsigned, q = c + 2^(b-1);
- `scales` fp16 [groups, out]; `qzeros` int32 [groups, out / k]: the zero point 2^(b-1) packed
  along the outputs, stored minus one (checkpoint_format "gptq", the original "v1" layout);
- `g_idx` int32 [in]: the group of each input row, i // group (our act-order GPTQ keeps groups in
  column order, so `desc_act` is false and the layout is exact).
w = scale[g_idx[i], o] * (q[i, o] - zero). Our symmetric codes c in [-2^(b-1), 2^(b-1) - 1] map
onto this with no change; only the scales round to fp16. On disk a weight takes b + (16 + b) /
group bits: 4.625 at group 32 (the zero points cost 0.125 over compressed-tensors), 4.16 at 128.
Weight-only: a stage with int8 activations (W8A8) has no GPTQ form and is refused
(compressed-tensors holds it).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import UserError
from ..models import decoder_layers
from .base import Export, Exporter
from .integer import pack_int32, read_integer_model, require_integer_grid, write_folder

LOADERS = ["optimum==2.3.0", "gptqmodel==7.6.0"]  # what loaded it here (bench/gptqmodel_cpu.py); 7.7 needs torch 2.14


def gptq_tensors(codes: torch.Tensor, scales: torch.Tensor, bits: int, group: int | None) -> dict[str, torch.Tensor]:
    """qweight, qzeros, scales, g_idx of one Linear from our codes [out, in] and scales [out, groups]."""
    out, n_in = codes.shape
    offset = 2 ** (bits - 1)
    groups = scales.shape[1]
    zeros = torch.full((groups, out), offset - 1, dtype=torch.int64)  # "gptq" (v1) stores zero - 1
    g_idx = torch.arange(n_in, dtype=torch.int32) // (group or n_in)
    return {
        "qweight": pack_int32(codes.to(torch.int64) + offset, bits).t().contiguous(),  # packed along the inputs
        "qzeros": pack_int32(zeros, bits),
        "scales": scales.t().contiguous().to(torch.float16),
        "g_idx": g_idx,
    }


class GPTQExporter(Exporter):
    name = "gptq"

    def check(self, job: Export) -> None:
        kernel = require_integer_grid(job, "gptq")
        if "int8 dynamic activations" in kernel:
            raise UserError(
                f"stage {job.stage['name']!r} computes with int8 activations (W8A8): GPTQ checkpoints are weight-only; "
                "use --format compressed-tensors"
            )

    def write(self, job: Export, out: Path) -> None:
        got = read_integer_model(job)
        k = 32 // got.bits
        modules = dict(got.loaded.model.named_modules())
        in_blocks = {id(m) for layer in decoder_layers(got.loaded.model) for m in layer.modules()}
        floating = [n for n in got.unquantized if id(modules[n]) in in_blocks]
        if floating:
            raise UserError(
                f"stage {job.stage['name']!r}: {floating[0]} is not quantized; GPTQ checkpoints quantize every "
                "Linear of the decoder blocks (use --format compressed-tensors)"
            )
        tensors = got.float_tensors()
        for name, (codes, scales) in got.linears.items():
            n_out, n_in = codes.shape
            if n_in % k or n_out % k:
                raise UserError(f"{name}: shape {n_out}x{n_in} does not pack {k} {got.bits}-bit codes to an int32")
            for part, value in gptq_tensors(codes, scales, got.bits, got.group).items():
                tensors[f"{name}.{part}"] = value
        config = {
            "quant_method": "gptq",
            "bits": got.bits,
            "group_size": got.group or -1,
            "sym": True,
            "desc_act": False,
            "checkpoint_format": "gptq",
            "true_sequential": True,
            "pack_dtype": "int32",
            "meta": {"quantizer": ["compressor"]},
        }
        usage = [
            "```python",
            "from transformers import AutoModelForCausalLM  # with optimum and gptqmodel installed",
            'model = AutoModelForCausalLM.from_pretrained("<this folder>")',
            "```",
            "",
            "```bash",
            "vllm serve <this folder>   # vLLM and TGI read GPTQ checkpoints",
            "```",
        ]
        write_folder(job, out, got, tensors, config, usage, LOADERS)
