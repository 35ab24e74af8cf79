"""`--format hf` (the default): the stage's artifact as a standalone `from_pretrained` folder:
the weights (safetensors only), the config with its quantization config, the tokenizer, and a
model card with the recipe, the stage chain, the measured tables and the exact packages that
load it. Loading it needs transformers (and the quantization backend), not this package."""

from __future__ import annotations

import shutil
from pathlib import Path

from .. import UserError
from ..storage import MANIFEST
from .base import Export, Exporter, model_card

PICKLED = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
USAGE = [
    "```python",
    "from transformers import AutoModelForCausalLM, AutoTokenizer",
    'model = AutoModelForCausalLM.from_pretrained("<this folder>")',
    'tokenizer = AutoTokenizer.from_pretrained("<this folder>")',
    "```",
]


def requirements(job: Export) -> tuple[list[str], list[str]]:
    """The pip requirements (pinned to what measured it) and what their import prints."""
    versions, kernel = job.record.get("versions", {}), job.stage["metrics"].get("kernel", "")
    names = ["torch", "transformers", "safetensors"]
    seen = []
    if "torchao" in kernel:
        names.append("torchao")
        seen.append(
            "torchao prints `Failed to load .../_C_mxfp8...so` (and `_C_cutlass_90a`) on a CPU-only machine: "
            "those are CUDA kernels for other data types; the CPU path used here does not need them."
        )
    if "bitsandbytes" in kernel:
        names.append("bitsandbytes")
        seen.append(
            "bitsandbytes may log that it could not load `gemm_4bit_forward` from `kernels`: it then uses "
            "its own CPU kernel (same results)."
        )
    return [f"{n}=={versions[n]}" if n in versions else n for n in names], seen


class HFExporter(Exporter):
    name = "hf"

    def check(self, job: Export) -> None:
        pickled = [p.name for p in job.artifact.iterdir() if p.suffix in PICKLED]
        if pickled:
            raise UserError(f"{job.artifact}: holds pickled weights {pickled}; only safetensors are exported")

    def write(self, job: Export, out: Path) -> None:
        for f in job.artifact.iterdir():
            if f.is_file() and f.name != MANIFEST:
                shutil.copyfile(f, out / f.name)
        pins, seen = requirements(job)
        (out / "README.md").write_text(model_card(job, USAGE, pins, seen))
