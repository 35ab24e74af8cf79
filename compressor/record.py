"""run.json: the record scripts read, its schema, and the one function that builds it for
`run`, `eval` and `compare`. The README's contract and tests/test_pipeline.py read these types.
"""

import os
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from typing_extensions import NotRequired, TypedDict

from . import __version__

VERSIONED = (
    "torch",
    "transformers",
    "accelerate",
    "lm_eval",
    "tokenizers",
    "safetensors",
    "bitsandbytes",
    "gptqmodel",
    "torchao",
    "peft",
    "aiohttp",
    "gguf",
    "llama_cpp_python",
)


class Metrics(TypedDict):
    """What every measured row holds (latency keys are absent when latency is disabled)."""

    params: int
    bytes: int  # weights on disk
    bits_per_param: float
    loaded_bytes: int  # weights in memory once loaded (integer codes + scales when quantized)
    kernel: str  # what computes the Linear layers as the artifact loads
    heldout_ppl: float  # token-level, on the recipe's held-out text
    heldout_tokens: int
    heldout_bpb: float  # bits per UTF-8 byte of the held-out text: comparable across tokenizers
    accuracy: dict[str, float]  # "<task>/<metric>" -> value, from lm-eval
    higher_is_better: dict[str, bool]  # direction of each of our metrics and of each accuracy
    teacher_kl: NotRequired[float]
    top1_agreement: NotRequired[float]
    prefill_ms: NotRequired[float]
    decode_ms_per_token: NotRequired[float]  # min over interleaved rounds
    decode_ms_range: NotRequired[list[float]]
    decode_ms_samples: NotRequired[list[float]]  # one per round
    tokens_per_s: NotRequired[float]
    tokens_per_s_batch: NotRequired[int]
    peak_mem_bytes: NotRequired[int]
    roofline_ms_per_token: NotRequired[float]
    speculative: NotRequired[dict]
    measured_within_bytes: NotRequired[int]  # eval.layerwise: the estimated peak of measuring it a layer at a time


class StageRecord(TypedDict):
    name: str
    kind: str  # teacher | base | eval | distill | prune | recover | quantize | qat
    key: str | None  # the artifact's stage key (None for `compressor eval`)
    cached: bool  # the artifact was found built (row 0: its measurement was found)
    seconds: float  # build + measurement of this row in this run
    build_seconds: float | None  # building the artifact (when it was built, in whichever run)
    measure_seconds: float | None  # measuring it, latency excluded (timed with every row at the end)
    artifact: str | None
    metrics: Metrics
    info: NotRequired[dict]  # what the stage reports: rounding of pruning, training summary, ...
    source: NotRequired[str]  # row 0: the teacher's spec
    ordering: NotRequired[str]  # compare: the ordering this row belongs to
    runtime: NotRequired[str]  # torch (the artifact as from_pretrained loads it), llama.cpp (its GGUF export)


class RunRecord(TypedDict):
    recipe: str | None
    seed: int
    versions: dict[str, str]
    device: str
    machine: dict[str, Any]
    created: str
    stages: list[StageRecord]
    timing: dict | None  # how latency was measured: rounds, order, machine load before/after
    recipe_path: NotRequired[str]
    pick: NotRequired[dict]
    notes: NotRequired[list[str]]  # caveats the report prints above the tables
    orderings: NotRequired[dict[str, list[str]]]
    recipe_paths: NotRequired[list[str]]
    seconds: NotRequired[float]


def versions() -> dict:
    out = {"compressor": __version__, "python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def machine(device: torch.device) -> dict:
    """What latency figures depend on; part of the timing cache key."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "device": str(device),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "gpu": gpu,
        "torch": torch.__version__,
    }


def make_record(
    recipe: str | None, seed: int, device: torch.device, stages: list[StageRecord], timing: dict | None, **extra
) -> RunRecord:
    """The run record, the same for `run`, `eval` and `compare` (extra: recipe_path, pick, ...)."""
    return {
        "recipe": recipe,
        "seed": seed,
        "versions": versions(),
        "device": str(device),
        "machine": machine(device),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "stages": stages,
        "timing": timing,
        **extra,
    }
