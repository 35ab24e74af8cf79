"""A GGUF type as our optimisers see it, always through the values the file will dequantize to
(the same float32 order as `Blocks.dequantize`):
- GgmlGrid, as GPTQ walks it: fields (fp16 d, sub-block integers) fitted per block from the
  weights as error feedback has left them, weighted by the Hessian's diagonal (the importance
  llama.cpp's imatrix estimates), and each column rounded against them;
- OnFields, as QAT trains on it: the fields of a starting quantization kept, every weight
  rounded against them in the forward pass, the gradient straight through to the float weight.
  Keeping the fields is what keeps the trained weights exact: the sub-block integers and fp16 d
  that the forward pass used are the ones written."""

from __future__ import annotations

import torch

from .fit import codes, fields, level_codes
from .types import Blocks, GgmlType


class GgmlGrid:
    def __init__(self, t: GgmlType, rows: int, n_in: int):
        self.t, self.span = t, t.block
        self.q = torch.zeros(rows, n_in, dtype=torch.uint8)
        self.scale = torch.zeros(rows, n_in // t.sub)
        self.bias = torch.zeros(rows, n_in // t.sub) if t.asymmetric else None
        self.levels = t.level_tensor()
        self.parts: list[tuple[int, Blocks]] = []

    def start(self, w: torch.Tensor, first: int, importance: torch.Tensor) -> None:
        """Fit the fields of columns [first, first + w.shape[1]) (all of them under act_order)."""
        blocks = fields(self.t, w, importance)
        self.parts.append((first, blocks))
        scale, bias = blocks.scale_bias()
        subs = slice(first // self.t.sub, first // self.t.sub + scale.shape[1])
        self.scale[:, subs] = scale
        if bias is not None:
            self.bias[:, subs] = bias

    def column(self, j: int, col: torch.Tensor) -> torch.Tensor:
        s = self.scale[:, j // self.t.sub]
        b = None if self.bias is None else self.bias[:, j // self.t.sub]
        y = col if b is None else col - b
        q = level_codes(self.t, torch.where(s != 0, y / s.where(s != 0, torch.ones_like(s)), torch.zeros_like(y)))
        self.q[:, j] = q
        value = s * self.levels[q.long()]
        return value if b is None else value + b

    def result(self) -> Blocks:
        """The tensor's Blocks: the fitted fields of every span, side by side, and the codes."""
        blocks = Blocks.cat([b for _, b in sorted(self.parts, key=lambda p: p[0])], dim=1)
        blocks.q = self.q
        return blocks


class OnFields(torch.nn.Module):
    """A parametrization of a Linear weight: computes with `start`'s stored fields and the nearest
    level of each weight against them; `blocks(w)` is what the file holds for the weight `w`. The
    fields are kept on the weight's device, so a training step on a GPU rounds there."""

    def __init__(self, start: Blocks):
        super().__init__()
        self.start = start

    def blocks(self, w: torch.Tensor) -> Blocks:
        if self.start.d.device != w.device:
            self.start = self.start.to(w.device)
        s = self.start
        q = codes(s.type, w.detach().float(), *s.scale_bias())
        return Blocks(s.type, q, s.d, s.dmin, s.sc, s.mn)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        value = self.blocks(w).dequantize().to(w)
        return w + (value - w).detach()
