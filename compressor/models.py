"""Teachers and students: load a teacher from its spec, build a student from a model.

Teacher sources: `builtin:<name>` (trained here on first use), `hf:<hub id or local folder>`
(plain `from_pretrained`; remote code only when the recipe says so) and `llama2c:<model.bin>`
(converted once to an HF folder). Every teacher has an identity string that goes into stage
keys, so a changed teacher never reuses old artifacts.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, model_validator

from . import UserError
from .builtin import BUILTIN_TEACHERS, BuiltinBuild, ensure_teacher, teacher_folder
from .storage import atomic_dir, digest, file_hashes, home, locked, recipe_path, sha256_file

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TeacherSpec(BaseModel):
    """`source` is builtin:<name>, hf:<hub id or folder>, llama2c:<model.bin>, or
    openai:<base_url>#<model> (a black-box teacher: text only, see answers.py)."""

    model_config = ConfigDict(extra="forbid")

    source: str
    tokenizer: str | None = Field(None, description="llama2c tokenizer.bin (default: the one beside the model)")
    revision: str | None = Field(None, description="hub revision for hf: ids")
    trust_remote_code: bool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
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
            kind, sep, rest = source.partition(":")
            if kind == "llama2c" or (kind == "hf" and rest.startswith((".", "/", "~"))):
                value["source"] = f"{kind}:{recipe_path(rest, info)}"
        if isinstance(value.get("tokenizer"), str):
            value["tokenizer"] = recipe_path(value["tokenizer"], info)
        return value

    @model_validator(mode="after")
    def _check(self) -> "TeacherSpec":
        kind, _, rest = self.source.partition(":")
        if kind not in ("builtin", "hf", "llama2c", "openai") or not rest:
            raise ValueError(
                "must be builtin:<name>, hf:<hub id or folder>, llama2c:<model.bin> or openai:<base_url>#<model>, "
                f"got {self.source!r}"
            )
        if kind == "openai":
            url, _, model = rest.partition("#")
            if not url.startswith(("http://", "https://")) or not model:
                raise ValueError(f"openai: expected openai:http(s)://host[:port]/v1#<model>, got {self.source!r}")
            if self.api_key_env is not None and not os.environ.get(self.api_key_env):
                raise ValueError(f"api_key_env: environment variable {self.api_key_env} is not set")
        elif self.api_key_env is not None:
            raise ValueError("api_key_env: only applies to openai: teachers")
        if kind == "builtin" and rest not in BUILTIN_TEACHERS:
            raise ValueError(f"unknown built-in teacher {rest!r}; built-in teachers: {', '.join(BUILTIN_TEACHERS)}")
        if self.build is not None and kind != "builtin":
            raise ValueError("build: only applies to builtin: teachers")
        if kind == "llama2c":
            if not Path(rest).is_file():
                raise ValueError(f"llama2c checkpoint not found: {rest}")
            if not Path(self.llama2c_tokenizer()).is_file():
                raise ValueError(f"llama2c tokenizer not found: {self.llama2c_tokenizer()}")
        looks_local = rest.startswith((".", "/", "~")) or Path(rest).exists()
        if kind == "hf" and looks_local and not (Path(rest) / "config.json").is_file():
            raise ValueError(f"no model folder (with config.json) at {rest}")
        return self

    @property
    def kind(self) -> str:
        return self.source.partition(":")[0]

    @property
    def target(self) -> str:
        return self.source.partition(":")[2]

    def llama2c_tokenizer(self) -> str:
        if self.tokenizer:
            return self.tokenizer
        folder = Path(self.target).parent
        candidates = sorted(folder.glob("tok*.bin"))
        return str(candidates[0] if len(candidates) == 1 else folder / "tokenizer.bin")

    def identity(self) -> str:
        """What the teacher is, for stage keys (content hashes where there are files)."""
        if self.kind == "builtin":
            return f"builtin:{teacher_folder(self.target, self.build or BuiltinBuild()).name}"
        if self.kind == "llama2c":
            return f"llama2c:{sha256_file(Path(self.target))[:16]}:{sha256_file(Path(self.llama2c_tokenizer()))[:16]}"
        if self.kind == "openai":
            return self.source
        if Path(self.target).is_dir():
            return f"hf-folder:{digest(file_hashes(Path(self.target)))}"
        return f"hf:{self.target}@{self.revision or 'main'}"

    def folder(self) -> Path | None:
        """Where the teacher's HF folder is (or will be) on disk; None for a hub id."""
        if self.kind == "builtin":
            return teacher_folder(self.target, self.build or BuiltinBuild())
        if self.kind == "llama2c":
            return home() / "teachers" / self.identity().replace(":", "-")
        if self.kind == "openai":
            return None
        return Path(self.target) if Path(self.target).is_dir() else None


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
    """`from_pretrained` of a causal LM and its tokenizer; failures become one-line errors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"trust_remote_code": trust_remote_code, "revision": revision}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path_or_id, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path_or_id, dtype=dtype, **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load model {path_or_id}: {first}") from None
    model.to(device).eval()
    folder = Path(path_or_id) if Path(path_or_id).is_dir() else None
    return Loaded(model, tokenizer, folder)


def llama2c_folder(spec: TeacherSpec) -> Path:
    """The converted HF folder for a llama2c checkpoint, converted once (atomically)."""
    from .llama2c import convert

    folder = spec.folder()
    with locked(folder.with_name(folder.name + ".lock"), f"conversion of {spec.target}"):
        if not (folder / "config.json").is_file():
            with atomic_dir(folder) as tmp:
                convert(Path(spec.target), Path(spec.llama2c_tokenizer()), tmp)
    return folder


def load_teacher(spec: TeacherSpec, device: torch.device) -> Loaded:
    if spec.kind == "openai":
        raise UserError(f"{spec.source}: a black-box teacher has no weights to load or measure here")
    dtype = resolve_dtype(spec.dtype, device)
    if spec.kind == "builtin":
        return load_pretrained(str(ensure_teacher(spec.target, spec.build)), device, dtype)
    if spec.kind == "llama2c":
        return load_pretrained(str(llama2c_folder(spec)), device, dtype)
    return load_pretrained(spec.target, device, dtype, spec.trust_remote_code, spec.revision)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The list of decoder blocks of a Llama-family model (`model.model.layers`)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise UserError(f"{type(model).__name__}: expected a Llama-family model with model.layers")
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
        if hasattr(layer, "self_attn"):
            layer.self_attn.layer_idx = new_index
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
        cfg.head_dim = overrides.get("head_dim", cfg.hidden_size // cfg.num_attention_heads)
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


# the dimensions stages are checked against; teacher_shape adds model_type, tie_word_embeddings
# and head_dim when it knows them (parameter counts depend on them)
SHAPE_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
)


def teacher_shape(spec: TeacherSpec) -> dict | None:
    """The teacher's dimensions, read without loading weights, for validating stages before
    any work starts; None when they cannot be known offline (a hub id)."""
    if spec.kind == "builtin":
        b = spec.build or BuiltinBuild()
        return {
            "model_type": "llama",
            "tie_word_embeddings": True,
            "head_dim": b.hidden_size // b.num_heads,
            "vocab_size": b.vocab_size,
            "hidden_size": b.hidden_size,
            "intermediate_size": b.intermediate_size,
            "num_hidden_layers": b.num_layers,
            "num_attention_heads": b.num_heads,
            "num_key_value_heads": b.num_kv_heads,
        }
    if spec.kind == "llama2c":
        from .llama2c import read_header

        h = read_header(Path(spec.target))
        return {
            "model_type": "llama",
            "tie_word_embeddings": h["shared_classifier"],
            "head_dim": h["dim"] // h["n_heads"],
            "vocab_size": h["vocab_size"],
            "hidden_size": h["dim"],
            "intermediate_size": h["hidden_dim"],
            "num_hidden_layers": h["n_layers"],
            "num_attention_heads": h["n_heads"],
            "num_key_value_heads": h["n_kv_heads"],
        }
    config = Path(spec.target) / "config.json"
    if not config.is_file():
        return None
    raw = json.loads(config.read_text())
    raw.setdefault("num_key_value_heads", raw.get("num_attention_heads"))
    if not all(k in raw for k in SHAPE_KEYS):
        return None
    extra = {k: raw[k] for k in ("model_type", "tie_word_embeddings", "head_dim") if raw.get(k) is not None}
    return {**extra, **{k: raw[k] for k in SHAPE_KEYS}}
