"""llama.cpp's GGUF weight types as grids our quantizers optimise on and our exporter writes
bit for bit: the types and their arithmetic (types.py), their bytes (layout.py), and choosing
their stored fields (fit.py)."""

from .fit import codes, fields, quantize
from .layout import pack, unpack
from .types import FALLBACK, QK_K, TYPES, Blocks, GgmlType, ggml_type, type_for_row

__all__ = [
    "FALLBACK",
    "QK_K",
    "TYPES",
    "Blocks",
    "GgmlType",
    "codes",
    "fields",
    "ggml_type",
    "pack",
    "quantize",
    "type_for_row",
    "unpack",
]
