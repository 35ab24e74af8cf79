"""Latency that survives a noisy machine: every model of a run is timed in interleaved rounds
(A B C, B C A, C A B, ...), so a burst of load from another process lands on all of them
alike, and the estimator is the minimum over the rounds (contention only ever adds time).
Each figure keeps its per-round samples, so a comparison can ask whether one model was faster
in every round and by more than the spread (`faster`), or whether the two tie within noise.

Measured per model: prefill ms for P prompt tokens, decode ms/token at batch 1 (the N − 1 decode
steps of a generate of N tokens, clocked from the first token's logits to the last's), tokens/s at
each batch size, and memory: the weights plus the working memory generation adds at the largest
batch. Beside it, the roofline: bytes read per decoded token divided by the measured memory bandwidth.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Callable

import psutil
import torch
from pydantic import BaseModel, ConfigDict, Field

from .models import head_dim
from .progress import Bar
from .quantized import stored_bytes

# a difference smaller than this fraction is never called a win, however quiet the machine
MIN_NOISE = 0.02


class LatencySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    prompt_tokens: int = Field(128, ge=1)
    new_tokens: int = Field(32, ge=2)
    batch_sizes: list[int] = Field([1, 8], min_length=1)
    warmup: int = Field(1, ge=0, description="untimed generations per model before the first round")
    repeats: int = Field(5, ge=1, description="interleaved rounds: each model is timed once per round")
    threads: int | None = Field(None, ge=1, description="CPU threads while timing (default: torch's)")


@contextlib.contextmanager
def threads(n: int | None):
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable, device: torch.device) -> tuple[object, float]:
    """fn()'s result and its wall time in seconds, with the device's queue drained on both ends."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


class PeakRSS:
    """Peak resident memory of this process while the block runs (CPU), sampled every 2 ms."""

    def __enter__(self):
        self.proc = psutil.Process()
        self.start = self.peak = self.proc.memory_info().rss
        self._stop = False
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


@contextlib.contextmanager
def cuda_working_memory(device: torch.device):
    """Bytes the block allocates on the GPU beyond what was held before it (peak minus start)."""
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = {"bytes": 0}
    yield out
    out["bytes"] = torch.cuda.max_memory_allocated(device) - before


def kv_cache_bytes(model: torch.nn.Module, batch: int, context: int) -> int:
    """Keys and values of every layer for `batch` sequences of `context` tokens."""
    cfg = model.config
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    itemsize = next(model.parameters()).element_size()
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim(cfg) * batch * context * itemsize


def memory_bandwidth(device_str: str) -> float:
    """Measured copy bandwidth in bytes/s (read + write), the roofline's denominator: sampled
    between the timing rounds and the best sample kept, as decode times keep their best round (one
    sample taken while a neighbour streams memory made the floor slower than the model)."""
    device = torch.device(device_str)
    n = (256 << 20) // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    times = [timed(lambda: dst.copy_(src), device)[1] for _ in range(7)][2:]
    return 2 * src.numel() * 4 / min(times)


def bytes_per_decoded_token(model: torch.nn.Module, context: int) -> int:
    """Weights read to decode one token (an untied input embedding reads one row, not all)
    plus the KV cache read at `context` tokens."""
    total = sum(stored_bytes(t) for t in model.parameters())
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if emb is not None and head is not None and emb.weight is not head.weight:
        total -= stored_bytes(emb.weight)
    return total + kv_cache_bytes(model, 1, context)


# --- one model, one round -----------------------------------------------------------------------


