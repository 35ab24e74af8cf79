"""`hf:<hub id or local folder>`: plain `from_pretrained` (remote code only when the recipe says so)."""

from __future__ import annotations

from pathlib import Path

from ..models import load_pretrained, resolve_dtype
from ..storage import digest, file_hashes
from .base import Source


class HFSource(Source):
    prefix, form, fields = "hf", "hf:<hub id or folder>", frozenset({"revision", "trust_remote_code"})

    @classmethod
    def is_path(cls, target: str) -> bool:
        return target.startswith((".", "/", "~"))

    def validate(self) -> None:
        looks_local = self.is_path(self.target) or Path(self.target).exists()
        if looks_local and not (Path(self.target) / "config.json").is_file():
            raise ValueError(f"no model folder (with config.json) at {self.target}")

    def identity(self) -> str:
        if Path(self.target).is_dir():
            return f"hf-folder:{digest(file_hashes(Path(self.target)))}"
        return f"hf:{self.target}@{self.spec.revision or 'main'}"

    def folder(self) -> Path | None:
        return Path(self.target) if Path(self.target).is_dir() else None

    def load(self, device):
        dtype = resolve_dtype(self.spec.dtype, device)
        return load_pretrained(self.target, device, dtype, self.spec.trust_remote_code, self.spec.revision)
