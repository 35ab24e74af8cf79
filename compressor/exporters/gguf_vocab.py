"""A Hugging Face tokenizer as GGUF vocabulary metadata, so llama.cpp encodes the same ids.

Two kinds are written, the two llama.cpp implements and our teachers use:
- byte-level BPE (GPT-2 style: the built-in teacher, SmolLM2): `tokenizer.ggml.model = gpt2`,
  the tokens in their byte-level spelling, the merges in rank order, and the pre-tokenizer
  `gpt-2` (the regex of a plain `ByteLevel(use_regex=True)` pre-tokenizer);
- sentencepiece-style BPE with byte fallback and a `▁` space prefix (llama2.c's tokenizers as
  we convert them): `tokenizer.ggml.model = llama`, where llama.cpp merges the adjacent pair whose
  merged piece has the highest score; the score of a piece is minus the rank of the first merge
  that makes it, which orders merges exactly as the HF tokenizer does.
Anything else is refused with the reason: a GGUF that encodes other ids would be silently wrong.
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import UserError

NORMAL, UNKNOWN, CONTROL, BYTE = 1, 2, 3, 6


def _merges(model: dict) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]


def _kind(spec: dict) -> str:
    model, pre, norm = spec["model"], spec.get("pre_tokenizer") or {}, spec.get("normalizer") or {}
    if model.get("type") != "BPE":
        raise UserError(f"tokenizer model {model.get('type')!r}: GGUF export writes BPE tokenizers only")
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not model.get("byte_fallback"):
        return "gpt2"
    prepends = [n for n in norm.get("normalizers", [norm]) if n.get("type") == "Prepend" and n.get("prepend") == "▁"]
    if model.get("byte_fallback") and prepends and not pre:
        return "llama"
    raise UserError(
        "tokenizer: neither a GPT-2 byte-level BPE nor a sentencepiece-style BPE with byte fallback; llama.cpp "
        "would encode other ids, so it is not exported to GGUF"
    )


def vocabulary(folder: Path, tokenizer) -> dict:
    """{GGUF key: value} of the tokenizer saved in `folder` (its tokenizer.json)."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{folder}: no tokenizer.json (a fast tokenizer is needed to write GGUF vocabulary)")
    spec = json.loads(path.read_text(encoding="utf-8"))
    kind, model = _kind(spec), spec["model"]
    pieces = {i: p for p, i in model["vocab"].items()}
    special = {t["id"]: t["content"] for t in spec.get("added_tokens", []) if t.get("special")}
    pieces.update({t["id"]: t["content"] for t in spec.get("added_tokens", [])})
    size = max(len(tokenizer), max(pieces) + 1)
    tokens = [pieces.get(i, f"[PAD{i}]") for i in range(size)]
    types = []
    for i, tok in enumerate(tokens):
        if i in special:
            types.append(UNKNOWN if tok == model.get("unk_token") else CONTROL)
        elif kind == "llama" and tok.startswith("<0x") and len(tok) == 6:
            types.append(BYTE)
        else:
            types.append(NORMAL)
    out = {"tokenizer.ggml.model": kind, "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types}
    merges = _merges(model)
    if kind == "gpt2":
        out["tokenizer.ggml.pre"] = "gpt-2"
        out["tokenizer.ggml.merges"] = [f"{a} {b}" for a, b in merges]
    else:
        scores = [0.0] * size
        index = model["vocab"]
        for rank, (a, b) in reversed(list(enumerate(merges))):
            scores[index[a + b]] = -float(rank)  # the first (lowest-rank) merge that makes it wins
        out["tokenizer.ggml.scores"] = scores
        out["tokenizer.ggml.add_space_prefix"] = True
    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and tokenizer("a").input_ids[:1] == [bos]
    for key, value in (
        ("bos_token_id", bos),
        ("eos_token_id", tokenizer.eos_token_id),
        ("unknown_token_id", tokenizer.unk_token_id),
        ("padding_token_id", tokenizer.pad_token_id),
    ):
        if value is not None:
            out[f"tokenizer.ggml.{key}"] = int(value)
    out["tokenizer.ggml.add_bos_token"] = adds_bos
    out["tokenizer.ggml.add_eos_token"] = False
    if getattr(tokenizer, "chat_template", None):
        out["tokenizer.chat_template"] = tokenizer.chat_template
    return out
