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
from pathlib import Path

import torch

from .heap import map_large_blocks, trim

INDEX = "model.safetensors.index.json"
CODES = "codes"  # the integers of each shard: int-*.safetensors (codes, scales) or ggml-*.safetensors (blocks)


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

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors in float32, each a copy that owns its memory."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        out = {}
        for file, keys in by_file.items():
            with safe_open(file, "pt") as f:  # closed (unmapped) before the next file
                for k in keys:
                    out[k] = f.get_tensor(k).to(torch.float32, copy=True)
        return out


def _set(module: torch.nn.Module, local: str, value: torch.Tensor) -> None:
    """Replace the parameter `local` (a dotted name inside `module`) with a frozen `value`."""
    owner, _, leaf = local.rpartition(".")
    sub = module.get_submodule(owner) if owner else module
    sub._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)


def _to_meta(module: torch.nn.Module) -> None:
    for local, p in list(module.named_parameters()):
        _set(module, local, torch.empty(p.shape, device="meta"))


def skeleton(folder: Path) -> torch.nn.Module:
    """The model of `folder`'s config with its parameters on the meta device; buffers (rotary
    frequencies, embedding scales) are computed for real, as loading would."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from .families import family_of

    config = AutoConfig.from_pretrained(folder)
    family_of(config)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


class Streamed:
    """Weights read into a module of a meta-device model on `load`, written out (when changed)
    and dropped on `done`; `finish` copies what was never changed and writes the index."""

    def __init__(self, model: torch.nn.Module, source: Checkpoint, out: Path, device: torch.device):
        self.source, self.out, self.device = source, Path(out), device
        self.prefix = {m: (name + "." if name else "") for name, m in model.named_modules()}
        embed = model.get_input_embeddings()
        self.tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is embed.weight
        self.embed_key = self.prefix[embed] + "weight"
        self.written: dict[str, str] = {}  # tensor name -> the shard that holds it
        self.parts: list[str] = []
        (self.out / CODES).mkdir(parents=True, exist_ok=True)
        map_large_blocks()

    def _key(self, name: str) -> str:
        return self.embed_key if name not in self.source.files and self.tied and name.endswith("weight") else name

    def load(self, module: torch.nn.Module) -> None:
        names = {self.prefix[module] + n: n for n, _ in module.named_parameters()}
        found = self.source.read([self._key(k) for k in names])
        for full, local in names.items():
            _set(module, local, found[self._key(full)].to(self.device))

    def done(self, module: torch.nn.Module, changed: bool, found: dict | None = None) -> None:
        """Write the module's weights (when the work changed them) and the integers `found` holds
        for it (taken out of `found`: module name -> (int8 codes, scales) or ggml.Blocks), then
        give their memory back."""
        if changed:
            self._write(module, found or {})
        _to_meta(module)
        trim()

    def _write(self, module: torch.nn.Module, found: dict) -> None:
        from safetensors.torch import save_file

        from .quantized import write_ggml

        part = len(self.parts)
        self.parts.append(f"part-{part:05d}.safetensors")
        tensors = {self.prefix[module] + n: p.data.contiguous().cpu() for n, p in module.named_parameters()}
        save_file(tensors, self.out / self.parts[-1], metadata={"format": "pt"})
        self.written.update(dict.fromkeys(tensors, self.parts[-1]))
        mine = {n: found.pop(n) for n in list(found) if (n + ".").startswith(self.prefix[module])}
        blocks = {n: v for n, v in mine.items() if not isinstance(v, tuple)}
        if blocks:
            write_ggml(self.out / CODES / f"ggml-{part:05d}.safetensors", blocks)
        ints = {f"{n}.{k}": t for n, v in mine.items() if isinstance(v, tuple) for k, t in zip(("codes", "scales"), v)}
        if ints:
            save_file(ints, self.out / CODES / f"int-{part:05d}.safetensors")

    def finish(self) -> None:
        """Copy the tensors the work left as they were (embeddings, norms), one at a time, and
        write the index and the config, so `out` loads with `from_pretrained`."""
        from safetensors.torch import save_file

        rest = [k for k in self.source.files if k not in self.written]
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

    def codes(self) -> dict:
        """Every integer written, read back: module name -> (int8 codes, scales) or ggml.Blocks."""
        from safetensors.torch import load_file

        from .quantized import read_ggml_file

        out: dict = {}
        for file in sorted((self.out / CODES).glob("int-*.safetensors")):
            ints = load_file(file)
            names = [k.removesuffix(".codes") for k in ints if k.endswith(".codes")]
            out |= {n: (ints[f"{n}.codes"], ints[f"{n}.scales"]) for n in names}
        for file in sorted((self.out / CODES).glob("ggml-*.safetensors")):
            out |= {k.removesuffix(".weight"): b for k, b in read_ggml_file(file).items()}
        return out
