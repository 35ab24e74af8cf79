"""Teachers: `prefix:target` in a recipe, one source class per prefix.

Adding a source is one module with a `Source` subclass and one line in SOURCES.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, model_validator

from .. import UserError
from ..models import Loaded
from ..storage import recipe_path
from .base import Source
from .builtin import BuiltinBuild, BuiltinSource
from .gguf import GGUFSource
from .hf import HFSource
from .llama2c import Llama2cSource
from .openai import OpenAISource

SOURCES: dict[str, type[Source]] = {
    s.prefix: s for s in (BuiltinSource, HFSource, GGUFSource, Llama2cSource, OpenAISource)
}
COMMON_FIELDS = frozenset({"source", "dtype"})


class TeacherSpec(BaseModel):
    """`source` is `<prefix>:<target>` (see SOURCES); the other settings apply to some sources."""

    model_config = ConfigDict(extra="forbid")

    source: str
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    tokenizer: str | None = Field(None, description="llama2c tokenizer.bin (default: the one beside the model)")
    revision: str | None = Field(None, description="hub revision for hf: ids")
    trust_remote_code: bool = Field(False, description="hf: run the model's own code (off unless set)")
    build: BuiltinBuild | None = Field(None, description="built-in teacher settings (builtin: only)")
    api_key_env: str | None = Field(None, description="openai: the environment variable holding the API key")
    concurrency: int = Field(4, ge=1, le=256, description="openai: requests in flight at once")
    max_retries: int = Field(5, ge=0, le=20, description="openai: retries of a 429/5xx/timeout/malformed answer")
    backoff_s: float = Field(1.0, ge=0, description="openai: first retry delay, doubled on each retry")
    timeout_s: float = Field(120.0, gt=0, description="openai: per request")

    @model_validator(mode="before")
    @classmethod
    def _paths(cls, value, info: ValidationInfo):
        value = {"source": value} if isinstance(value, str) else value
        if not isinstance(value, dict):
            return value
        value = dict(value)
        source = value.get("source")
        if isinstance(source, str):
            kind, _, rest = source.partition(":")
            if kind in SOURCES and SOURCES[kind].is_path(rest):
                value["source"] = f"{kind}:{recipe_path(rest, info)}"
        if isinstance(value.get("tokenizer"), str):
            value["tokenizer"] = recipe_path(value["tokenizer"], info)
        return value

    @model_validator(mode="after")
    def _check(self) -> "TeacherSpec":
        kind, _, rest = self.source.partition(":")
        if kind not in SOURCES or not rest:
            forms = [s.form for s in SOURCES.values()]
            raise ValueError(f"must be {', '.join(forms[:-1])} or {forms[-1]}, got {self.source!r}")
        cls = SOURCES[kind]
        foreign = [n for n, f in type(self).model_fields.items() if n not in COMMON_FIELDS | cls.fields]
        for name in [n for n in foreign if getattr(self, n) != type(self).model_fields[n].default]:
            owners = [s.prefix + ":" for s in SOURCES.values() if name in s.fields]
            raise ValueError(f"{name}: only applies to {' and '.join(owners)} teachers")
        cls(self).validate()
        return self

    @property
    def kind(self) -> str:
        return self.source.partition(":")[0]

    @property
    def target(self) -> str:
        return self.source.partition(":")[2]

    @property
    def impl(self) -> Source:
        return SOURCES[self.kind](self)

    @property
    def has_logits(self) -> bool:
        return SOURCES[self.kind].has_logits

    def identity(self) -> str:
        return self.impl.identity()

    def folder(self):
        return self.impl.folder()

    def shape(self) -> dict | None:
        return self.impl.shape()


def load_teacher(spec: TeacherSpec, device: torch.device) -> Loaded:
    """A teacher (or base model) as a local model; a text-only teacher loads as its client."""
    return spec.impl.load(device)


def local_folder(spec: TeacherSpec, what: str) -> Path:
    """The folder a teacher's (or base model's) weights are read from a layer at a time; a source
    converted into one (built-in, llama2c, GGUF) is converted first, the one time it loads whole."""
    folder = spec.folder()
    if folder is None:
        raise UserError(
            f"teacher {spec.source}: {what} reads a model from its folder, and a hub id has none here; "
            "download it and name the folder (hf:./path/to/model)"
        )
    if not (folder / "config.json").is_file():
        spec.impl.load(torch.device("cpu"))
    return folder


def stream_teacher(spec: TeacherSpec, device: torch.device) -> Loaded:
    """A teacher read a decoder layer at a time from its folder (layerwise.streaming), in the
    dtype it loads in."""
    from ..layerwise import load_streamed
    from ..models import resolve_dtype

    return load_streamed(local_folder(spec, "eval.layerwise"), device, resolve_dtype(spec.dtype, device))


__all__ = ["SOURCES", "Source", "TeacherSpec", "load_teacher", "local_folder", "stream_teacher", "BuiltinBuild"]