class TorchRunner:
    """A model as `from_pretrained` loads it, timed through `generate` (the torch runtime).
    Other runtimes bring a runner of the same shape (runtimes/)."""

    def __init__(self, model: torch.nn.Module, pad: int | None):
        self.model, self.pad, self.device = model, pad, model.device

    @property
    def max_positions(self) -> int:
        return getattr(self.model.config, "max_position_embeddings", None) or 1 << 30

    def batch_sizes(self, spec: LatencySpec) -> list[int]:
        return spec.batch_sizes

    @torch.no_grad()
    def prefill(self, ids: list[int]) -> None:
        self.model(input_ids=torch.tensor([ids], device=self.device), use_cache=True)

    @torch.no_grad()
    def generate(self, ids: list[int], new_tokens: int, batch: int) -> float:
        """Greedy generation; returns the seconds of its decode steps alone. Clocked inside
        generate: subtracting a separately timed prefill went negative when a burst of load hit
        the prefill and not the generate."""
        from transformers import LogitsProcessorList

        x = torch.tensor([ids], device=self.device).expand(batch, -1)
        clock = _StepClock(self.device)
        self.model.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=self.pad,
            logits_processor=LogitsProcessorList([clock]),
        )
        return clock.times[-1] - clock.times[0]

    def weight_bytes(self) -> int:
        return sum(stored_bytes(x) for x in list(self.model.parameters()) + list(self.model.buffers()))

    def bytes_per_token(self, context: int) -> int:
        return bytes_per_decoded_token(self.model, context)

    def kv_bytes(self, batch: int, context: int) -> int:
        return kv_cache_bytes(self.model, batch, context)

    def close(self) -> None:
        self.model = None


