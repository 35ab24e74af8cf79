"""`--format gguf`: one .gguf file llama.cpp (and everything built on it) runs.

Weights (`--weights`): a quantized stage is written from its own integers, exactly: our INT4
grid (symmetric, code c in [-8, 7], one scale per group of a multiple of 32 or per row; Q4_0's
rule, so the scale is negative when a group's largest weight is positive) is GGUF's Q4_0 block
(d = scale, q = c + 8) and our INT8 grid is Q8_0 (d = scale, q = c); the only change is the
scale rounded to fp16. So GPTQ's and QAT's integers reach llama.cpp untouched.
A float stage is written as F16 (default) or F32. What cannot map exactly is refused with the
setting that would: bitsandbytes formats, a group size that does not tile 32-weight blocks.
Embeddings (`--embeddings`): F16 (default), F32 or Q8_0 (round to nearest, llama.cpp's rule:
scale = max|w| / 127). Norms stay F32. Query and key rows are permuted into llama.cpp's rotary
layout, codes and scales alike. The vocabulary is written so llama.cpp encodes our ids
(gguf_vocab.py).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING

from .. import UserError
from .base import Export, Exporter

if TYPE_CHECKING:  # imported where used: `compressor export --help` loads no torch
    import numpy as np
    import torch

WEIGHTS = ("auto", "f32", "f16")
EMBEDDINGS = ("f16", "f32", "q8_0")
LLAMA_FAMILY = ("llama",)
BLOCK = 32
LINEARS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def rotary_rows(n_rows: int, heads: int) -> torch.Tensor:
    """Row order that turns HF's half-split rotary layout into llama.cpp's interleaved pairs."""
    import torch

    per = n_rows // heads
    return torch.arange(n_rows).view(heads, 2, per // 2).transpose(1, 2).reshape(-1)


def q4_0_blocks(codes: torch.Tensor, scale: torch.Tensor) -> np.ndarray:
    """Q4_0 bytes of int4 codes [out, in] in [-8, 7] with per-block scales [out, in/32]."""
    import torch

    out, n_in = codes.shape
    q = (codes.to(torch.int16) + 8).to(torch.uint8).view(out, n_in // BLOCK, BLOCK)
    packed = q[..., :16] | (q[..., 16:] << 4)
    d = scale.to(torch.float16).view(torch.uint8).view(out, n_in // BLOCK, 2)
    return torch.cat([d, packed], dim=-1).reshape(out, -1).numpy()


def q8_0_blocks(codes: torch.Tensor, scale: torch.Tensor) -> np.ndarray:
    """Q8_0 bytes of int8 codes [out, in] with per-block scales [out, in/32]."""
    import torch

    out, n_in = codes.shape
    q = codes.to(torch.int8).view(torch.uint8).view(out, n_in // BLOCK, BLOCK)
    d = scale.to(torch.float16).view(torch.uint8).view(out, n_in // BLOCK, 2)
    return torch.cat([d, q], dim=-1).reshape(out, -1).numpy()


def block_scales(scale: torch.Tensor, n_in: int) -> torch.Tensor | None:
    """Per-32-block scales [out, n_in/32] of a grid with per-group scales [out, groups], or None
    when its groups do not tile 32-weight blocks."""
    group = n_in // scale.shape[1]
    if n_in % BLOCK or group % BLOCK:
        return None
    return scale.repeat_interleave(group // BLOCK, dim=1)


class GGUFExporter(Exporter):
    name = "gguf"
    options = {"weights": WEIGHTS, "embeddings": EMBEDDINGS}

    def check(self, job: Export) -> None:
        for package in ("gguf",):
            if importlib.util.find_spec(package) is None:
                raise UserError(f"--format gguf needs the `{package}` package: pip install 'compressor[gguf]'")
        for key, allowed in self.options.items():
            value = job.options.get(key) or allowed[0]
            if value not in allowed:
                raise UserError(f"--{key} {value}: GGUF export takes {', '.join(allowed)}")
        config = json.loads((job.artifact / "config.json").read_text())
        if config.get("model_type") not in LLAMA_FAMILY:
            raise UserError(f"model_type {config.get('model_type')!r}: GGUF export writes Llama-architecture models")
        kernel = job.stage["metrics"].get("kernel", "")
        if "bitsandbytes" in kernel:
            raise UserError(
                "a bitsandbytes stage (NF4/FP4/LLM.int8) has no GGUF type: quantize with method rtn or gptq, bits 4, "
                "group_size 32 (Q4_0) or bits 8 (Q8_0) to export to GGUF"
            )
        if (job.options.get("embeddings") == "q8_0") and config["hidden_size"] % BLOCK:
            raise UserError(f"--embeddings q8_0: hidden_size {config['hidden_size']} is not a multiple of 32")

    def write(self, job: Export, out: Path) -> None:
        import torch

        from ..models import load_pretrained

        loaded = load_pretrained(str(job.artifact), torch.device("cpu"), dtype="auto")
        path = out / f"{job.record.get('recipe') or 'model'}-{job.stage['name']}.gguf"
        write_gguf(loaded.model, loaded.tokenizer, job.artifact, path, job.options, name=job.stage["name"])
        (out / "README.md").write_text(card(job, path))


def _float(w: torch.Tensor, kind: str) -> np.ndarray:
    import numpy as np

    return w.detach().float().numpy().astype(np.float16 if kind == "f16" else np.float32)


def tensor_data(module, name: str, weights: str, permute: torch.Tensor | None) -> tuple[np.ndarray, object]:
    """(array, GGML type, or None for a plain float array) of a Linear's weight."""
    from gguf import GGMLQuantizationType as T

    from ..quantized import integer_weight

    w = module.weight
    stored = type(w).__name__ not in ("Tensor", "Parameter")
    found = integer_weight(module) if weights == "auto" and stored else None
    if found is None:
        if weights == "auto" and stored:
            raise UserError(f"{name}: weights stored as {type(w).__name__} have no exact GGUF type")
        w = w.dequantize() if stored else w
        return _float(w[permute] if permute is not None else w, "f16" if weights == "auto" else weights), None
    codes, scale, bits = found
    blocks = block_scales(scale, codes.shape[1])
    if blocks is None:
        group = codes.shape[1] // scale.shape[1]
        raise UserError(
            f"{name}: group_size {group} does not tile GGUF's 32-weight blocks: quantize with group_size 32 "
            "(or a multiple of 32, or null for one scale per row) to export its integers exactly"
        )
    if permute is not None:
        codes, blocks = codes[permute], blocks[permute]
    return (q4_0_blocks(codes, blocks), T.Q4_0) if bits == 4 else (q8_0_blocks(codes, blocks), T.Q8_0)


