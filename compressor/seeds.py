"""Derived seeds. Every random stream of a run is a function of the recipe's seed and a
position in the work (a step, an epoch, a prompt), never of what ran before, so a resumed run
draws exactly what an uninterrupted one would."""

from __future__ import annotations

PRIME = 7919
EPOCH_PRIME = 1_000_003


def step_seed(seed: int, step: int) -> int:
    """Sampling at a training micro-step, or for a batch of generations."""
    return seed * PRIME + step


def epoch_seed(seed: int, epoch: int) -> int:
    """A data epoch's permutation, or a per-step coin flip (on-policy batches)."""
    return seed * EPOCH_PRIME + epoch


def answer_seed(seed: int, prompt: int, sample: int = 0) -> int:
    """One teacher answer: prompt `prompt`, sample `sample` of it."""
    return seed + PRIME * prompt + sample
