"""`--format gguf`: one .gguf file llama.cpp (and everything built on it) runs.

Every supported family is written under llama.cpp's own architecture (`compressor.families`:
`llama` for Llama and Mistral, `qwen2`, `qwen3`, `phi3`, `gemma3`) with its tensor names and
hyperparameter keys: Qwen2's biases, q/k norms, Phi-3's fused `attn_qkv` and `ffn_up`, Gemma's
four norms stored as 1 + w, its sliding-window pattern and both rope bases. What llama.cpp's
graph cannot compute as transformers does is refused, in `check_config`, which every path to a
file goes through (this exporter and the llama.cpp runtime alike).

Weights (`--weights`): a quantized stage is written from its own integers, exactly: our INT4
grid (symmetric, code c in [-8, 7], one scale per group of a multiple of 32 or per row; Q4_0's
rule, so the scale is negative when a group's largest weight is positive) is GGUF's Q4_0 block
(d = scale, q = c + 8) and our INT8 grid is Q8_0 (d = scale, q = c); the only change is the
scale rounded to fp16. So GPTQ's and QAT's integers reach llama.cpp untouched. A stage on a
GGUF type (`quantize: {type: Q4_K}`) carries its blocks in `ggml.safetensors`: they are written
as they are, byte for byte.
A float stage is written as F16 (default) or F32. What cannot map exactly is refused with the
setting that would: bitsandbytes formats, a group size that does not tile 32-weight blocks.
Embeddings (`--embeddings`): F16 (default), F32 or Q8_0 (round to nearest, llama.cpp's rule:
scale = max|w| / 127). Norms and biases stay F32. For llama.cpp's `llama` graph (interleaved
rotary pairs) query and key rows are permuted, codes, scales and biases alike. The vocabulary is
written so llama.cpp encodes our ids (gguf_vocab.py).
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
BLOCK = 32
SPOOL_BYTES = 256 << 20  # tensors the GGUF writer holds in memory before it spools them to disk


def check_config(config) -> None:
    """One line (UserError) when llama.cpp cannot run this model as transformers does: a family
    we do not model, or a shape its graph for the architecture does not take."""
    from ..families import family_of

    why = family_of(config).gguf_refusal(config)
    if why:
        raise UserError(why)


def rotary_rows(n_rows: int, heads: int) -> torch.Tensor:
    """Row order that turns HF's half-split rotary layout into llama.cpp's interleaved pairs."""
    import torch

    per = n_rows // heads
    return torch.arange(n_rows).view(heads, 2, per // 2).transpose(1, 2).reshape(-1)


def file_rows(model, role: str, n_rows: int) -> torch.Tensor | None:
    """The order a GGUF file holds a matrix's rows in: llama.cpp's interleaved rotary pairs for q
    and k where the family's architecture wants them, else None (HF's own order)."""
    from ..families import family_of

    cfg = model.config
    heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}
    if not family_of(cfg).gguf_interleaved_rotary or role not in heads:
        return None
    return rotary_rows(n_rows, heads[role])


def read_blocks(model, path: Path) -> dict:
    """{module name: ggml.Blocks} of every matrix a GGUF file of `model`'s architecture holds
    (written by us or by llama.cpp's quantizer), rows in HF's order: write_gguf's naming undone.
    UserError naming the tensor when one is missing or of a type we do not read."""
    import gguf
    import numpy as np
    import torch

    from ..ggml import TYPES, unpack
    from ..ggml.model import tensors

    stored = {t.name: t for t in gguf.GGUFReader(path).tensors}
    out = {}
    for name, role, layer, n_in in tensors(model):
        key = f"{role}.weight" if layer is None else f"blk.{layer}.{role}.weight"
        tensor = stored.get(key)
        if tensor is None:
            raise UserError(f"{path}: no tensor {key} for {name}")
        kind = tensor.tensor_type.name
        if kind not in TYPES:
            raise UserError(f"{path}: {key} is {kind}; the types we read are {', '.join(TYPES)}")
        rows = int(tensor.shape[-1])
        blocks = unpack(kind, np.asarray(tensor.data), (rows, n_in))
        order = file_rows(model, role, rows)
        out[name] = blocks if order is None else blocks.rows(torch.argsort(order))
    return out


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
        check_config(config)
        kernel = job.stage["metrics"].get("kernel", "")
        if "bitsandbytes" in kernel:
            raise UserError(
                "a bitsandbytes stage (NF4/FP4/LLM.int8) has no GGUF type: quantize with method rtn or gptq, bits 4, "
                "group_size 32 (Q4_0) or bits 8 (Q8_0) to export to GGUF"
            )
        if (job.options.get("embeddings") == "q8_0") and config["hidden_size"] % BLOCK:
            raise UserError(f"--embeddings q8_0: hidden_size {config['hidden_size']} is not a multiple of 32")

    def write(self, job: Export, out: Path) -> None:
        path = out / f"{job.record.get('recipe') or 'model'}-{job.stage['name']}.gguf"
        write_artifact(job.artifact, path, job.options, name=job.stage["name"])
        (out / "README.md").write_text(card(job, path))


def write_artifact(folder: Path, path: Path, options: dict, name: str) -> Path:
    """The model in `folder` as a GGUF file. Float weights (a float stage's, or a stage's on GGUF
    types, whose blocks lie beside them) are read a decoder layer at a time, so a model bigger than
    memory exports; an INT grid's or bitsandbytes' tensors (`quantization_config`) load whole."""
    import torch

    from ..layerwise import Checkpoint, Reader, load_skeleton
    from ..models import load_pretrained

    cpu = torch.device("cpu")
    if "quantization_config" in json.loads((Path(folder) / "config.json").read_text()):
        loaded = load_pretrained(str(folder), cpu, dtype="auto")
        return write_gguf(loaded.model, loaded.tokenizer, folder, path, options, name)
    skeleton = load_skeleton(folder)
    reader = Reader(skeleton.model, Checkpoint(folder), cpu, dtype=None)  # as stored, as dtype="auto" loads
    return write_gguf(skeleton.model, skeleton.tokenizer, folder, path, options, name, reader)


def _float(w: torch.Tensor, kind: str) -> np.ndarray:
    import numpy as np

    return w.detach().float().numpy().astype(np.float16 if kind == "f16" else np.float32)


def tensor_data(
    module, name: str, weights: str, permute: torch.Tensor | None, blocks=None
) -> tuple[np.ndarray, object]:
    """(array, GGML type, or None for a plain float array) of a Linear's weight; `blocks` (the
    stage's ggml.Blocks of it, if it has them) are written as they are."""
    from gguf import GGMLQuantizationType as T

    from ..ggml import pack
    from ..quantized import integer_weight

    if blocks is not None and weights == "auto":
        data = pack(blocks)
        return (data[permute.numpy()] if permute is not None else data), T[blocks.type.name]
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


def write_gguf(model, tokenizer, folder: Path, path: Path, options: dict, name: str, reader=None) -> Path:
    """Write `model` (float or on our integer grid) and its tokenizer to `path`, as llama.cpp's
    architecture for the model's family. With a `reader` (compressor.layerwise), `model` is a
    skeleton: its embeddings, norm and head are read, and each decoder layer for its turn. Tensors
    go to a file beside `path` as they are made (the header, written first, needs them all)."""
    import tempfile

    import gguf
    from gguf import GGMLQuantizationType as T

    from ..families import family_of
    from ..ggml import pack
    from ..quantized import GgmlBlocks
    from .gguf_vocab import vocabulary

    cfg = model.config
    found = GgmlBlocks(folder)
    full_name = {m: n for n, m in model.named_modules()}
    check_config(cfg)
    family = family_of(cfg)
    weights = options.get("weights") or "auto"
    embeddings = options.get("embeddings") or "f16"
    arch = family.gguf_arch
    writer = gguf.GGUFWriter(str(path), arch, use_temp_file=True)
    # its spool beside the file, not in /tmp: a big model's tensors go where the file goes
    writer.temp_file = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES, dir=Path(path).parent)
    writer.add_name(name)
    for key, value in family.gguf_metadata(cfg).items():
        _add(writer, f"{arch}.{key}", value)
    kinds: dict[str, int] = {}
    for key, value in vocabulary(folder, tokenizer).items():
        _add(writer, key, value)

    def add(tensor_name: str, data: np.ndarray, kind=None) -> None:
        writer.add_tensor(tensor_name, data, raw_dtype=kind)
        if data.ndim == 2:  # a matrix: what the file type names
            kind_name = kind.name if kind is not None else {"float16": "F16", "float32": "F32"}[data.dtype.name]
            kinds[kind_name] = kinds.get(kind_name, 0) + 1

    def norm(tensor_name: str, module) -> None:  # llama.cpp multiplies by the stored weight itself
        add(tensor_name, (module.weight.detach().float() + family.norm_offset).numpy())

    if reader is not None:
        reader.load_outside_layers(model)
    emb = model.get_input_embeddings().weight.detach().float()
    emb_blocks = found.get(f"{full_name[model.get_input_embeddings()]}.weight")
    if emb_blocks is not None:  # a mix quantized the embedding: its blocks, as they are
        add("token_embd.weight", pack(emb_blocks), T[emb_blocks.type.name])
    elif embeddings == "q8_0":
        add("token_embd.weight", gguf.quants.quantize(emb.numpy(), T.Q8_0), T.Q8_0)
    else:
        add("token_embd.weight", _float(emb, embeddings))
    del emb  # a float copy of the table
    for i, layer in enumerate(model.model.layers):
        if reader is not None:
            reader.load(layer)
        for hf, short in {**family.hidden_norms, **family.head_norms}.items():
            norm(f"blk.{i}.{short}.weight", layer.get_submodule(hf))
        for hf, short in family.gguf_linears.items():
            module = layer.get_submodule(hf)
            permute = file_rows(model, short, module.out_features)
            blocks = found.get(f"{full_name[module]}.weight")
            data, kind = tensor_data(module, f"layers.{i}.{hf}", weights, permute, blocks)
            add(f"blk.{i}.{short}.weight", data, kind)
            if module.bias is not None:
                bias = module.bias.detach().float()
                add(f"blk.{i}.{short}.bias", (bias[permute] if permute is not None else bias).numpy())
        if reader is not None:
            reader.drop(layer)
    norm("output_norm.weight", model.model.norm)
    head = model.get_output_embeddings()
    if head is not None and head.weight is not model.get_input_embeddings().weight:
        data, kind = tensor_data(head, "lm_head", weights, None, found.get(f"{full_name[head]}.weight"))
        add("output.weight", data, kind)
    for tensor_name, data in family.gguf_extra_tensors(cfg).items():
        add(tensor_name, data)
    writer.add_file_type(_file_type(kinds))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)  # as llama.cpp's converter and quantizer write it
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _file_type(kinds: dict[str, int]) -> int:
    """llama.cpp's file type: its name for the most common matrix type (a label: each tensor
    carries its own type)."""
    from gguf import LlamaFileType as F

    names = {"F32": "ALL_F32", "F16": "MOSTLY_F16"}  # the K types: the _S mix, all of one type
    names |= {k: f"MOSTLY_{k}_S" for k in ("Q3_K", "Q4_K", "Q5_K")}
    ranked = sorted(kinds, key=lambda k: -kinds[k])
    for kind in ranked:
        member = names.get(kind, f"MOSTLY_{kind}")
        if member in F.__members__:
            return F[member]
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
