"""Text sources, tokenization and packing, and deterministic batches.

A source is the built-in stdlib text, a local `.txt`/`.jsonl`/`.json` file, or a Hugging Face
dataset. Documents are tokenized once per (tokenizer, source, seq_len), packed into blocks and
cached. Batch `i` depends only on (seed, i), so a resumed run sees exactly the batches an
uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import json
import sys
import sysconfig
from pathlib import Path
from typing import Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, model_validator
from safetensors.torch import load_file, save_file

from . import UserError
from .seeds import epoch_seed, step_seed
from .storage import digest, home, recipe_path, sha256_file

BUILTIN_SOURCES = ("builtin:stdlib-text", "builtin:stdlib-heldout")
TEXT_SUFFIXES = (".txt", ".jsonl", ".json")

# Parts of the stdlib that are not code a person wrote: test suites and generated tables.
_STDLIB_SKIP = {"test", "tests", "idle_test", "encodings", "pydoc_data", "site-packages", "__pycache__"}


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if _STDLIB_SKIP.isdisjoint(parts) and not parts[-1].startswith("test_"):
            files.append(path)
    return files


def _is_heldout(relative: str) -> bool:
    """A deterministic 1-in-12 split by file name, stable across machines and versions."""
    return hashlib.sha256(relative.encode()).digest()[0] % 12 == 0


def stdlib_documents(split: str) -> list[str]:
    """The stdlib `.py` sources (tests excluded), split by file into train / heldout."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: dict[bool, list[str]] = {True: [], False: []}
    for path in stdlib_files():
        heldout = _is_heldout(str(path.relative_to(root)))
        if heldout and split != "heldout":
            continue  # the training split needs no held-out file
        docs[heldout].append(path.read_text(encoding="utf-8", errors="replace"))
    if split != "heldout":
        return docs[False]
    # a held-out file identical to a training one (an empty __init__.py, a copy some builds ship) is not held out
    train = set(docs[False])
    return [d for d in docs[True] if d not in train]


