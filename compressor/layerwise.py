"""Quantizing a model bigger than memory, a decoder layer at a time.

The model is built from its config with every parameter on the meta device (no storage);
`Streamed` reads one module's weights from the checkpoint's safetensors when the work reaches
it and drops them after, writing the quantized weights to a new checkpoint as it goes. Peak
memory is one layer in float32, its Hessians and the calibration hidden states, whatever the
depth. Each read maps its file and unmaps it at once: pages of a memory-mapped checkpoint count
as the process's resident memory while they stay mapped.

GPTQ (`gptq_model.run_gptq(..., stream=)`) does the same arithmetic in the same order as on a
loaded model, so both give the same integers bit for bit.
"""

from __future__ import annotations

import json
import shutil
import weakref
from pathlib import Path

import torch

from .heap import map_large_blocks, trim

INDEX = "model.safetensors.index.json"
CODES = "codes"  # the INT grid's integers of each shard: codes/int-*.safetensors (codes, scales)


class Checkpoint:
    """A safetensors checkpoint (one file, or shards with an index), read a few tensors at a time."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.exists():
            self.files = {k: self.folder / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        else:
            single = self.folder / "model.safetensors"
            with safe_open(single, "pt") as f:
                self.files = dict.fromkeys(f.keys(), single)

    def read(self, names: list[str], dtype: torch.dtype | None = torch.float32) -> dict[str, torch.Tensor]:
        """The named tensors in `dtype` (None: as stored), each a copy that owns its memory."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        out = {}
        for file, keys in by_file.items():
            with safe_open(file, "pt") as f:  # closed (unmapped) before the next file
                for k in keys:
                    t = f.get_tensor(k)
                    out[k] = t.to(dtype or t.dtype, copy=True)
        return out


def _set(module: torch.nn.Module, local: str, value: torch.Tensor) -> None:
    """Replace the parameter `local` (a dotted name inside `module`) with a frozen `value`."""
    owner, _, leaf = local.rpartition(".")
    sub = module.get_submodule(owner) if owner else module
    sub._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)


def _to_meta(module: torch.nn.Module, recurse: bool = True) -> None:
    for local, p in list(module.named_parameters(recurse=recurse)):
        _set(module, local, torch.empty(p.shape, dtype=p.dtype, device="meta"))


def transplant(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """`target` (a meta-device module of the same structure and shapes) takes `source`'s weights."""
    for local, p in source.named_parameters():
        _set(target, local, p.data)


def skeleton(folder: Path, dtype: torch.dtype | None = torch.float32) -> torch.nn.Module:
    """The model of `folder`'s config with its parameters on the meta device; buffers (rotary
    frequencies, embedding scales) are computed for real, as loading would. `dtype` None: the
    config's (what `from_pretrained(dtype="auto")` takes)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from .families import family_of

    config = AutoConfig.from_pretrained(folder)
    family_of(config)
    stored = getattr(config, "dtype", None) or torch.float32
    dtype = dtype or (getattr(torch, stored) if isinstance(stored, str) else stored)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # empty weights are made apart, tied or not
    return model.eval()


class Reader:
    """Weights read from the checkpoint into one module of a meta-device model at a time (`load`)
    and dropped again (`drop`), in `dtype` (None: as stored)."""

    def __init__(self, model: torch.nn.Module, source: Checkpoint, device: torch.device, dtype=torch.float32):
        self.source, self.device, self.dtype = source, device, dtype
        # weak: a module the work replaces (a sliced Linear's old one) goes, with its weights
        self.prefix = weakref.WeakKeyDictionary({m: (name + "." if name else "") for name, m in model.named_modules()})
        embed, head = model.get_input_embeddings(), model.get_output_embeddings()
        self.tied = head is not None and head.weight is embed.weight
        self.embed, self.head = embed, head
        self.embed_key = self.prefix[embed] + "weight"

    def _key(self, name: str) -> str:
        return self.embed_key if name not in self.source.files and self.tied and name.endswith("weight") else name

    def load(self, module: torch.nn.Module, recurse: bool = True) -> None:
        """`module`'s weights (`recurse` False: only those it holds itself, not its children's)."""
        names = {self.prefix[module] + n: n for n, _ in module.named_parameters(recurse=recurse)}
        found = self.source.read([self._key(k) for k in names], self.dtype)
        for full, local in names.items():
            _set(module, local, found[self._key(full)].to(self.device))

    def drop(self, module: torch.nn.Module, recurse: bool = True) -> None:
        _to_meta(module, recurse)
        if self.tied and module is self.embed:  # a tied head goes on sharing its tensor
            self.head.weight = module.weight
        trim()

    def outside_layers(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """The modules holding weights no decoder layer holds (embeddings, final norm, an untied head)."""
        from .models import decoder_layers

        inside = {id(p) for layer in decoder_layers(model) for p in layer.parameters()}
        head = model.get_output_embeddings()
        return [
            module
            for module in model.modules()
            if any(id(p) not in inside for p in module.parameters(recurse=False)) and not (module is head and self.tied)
        ]

    def load_outside_layers(self, model: torch.nn.Module) -> None:
        """The weights no decoder layer holds: loaded for good; a tied head shares the embeddings' tensor."""
        for module in self.outside_layers(model):
            self.load(module, recurse=False)
        if self.tied:
            self.head.weight = self.embed.weight


