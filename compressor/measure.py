"""One measurement, taken the same way for the teacher and after every stage.

size      parameters, bytes of weights on disk, effective bits/param, memory once loaded
latency   prefill ms for P prompt tokens, decode ms/token at batch 1, tokens/s at batch B,
          peak memory; warm-up, repeats, median and [min, max]; beside it the roofline:
          bytes read per decoded token / measured memory bandwidth
accuracy  lm-evaluation-harness tasks, plus our own token-level held-out perplexity
fidelity  mean KL(teacher || model) per token and top-1 agreement with the teacher on held-out
          text (what a draft model's acceptance rate in speculative decoding depends on)
speculative  optional: the model as a draft for the teacher, measured acceptance and speed-up
"""

from __future__ import annotations

import contextlib
import math
import statistics
import threading
import time
from functools import lru_cache
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from .evaldata import user_file
from .models import count_params
from .speculative import SpeculativeSpec, speculative
from .storage import recipe_path
from .tasks import evaluate


class LatencySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    prompt_tokens: int = Field(128, ge=1)
    new_tokens: int = Field(32, ge=2)
    batch_sizes: list[int] = Field([1, 8], min_length=1)
    warmup: int = Field(1, ge=0)
    repeats: int = Field(3, ge=1)
    threads: int | None = Field(None, ge=1, description="CPU threads while timing (default: torch's)")


class FidelitySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    samples: int = Field(16, ge=1, description="held-out blocks of data.seq_len tokens")
    batch_size: int = Field(4, ge=1)


class EvalSpec(BaseModel):
    """What every measurement records."""

    model_config = ConfigDict(extra="forbid")

    tasks: list[str] = Field(
        ["stdlib_ppl", "stdlib_mc"],
        description="lm-eval task names: ours (compressor/evals), stock ones, or mc:FILE.json / ppl:FILE.txt",
    )
    task_dirs: list[str] = Field([], description="folders of your own lm-eval task YAMLs")
    data_dir: str | None = Field(None, description="folder of the published benchmark files (default: ../shared/data)")
    limit: int | None = Field(None, ge=1, description="items per task (None: all)")
    batch_size: int = Field(8, ge=1)
    max_length: int | None = Field(None, ge=16)
    latency: LatencySpec = LatencySpec()
    fidelity: FidelitySpec = FidelitySpec()
    speculative: SpeculativeSpec = SpeculativeSpec()

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


def stored_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor occupies: a quantized tensor subclass (torchao) counts its inner integer
    data and scales, not its logical float shape."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(stored_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


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


def size(model: torch.nn.Module, folder: Path | None) -> dict:
    params = count_params(model)
    loaded = sum(stored_bytes(t) for t in list(model.parameters()) + list(model.buffers()))
    on_disk = weight_bytes_on_disk(folder) or loaded
    return {
        "params": params,
        "bytes": on_disk,
        "bits_per_param": round(8 * on_disk / params, 3),
        "loaded_bytes": loaded,
        "kernel": kernel(model),
    }


# --- latency ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _threads(n: int | None):
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


class PeakRSS:
    """Peak resident memory of this process while the block runs (CPU), sampled every 2 ms."""

    def __enter__(self):
        self.proc, self.peak, self._stop = psutil.Process(), psutil.Process().memory_info().rss, False
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join()


@lru_cache(maxsize=4)
def memory_bandwidth(device_str: str) -> float:
    """Measured copy bandwidth in bytes/s (read + write), the roofline's denominator."""
    device = torch.device(device_str)
    n = (256 << 20) // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    times = _timed(lambda: dst.copy_(src), device, warmup=2, repeats=5)
    return 2 * src.numel() * 4 / min(times)


def bytes_per_decoded_token(model: torch.nn.Module, context: int) -> int:
    """Weights read to decode one token (an untied input embedding reads one row, not all)
    plus the KV cache read at `context` tokens."""
    total = sum(stored_bytes(t) for t in model.parameters())
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if emb is not None and head is not None and emb.weight is not head.weight:
        total -= stored_bytes(emb.weight)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    itemsize = next(model.parameters()).element_size()
    return total + 2 * cfg.num_hidden_layers * kv_heads * head_dim * context * itemsize