class TextSource(BaseModel):
    """Where text comes from: `builtin:stdlib-text|stdlib-heldout`, a `.txt`/`.jsonl`/`.json`
    file (`.txt` split into documents at `separator`), or `hf:<dataset id or folder>`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str
    field: str = Field("text", description="the text field of .jsonl/.json rows and hf datasets")
    config: str | None = Field(None, description="hf dataset config name")
    split: str = Field("train", description="hf dataset split")
    separator: str = Field("\n\n", min_length=1, description="document separator in .txt files")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value, info: ValidationInfo):
        value = {"source": value} if isinstance(value, str) else value
        source = value.get("source") if isinstance(value, dict) else None
        if isinstance(source, str) and not source.startswith(("builtin:", "hf:")):
            value = dict(value, source=recipe_path(source, info))
        return value

    @model_validator(mode="after")
    def _check(self) -> "TextSource":
        if self.source.startswith("builtin:"):
            if self.source not in BUILTIN_SOURCES:
                raise ValueError(f"unknown built-in text {self.source!r}; built-in: {', '.join(BUILTIN_SOURCES)}")
        elif not self.source.startswith("hf:"):
            path = Path(self.source)
            if not path.is_file():
                raise ValueError(f"file not found: {self.source}")
            if path.suffix not in TEXT_SUFFIXES:
                raise ValueError(f"{self.source}: must end in {', '.join(TEXT_SUFFIXES)} (or use hf:<dataset>)")
        return self

    def identity(self) -> str:
        """What the text is, for cache keys: content hash for files, name + version else."""
        if self.source.startswith("builtin:"):
            return f"{self.source}@python{sys.version_info[0]}.{sys.version_info[1]}"
        if self.source.startswith("hf:"):
            return f"{self.source}:{self.config}:{self.split}:{self.field}"
        return f"file:{sha256_file(Path(self.source))}:{self.field}:{self.separator!r}"


def load_documents(src: TextSource) -> list[str]:
    if src.source == "builtin:stdlib-text":
        return stdlib_documents("train")
    if src.source == "builtin:stdlib-heldout":
        return stdlib_documents("heldout")
    if src.source.startswith("hf:"):
        import datasets

        try:
            ds = datasets.load_dataset(src.source[3:], src.config, split=src.split)
        except Exception as exc:  # the hub or the folder is the user's to fix
            raise UserError(f"data {src.source}: cannot load dataset ({type(exc).__name__}: {exc})") from None
        if src.field not in ds.column_names:
            raise UserError(f"data {src.source}: no field {src.field!r}; fields are {ds.column_names}")
        return [t for t in ds[src.field] if t]
    path = Path(src.source)
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif path.suffix == ".json":
        rows = json.loads(path.read_text(encoding="utf-8"))
    else:
        text = path.read_text(encoding="utf-8", errors="replace")
        return [d for d in text.split(src.separator) if d.strip()]
    try:
        return [row[src.field] for row in rows if row[src.field]]
    except (KeyError, TypeError):
        raise UserError(f"data {path}: every row needs a {src.field!r} string field") from None


def documents(data) -> tuple[list[str], list[str]]:
    """Training and held-out documents of a recipe's `data`: `heldout` when it names a source,
    the stdlib's held-out files for the built-in text, else the last `heldout_fraction` of the
    training documents."""
    train_docs = load_documents(data.train)
    if held_out_of_train(data):
        return split_heldout(train_docs, data.heldout_fraction)
    if data.heldout is not None:
        return train_docs, load_documents(data.heldout)
    return train_docs, load_documents(TextSource(source="builtin:stdlib-heldout"))


def held_out_of_train(data) -> bool:
    """Whether `documents` takes the held-out set from the end of the training text (then
    `heldout_fraction` changes what is trained on)."""
    return data.heldout is None and data.train.source != "builtin:stdlib-text"


def split_heldout(docs: list[str], fraction: float = 0.05) -> tuple[list[str], list[str]]:
    """Hold out the last `fraction` of documents (at least one) when no held-out set is named."""
    n = max(1, int(len(docs) * fraction))
    if len(docs) < 2:
        raise UserError("data: need at least two documents to hold one out; name data.heldout")
    return docs[:-n], docs[-n:]


def tokenize_stream(docs: list[str], tokenizer) -> torch.Tensor:
    """One token stream: the tokenizer's own BOS starts each document if it adds one (Llama
    convention), otherwise EOS ends each document (GPT-2 convention)."""
    ids = tokenizer(docs, add_special_tokens=True)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    adds_bos = bool(ids) and bos is not None and all(seq[:1] == [bos] for seq in ids if seq)
    stream: list[int] = []
    for seq in ids:
        stream.extend(seq)
        if not adds_bos and eos is not None:
            stream.append(eos)
    return torch.tensor(stream, dtype=torch.int64)


def bos_blocks(stream: torch.Tensor, seq_len: int, bos: int) -> torch.Tensor:
    """Blocks [N, seq_len] that each start with BOS: the stream's next seq_len - 1 tokens after
    one, or its next seq_len when a document's own BOS comes first (remainder dropped)."""
    rows, at, n = [], 0, stream.numel()
    prefix = torch.tensor([bos], dtype=stream.dtype)
    while True:
        if at < n and int(stream[at]) == bos:
            if at + seq_len > n:
                break
            rows.append(stream[at : at + seq_len])
            at += seq_len
        else:
            if at + seq_len - 1 > n:
                break
            rows.append(torch.cat([prefix, stream[at : at + seq_len - 1]]))
            at += seq_len - 1
    return torch.stack(rows) if rows else stream.new_empty((0, seq_len))


def pack(
    docs: list[str] | Callable[[], list[str]],
    tokenizer,
    seq_len: int,
    cache_key: str | None = None,
    bos: int | None = None,
) -> torch.Tensor:
    """Blocks [N, seq_len] of the token stream (remainder dropped), cached on disk by key;
    `docs` may be a callable, so a cache hit does not even read the text. With `bos` (a family
    whose sequences must start with it: Gemma) every block starts with it."""
    parts = [cache_key, seq_len] + ([f"bos={bos}"] if bos is not None else [])
    path = home() / "tokens" / f"{digest(parts)}.safetensors" if cache_key else None
    if path is not None and path.is_file():
        return load_file(path)["blocks"]
    stream = tokenize_stream(docs() if callable(docs) else docs, tokenizer)
    if bos is None:
        n = stream.numel() // seq_len
        blocks = stream[: n * seq_len].view(n, seq_len).clone()
    else:
        blocks = bos_blocks(stream, seq_len, bos)
    if len(blocks) == 0:
        raise UserError(f"data: only {stream.numel()} tokens, fewer than one block of seq_len {seq_len}")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"blocks": blocks}, tmp)
        tmp.replace(path)
    return blocks


