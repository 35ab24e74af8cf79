"""One measurement, taken the same way for the teacher and after every stage.

size      parameters, bytes of weights on disk, effective bits/param, memory once loaded, and
          the kernel that computes the Linear layers as the artifact loads
accuracy  lm-evaluation-harness tasks, plus our own token-level held-out perplexity and its bits
          per byte of text (what compares across tokenizers)
fidelity  mean KL(teacher || model) per token and top-1 agreement with the teacher on held-out
          text (what a draft model's acceptance rate in speculative decoding depends on)
speculative  optional: the model as a draft for the teacher, measured acceptance and speed-up

Latency is measured apart (`latency.py`): every model of a run together, in interleaved rounds.
Every metric carries its direction (`higher_is_better`), lm-eval's own for its metrics.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from .evaldata import user_file
from .latency import LatencySpec
from .models import count_params
from .progress import Bar
from .quantized import kernel, stored_bytes
from .scoring import Logits, scored_chunks
from .speculative import SpeculativeSpec, speculative
from .storage import recipe_path
from .tasks import evaluate

# our own metrics' directions; lm-eval declares its own per metric
HIGHER_IS_BETTER = {"heldout_ppl": False, "heldout_bpb": False, "teacher_kl": False, "top1_agreement": True}


class FidelitySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    samples: int = Field(16, ge=1, description="held-out blocks of data.seq_len tokens")
    batch_size: int = Field(4, ge=1)


class GGUFSpec(BaseModel):
    """How a stage is exported for llama.cpp (see exporters/gguf.py)."""

    model_config = ConfigDict(extra="forbid")

    weights: Literal["auto", "f32", "f16"] = Field("auto", description="auto: a quantized stage's own integers")
    embeddings: Literal["f16", "f32", "q8_0"] = "f16"


class EvalSpec(BaseModel):
    """What every measurement records."""

    model_config = ConfigDict(extra="forbid")

    tasks: list[str] = Field(
        ["stdlib_ppl", "stdlib_mc"],
        description="lm-eval task names: ours (compressor/evals), stock ones, or mc:FILE.json / ppl:FILE.txt",
    )
    task_dirs: list[str] = Field([], description="folders of your own lm-eval task YAMLs")
    data_dir: str | None = Field(None, description="folder of the published benchmark files (default: ../shared/data)")
    limit: int | dict[str, int] | None = Field(
        None, description="items per task (None: all), or {default: N, <task>: M} for per-task limits"
    )
    batch_size: int = Field(8, ge=1)
    max_length: int | None = Field(None, ge=16)
    latency: LatencySpec = LatencySpec()
    fidelity: FidelitySpec = FidelitySpec()
    speculative: SpeculativeSpec = SpeculativeSpec()
    runtimes: list[str] = Field(["torch"], description="where each stage is measured: torch, llama.cpp")
    gguf: GGUFSpec = GGUFSpec()
    layerwise: bool = Field(
        False,
        description="read each model a decoder layer at a time while it is measured (for models bigger "
        "than memory; every batch reads the layers again)",
        exclude_if=lambda on: not on,  # off, it is left out of measurement keys: keys made before it stay valid
    )

    @model_validator(mode="after")
    def _layerwise(self) -> "EvalSpec":
        if self.layerwise and self.latency.enabled:
            raise ValueError("layerwise: latency times a model held in memory; set latency: {enabled: false}")
        if self.layerwise and self.speculative.enabled:
            raise ValueError(
                "layerwise: a draft model decodes token by token from memory; set speculative: {enabled: false}"
            )
        return self

    @field_validator("runtimes", mode="after")
    @classmethod
    def _runtimes(cls, runtimes: list[str]) -> list[str]:
        from .runtimes import NAMES, RUNTIMES

        unknown = [r for r in runtimes if r not in NAMES]
        if unknown or "torch" not in runtimes or len(set(runtimes)) != len(runtimes):
            raise ValueError(f"must list torch and any of {', '.join(NAMES[1:])} once each, got {runtimes}")
        for name in runtimes:
            why = RUNTIMES[name].missing() if name in RUNTIMES else None
            if why:
                raise ValueError(why)
        return runtimes

    @field_validator("limit", mode="after")
    @classmethod
    def _limits(cls, limit, info: ValidationInfo):
        values = limit.values() if isinstance(limit, dict) else [limit] if limit is not None else []
        if any(v < 1 for v in values):
            raise ValueError(f"items per task must be at least 1, got {limit}")
        tasks = info.data.get("tasks") or []
        unknown = [k for k in (limit if isinstance(limit, dict) else {}) if k != "default" and k not in tasks]
        if unknown:
            raise ValueError(f"{unknown[0]!r} is not among eval.tasks; give default or one of {', '.join(tasks)}")
        return limit

    def limit_of(self, task: str) -> int | None:
        """Items of `task` scored: its own limit, else the default."""
        if isinstance(self.limit, dict):
            return self.limit.get(task, self.limit.get("default"))
        return self.limit

    @field_validator("tasks", mode="after")
    @classmethod
    def _user_files(cls, tasks: list[str], info: ValidationInfo) -> list[str]:
        return [f"{u[0]}:{recipe_path(str(u[1]), info)}" if (u := user_file(t)) else t for t in tasks]

    @field_validator("data_dir", mode="after")
    @classmethod
    def _data_folder(cls, folder: str | None, info: ValidationInfo) -> str | None:
        if folder is None:
            return None
        folder = recipe_path(folder, info)
        if not Path(folder).is_dir():
            raise ValueError(f"folder not found: {folder}")
        return folder

    @field_validator("task_dirs", mode="after")
    @classmethod
    def _folders(cls, dirs: list[str], info: ValidationInfo) -> list[str]:
        dirs = [recipe_path(d, info) for d in dirs]
        missing = [d for d in dirs if not Path(d).is_dir()]
        if missing:
            raise ValueError(f"folder not found: {missing[0]}")
        return dirs


# --- size ------------------------------------------------------------------------------------

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def weight_bytes_on_disk(folder: Path | None) -> int | None:
    if folder is None:
        return None
    return sum(p.stat().st_size for p in folder.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file()) or None


def size(model: torch.nn.Module, folder: Path | None) -> dict:
    params = count_params(model)
    loaded = sum(stored_bytes(t) for t in list(model.parameters()) + list(model.buffers()))
    on_disk = weight_bytes_on_disk(folder) or loaded
    return {
        "params": params,
        "bytes": on_disk,
        "bits_per_param": round(8 * on_disk / params, 3),
        "loaded_bytes": loaded,
        "kernel": kernel(model) + ggml_note(folder),
    }


def ggml_note(folder: Path | None) -> str:
    """For a stage on GGUF types: torch computes with the blocks' values in float; say which."""
    from .quantized import ggml_types

    types = ggml_types(folder) if folder is not None else []
    return f" (the values of GGUF {'/'.join(types)} blocks)" if types else ""