class Streamed(Reader):
    """A Reader that writes what the work changed (`done`) to a new checkpoint; `finish` copies
    what was never changed and writes the index."""

    def __init__(self, model: torch.nn.Module, source: Checkpoint, out: Path, device: torch.device):
        super().__init__(model, source, device)
        self.names = {self.prefix[m] + n for m in self.prefix for n, _ in m.named_parameters(recurse=False)}
        self.out = Path(out)
        self.written: dict[str, str] = {}  # tensor name -> the shard that holds it
        self.parts: list[str] = []
        self.out.mkdir(parents=True, exist_ok=True)
        map_large_blocks()

    def done(self, module: torch.nn.Module, changed: bool, found: dict | None = None, recurse: bool = True) -> None:
        """Write the module's weights (when the work changed them; `recurse` False: only those it
        holds itself) and the integers `found` holds for it (taken out of `found`: module name ->
        (int8 codes, scales) or ggml.Blocks), then give their memory back."""
        if changed:
            self._write(module, found or {}, recurse)
        self.drop(module, recurse)

    def _write(self, module: torch.nn.Module, found: dict, recurse: bool) -> None:
        from safetensors.torch import save_file

        from .quantized import GGML_SHARDS, write_ggml

        part = len(self.parts)
        self.parts.append(f"part-{part:05d}.safetensors")
        params = module.named_parameters(recurse=recurse)
        tensors = {self.prefix[module] + n: p.data.contiguous().cpu() for n, p in params}
        save_file(tensors, self.out / self.parts[-1], metadata={"format": "pt"})
        self.written.update(dict.fromkeys(tensors, self.parts[-1]))
        mine = {n: found.pop(n) for n in list(found) if (n + ".").startswith(self.prefix[module])}
        blocks = {n: v for n, v in mine.items() if not isinstance(v, tuple)}
        if blocks:  # the artifact's GGUF blocks, as quantized.read_ggml reads them
            (self.out / GGML_SHARDS).mkdir(exist_ok=True)
            write_ggml(self.out / GGML_SHARDS / f"{part:05d}.safetensors", blocks)
        ints = {f"{n}.{k}": t for n, v in mine.items() if isinstance(v, tuple) for k, t in zip(("codes", "scales"), v)}
        if ints:
            (self.out / CODES).mkdir(exist_ok=True)
            save_file(ints, self.out / CODES / f"int-{part:05d}.safetensors")

    def finish(self, config=None) -> None:
        """Copy the tensors the work left as they were (embeddings, norms), one at a time, and
        write the index and the config (the source's, or `config` when the work changed the
        shape), so `out` loads with `from_pretrained`."""
        from safetensors.torch import save_file

        rest = [k for k in self.source.files if k not in self.written and k in self.names]
        for i, name in enumerate(rest):
            file = f"kept-{i:05d}.safetensors"
            save_file(self.source.read([name]), self.out / file, metadata={"format": "pt"})
            self.written[name] = file
        total = sum((self.out / f).stat().st_size for f in set(self.written.values()))
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(self.written.items()))}
        (self.out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        for name in ("config.json", "generation_config.json"):
            if (self.source.folder / name).exists():
                shutil.copy2(self.source.folder / name, self.out / name)
        if config is not None:
            config.save_pretrained(self.out)

    def codes(self) -> dict:
        """Every integer written, read back: module name -> (int8 codes, scales) or ggml.Blocks."""
        from safetensors.torch import load_file

        from .quantized import read_ggml

        out: dict = {}
        for file in sorted((self.out / CODES).glob("int-*.safetensors")):
            ints = load_file(file)
            names = [k.removesuffix(".codes") for k in ints if k.endswith(".codes")]
            out |= {n: (ints[f"{n}.codes"], ints[f"{n}.scales"]) for n in names}
        return out | {k.removesuffix(".weight"): b for k, b in read_ggml(self.out).items()}


def streaming(folder: Path, device: torch.device, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The model of `folder`, computing what it computes loaded whole while holding one decoder
    layer at a time: each layer reads its weights from the checkpoint when its forward pass
    begins and drops them when it ends; embeddings, final norm and head stay loaded (a tied head
    shares the embeddings' tensor). `dtype` None keeps the stored one, as `dtype="auto"` loads.
    Every forward pass reads the layers again (from the page cache when they fit there)."""
    from .models import decoder_layers

    map_large_blocks()  # each layer's weights back to the system when dropped, not kept in the heap
    model = skeleton(folder, dtype)
    for module in model.modules():  # rotary frequencies and the like, made on the CPU
        module._buffers.update({k: b.to(device) for k, b in module._buffers.items() if b is not None})
    reader = Reader(model, Checkpoint(folder), device, dtype)
    for layer in decoder_layers(model):
        layer.register_forward_pre_hook(lambda module, _args: reader.load(module))
        layer.register_forward_hook(lambda module, _args, _out: reader.drop(module))
    reader.load_outside_layers(model)
    return model.eval()


def load_streamed(folder: Path, device: torch.device, dtype: torch.dtype | None = None):
    """`streaming`'s model of `folder` with its tokenizer, as `models.load_pretrained` gives one."""
    return _with_tokenizer(streaming(folder, device, dtype), folder)


def load_skeleton(folder: Path):
    """`skeleton`'s weightless model of `folder` with its tokenizer: its config and tokenizer, or a
    stage's input that reads its weights itself a layer at a time."""
    return _with_tokenizer(skeleton(folder), folder)


def _with_tokenizer(model: torch.nn.Module, folder: Path):
    from transformers import AutoTokenizer

    from .models import Loaded

    return Loaded(model, AutoTokenizer.from_pretrained(folder), Path(folder))