class Batches:
    """Deterministic batches over rows of equal-length tensors (`input_ids`, optionally
    `labels`): each epoch is a seeded permutation, and batch `step` is a fixed slice of the
    concatenated epochs, so it depends only on (seed, step)."""

    def __init__(self, rows: torch.Tensor | dict[str, torch.Tensor], batch_size: int, seed: int):
        self.rows = rows if isinstance(rows, dict) else {"input_ids": rows}
        self.n = len(self.rows["input_ids"])
        self.batch_size, self.seed = batch_size, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return self._perms[epoch]

    def indices(self, step: int) -> torch.Tensor:
        """The rows batch `step` holds."""
        start = step * self.batch_size
        return torch.stack([self._perm(i // self.n)[i % self.n] for i in range(start, start + self.batch_size)])

    def __call__(self, step: int) -> dict[str, torch.Tensor]:
        idx = self.indices(step)
        return {name: rows[idx] for name, rows in self.rows.items()}


class Calibration(BaseModel):
    """Training blocks fed through the model by a stage that measures before it changes weights
    (pruning importance, GPTQ Hessians)."""

    model_config = ConfigDict(extra="forbid")

    samples: int = Field(32, ge=1, description="training blocks fed through the model")
    batch_size: int = Field(4, ge=1)


class Sequences(BaseModel):
    """Sequence-level KD data: the teacher continues prompts taken from the training text;
    generated once per (teacher, data, settings, seed) and cached on disk."""

    model_config = ConfigDict(extra="forbid")

    prompts: int = Field(256, ge=1, description="how many sequences to generate")
    prompt_tokens: int = Field(16, ge=1)
    new_tokens: int = Field(64, ge=1)
    method: Literal["greedy", "sample", "beam"] = "sample"
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    num_beams: int = Field(4, ge=2, description="beam only")
    batch_size: int = Field(16, ge=1)

    def generate_kwargs(self) -> dict:
        if self.method == "greedy":
            return {"do_sample": False, "num_beams": 1}
        if self.method == "beam":
            return {"do_sample": False, "num_beams": self.num_beams, "early_stopping": True}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": 0}


@torch.no_grad()
def continue_prompts(model, prompts: torch.Tensor, new_tokens: int, generate_kwargs: dict) -> dict[str, torch.Tensor]:
    """Rows of prompt + continuation [N, P + new] and next-token labels that cover only the
    generated tokens, up to and including the first EOS (padding after it is ignored)."""
    eos = model.generation_config.eos_token_id if model.generation_config else None
    eos = eos[0] if isinstance(eos, list) else eos
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else (eos or 0)
    was_training = model.training
    model.eval()
    out = model.generate(
        prompts,
        attention_mask=torch.ones_like(prompts),
        max_new_tokens=new_tokens,
        min_new_tokens=1,
        pad_token_id=pad,
        **generate_kwargs,
    )
    model.train(was_training)
    p, full = prompts.shape[1], prompts.shape[1] + new_tokens
    out = torch.nn.functional.pad(out, (0, full - out.shape[1]), value=pad)
    generated = out[:, p:]
    length = torch.full((len(out),), new_tokens, device=out.device)
    if eos is not None:
        is_eos = generated == eos
        length = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, length)
    valid = torch.arange(new_tokens, device=out.device)[None] < length[:, None]
    labels = torch.full_like(out, -100)
    labels[:, p - 1 : full - 1] = torch.where(valid, generated, torch.full_like(generated, -100))
    return {"input_ids": out, "labels": labels}


def sample_prompts(blocks: torch.Tensor, cfg: Sequences, seed: int) -> torch.Tensor:
    """`cfg.prompts` random blocks (by seed), cut to their first `cfg.prompt_tokens` tokens."""
    if cfg.prompt_tokens > blocks.shape[1]:
        raise UserError(f"sequences.prompt_tokens {cfg.prompt_tokens} exceeds the data's seq_len {blocks.shape[1]}")
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))
    return blocks[order[: cfg.prompts], : cfg.prompt_tokens]


def teacher_sequences(teacher, blocks: torch.Tensor, cfg: Sequences, seed: int, cache: Path, cache_key: str) -> dict:
    """The teacher's continuations of `cfg.prompts` prompts, cached in the folder `cache` under a
    name made of (teacher and data `cache_key`, settings, seed)."""
    from .progress import Bar

    path = cache / f"{digest([cache_key, cfg.model_dump(), seed])}.safetensors"
    if path.is_file():
        return load_file(path)
    prompts = sample_prompts(blocks, cfg, seed)
    parts: list[dict] = []
    with Bar("teacher generations", len(prompts), unit="sequence") as bar:
        for i in range(0, len(prompts), cfg.batch_size):
            torch.manual_seed(step_seed(seed, i))
            batch = prompts[i : i + cfg.batch_size].to(teacher.device)
            parts.append(continue_prompts(teacher, batch, cfg.new_tokens, cfg.generate_kwargs()))
            bar.update(len(batch))
    rows = {k: torch.cat([part[k].cpu() for part in parts]) for k in parts[0]}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(rows, tmp)
    tmp.replace(path)
    return rows
