"""A student as a speculative-decoding draft for its teacher, measured.

transformers' assisted generation (`generate(..., assistant_model=draft)`) with the teacher as
target: the draft proposes `draft_tokens` tokens, the teacher checks them in one forward pass and
keeps the longest agreeing prefix plus one token of its own. We count what the draft proposed and
what the teacher accepted (acceptance rate), time the teacher alone against the pair on the same
held-out prompts (speed-up), and check that greedy assisted output equals the teacher's own.
Top-1 agreement, measured beside it on held-out text, is the per-token prediction of acceptance.
"""

from __future__ import annotations

import contextlib

import torch
from pydantic import BaseModel, ConfigDict, Field

from .latency import timed


class SpeculativeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    prompts: int = Field(8, ge=1, description="held-out prompts, one at a time (batch 1)")
    prompt_tokens: int = Field(64, ge=1)
    new_tokens: int = Field(64, ge=2)
    draft_tokens: int = Field(5, ge=1, description="tokens the draft proposes per teacher pass (fixed)")


@contextlib.contextmanager
def _counted():
    """Count proposed and accepted draft tokens inside transformers' candidate generator."""
    from transformers.generation.candidate_generator import AssistedCandidateGenerator as Generator

    counts = {"proposed": 0, "accepted": 0, "passes": 0}
    get, update = Generator.get_candidates, Generator.update_candidate_strategy

    def get_candidates(self, input_ids, **kwargs):
        candidates, logits = get(self, input_ids, **kwargs)
        counts["proposed"] += candidates.shape[1] - input_ids.shape[1]
        return candidates, logits

    def update_candidate_strategy(self, input_ids, scores, num_matches):
        counts["accepted"] += int(num_matches)
        counts["passes"] += 1
        return update(self, input_ids, scores, num_matches)

    Generator.get_candidates, Generator.update_candidate_strategy = get_candidates, update_candidate_strategy
    try:
        yield counts
    finally:
        Generator.get_candidates, Generator.update_candidate_strategy = get, update


@contextlib.contextmanager
def _fixed_drafts(draft: torch.nn.Module, k: int):
    """Exactly k proposals per pass: no adaptive schedule, no confidence cut-off, so the
    acceptance rate is a property of the draft and not of transformers' heuristics."""
    config = draft.generation_config
    saved = (config.num_assistant_tokens, config.num_assistant_tokens_schedule, config.assistant_confidence_threshold)
    config.num_assistant_tokens, config.num_assistant_tokens_schedule, config.assistant_confidence_threshold = (
        k,
        "constant",
        0.0,
    )
    try:
        yield
    finally:
        config.num_assistant_tokens, config.num_assistant_tokens_schedule, config.assistant_confidence_threshold = saved


def _timed_generate(model, ids, gen: dict) -> tuple[torch.Tensor, float]:
    return timed(lambda: model.generate(ids, attention_mask=torch.ones_like(ids), **gen), ids.device)


@torch.no_grad()
def speculative(
    draft: torch.nn.Module, teacher: torch.nn.Module, blocks: torch.Tensor, spec: SpeculativeSpec, pad_token_id
) -> dict:
    """Acceptance rate and speed-up of `draft` drafting for `teacher` on held-out prompts."""
    max_pos = getattr(teacher.config, "max_position_embeddings", None) or 1 << 30
    p = max(1, min(spec.prompt_tokens, blocks.shape[1], max_pos - spec.new_tokens))
    gen = dict(
        max_new_tokens=spec.new_tokens, min_new_tokens=spec.new_tokens, do_sample=False, pad_token_id=pad_token_id
    )
    alone = assisted = 0.0
    same = 0
    prompts = blocks[: spec.prompts, :p].to(teacher.device)
    _timed_generate(teacher, prompts[:1], dict(gen, max_new_tokens=2, min_new_tokens=2))  # warm-up
    with _counted() as counts, _fixed_drafts(draft, spec.draft_tokens):
        for ids in prompts.split(1):
            reference, seconds = _timed_generate(teacher, ids, gen)
            alone += seconds
            out, seconds = _timed_generate(teacher, ids, dict(gen, assistant_model=draft))
            assisted += seconds
            same += int(torch.equal(out, reference))
    n = len(prompts)
    return {
        "acceptance_rate": counts["accepted"] / max(1, counts["proposed"]),
        "tokens_per_teacher_pass": n * spec.new_tokens / max(1, counts["passes"]),
        "speedup": alone / assisted,
        "teacher_ms_per_token": 1e3 * alone / (n * spec.new_tokens),
        "assisted_ms_per_token": 1e3 * assisted / (n * spec.new_tokens),
        "draft_tokens": spec.draft_tokens,
        "prompts": n,
        "identical_to_teacher": same / n,
    }
