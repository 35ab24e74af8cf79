"""The runtime contract: where a stage is measured besides torch (the artifact as
`from_pretrained` loads it). A runtime deploys an artifact into its own format once, and gives
the measurement what it needs from that deployment: logits (for perplexity, KL, top-1 and
lm-eval's scoring), a runner for the interleaved latency rounds, and the kernel it computes with.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar


class Runtime(ABC):
    name: ClassVar[str]

    @abstractmethod
    def missing(self) -> str | None:
        """Why this runtime cannot run here (a package to install), or None."""

    def refuses(self, shape: dict, context: int) -> str | None:
        """Why this runtime cannot compute a model of this shape (a config dict) as transformers does
        over `context` tokens, in one line; None when it can. Checked when the recipe is validated."""
        return None

    @abstractmethod
    def deploy(self, artifact: Path, key: str, options: dict, cache: Path) -> Path:
        """The artifact in the runtime's format, written once into `cache` (a file or folder)."""

    @abstractmethod
    def logits(self, path: Path, n_ctx: int, threads: int):
        """A callable: token ids [B, L] -> logits [B, L, V] computed by the runtime."""

    @abstractmethod
    def runner(self, path: Path, threads: int, n_ctx: int, max_positions: int):
        """What latency.time_models times (prefill, generate, bytes), see latency.TorchRunner."""

    @abstractmethod
    def kernel(self, path: Path) -> str:
        """What computes the weights, in words."""
