"""llama.cpp's importance-matrix file, written from our own calibration pass.

llama-imatrix stores, per matrix of the decoder layers, the sum over calibration tokens of each
input column's squared activation (`<tensor>.in_sum2`, F32 [1, n_in]) and the token count
(`<tensor>.counts`, F32 [1, 1]), in a GGUF file of `general.type` imatrix with the datasets, chunk
count and chunk size (tools/imatrix/imatrix.cpp, save_imatrix); llama-quantize divides the one by
the other. Ours holds the same statistics from the same forward pass our own quantizers weigh by
(ggml.model.activation_importance), so `llama-quantize --imatrix` and our `rtn` with importance
read one calibration, and no llama.cpp tool has to compute it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def write_imatrix(path: Path, importance: dict, tokens: int, listed: list, chunk_size: int, dataset: str) -> Path:
    """Write `importance` ({module name: mean squared input per column} over `tokens` tokens) for
    the decoder-layer matrices `listed` names (ggml.model.tensors), under their GGUF names."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "imatrix")
    writer.add_type(gguf.GGUFType.IMATRIX)
    writer.add_array("imatrix.datasets", [dataset])
    writer.add_uint32("imatrix.chunk_count", tokens // chunk_size)
    writer.add_uint32("imatrix.chunk_size", chunk_size)
    named = sorted((f"blk.{layer}.{role}.weight", name) for name, role, layer, _ in listed if layer is not None)
    for key, name in named:  # llama-imatrix's order: sorted by tensor name
        mean = importance[name].detach().double().cpu()
        writer.add_tensor(f"{key}.in_sum2", (mean * tokens).float().numpy()[None, :])
        writer.add_tensor(f"{key}.counts", np.full((1, 1), float(tokens), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def read_imatrix(path: Path) -> dict[str, torch.Tensor]:
    """{GGUF tensor name: mean squared input per column} of an imatrix file (llama-quantize's reading)."""
    import gguf

    found = {t.name: np.asarray(t.data, dtype=np.float32).reshape(-1) for t in gguf.GGUFReader(path).tensors}
    out = {}
    for name, sums in found.items():
        if name.endswith(".in_sum2"):
            key = name.removesuffix(".in_sum2")
            out[key] = torch.from_numpy(sums / found[f"{key}.counts"][0])
    return out
