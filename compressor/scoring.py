"""Next-token scores with bounded memory: a model's logits are made a slice of positions at a
time, never as a whole [tokens × vocabulary] tensor.

With a 262k vocabulary (Gemma 3) the logits are the memory: one 1,024-token row is 1 GB in
fp32, and lm-eval's usual path makes the whole batch's logits and then their log-softmax. Here
a torch model runs its decoder once per batch, and its head runs on `chunk_positions` positions
at a time (about 128 MiB of fp32 logits); a runtime that returns logits itself (llama.cpp) is
asked one row at a time. Held-out fidelity (`measure.fidelity`) and lm-eval's log-likelihoods
(`tasks.evaluate`) both score through here.

A family whose sequences must start with BOS (Gemma) gets it: a scored window that does not
start with it (lm-eval's later rolling windows, a left-truncated context) is given one in front.
"""

from __future__ import annotations

from typing import Callable

import torch

Logits = Callable[[torch.Tensor], torch.Tensor]  # token ids [B, L] -> logits [B, L, V]
CHUNK_BYTES = 128 << 20  # fp32 logits per slice


def chunk_positions(vocab: int) -> int:
    return max(1, CHUNK_BYTES // (4 * vocab))


class BatchLogits:
    """Logits of one batch of rows, on demand: `at(row, positions)` -> float32 [n, V]."""

    def __init__(self, source: torch.nn.Module | Logits, ids: torch.Tensor):
        self.source, self.ids, self._row = source, ids, (None, None)
        if isinstance(source, torch.nn.Module):
            self.head = source.get_output_embeddings()
            with torch.no_grad():
                self.hidden = source.model(input_ids=ids.to(source.device)).last_hidden_state

    @property
    def vocab(self) -> int:
        return self.head.out_features if isinstance(self.source, torch.nn.Module) else self._logits_of(0).shape[-1]

    def _logits_of(self, row: int) -> torch.Tensor:
        if self._row[0] != row:
            view = getattr(self.source, "view", None)  # a runtime's own buffer, read without a copy
            logits = view(self.ids[row].tolist()) if view else self.source(self.ids[row : row + 1])[0]
            self._row = (row, logits)
        return self._row[1]

    @torch.no_grad()
    def at(self, row: int, positions: torch.Tensor) -> torch.Tensor:
        if isinstance(self.source, torch.nn.Module):
            return self.head(self.hidden[row, positions.to(self.hidden.device)]).float()
        return self._logits_of(row)[positions.to(self._logits_of(row).device)].float()


def scored_chunks(sources: list, ids: torch.Tensor, positions: list[torch.Tensor]):
    """(row, positions, [log-probs [n, V] of each source]) over every wanted position of every
    row, a slice at a time; every source scores the same slice (a student and its teacher)."""
    batches = [BatchLogits(source, ids) for source in sources]
    step = chunk_positions(batches[0].vocab)
    for row, pos in enumerate(positions):
        for start in range(0, len(pos), step):
            part = pos[start : start + step]
            yield row, part, [b.at(row, part).log_softmax(-1) for b in batches]


def with_bos(tokens: list[int], bos: int | None) -> list[int]:
    """The window with BOS in front when it needs one and lacks it."""
    return tokens if bos is None or (tokens and tokens[0] == bos) else [bos, *tokens]


def loglikelihoods(
    source,
    requests: list[tuple[list[int], list[int]]],
    max_length: int,
    batch_size: int,
    bos: int | None = None,
    pad: int = 0,
    progress: Callable[[int], None] | None = None,
) -> list[tuple[float, bool]]:
    """lm-eval's (log P(continuation | context), is greedy) per (context ids, continuation ids):
    the last `max_length` tokens of context + continuation[:-1] are the input, as lm-eval cuts
    them (BOS in front for a BOS family: `max_length` then counts it too); longest first,
    padded on the right."""
    rows = []
    for ctx, cont in requests:
        keep = max_length - (1 if bos is not None else 0)
        inp = (ctx + cont)[-(keep + 1) :][:-1]
        rows.append((with_bos(inp, bos), cont))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out: list[tuple[float, bool] | None] = [None] * len(rows)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(rows[i][0]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        positions, targets = [], []
        for b, i in enumerate(chunk):
            inp, cont = rows[i]
            ids[b, : len(inp)] = torch.tensor(inp)
            positions.append(torch.arange(len(inp) - len(cont), len(inp)))
            targets.append(torch.tensor(cont))
        sums, greedy = [0.0] * len(chunk), [True] * len(chunk)
        for b, pos, (logp,) in scored_chunks([source], ids, positions):
            first = int(pos[0] - positions[b][0])
            want = targets[b][first : first + len(pos)].to(logp.device)
            sums[b] += float(logp.gather(-1, want[:, None]).sum())
            greedy[b] = greedy[b] and bool((logp.argmax(-1) == want).all())
        for b, i in enumerate(chunk):
            out[i] = (sums[b], greedy[b])
        if progress is not None:
            progress(len(chunk))
    return out