# --- fidelity --------------------------------------------------------------------------------


def token_perplexity(model: torch.nn.Module | Logits, blocks: torch.Tensor, batch_size: int = 16) -> float:
    """exp(mean next-token NLL) over blocks, every block scored from its first token."""
    return fidelity(model, None, blocks, batch_size)["heldout_ppl"]


def text_bytes(tokenizer, blocks: torch.Tensor) -> int:
    """UTF-8 bytes of the text that the scored tokens of `blocks` spell (every token but each row's first)."""
    return sum(len(tokenizer.decode(row[1:], skip_special_tokens=True).encode("utf-8")) for row in blocks.tolist())


@torch.no_grad()
def fidelity(
    model: torch.nn.Module | Logits,
    teacher: torch.nn.Module | Logits | None,
    blocks: torch.Tensor,
    batch_size: int,
    tokenizer=None,
) -> dict:
    """Token-level held-out perplexity; with the tokenizer, bits per byte of the text (comparable
    across tokenizers: a teacher's in its own tokens beside a student's); with a teacher,
    KL(teacher || model) and top-1 agreement. `model` and `teacher` are torch models or a runtime's
    logits (llama.cpp's, for a GGUF export); logits are made a slice of positions at a time (scoring.py)."""
    sources = [model] if teacher is None else [model, teacher]
    nll = kl = agree = count = 0.0
    with Bar("held-out fidelity", len(blocks), unit="block") as bar:
        for i in range(0, len(blocks), batch_size):
            ids = blocks[i : i + batch_size]
            positions = [torch.arange(ids.shape[1] - 1)] * len(ids)
            for row, pos, (logp, *rest) in scored_chunks(sources, ids, positions):
                target = ids[row, pos + 1].to(logp.device)
                nll -= logp.gather(-1, target[:, None]).sum().item()
                count += len(pos)
                if rest:
                    t_logp = rest[0].to(logp.device)
                    kl += (t_logp.exp() * (t_logp - logp)).sum().item()
                    agree += (t_logp.argmax(-1) == logp.argmax(-1)).sum().item()
            bar.update(len(ids))
    out = {"heldout_ppl": math.exp(nll / count), "heldout_tokens": int(count)}
    if tokenizer is not None:
        out["heldout_bpb"] = nll / math.log(2) / text_bytes(tokenizer, blocks)
    if teacher is not None:
        out.update(teacher_kl=kl / count, top1_agreement=agree / count)
    return out


