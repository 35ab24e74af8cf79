"""Models as the stages see them: loading an HF folder, the dimensions stages are checked
against, and the surgery that makes a student (layer subsets, fresh configs).

Where a teacher comes from (builtin:, hf:, llama2c:, openai:, ...) is `compressor.teachers`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from . import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    folder: Path | None  # a local HF folder with the weights, when there is one


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name}: CUDA is not available on this machine; use device: cpu or auto")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return DTYPES[name]


def load_pretrained(
    path_or_id: str,
    device: torch.device,
    dtype: torch.dtype | str = torch.float32,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> Loaded:
    """`from_pretrained` of a causal LM of a supported family (its config is checked before any
    weight loads) and its tokenizer; failures become one-line errors."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .families import family_of

    kwargs = {"trust_remote_code": trust_remote_code, "revision": revision}
    try:
        family_of(AutoConfig.from_pretrained(path_or_id, **kwargs))
        tokenizer = AutoTokenizer.from_pretrained(path_or_id, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path_or_id, dtype=dtype, **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load model {path_or_id}: {first}") from None
    model.to(device).eval()
    folder = Path(path_or_id) if Path(path_or_id).is_dir() else None
    return Loaded(model, tokenizer, folder)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The list of decoder blocks (`model.model.layers` in every supported family)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise UserError(f"{type(model).__name__}: expected a decoder with model.layers (see compressor.families)")
    return layers


def keep_layers(model: torch.nn.Module, keep: list[int]) -> torch.nn.Module:
    """A copy of `model` with only the decoder layers `keep`, renumbered for the KV cache."""
    layers = decoder_layers(model)
    if not keep or any(i < 0 or i >= len(layers) for i in keep) or len(set(keep)) != len(keep):
        raise UserError(f"keep_layers {keep}: must be distinct layer indices in [0, {len(layers) - 1}]")
    student = copy.deepcopy(model)
    kept = [decoder_layers(student)[i] for i in sorted(keep)]
    student.model.layers = torch.nn.ModuleList(kept)
    for new_index, layer in enumerate(kept):
        for module in (layer, getattr(layer, "self_attn", None)):
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    cfg = student.config
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[i] for i in sorted(keep)]
    cfg.num_hidden_layers = len(kept)
    return student


def evenly_spaced(total: int, n: int) -> list[int]:
    """n layer indices spread over [0, total-1], always keeping the first and the last."""
    if n == 1:
        return [0]
    return sorted({round(i * (total - 1) / (n - 1)) for i in range(n)})


def fresh_model(like: torch.nn.Module, overrides: dict, seed: int) -> torch.nn.Module:
    """A randomly initialised model of the same family with some config fields changed."""
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(like.config)
    for key, value in overrides.items():
        if not hasattr(cfg, key):
            raise UserError(f"student config: {type(cfg).__name__} has no field {key!r}")
        setattr(cfg, key, value)
    if "hidden_size" in overrides or "num_attention_heads" in overrides:
        # derived from the new widths, not kept from the old config (unless given)
        cfg.head_dim = head_dim(
            {
                "head_dim": overrides.get("head_dim"),
                "hidden_size": cfg.hidden_size,
                "num_attention_heads": cfg.num_attention_heads,
            }
        )
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise UserError(
            f"student config: num_attention_heads {cfg.num_attention_heads} must divide by "
            f"num_key_value_heads {cfg.num_key_value_heads}"
        )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).to(like.device, like.dtype)


def count_params(model: torch.nn.Module) -> int:
    """Parameters; `parameters()` yields a tied embedding once, and a packed 4-bit bitsandbytes
    weight counts the elements it holds, not its bytes."""
    return sum(
        p.quant_state.shape.numel() if getattr(p, "quant_state", None) else p.numel() for p in model.parameters()
    )


# the dimensions stages are checked against; a shape also carries model_type,
# tie_word_embeddings and head_dim when they are known (parameter counts depend on them), and the
# context and attention windows (what a runtime can compute as transformers does)
SHAPE_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
)


def head_dim(config) -> int:
    """Width of one attention head, from a config object or a config/shape dict."""
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k, None)
    return get("head_dim") or get("hidden_size") // get("num_attention_heads")


def shape_of(config: dict) -> dict | None:
    """The dimensions of an HF config dict (None when some are missing)."""
    raw = dict(config)
    raw.setdefault("num_key_value_heads", raw.get("num_attention_heads"))
    if not all(raw.get(k) is not None for k in SHAPE_KEYS):
        return None
    known = (
        "model_type",
        "tie_word_embeddings",
        "head_dim",
        "max_position_embeddings",
        "sliding_window",
        "layer_types",
    )
    extra = {k: raw[k] for k in known if raw.get(k) is not None}
    return {**extra, **{k: raw[k] for k in SHAPE_KEYS}}
