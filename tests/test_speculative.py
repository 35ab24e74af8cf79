"""Students as drafts: acceptance counted inside transformers' assisted generation, checked
against a hand simulation of greedy speculative decoding; the output stays the teacher's own."""

import copy

import pytest
import torch

from compressor.models import keep_layers, load_pretrained
from compressor.speculative import SpeculativeSpec, speculative


@pytest.fixture(scope="module")
def pair(tiny_teacher_folder):
    teacher = load_pretrained(str(tiny_teacher_folder), torch.device("cpu"))
    draft = keep_layers(copy.deepcopy(teacher.model), [0])
    from compressor.data import stdlib_documents

    ids = teacher.tokenizer("\n".join(stdlib_documents("heldout")[:2])).input_ids
    blocks = torch.tensor(ids[: 3 * 40]).view(3, 40)
    return teacher.model.eval(), draft.eval(), blocks, teacher.tokenizer.eos_token_id


@torch.no_grad()
def greedy(model, ids, n):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False)


@torch.no_grad()
def simulated(teacher, draft, prompt, new_tokens, k):
    """Greedy speculative decoding by hand: the draft proposes up to k tokens (fewer near the end,
    leaving room for the teacher's own), the teacher keeps the agreeing prefix and adds one."""
    target = greedy(teacher, prompt, new_tokens)[0].tolist()
    cur, proposed, accepted = prompt[0].tolist(), 0, 0
    end = len(target)
    while len(cur) < end:
        room = min(k, end - len(cur) - 1)
        guess = greedy(draft, torch.tensor([cur]), room)[0, len(cur) :].tolist() if room > 0 else []
        match = 0
        while match < len(guess) and guess[match] == target[len(cur) + match]:
            match += 1
        proposed += len(guess)
        accepted += match
        cur = target[: len(cur) + match + 1]
    return proposed, accepted


def test_acceptance_matches_a_hand_simulation_and_output_is_the_teachers(pair):
    teacher, draft, blocks, pad = pair
    spec = SpeculativeSpec(enabled=True, prompts=3, prompt_tokens=24, new_tokens=12, draft_tokens=4)
    got = speculative(draft, teacher, blocks, spec, pad)
    counts = [simulated(teacher, draft, blocks[i : i + 1, :24], 12, 4) for i in range(3)]
    assert got["acceptance_rate"] == pytest.approx(sum(a for _, a in counts) / sum(p for p, _ in counts))
    assert 0 < got["acceptance_rate"] < 1
    assert got["identical_to_teacher"] == 1.0  # greedy assisted generation is lossless
    assert 1 <= got["tokens_per_teacher_pass"] <= 5 and got["speedup"] > 0


def test_the_teacher_as_its_own_draft_is_always_accepted(pair):
    teacher, _, blocks, pad = pair
    spec = SpeculativeSpec(enabled=True, prompts=2, prompt_tokens=16, new_tokens=10, draft_tokens=3)
    got = speculative(copy.deepcopy(teacher), teacher, blocks, spec, pad)
    assert got["acceptance_rate"] == 1.0 and got["identical_to_teacher"] == 1.0
    assert got["tokens_per_teacher_pass"] > 3
