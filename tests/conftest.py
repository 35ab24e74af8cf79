"""Shared fixtures: an isolated cache, a tiny built-in teacher, tiny Llamas, recipe writers.

Tests never touch the hub or write the user's cache: COMPRESSOR_HOME points at a session temp
folder and HF_HUB_OFFLINE is set. llama.cpp's tools, where `python -m compressor.llamacpp_tools`
built them, are run from there (read only); the tests that need them skip otherwise. Real data
(../shared/data) is used where present and the tests that need it skip with the reason otherwise.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
needs_shared_data = pytest.mark.skipif(
    not (SHARED_DATA / "stories260K").is_dir(),
    reason="../shared/data is absent (real artifacts live beside the checkout)",
)

# A built-in teacher small enough to build in seconds, same code path as the real one.
TINY_BUILD = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "seq_len": 64,
    "train": {"steps": 150, "batch_size": 16, "lr": 2.0e-2, "schedule": "wsd", "checkpoint_every": 50},
}
TINY_TEACHER = {"source": "builtin:tiny-stdlib", "build": TINY_BUILD}
FAST_EVAL = {
    "tasks": ["stdlib_mc"],
    "limit": 16,
    "batch_size": 8,
    "latency": {"prompt_tokens": 16, "new_tokens": 4, "batch_sizes": [1, 2], "repeats": 1, "warmup": 0},
    "fidelity": {"samples": 4},
}


@pytest.fixture(scope="session", autouse=True)
def compressor_home(tmp_path_factory) -> Path:
    from compressor.llamacpp_tools import missing_tool, tools_dir

    if missing_tool("llama-quantize") is None:
        os.environ["COMPRESSOR_LLAMACPP_TOOLS"] = str(tools_dir())
    home = tmp_path_factory.mktemp("compressor-home")
    os.environ["COMPRESSOR_HOME"] = str(home)
    torch.set_num_threads(2)
    return home


@pytest.fixture(scope="session")
def tiny_teacher_folder(compressor_home) -> Path:
    from compressor.teachers.builtin import BuiltinBuild, ensure_teacher

    return ensure_teacher("tiny-stdlib", BuiltinBuild.model_validate(TINY_BUILD))


def tiny_llama(
    hidden: int = 64,
    layers: int = 3,
    heads: int = 4,
    kv_heads: int = 2,
    inter: int = 128,
    vocab: int = 512,
    tie: bool = True,
    seed: int = 0,
):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        eos_token_id=0,
        pad_token_id=0,
        bos_token_id=None,
    )
    return LlamaForCausalLM(cfg).eval()


def save_with_tokenizer(model, folder: Path) -> Path:
    """An HF folder: the model plus a word-level tokenizer over its vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model.save_pretrained(folder)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(model.config.vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t0").save_pretrained(folder)
    return folder


def llama_cpp_logits(path, ids: list[int], n_ctx: int = 256) -> torch.Tensor:
    """llama.cpp's logits [L, V] for one sequence of token ids from a GGUF file."""
    from compressor.runtimes.llamacpp import LlamaCppLogits

    logits = LlamaCppLogits(path, n_ctx=n_ctx, threads=2)
    try:
        return logits(torch.tensor([ids]))[0]
    finally:
        logits.close()


def recipe(*stages: dict, name: str = "t", **extra) -> dict:
    """A recipe on the tiny built-in teacher with fast evaluation; `extra` replaces top-level keys."""
    out = {
        "name": name,
        "seed": 0,
        "teacher": copy.deepcopy(TINY_TEACHER),
        "data": {"seq_len": 64},
        "stages": list(stages),
        "eval": copy.deepcopy(FAST_EVAL),
    }
    out.update(extra)
    return out


def distill_recipe(name: str = "t", steps: int = 8, **extra) -> dict:
    stage = {"student": {"num_layers": 1}, "steps": steps, "batch_size": 4, "checkpoint_every": 2}
    return recipe({"distill": {**stage, "loss": {"temperature": 2.0, "alpha": 0.5}}}, name=name, **extra)


@pytest.fixture
def write_recipe(tmp_path):
    def write(recipe: dict | str, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False))
        return path

    return write


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.gpu` tests run only where CUDA is."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
