"""Model families by HF `model_type`. The contract is `base.Family`; adding a family is one
module and one line here. A model of any other type is refused before any work."""

from __future__ import annotations

from .. import UserError
from .base import Family, Rows, config_get
from .gemma3 import Gemma3
from .llama import Llama
from .mistral import Mistral
from .phi3 import Phi3
from .qwen2 import Qwen2
from .qwen3 import Qwen3

FAMILIES: dict[str, Family] = {
    t: f for f in (Llama(), Mistral(), Qwen2(), Qwen3(), Gemma3(), Phi3()) for t in f.model_types
}


def family_of(config) -> Family:
    """The family of a model, config or config dict; UserError (one line) for any other type,
    or for a variant of a known type that is not modelled."""
    config = getattr(config, "config", config)
    model_type = config_get(config, "model_type")
    family = FAMILIES.get(model_type)
    if family is None:
        names = ", ".join(dict.fromkeys(_named(f) for f in FAMILIES.values()))
        raise UserError(f"model_type {model_type!r} is not a supported decoder family; supported: {names}")
    why = family.problems(config)
    if why:
        raise UserError(f"model_type {model_type!r}: {why} is not supported")
    return family


def _named(family: Family) -> str:
    types = [t for t in family.model_types if t != family.name]
    return f"{family.name} (model_type {', '.join(types)})" if types else family.name


def sequence_bos(config, tokenizer) -> int | None:
    """The BOS id every sequence must start with (training, calibration, measurement), or None
    when the family has no such rule."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos if bos is not None and family_of(config).bos_first else None


__all__ = ["FAMILIES", "Family", "Rows", "config_get", "family_of", "sequence_bos"]