def latency(model: torch.nn.Module, prompt: torch.Tensor, spec: LatencySpec, pad_token_id: int | None) -> dict:
    """Prefill, decode at batch 1, throughput at each batch size; median and [min, max]."""
    device = model.device
    max_pos = getattr(model.config, "max_position_embeddings", None) or 1 << 30
    p = min(spec.prompt_tokens, prompt.numel(), max_pos - spec.new_tokens)
    ids = prompt[:p].view(1, -1).to(device)
    gen = dict(
        max_new_tokens=spec.new_tokens, min_new_tokens=spec.new_tokens, do_sample=False, pad_token_id=pad_token_id
    )
    out: dict = {"prompt_tokens": p, "new_tokens": spec.new_tokens, "threads": torch.get_num_threads()}
    with _threads(spec.threads), torch.no_grad():
        out["threads"] = torch.get_num_threads()
        prefill = _timed(lambda: model(input_ids=ids, use_cache=True), device, spec.warmup, spec.repeats)
        full = _timed(
            lambda: model.generate(ids, attention_mask=torch.ones_like(ids), **gen), device, spec.warmup, spec.repeats
        )
        decode = [(f - statistics.median(prefill)) / (spec.new_tokens - 1) for f in full]
        out.update(
            prefill_ms=1e3 * statistics.median(prefill),
            prefill_ms_range=[1e3 * min(prefill), 1e3 * max(prefill)],
            decode_ms_per_token=1e3 * statistics.median(decode),
            decode_ms_range=[1e3 * min(decode), 1e3 * max(decode)],
        )
        throughput = {}
        peak = None
        for b in spec.batch_sizes:
            batch = ids.expand(b, -1)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            with PeakRSS() if device.type == "cpu" else contextlib.nullcontext() as rss:
                times = _timed(
                    lambda: model.generate(batch, attention_mask=torch.ones_like(batch), **gen),
                    device,
                    spec.warmup,
                    spec.repeats,
                )
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else rss.peak
            throughput[str(b)] = b * spec.new_tokens / statistics.median(times)
        largest = str(max(spec.batch_sizes))
        out.update(
            tokens_per_s=throughput[largest],
            tokens_per_s_batch=int(largest),
            tokens_per_s_by_batch=throughput,
            peak_mem_bytes=peak,
            peak_mem_kind="cuda max allocated" if device.type == "cuda" else "process peak RSS",
        )
    bandwidth = memory_bandwidth(str(device))
    read = bytes_per_decoded_token(model, p + spec.new_tokens // 2)
    out.update(bandwidth_gb_s=bandwidth / 1e9, bytes_per_token=read, roofline_ms_per_token=1e3 * read / bandwidth)
    return out


# --- fidelity --------------------------------------------------------------------------------


@torch.no_grad()
def fidelity(model: torch.nn.Module, teacher: torch.nn.Module | None, blocks: torch.Tensor, batch_size: int) -> dict:
    """Token-level held-out perplexity; with a teacher, KL(teacher || model) and top-1 agreement."""
    nll = kl = agree = count = 0.0
    for i in range(0, len(blocks), batch_size):
        ids = blocks[i : i + batch_size].to(model.device)
        logp = model(input_ids=ids).logits[:, :-1].float().log_softmax(-1)
        nll += F.nll_loss(logp.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
        count += ids[:, 1:].numel()
        if teacher is not None:
            t_logp = teacher(input_ids=ids.to(teacher.device)).logits[:, :-1].float().log_softmax(-1).to(logp.device)
            kl += (t_logp.exp() * (t_logp - logp)).sum().item()
            agree += (t_logp.argmax(-1) == logp.argmax(-1)).sum().item()
    out = {"heldout_ppl": math.exp(nll / count), "heldout_tokens": int(count)}
    if teacher is not None:
        out.update(teacher_kl=kl / count, top1_agreement=agree / count)
    return out


def measure(
    model: torch.nn.Module,
    tokenizer,
    folder: Path | None,
    spec: EvalSpec,
    heldout: torch.Tensor,
    teacher: torch.nn.Module | None,
    seed: int,
) -> dict:
    """Every figure for one model, in the output contract's shape."""
    model.eval()
    metrics = size(model, folder)
    metrics.update(fidelity(model, teacher, heldout[: spec.fidelity.samples], spec.fidelity.batch_size))
    pad = tokenizer.pad_token_id or tokenizer.eos_token_id
    if spec.latency.enabled:
        metrics.update(latency(model, heldout.flatten(), spec.latency, pad))
    if spec.speculative.enabled and teacher is not None:
        metrics["speculative"] = speculative(model, teacher, heldout, spec.speculative, pad)
    torch.manual_seed(seed)
    metrics["accuracy"] = evaluate(model, tokenizer, spec, seed)
    return metrics
