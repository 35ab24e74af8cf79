"""llama.cpp as a runtime: a stage is exported to GGUF (its own integers as Q4_0/Q8_0, its
family as llama.cpp's architecture, see exporters/gguf.py, through the same checks as
`compressor export --format gguf`) and measured as llama.cpp runs it, through llama-cpp-python:
its logits for perplexity, KL, top-1 agreement and lm-eval's scoring, its prefill and decode for
latency.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import torch

from .. import UserError
from ..storage import atomic_dir, digest
from .base import Runtime

EXPORT_VERSION = 3  # bumped when what the GGUF export writes changes (2: families, user-defined tokens;
# 3: general.quantization_version)


_SILENT = None


def mute() -> None:
    """llama.cpp's own log lines off (its errors still raise): our progress is the one to read."""
    global _SILENT
    import ctypes

    import llama_cpp

    if _SILENT is None:
        _SILENT = llama_cpp.llama_log_callback(lambda level, text, data: None)
        llama_cpp.llama_log_set(_SILENT, ctypes.c_void_p(0))


def _llama(path: Path, n_ctx: int, threads: int, logits_all: bool):
    """A llama-cpp-python model, quiet."""
    from llama_cpp import Llama

    mute()
    return Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_batch=min(n_ctx, 512),
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=logits_all,
        verbose=False,
    )


class LlamaCppLogits:
    """Token ids [B, L] -> llama.cpp's logits [B, L, V]; consecutive rows that share a prefix
    (lm-eval's answers to one question) reuse its KV cache."""

    def __init__(self, path: Path, n_ctx: int, threads: int):
        self.llm = _llama(path, n_ctx, threads, logits_all=True)
        self.n_ctx = n_ctx

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        rows = ids.tolist()
        out = np.empty((len(rows), len(rows[0]), self.llm.n_vocab()), dtype=np.float32)
        for b, row in enumerate(rows):
            self._eval(row)
            out[b] = self.llm.scores[: len(row)]
        return torch.from_numpy(out)

    def view(self, row: list[int]) -> torch.Tensor:
        """Logits [L, V] of one row as a view of llama.cpp's own buffer, valid until the next call:
        what bounded scoring reads (a 262k vocabulary makes a copy of 1,024 positions 1 GB)."""
        self._eval(row)
        return torch.from_numpy(self.llm.scores[: len(row)])

    def _eval(self, row: list[int]) -> None:
        """Evaluate `row`, reusing the KV cache of the prefix it shares with the last one."""
        if len(row) > self.n_ctx:
            raise UserError(f"llama.cpp: a sequence of {len(row)} tokens exceeds its context of {self.n_ctx}")
        done = self.llm.input_ids[: self.llm.n_tokens].tolist()
        common = 0
        while common < min(len(done), len(row)) and done[common] == row[common]:
            common += 1
        if common < len(row):
            self.llm.n_tokens = common
            self.llm.eval(row[common:])

    def close(self) -> None:
        self.llm.close()


class LlamaCppRunner:
    """A GGUF file timed as llama.cpp decodes it: batch 1, greedy, threads fixed."""

    def __init__(self, path: Path, threads: int, n_ctx: int, max_positions: int):
        self.path, self.device, self.max_positions = path, torch.device("cpu"), max_positions
        self.llm = _llama(path, n_ctx, threads, logits_all=False)

    def batch_sizes(self, spec) -> list[int]:
        return [1]  # one sequence at a time through llama-cpp-python's context

    def prefill(self, ids: list[int]) -> None:
        self.llm.reset()
        self.llm.eval(ids)

    def generate(self, ids: list[int], new_tokens: int, batch: int) -> float:
        """Greedy generation after a prefill; returns the seconds of the decode steps alone."""
        import time

        import llama_cpp

        self.prefill(ids)
        n_vocab = self.llm.n_vocab()
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llm.ctx, -1), shape=(n_vocab,))
            self.llm.eval([int(logits.argmax())])
        return time.perf_counter() - start

    def weight_bytes(self) -> int:
        return self.path.stat().st_size

    def close(self) -> None:
        self.llm.close()

    def bytes_per_token(self, context: int) -> int:
        return self.weight_bytes() + self.kv_bytes(1, context)

    def kv_bytes(self, batch: int, context: int) -> int:
        meta = gguf_shape(self.path)
        return 2 * meta["layers"] * meta["kv_width"] * batch * context * 2  # f16 keys and values


def gguf_shape(path: Path) -> dict:
    from ..teachers.gguf import read_header

    meta, _ = read_header(path)
    arch = meta["general.architecture"]
    heads_kv = meta[f"{arch}.attention.head_count_kv"]
    width = (
        meta.get(f"{arch}.attention.key_length")
        or meta[f"{arch}.embedding_length"] // meta[f"{arch}.attention.head_count"]
    )
    return {"layers": meta[f"{arch}.block_count"], "kv_width": heads_kv * width}


def gguf_kernel(path: Path) -> str:
    """What llama.cpp computes with: the GGUF tensor types, counted."""
    from gguf import GGUFReader

    kinds: dict[str, int] = {}
    for t in GGUFReader(path).tensors:
        kinds[t.tensor_type.name] = kinds.get(t.tensor_type.name, 0) + 1
    return "llama.cpp " + ", ".join(f"{k} ×{n}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1]))


class LlamaCpp(Runtime):
    name = "llama.cpp"

    def missing(self) -> str | None:
        for module, package in (("llama_cpp", "llama-cpp-python"), ("gguf", "gguf")):
            if importlib.util.find_spec(module) is None:
                return f"runtime llama.cpp needs {package}: pip install 'compressor[llamacpp]'"
        return None

    def refuses(self, shape: dict, context: int) -> str | None:
        from ..families import family_of

        family = family_of(shape)
        why = family.gguf_refusal(shape)
        limit = family.gguf_context_limit(shape)
        if why is None and limit is not None and context > limit:
            why = (
                f"llama.cpp's {family.gguf_arch} graph has no sliding window: it computes as transformers does only up "
                f"to the window of {limit} tokens, and {context} are scored (set eval.max_length and data.seq_len "
                f"to at most {limit})"
            )
        return why

    def deploy(self, artifact: Path, key: str, options: dict, cache: Path) -> Path:
        """The artifact as a GGUF file, written once per (artifact, export options)."""
        from ..exporters.gguf import write_artifact

        folder = cache / f"{key}-{digest([options, EXPORT_VERSION])}"
        path = folder / "model.gguf"
        if not path.is_file():
            with atomic_dir(folder) as tmp:
                write_artifact(artifact, tmp / "model.gguf", options, name=key)
                (tmp / "export.json").write_text(json.dumps({"artifact": str(artifact), "options": options}))
        return path

    def logits(self, path: Path, n_ctx: int, threads: int) -> LlamaCppLogits:
        return LlamaCppLogits(path, n_ctx, threads)

    def runner(self, path: Path, threads: int, n_ctx: int, max_positions: int) -> LlamaCppRunner:
        return LlamaCppRunner(path, threads, n_ctx, max_positions)

    def kernel(self, path: Path) -> str:
        return gguf_kernel(path)
