"""`openai:<base_url>#<model>`: a black-box teacher behind an OpenAI-compatible endpoint. It
answers in text only (no logits, no weights here), so it feeds sequence-level distillation; the
client (concurrency, retries, the answer cache) is `answers.Endpoint`."""

from __future__ import annotations

import os

from ..answers import Endpoint
from .base import Source


class OpenAISource(Source):
    prefix, form, has_logits = "openai", "openai:<base_url>#<model>", False
    fields = frozenset({"api_key_env", "concurrency", "max_retries", "backoff_s", "timeout_s"})

    def validate(self) -> None:
        url, _, model = self.target.partition("#")
        if not url.startswith(("http://", "https://")) or not model:
            raise ValueError(f"openai: expected openai:http(s)://host[:port]/v1#<model>, got {self.spec.source!r}")
        if self.spec.api_key_env is not None and not os.environ.get(self.spec.api_key_env):
            raise ValueError(f"api_key_env: environment variable {self.spec.api_key_env} is not set")

    def identity(self) -> str:
        return self.spec.source

    def load(self, device) -> Endpoint:
        return Endpoint(self.spec)

    def preflight(self) -> None:
        Endpoint(self.spec).check()
