"""GGUF types as stage settings, shared by `quantize` and `qat`: which type each matrix gets (one
`type`, llama.cpp's `mix`, or a `target_bits` budget), checked against the model's dimensions
before any work, chosen on the model, and reported (types, allocation, fallbacks, and the blocks
themselves in ggml.safetensors for `--format gguf` and the llama.cpp runtime)."""

from __future__ import annotations

import torch
from pydantic import BaseModel, Field, model_validator

from ..quantized import GGML_FILE, ggml_summary, write_ggml
from . import model as ggml_model
from .mixes import PRESETS
from .types import TYPES, ggml_type


class GgufChoice(BaseModel):
    type: str | None = Field(None, description=f"one GGUF type for every Linear: {', '.join(TYPES)}")
    mix: str | None = Field(None, description=f"llama.cpp's mix for every matrix: {', '.join(PRESETS)}")
    target_bits: float | None = Field(
        None, gt=2, le=8.5, description="GGUF types per matrix by measured sensitivity, to this many bits per weight"
    )

    @model_validator(mode="after")
    def _one_choice(self) -> "GgufChoice":
        given = [f for f in ("type", "mix", "target_bits") if getattr(self, f) is not None]
        if len(given) > 1:
            raise ValueError(
                f"{' and '.join(given)}: give one (type: one GGUF type for the Linears; mix: llama.cpp's rule; "
                "target_bits: a budget)"
            )
        if self.type is not None:
            self.type = ggml_type(self.type).name
        if self.mix is not None:
            if self.mix.upper() not in PRESETS:
                raise ValueError(f"mix {self.mix!r} is not one of llama.cpp's we follow; mixes: {', '.join(PRESETS)}")
            self.mix = self.mix.upper()
        return self

    def gguf(self) -> str | None:
        """What GGUF types were asked for, in words ("mix Q4_K_M"), or None for the INT grid."""
        if self.type is not None:
            return f"type {self.type.upper()}"
        if self.mix is not None:
            return f"mix {self.mix.upper()}"
        return None if self.target_bits is None else f"target_bits {self.target_bits}"

    def refuse_grid_fields(self, grid_fields: tuple[str, ...]) -> None:
        """A GGUF choice is the whole grid: the INT grid's settings given beside it are refused."""
        grid_fields += ("lm_head",) if self.type is None else ()  # a mix or budget covers the output itself
        clash = [f for f in grid_fields if f in self.model_fields_set]
        if clash:
            raise ValueError(f"{clash[0]}: {self.gguf()} is the whole grid; leave {clash[0]} out")


def check_gguf(cfg: GgufChoice, shape: dict) -> None:
    """Refuse, from the config's dimensions alone, a budget no mix meets or a type the rows cannot take."""
    if cfg.target_bits is not None:
        from .budget import smallest_bits

        least = smallest_bits(ggml_model.shape_sizes(shape))
        if cfg.target_bits < least:
            raise ValueError(
                f"target_bits {cfg.target_bits}: no mix of GGUF types is that small for this model; "
                f"the smallest is {least:.2f} bits per weight (every matrix in Q2_K or its fallback)"
            )
        return
    if cfg.lm_head and shape.get("tie_word_embeddings"):
        raise ValueError("lm_head: true, but the head is tied to the embeddings (a mix quantizes both)")
    ggml_model.assign(ggml_model.shape_tensors(shape), shape, cfg.type, cfg.mix, cfg.lm_head, True)


def choose_types(model: torch.nn.Module, cfg, calibrate, imatrix: bool) -> tuple[list, dict]:
    """(the matrices a GGUF file quantizes, {module name: type}) for this model: the budget's
    allocation by measured sensitivity, or the type or mix (`imatrix`: llama.cpp's mix rules as
    when it has an importance matrix)."""
    listed = ggml_model.tensors(model)
    if cfg.target_bits is not None:
        return listed, ggml_model.budgeted(model, listed, cfg.target_bits, calibrate, cfg.calibration.batch_size)
    return listed, ggml_model.assign(listed, model.config.to_dict(), cfg.type, cfg.mix, cfg.lm_head, imatrix)


def report_gguf(kinds: dict, listed: list, cfg, ctx) -> None:
    """What the report says of the types (`ctx.info`); `kinds` is {module name: (type, (rows,
    row length))} of the blocks quantized (quantized.ggml_kinds)."""
    ctx.info["gguf_types"] = ggml_summary(kinds)
    ctx.info["gguf_allocation"] = ggml_model.allocation(kinds, listed)
    weights = sum(rows * n for _, (rows, n) in kinds.values())
    stored = sum(rows * n // TYPES[kind].block * TYPES[kind].bytes for kind, (rows, n) in kinds.values())
    ctx.info["gguf_bits_per_weight"] = round(8 * stored / weights, 3)
    if cfg.type is not None:
        chosen = {kind for kind, _ in kinds.values()}
        fallbacks = sorted({n.rpartition(".")[2] for n, (kind, _) in kinds.items() if kind != cfg.type})
        if fallbacks:
            ctx.info["gguf_fallback"] = (
                f"{', '.join(fallbacks)}: rows not a multiple of {TYPES[cfg.type].block}, written as "
                f"{', '.join(sorted(chosen - {cfg.type}))} (llama.cpp's rule)"
            )


def keep_blocks(found: dict, ctx) -> dict:
    """The blocks as the artifact's ggml.safetensors (for `--format gguf` and the llama.cpp runtime);
    returns their kinds for `report_gguf`."""
    ctx.files[GGML_FILE] = lambda path: write_ggml(path, found)
    return {name: (b.type.name, b.shape) for name, b in found.items()}
