"""`hf:<hub id or local folder>`: plain `from_pretrained` (remote code only when the recipe says so)."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from urllib.parse import urlparse

from .. import UserError
from ..families import family_of
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
        config = Path(self.target) / "config.json"
        if looks_local and not config.is_file():
            raise ValueError(f"no model folder (with config.json) at {self.target}")
        if looks_local:
            try:
                family_of(json.loads(config.read_text()))
            except UserError as exc:
                raise ValueError(str(exc)) from None

    def identity(self) -> str:
        if Path(self.target).is_dir():
            return f"hf-folder:{digest(file_hashes(Path(self.target)))}"
        return f"hf:{self.target}@{self.spec.revision or 'main'}"

    def folder(self) -> Path | None:
        return Path(self.target) if Path(self.target).is_dir() else None

    def preflight(self) -> None:
        """A hub id that is not in the local cache needs the hub: fail in seconds, not retries."""
        if self.folder() is not None:
            return
        from huggingface_hub import constants, try_to_load_from_cache

        if isinstance(try_to_load_from_cache(self.target, "config.json", revision=self.spec.revision), str):
            return
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else _unreachable(constants.ENDPOINT)
        if why:
            raise UserError(
                f"teacher hf:{self.target}: not in the local Hugging Face cache and the hub cannot be reached "
                f"({why}); download it where there is a network and name the folder: hf:./path/to/model"
            )

    def load(self, device):
        self.preflight()
        dtype = resolve_dtype(self.spec.dtype, device)
        return load_pretrained(self.target, device, dtype, self.spec.trust_remote_code, self.spec.revision)


def _unreachable(endpoint: str, timeout: float = 3.0) -> str | None:
    """Why a TCP connection to the hub cannot be made within `timeout` seconds, or None."""
    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError as exc:
        return f"{url.hostname}: {exc.strerror or type(exc).__name__}"
    return None
