"""The built-in teacher: a small GQA Llama trained on the Python standard library's source.

A fresh machine has no model to compress, but every Python install carries a few MB of
well-written code. We train a byte-level BPE tokenizer and a few-million-parameter Llama on
it (held-out files by hash of their path), and cache the result as a Hugging Face folder.
Same build settings + same machine -> same weights.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from .. import FORMAT_VERSION, UserError, launch
from ..data import Batches, pack, stdlib_documents
from ..models import load_pretrained, resolve_dtype, shape_of
from ..progress import say
from ..storage import atomic_dir, digest, home, locked, read_json, write_json
from ..train import TrainConfig, train
from .base import Source

BUILTIN_TEACHERS = ("tiny-stdlib",)
EOT = "<|endoftext|>"
HELDOUT_BLOCKS = 256  # the first 256 held-out blocks (~65K tokens) score the teacher


class BuiltinBuild(BaseModel):
    """How the built-in teacher is made. The defaults fit the 3-minute budget on 2 CPU cores
    (~100 GFLOP/s): 2.9M parameters see ~550K tokens. Measured at equal wall time, a 2048-token
    vocabulary beat 4096 (1.97 vs 2.31 bits/byte held out): fewer, more frequent tokens are
    learnt faster than the extra compression is worth at this budget."""

    model_config = ConfigDict(extra="forbid")

    vocab_size: int = Field(2048, ge=300, le=65536)
    hidden_size: int = Field(256, ge=16)
    intermediate_size: int = Field(512, ge=16)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(8, ge=1)
    num_kv_heads: int = Field(4, ge=1)
    seq_len: int = Field(256, ge=16)
    seed: int = 0
    train: TrainConfig = TrainConfig(
        steps=270,
        batch_size=8,
        lr=3e-3,
        warmup=0.04,
        schedule="wsd",
        decay=0.3,
        min_lr_ratio=0.1,
        weight_decay=0.01,
        checkpoint_every=50,
    )


def train_tokenizer(docs: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(docs, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOT, pad_token=EOT, unk_token=None)


def hf_config(build: BuiltinBuild, vocab_size: int, eos: int | None = None, pad: int | None = None) -> dict:
    """The built-in teacher's Llama config: what it is built with and what recipes are checked against."""
    return {
        "vocab_size": vocab_size,
        "hidden_size": build.hidden_size,
        "intermediate_size": build.intermediate_size,
        "num_hidden_layers": build.num_layers,
        "num_attention_heads": build.num_heads,
        "num_key_value_heads": build.num_kv_heads,
        "head_dim": build.hidden_size // build.num_heads,
        "max_position_embeddings": build.seq_len,
        "tie_word_embeddings": True,
        "bos_token_id": None,
        "eos_token_id": eos,
        "pad_token_id": pad,
    }


def make_model(build: BuiltinBuild, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    if build.hidden_size % build.num_heads or build.num_heads % build.num_kv_heads:
        raise UserError("builtin teacher: hidden_size must divide by num_heads, num_heads by num_kv_heads")
    config = LlamaConfig(**hf_config(build, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id))
    torch.manual_seed(build.seed)
    return LlamaForCausalLM(config)


def unigram_perplexity(train_blocks: torch.Tensor, heldout_blocks: torch.Tensor, vocab: int) -> float:
    """Perplexity of an add-one unigram model: the bar a real LM must clear by far."""
    counts = torch.bincount(train_blocks.flatten(), minlength=vocab).double() + 1
    logp = (counts / counts.sum()).log()
    return math.exp(-logp[heldout_blocks.flatten()].mean().item())


def teacher_folder(name: str, build: BuiltinBuild) -> Path:
    tag = digest(
        {
            "name": name,
            "build": build.model_dump(),
            "format": FORMAT_VERSION,
            "python": sys.version_info[:2],
            "torch": torch.__version__,
        }
    )
    return home() / "teachers" / f"{name}-{tag}"


def ensure_teacher(name: str = "tiny-stdlib", build: BuiltinBuild | None = None) -> Path:
    """The cached teacher folder, built first if needed (under a lock, atomically)."""
    if name not in BUILTIN_TEACHERS:
        raise UserError(f"teacher builtin:{name}: unknown; built-in teachers are {', '.join(BUILTIN_TEACHERS)}")
    build = build or BuiltinBuild()
    folder = teacher_folder(name, build)
    with locked(folder.with_name(folder.name + ".lock"), f"teacher build {folder.name}"):
        if (folder / "teacher.json").is_file():
            return folder
        from ..measure import token_perplexity

        if launch.world() > 1:  # its training would wait for processes that wait for the run
            raise UserError(
                f"the built-in teacher {name} is built by one process: build it first (`compressor teacher "
                f"build --name {name}` for the default settings, or the run without `accelerate launch`)"
            )
        start = time.time()
        say(f"building the built-in teacher {name} (once; cached in {folder})")
        train_docs, heldout_docs = stdlib_documents("train"), stdlib_documents("heldout")
        tokenizer = train_tokenizer(train_docs, build.vocab_size)
        train_blocks = pack(train_docs, tokenizer, build.seq_len)
        heldout_blocks = pack(heldout_docs, tokenizer, build.seq_len)
        model = make_model(build, tokenizer)
        scratch = folder.with_name(folder.name + ".partial")
        summary = train(
            model,
            lambda m, b, step: (m(input_ids=b["input_ids"], labels=b["input_ids"]).loss, {}),
            Batches(train_blocks, build.train.batch_size, build.seed),
            build.train,
            device=torch.device("cpu"),
            seed=build.seed,
            description=f"teacher {name}",
            checkpoint_dir=scratch,
        )
        report = {
            "name": name,
            "build": build.model_dump(),
            "params": sum(p.numel() for p in model.parameters()),
            "train_tokens": train_blocks.numel(),
            "heldout_tokens": heldout_blocks[:HELDOUT_BLOCKS].numel(),
            "heldout_ppl": token_perplexity(model, heldout_blocks[:HELDOUT_BLOCKS], batch_size=16),
            "unigram_ppl": unigram_perplexity(train_blocks, heldout_blocks[:HELDOUT_BLOCKS], len(tokenizer)),
            **summary,
            "build_seconds": round(time.time() - start, 1),
        }
        with atomic_dir(folder) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            write_json(tmp / "teacher.json", report)
        shutil.rmtree(scratch, ignore_errors=True)
        say(
            f"teacher {name}: {report['params'] / 1e6:.2f}M params, held-out perplexity "
            f"{report['heldout_ppl']:.1f} (unigram {report['unigram_ppl']:.0f}), {report['build_seconds']:.0f}s"
        )
    return folder


def teacher_report(folder: Path) -> dict:
    return read_json(folder / "teacher.json")


class BuiltinSource(Source):
    prefix, form, fields = "builtin", "builtin:<name>", frozenset({"build"})

    @property
    def build(self) -> BuiltinBuild:
        return self.spec.build or BuiltinBuild()

    def validate(self) -> None:
        if self.target not in BUILTIN_TEACHERS:
            raise ValueError(
                f"unknown built-in teacher {self.target!r}; built-in teachers: {', '.join(BUILTIN_TEACHERS)}"
            )

    def identity(self) -> str:
        return f"builtin:{self.folder().name}"

    def folder(self) -> Path:
        return teacher_folder(self.target, self.build)

    def load(self, device: torch.device):
        return load_pretrained(
            str(ensure_teacher(self.target, self.build)), device, resolve_dtype(self.spec.dtype, device)
        )

    def shape(self) -> dict:
        return shape_of({"model_type": "llama", **hf_config(self.build, self.build.vocab_size)})
