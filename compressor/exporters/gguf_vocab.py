"""A Hugging Face tokenizer as GGUF vocabulary metadata, so llama.cpp encodes the same ids.

Two kinds are written, the two llama.cpp implements and our families use:
- byte-level BPE (GPT-2 style: the built-in teacher, SmolLM2, Qwen2, Llama 3):
  `tokenizer.ggml.model = gpt2`, the tokens in their byte-level spelling, the merges in rank
  order, and llama.cpp's name for the pre-tokenizer, recognised exactly: a plain
  `ByteLevel(use_regex=True)` is `gpt-2`, digits split first is `smollm`, and a `Split` by
  Qwen2's or Llama 3's own regex is `qwen2` / `llama-bpe` (an NFC normalizer is accepted:
  llama.cpp does not normalize, which only matters for text that is not NFC already);
- sentencepiece-style BPE with byte fallback, spaces written `▁` (llama2.c's tokenizers as we
  convert them, with a `▁` prefix; Gemma's, without): `tokenizer.ggml.model = llama`, where
  llama.cpp merges the adjacent pair whose merged piece has the highest score; the score of a
  piece is minus the rank of the first merge that makes it, which orders merges exactly as the
  HF tokenizer does.
Added tokens are control tokens when special, user-defined otherwise (both matched whole, as
transformers does). Anything else is refused with the reason: a GGUF that encodes other ids
would be silently wrong.
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import UserError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6
# the pre-tokenizer regexes llama.cpp implements, as tokenizer.json spells them -> its name
SPLIT_REGEXES = {
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": "qwen2",
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": "llama-bpe",
}


def _merges(model: dict) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]


def _steps(node: dict | None, key: str) -> list[dict]:
    """The steps of a normalizer or pre-tokenizer, a Sequence flattened."""
    if not node:
        return []
    return (
        [step for inner in node.get(key, []) for step in _steps(inner, key)]
        if node.get("type") == "Sequence"
        else [node]
    )


def _byte_level(pre: list[dict], norm: list[dict]) -> str | None:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer, or None when it has none."""
    if any(n.get("type") != "NFC" for n in norm) or not pre or pre[-1].get("type") != "ByteLevel":
        return None
    *first, last = pre
    if not first and last.get("use_regex", True):
        return "gpt-2"
    if len(first) == 1 and first[0].get("type") == "Digits" and first[0].get("individual_digits"):
        return "smollm" if last.get("use_regex", True) else None
    if len(first) == 1 and first[0].get("type") == "Split" and not last.get("use_regex", True):
        return SPLIT_REGEXES.get((first[0].get("pattern") or {}).get("Regex"))
    return None


def _sentencepiece(pre: list[dict], norm: list[dict]) -> bool | None:
    """Whether a space prefix is added (None: not a sentencepiece-style tokenizer). A split on
    " " after the normalizer wrote every space as ▁ splits nothing (Gemma's)."""
    kinds = [n.get("type") for n in norm]
    replaces = [n for n in norm if n.get("type") == "Replace" and (n.get("pattern") or {}).get("String") == " "]
    prepends = [n for n in norm if n.get("type") == "Prepend" and n.get("prepend") == "▁"]
    if set(kinds) - {"Replace", "Prepend"} or len(replaces) + len(prepends) != len(norm):
        return None
    if replaces and any(r.get("content") != "▁" for r in replaces):
        return None
    noop = all(p.get("type") == "Split" and (p.get("pattern") or {}).get("String") == " " for p in pre)
    if not noop or (pre and not replaces):
        return None
    return bool(prepends)


def _kind(spec: dict) -> tuple[str, str | bool]:
    """("gpt2", pre-tokenizer name) or ("llama", adds a space prefix)."""
    model = spec["model"]
    pre, norm = _steps(spec.get("pre_tokenizer"), "pretokenizers"), _steps(spec.get("normalizer"), "normalizers")
    if model.get("type") != "BPE":
        raise UserError(f"tokenizer model {model.get('type')!r}: GGUF export writes BPE tokenizers only")
    if not model.get("byte_fallback"):
        name = _byte_level(pre, norm)
        if name:
            return "gpt2", name
    else:
        prefix = _sentencepiece(pre, norm)
        if prefix is not None:
            return "llama", prefix
    raise UserError(
        "tokenizer: neither a byte-level BPE with a pre-tokenizer llama.cpp implements (gpt-2, smollm, qwen2, "
        "llama-bpe) nor a sentencepiece-style BPE with byte fallback; llama.cpp would encode other ids, so it is "
        "not exported to GGUF"
    )


def vocabulary(folder: Path, tokenizer) -> dict:
    """{GGUF key: value} of the tokenizer saved in `folder` (its tokenizer.json)."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{folder}: no tokenizer.json (a fast tokenizer is needed to write GGUF vocabulary)")
    spec = json.loads(path.read_text(encoding="utf-8"))
    (kind, how), model = _kind(spec), spec["model"]
    pieces = {i: p for p, i in model["vocab"].items()}
    special = {t["id"]: t["content"] for t in spec.get("added_tokens", []) if t.get("special")}
    pieces.update({t["id"]: t["content"] for t in spec.get("added_tokens", [])})
    size = max(len(tokenizer), max(pieces) + 1)
    tokens = [pieces.get(i, f"[PAD{i}]") for i in range(size)]
    types = []
    added = {t["id"] for t in spec.get("added_tokens", [])}
    for i, tok in enumerate(tokens):
        if i in special:
            types.append(UNKNOWN if tok == model.get("unk_token") else CONTROL)
        elif i in added:
            types.append(USER_DEFINED)
        elif kind == "llama" and tok.startswith("<0x") and len(tok) == 6:
            types.append(BYTE)
        else:
            types.append(NORMAL)
    out = {"tokenizer.ggml.model": kind, "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types}
    merges = _merges(model)
    if kind == "gpt2":
        out["tokenizer.ggml.pre"] = how
        out["tokenizer.ggml.merges"] = [f"{a} {b}" for a, b in merges]
    else:
        scores = [0.0] * size
        index = model["vocab"]
        for rank, (a, b) in reversed(list(enumerate(merges))):
            scores[index[a + b]] = -float(rank)  # the first (lowest-rank) merge that makes it wins
        out["tokenizer.ggml.scores"] = scores
        out["tokenizer.ggml.add_space_prefix"] = how
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