def write_gguf(model, tokenizer, folder: Path, path: Path, options: dict, name: str) -> Path:
    """Write `model` (a Llama, float or on our integer grid) and its tokenizer to `path`."""
    import gguf
    from gguf import GGMLQuantizationType as T

    from ..models import head_dim
    from .gguf_vocab import vocabulary

    weights = options.get("weights") or "auto"
    embeddings = options.get("embeddings") or "f16"
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(head_dim(cfg))
    writer.add_value_length(head_dim(cfg))
    writer.add_rope_dimension_count(head_dim(cfg))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope = getattr(cfg, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    writer.add_vocab_size(cfg.vocab_size)
    types = set()
    for key, value in vocabulary(folder, tokenizer).items():
        _add(writer, key, value)

    def add(tensor_name: str, data: np.ndarray, kind=None) -> None:
        writer.add_tensor(tensor_name, data, raw_dtype=kind)
        types.add(kind.name if kind is not None else data.dtype.name)

    emb = model.get_input_embeddings().weight.detach().float()
    if embeddings == "q8_0":
        add("token_embd.weight", gguf.quants.quantize(emb.numpy(), T.Q8_0), T.Q8_0)
    else:
        add("token_embd.weight", _float(emb, embeddings))
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    for i, layer in enumerate(model.model.layers):
        for hf, short in NORMS.items():
            add(f"blk.{i}.{short}.weight", getattr(layer, hf).weight.detach().float().numpy())
        for hf, short in LINEARS.items():
            module = layer.get_submodule(hf)
            rows = module.weight.shape[0]
            permute = (
                rotary_rows(rows, heads)
                if short == "attn_q"
                else rotary_rows(rows, kv_heads)
                if short == "attn_k"
                else None
            )
            data, kind = tensor_data(module, f"layers.{i}.{hf}", weights, permute)
            add(f"blk.{i}.{short}.weight", data, kind)
    add("output_norm.weight", model.model.norm.weight.detach().float().numpy())
    head = model.get_output_embeddings()
    if head is not None and head.weight is not model.get_input_embeddings().weight:
        data, kind = tensor_data(head, "lm_head", weights, None)
        add("output.weight", data, kind)
    writer.add_file_type(_file_type(types))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _file_type(types: set[str]) -> int:
    from gguf import LlamaFileType as F

    for name, kind in (("Q4_0", F.MOSTLY_Q4_0), ("Q8_0", F.MOSTLY_Q8_0), ("float16", F.MOSTLY_F16)):
        if name in types:
            return kind
    return F.ALL_F32


def _add(writer, key: str, value) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif value and isinstance(value[0], float):
        writer.add_array(key, [float(v) for v in value])
    else:
        writer.add_array(key, list(value))


def card(job: Export, path: Path) -> str:
    from .base import model_card

    versions = job.record.get("versions", {})
    usage = [
        "```bash",
        f"llama-cli -m {path.name} -p 'Hello'          # llama.cpp",
        "```",
        "",
        "```python",
        "from llama_cpp import Llama",
        f'llm = Llama(model_path="{path.name}")',
        "```",
    ]
    pins = [
        f"llama-cpp-python=={versions['llama_cpp_python']}" if "llama_cpp_python" in versions else "llama-cpp-python"
    ]
    return model_card(job, usage, pins)
