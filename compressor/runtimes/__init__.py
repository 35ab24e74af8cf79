"""Runtimes a stage is measured in besides torch (`eval.runtimes: [torch, llama.cpp]`). Adding a
runtime is one module with a `Runtime` subclass and one line here."""

from __future__ import annotations

from .base import Runtime
from .llamacpp import LlamaCpp

RUNTIMES: dict[str, Runtime] = {r.name: r for r in (LlamaCpp(),)}
NAMES = ("torch", *RUNTIMES)

__all__ = ["NAMES", "RUNTIMES", "Runtime"]
