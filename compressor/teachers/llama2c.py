"""Convert llama2.c checkpoints (v0 `.bin` + `tokenizer.bin`) to a Hugging Face Llama folder.

Two traps: llama2.c rotates interleaved pairs (2i, 2i+1) while HF's rotary rotates halves, so
the rows of wq/wk are permuted per head; and llama2.c's tokenizer merges by the *score* of the
merged piece, which we express as HF BPE merges ranked by that score (as HF's own
sentencepiece converter does), with byte fallback and a dummy-prefix space.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch

from .. import UserError
from ..models import shape_of
from ..storage import sha256_file
from .base import Source

SPACE = "\u2581"  # sentencepiece's visible space
HEADER = struct.Struct("<7i")


def read_header(path: Path) -> dict:
    with open(path, "rb") as f:
        raw = f.read(HEADER.size)
    if len(raw) < HEADER.size:
        raise UserError(f"{path}: too short to be a llama2.c checkpoint")
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = HEADER.unpack(raw)
    if min(dim, hidden, layers, heads, kv_heads, seq_len) <= 0 or dim % heads or heads % kv_heads:
        raise UserError(
            f"{path}: not a llama2.c v0 checkpoint (header {dim, hidden, layers, heads, kv_heads, vocab, seq_len})"
        )
    return {
        "dim": dim,
        "hidden_dim": hidden,
        "n_layers": layers,
        "n_heads": heads,
        "n_kv_heads": kv_heads,
        "vocab_size": abs(vocab),
        "shared_classifier": vocab > 0,
        "seq_len": seq_len,
    }


def hf_config(h: dict) -> dict:
    """The HF Llama config of a llama2.c header: what it converts to and what recipes are checked against."""
    return {
        "vocab_size": h["vocab_size"],
        "hidden_size": h["dim"],
        "intermediate_size": h["hidden_dim"],
        "num_hidden_layers": h["n_layers"],
        "num_attention_heads": h["n_heads"],
        "num_key_value_heads": h["n_kv_heads"],
        "head_dim": h["dim"] // h["n_heads"],
        "max_position_embeddings": h["seq_len"],
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "tie_word_embeddings": h["shared_classifier"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }


def _rotary_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Interleaved-pair rotary rows -> HF's half-split layout, per head."""
    d_out, d_in = w.shape
    return w.reshape(n_heads, d_out // n_heads // 2, 2, d_in).transpose(1, 2).reshape(d_out, d_in)


def read_weights(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The header and an HF LlamaForCausalLM state dict."""
    h = read_header(path)
    dim, hid, n_l, n_h, n_kv, vocab, seq = (
        h[k] for k in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
    )
    head = dim // n_h
    kv_dim = n_kv * head
    data = np.fromfile(path, dtype="<f4", offset=HEADER.size)
    shapes = [
        ("embed", (vocab, dim)),
        ("rms_att", (n_l, dim)),
        ("wq", (n_l, dim, dim)),
        ("wk", (n_l, kv_dim, dim)),
        ("wv", (n_l, kv_dim, dim)),
        ("wo", (n_l, dim, dim)),
        ("rms_ffn", (n_l, dim)),
        ("w1", (n_l, hid, dim)),
        ("w2", (n_l, dim, hid)),
        ("w3", (n_l, hid, dim)),
        ("rms_final", (dim,)),
        ("freq_real", (seq, head // 2)),
        ("freq_imag", (seq, head // 2)),
    ]
    if not h["shared_classifier"]:
        shapes.append(("wcls", (vocab, dim)))
    need = sum(int(np.prod(s)) for _, s in shapes)
    if data.size != need:
        raise UserError(f"{path}: has {data.size} floats after the header, the header implies {need}")
    parts, offset = {}, 0
    for name, shape in shapes:
        n = int(np.prod(shape))
        parts[name] = torch.from_numpy(data[offset : offset + n].copy()).view(shape)
        offset += n
    sd = {
        "model.embed_tokens.weight": parts["embed"],
        "model.norm.weight": parts["rms_final"],
        "lm_head.weight": parts.get("wcls", parts["embed"]),
    }
    for i in range(n_l):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = parts["rms_att"][i]
        sd[p + "post_attention_layernorm.weight"] = parts["rms_ffn"][i]
        sd[p + "self_attn.q_proj.weight"] = _rotary_permute(parts["wq"][i], n_h)
        sd[p + "self_attn.k_proj.weight"] = _rotary_permute(parts["wk"][i], n_kv)
        sd[p + "self_attn.v_proj.weight"] = parts["wv"][i]
        sd[p + "self_attn.o_proj.weight"] = parts["wo"][i]
        sd[p + "mlp.gate_proj.weight"] = parts["w1"][i]
        sd[p + "mlp.down_proj.weight"] = parts["w2"][i]
        sd[p + "mlp.up_proj.weight"] = parts["w3"][i]
    return h, sd


def read_vocab(path: Path) -> list[tuple[str, float]]:
    """(piece, score) per id from a llama2.c tokenizer.bin; bytes decoded as UTF-8."""
    raw = Path(path).read_bytes()
    if len(raw) < 4:
        raise UserError(f"{path}: too short to be a llama2.c tokenizer")
    offset, vocab = 4, []
    try:
        while offset < len(raw):
            score, n = struct.unpack_from("<fi", raw, offset)
            offset += 8
            vocab.append((raw[offset : offset + n].decode("utf-8"), score))
            offset += n
    except (struct.error, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not a llama2.c tokenizer ({exc})") from None
    return vocab


def build_tokenizer(path: Path):
    """An HF fast tokenizer that encodes exactly as llama2.c's `encode(text, bos=1, eos=0)`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = read_vocab(path)
    pieces = []
    for i, (piece, _) in enumerate(vocab):
        if i < 3:
            piece = ("<unk>", "<s>", "</s>")[i]
        pieces.append(piece.replace(" ", SPACE))
    index = {p: i for i, p in enumerate(pieces)}
    scores = [s for _, s in vocab]
    merges = []
    for i, piece in enumerate(pieces):
        if i < 3 or (piece.startswith("<0x") and len(piece) == 6):
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in index and right in index:
                merges.append((-scores[i], i, index[left], (left, right)))
    merges.sort()
    model = models.BPE(vocab=index, merges=[m[3] for m in merges], unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    tok.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"
    )


def convert(model_bin: Path, tokenizer_bin: Path, out: Path) -> None:
    """Write an HF Llama folder (safetensors, config, tokenizer) for a llama2.c checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    h, sd = read_weights(model_bin)
    tokenizer = build_tokenizer(tokenizer_bin)
    if len(tokenizer) != h["vocab_size"]:
        raise UserError(f"{tokenizer_bin}: {len(tokenizer)} pieces, but {model_bin} has vocab {h['vocab_size']}")
    config = LlamaConfig(**hf_config(h))
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(sd, assign=True, strict=True)
    if h["shared_classifier"]:
        model.tie_weights()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


class Llama2cSource(Source):
    """`llama2c:<model.bin>`: converted once to an HF folder in the cache."""

    prefix, form, fields, local_target, converted = (
        "llama2c",
        "llama2c:<model.bin>",
        frozenset({"tokenizer"}),
        True,
        True,
    )

    def tokenizer(self) -> str:
        """`tokenizer:`, else the one `tok*.bin` beside the model, else `tokenizer.bin` there."""
        if self.spec.tokenizer:
            return self.spec.tokenizer
        folder = Path(self.target).parent
        candidates = sorted(folder.glob("tok*.bin"))
        return str(candidates[0] if len(candidates) == 1 else folder / "tokenizer.bin")

    def validate(self) -> None:
        if not Path(self.target).is_file():
            raise ValueError(f"llama2c checkpoint not found: {self.target}")
        if not Path(self.tokenizer()).is_file():
            raise ValueError(f"llama2c tokenizer not found: {self.tokenizer()}")

    def identity(self) -> str:
        return f"llama2c:{sha256_file(Path(self.target))[:16]}:{sha256_file(Path(self.tokenizer()))[:16]}"

    def load(self, device):
        return self.load_converted(
            device, lambda tmp: convert(Path(self.target), Path(self.tokenizer()), tmp), self.target
        )

    def shape(self) -> dict:
        return shape_of({"model_type": "llama", **hf_config(read_header(Path(self.target)))})