def measure_deployed(
    logits: Logits,
    model: torch.nn.Module,
    tokenizer,
    file: Path,
    kernel_name: str,
    spec: EvalSpec,
    heldout: torch.Tensor,
    teacher: torch.nn.Module | None,
    seed: int,
) -> dict:
    """Every figure but latency for a model as another runtime runs it: its file's size, and
    fidelity and accuracy from that runtime's logits (`model` only carries lm-eval's plumbing:
    config and tokenizer; it computes nothing)."""
    params = count_params(model)
    size_on_disk = file.stat().st_size if file.is_file() else weight_bytes_on_disk(file)
    metrics = {
        "params": params,
        "bytes": size_on_disk,
        "bits_per_param": round(8 * size_on_disk / params, 3),
        "loaded_bytes": size_on_disk,  # the runtime maps the file's weights as they are
        "kernel": kernel_name,
    }
    metrics.update(fidelity(logits, teacher, heldout[: spec.fidelity.samples], spec.fidelity.batch_size, tokenizer))
    torch.manual_seed(seed)
    metrics["accuracy"], directions = evaluate(model, tokenizer, spec, seed, logits=logits)
    metrics["higher_is_better"] = {**{k: v for k, v in HIGHER_IS_BETTER.items() if k in metrics}, **directions}
    return metrics


def measure(
    model: torch.nn.Module,
    tokenizer,
    folder: Path | None,
    spec: EvalSpec,
    heldout: torch.Tensor,
    teacher: torch.nn.Module | None,
    seed: int,
) -> dict:
    """Every figure for one model but latency, in the output contract's shape."""
    model.eval()
    metrics = size(model, folder)
    metrics.update(fidelity(model, teacher, heldout[: spec.fidelity.samples], spec.fidelity.batch_size, tokenizer))
    pad = tokenizer.pad_token_id or tokenizer.eos_token_id
    if spec.speculative.enabled and teacher is not None:
        metrics["speculative"] = speculative(model, teacher, heldout, spec.speculative, pad)
    torch.manual_seed(seed)
    metrics["accuracy"], directions = evaluate(model, tokenizer, spec, seed)
    metrics["higher_is_better"] = {**{k: v for k, v in HIGHER_IS_BETTER.items() if k in metrics}, **directions}
    return metrics