class _StepClock:
    """A logits processor that notes the time of each step: its first call comes right after the
    prompt's forward pass, so last − first spans the decode steps alone."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        sync(self.device)
        self.times.append(time.perf_counter())
        return scores


@dataclass
class Timed:
    """A model being timed: how to get its runner, and the samples of its rounds."""

    key: str  # what the figures are filed under
    name: str  # what progress shows
    load: Callable[[], TorchRunner]  # -> a runner (TorchRunner or a runtime's own)
    runner: TorchRunner | None = None
    prompt: torch.Tensor | None = None  # its own prompt tokens (a teacher with its own tokenizer)

    def __post_init__(self):
        self.prefill: list[float] = []
        self.decode: list[float] = []
        self.batch: dict[int, list[float]] = {}
        self.extra_bytes = 0

    def drop(self) -> None:
        """Free the runner (a runtime's native memory too) until it is loaded again."""
        if self.runner is not None:
            self.runner.close()
        self.runner = None


def _prompt(runner, prompt: torch.Tensor, spec: LatencySpec) -> list[int]:
    p = min(spec.prompt_tokens, prompt.numel(), runner.max_positions - spec.new_tokens)
    return prompt[:p].tolist()


def _round(t: Timed, prompt: torch.Tensor, spec: LatencySpec, last: bool) -> None:
    runner = t.runner
    ids = _prompt(runner, prompt, spec)
    _, prefill = timed(lambda: runner.prefill(ids), runner.device)
    decode, _ = timed(lambda: runner.generate(ids, spec.new_tokens, 1), runner.device)
    t.prefill.append(prefill)
    t.decode.append(decode / (spec.new_tokens - 1))
    sizes = runner.batch_sizes(spec)
    for b in sizes:
        measured = last and b == max(sizes) and runner.device.type == "cuda"
        with cuda_working_memory(runner.device) if measured else contextlib.nullcontext({}) as mem:
            _, seconds = timed(lambda: runner.generate(ids, spec.new_tokens, b), runner.device)
        t.batch.setdefault(b, []).append(seconds)
        if measured:
            t.extra_bytes = mem["bytes"]


def _warm(t: Timed, prompt: torch.Tensor, spec: LatencySpec) -> None:
    ids = _prompt(t.runner, prompt, spec)
    for _ in range(spec.warmup):
        t.runner.generate(ids, spec.new_tokens, 1)


def _summary(t: Timed, spec: LatencySpec, prompt_tokens: int, bandwidth: float) -> dict:
    """Per-model figures: the minimum over the rounds, the range, and every round's sample."""
    runner = t.runner
    largest = max(t.batch)
    throughput = {str(b): b * spec.new_tokens / min(s) for b, s in t.batch.items()}
    read = runner.bytes_per_token(prompt_tokens + spec.new_tokens // 2)
    cuda = runner.device.type == "cuda"
    return {
        "prompt_tokens": prompt_tokens,
        "new_tokens": spec.new_tokens,
        "threads": spec.threads or torch.get_num_threads(),
        "rounds": len(t.decode),
        "prefill_ms": 1e3 * min(t.prefill),
        "prefill_ms_range": [1e3 * min(t.prefill), 1e3 * max(t.prefill)],
        "decode_ms_per_token": 1e3 * min(t.decode),
        "decode_ms_range": [1e3 * min(t.decode), 1e3 * max(t.decode)],
        "decode_ms_median": 1e3 * statistics.median(t.decode),
        "decode_ms_samples": [1e3 * x for x in t.decode],
        "tokens_per_s": throughput[str(largest)],
        "tokens_per_s_batch": largest,
        "tokens_per_s_by_batch": throughput,
        "tokens_per_s_samples": [largest * spec.new_tokens / s for s in t.batch[largest]],
        "peak_mem_bytes": runner.weight_bytes()
        + (t.extra_bytes if cuda else runner.kv_bytes(largest, prompt_tokens + spec.new_tokens)),
        "peak_mem_kind": f"weights + GPU memory generation at batch {largest} allocates (measured)"
        if cuda
        else f"weights + KV cache of batch {largest} × {prompt_tokens + spec.new_tokens} tokens (computed: the "
        "RSS of one process timing several models cannot be split among them)",
        "bandwidth_gb_s": bandwidth / 1e9,
        "bytes_per_token": read,
        "roofline_ms_per_token": 1e3 * read / bandwidth,
    }


def _fits(models: list[Timed], device: torch.device) -> bool:
    """Whether every model can stay loaded while the rounds run (else each round reloads)."""
    return len(models) <= 1 or device.type == "cpu" and psutil.virtual_memory().available > 8 << 30


def _own(t: Timed, prompt: torch.Tensor) -> torch.Tensor:
    return t.prompt if t.prompt is not None else prompt


def time_models(models: list[Timed], prompt: torch.Tensor, spec: LatencySpec, device: torch.device) -> dict:
    """Time every model in interleaved rounds; {"models": {key: figures}, "session": {...}}."""
    bandwidths = []  # sampled after each round, at the rounds' threads
    resident = _fits(models, device)
    load_before = os.getloadavg()
    start = time.time()
    with threads(spec.threads):
        bar = Bar("latency", len(models) * spec.repeats, unit="model-round")
        for t in models:
            t.runner = t.load()
            _warm(t, _own(t, prompt), spec)
            if not resident:
                t.drop()
        for r in range(spec.repeats):
            order = models[r % len(models) :] + models[: r % len(models)]  # rotate who goes first
            for t in order:
                if t.runner is None:
                    t.runner = t.load()
                _round(t, _own(t, prompt), spec, last=r == spec.repeats - 1)
                if not resident and r < spec.repeats - 1:
                    t.drop()
                bar.update(1, model=t.name)
            bandwidths.append(memory_bandwidth(str(device)))
        bar.close()
        bandwidth = max(bandwidths)
        figures = {}
        for t in models:
            if t.runner is None:
                t.runner = t.load()
            figures[t.key] = _summary(t, spec, len(_prompt(t.runner, _own(t, prompt), spec)), bandwidth)
            t.drop()
    session = {
        "order": "interleaved rounds, rotating start",
        "rounds": spec.repeats,
        "estimator": f"min over {spec.repeats} rounds",
        "models": len(models),
        "resident": resident,
        "threads": spec.threads or torch.get_num_threads(),
        "cores": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "seconds": round(time.time() - start, 1),
    }
    return {"models": figures, "session": session}


# --- comparing two timed models -----------------------------------------------------------------


def noise(samples: list[float]) -> float:
    """Relative spread of a model's rounds: (median - min) / min, at least MIN_NOISE."""
    low = min(samples)
    return max(MIN_NOISE, (statistics.median(samples) - low) / low if low > 0 else 0.0)


def faster(a: list[float], b: list[float]) -> bool:
    """Whether times `a` beat times `b` beyond noise: a is faster in every round (same rounds,
    interleaved) and its minimum is lower by more than either one's spread."""
    paired = len(a) == len(b) and all(x < y for x, y in zip(a, b))
    return paired and min(a) < min(b) * (1 - max(noise(a), noise(b)))
