"""Mistral: Llama's layout with a sliding attention window. llama.cpp runs it as `llama`, whose
graph has no window: it agrees with transformers up to the window's length (4,096 for
Mistral 7B v0.1; none for later releases), and a runtime context beyond it is refused."""

from __future__ import annotations

from .llama import Llama


class Mistral(Llama):
    name = "mistral"
    model_types = ("mistral",)
    rope_types = ()
