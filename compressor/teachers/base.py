"""The teacher-source contract: what a `prefix:target` teacher is, where its weights live, how
it loads, and what its dimensions are before anything loads.

One class per prefix, registered in `compressor/teachers/__init__.py`. A source validates the
settings a recipe gives it, names itself (`identity`, part of every stage key, content hashes
where there are files, so a changed teacher never reuses old artifacts) and loads as a local
model (`Loaded`) or, without logits, as a text teacher (`has_logits = False`, see answers.py).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar

import torch

from ..models import Loaded, load_pretrained, resolve_dtype, shape_of
from ..storage import atomic_dir, home, locked

if TYPE_CHECKING:
    from . import TeacherSpec


class Source(ABC):
    prefix: ClassVar[str]  # "hf", "builtin", ...
    form: ClassVar[str]  # how a recipe writes it, for messages: "hf:<hub id or folder>"
    fields: ClassVar[frozenset[str]] = frozenset()  # TeacherSpec settings that apply to this source
    has_logits: ClassVar[bool] = True  # False: a text-only teacher (answers, no weights here)
    local_target: ClassVar[bool] = False  # the target is a path, relative to the recipe
    converted: ClassVar[bool] = False  # loads through an HF folder it converts once into the cache

    def __init__(self, spec: "TeacherSpec"):
        self.spec, self.target = spec, spec.target

    @classmethod
    def is_path(cls, target: str) -> bool:
        """Whether a recipe's target names a file or folder (made absolute against the recipe)."""
        return cls.local_target

    def validate(self) -> None:
        """Raise ValueError with what is wrong with the target or settings (before any work)."""
        return None

    @abstractmethod
    def identity(self) -> str: ...

    def folder(self) -> Path | None:
        """The HF folder holding the weights on disk (None when there is none, e.g. a hub id)."""
        return home() / "teachers" / self.identity().replace(":", "-") if self.converted else None

    @abstractmethod
    def load(self, device: torch.device) -> Loaded: ...

    def shape(self) -> dict | None:
        """The dimensions, without loading weights; None when they cannot be known offline."""
        folder = self.folder()
        config = folder / "config.json" if folder is not None else None
        return shape_of(json.loads(config.read_text())) if config is not None and config.is_file() else None

    def preflight(self) -> None:
        """Checks that need the network or the filesystem right before work starts."""
        return None

    def load_converted(self, device: torch.device, convert: Callable[[Path], None], what: str) -> Loaded:
        """A source that is not an HF folder: `convert(tmp)` writes one into the cache the first time
        (under a lock, atomically: a crash leaves nothing half-converted), named by `identity`."""
        folder = self.folder()
        with locked(folder.with_name(folder.name + ".lock"), f"conversion of {what}"):
            if not (folder / "config.json").is_file():
                with atomic_dir(folder) as tmp:
                    convert(tmp)
        return load_pretrained(str(folder), device, resolve_dtype(self.spec.dtype, device))

    def notes(self) -> list[str]:
        """Caveats every report of this teacher must carry (e.g. where its weights come from)."""
        return []
