"""Distillation across tokenizers (compressor.crosstok): the losses against their definitions,
the alignment of two real tokenizations of the same text, and a run whose teacher has a
tokenizer of its own, live and from the teacher-logit cache."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from conftest import FAST_EVAL, TINY_BUILD, TINY_TEACHER

from compressor import UserError
from compressor.crosstok import Aligner, cross_divergence, same_tokenizer, vocabulary_map
from compressor.recipe import load_recipe

TEXTS = [
    "The café was naïve about the weather, and the rain came at noon.",
    "Once upon a time a little fox found a shiny stone 🦊 near the river bank.",
    "def add(a, b):\n    return a + b  # sums two numbers",
]


def _topk(t_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the teacher-logit cache holds for these logits: top-k ids, log-probs, tail log-mass."""
    logp = t_logits.log_softmax(-1)
    values, ids = logp.topk(k, dim=-1)
    tail = logp.scatter(-1, ids, float("-inf")).logsumexp(-1)
    return ids, values, tail


def test_mapped_is_forward_kl_on_one_vocabulary():
    torch.manual_seed(0)
    t, s = torch.randn(6, 40) * 2, torch.randn(6, 40) * 2
    s_logp = s.log_softmax(-1)
    identity = torch.arange(40)
    full = cross_divergence(s_logp, _topk(t, 40), identity, "mapped")
    p = t.softmax(-1)
    torch.testing.assert_close(full, (p * (p.log() - s_logp)).sum(-1), rtol=1e-5, atol=1e-6)
    # k < V: the KL over the top-k tokens and one bucket for the rest, on both sides
    ids, values, tail = _topk(t, 8)
    top = values.exp()
    q_top, q_rest = s_logp.exp().gather(-1, ids), 1 - s_logp.exp().gather(-1, ids).sum(-1)
    bucketed = (top * (top.log() - q_top.log())).sum(-1) + tail.exp() * (tail - q_rest.log())
    got = cross_divergence(s_logp, (ids, values, tail), identity, "mapped")
    torch.testing.assert_close(got, bucketed, rtol=1e-5, atol=1e-6)
    assert (got <= full + 1e-6).all()  # coarser buckets never see more of the gap


def test_mapped_sums_teacher_tokens_that_read_the_same():
    torch.manual_seed(1)
    t, s = torch.randn(3, 6), torch.randn(3, 4)
    vmap = torch.tensor([0, 1, 2, 3, 3, -1])  # teacher tokens 3 and 4 read as student token 3; 5 as none
    p = t.softmax(-1)
    s_wide = torch.cat([s, torch.zeros(3, 1)], -1)  # a fifth student token, unmapped: the rest bucket
    q = s_wide.softmax(-1)
    p_s = torch.stack([p[:, 0], p[:, 1], p[:, 2], p[:, 3] + p[:, 4]], -1)
    expected = (p_s * (p_s / q[:, :4]).log()).sum(-1) + p[:, 5] * (p[:, 5] / q[:, 4]).log()
    got = cross_divergence(s_wide.log_softmax(-1), _topk(t, 6), vmap, "mapped")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_uld_is_the_sorted_l1_with_zero_padding():
    torch.manual_seed(2)
    t, s = torch.randn(5, 60) * 2, torch.randn(5, 40) * 2  # a teacher with the larger vocabulary
    p = t.softmax(-1).sort(-1, descending=True).values
    q = s.softmax(-1).sort(-1, descending=True).values
    exact = (p[:, :40] - q).abs().sum(-1) + p[:, 40:].sum(-1)  # the student's ranks past 40 are 0
    got = cross_divergence(s.log_softmax(-1), _topk(t, 40), torch.full((60,), -1), "uld")
    torch.testing.assert_close(got, exact, rtol=1e-5, atol=1e-6)


def test_hybrid_is_uld_when_nothing_maps_and_mapped_when_everything_does():
    torch.manual_seed(3)
    t, s = torch.randn(4, 30), torch.randn(4, 30)
    s_logp, cached = s.log_softmax(-1), _topk(t, 30)
    nothing, everything = torch.full((30,), -1), torch.arange(30)
    torch.testing.assert_close(
        cross_divergence(s_logp, cached, nothing, "hybrid"), cross_divergence(s_logp, cached, nothing, "uld")
    )
    torch.testing.assert_close(
        cross_divergence(s_logp, cached, everything, "hybrid"),
        cross_divergence(s_logp, cached, everything, "mapped"),
    )


def test_losses_have_gradients_and_vanish_at_the_teacher():
    torch.manual_seed(4)
    t = torch.randn(4, 30)
    for loss in ("uld", "hybrid", "mapped"):
        s = torch.randn(4, 30, requires_grad=True)
        value = cross_divergence(s.log_softmax(-1), _topk(t, 30), torch.arange(30), loss).sum()
        value.backward()
        assert s.grad.abs().sum() > 0, loss
        at_teacher = cross_divergence(t.log_softmax(-1), _topk(t, 30), torch.arange(30), loss)
        assert at_teacher.abs().max() < 1e-5, loss


# --- alignment ---------------------------------------------------------------------------------


def _byte_level(docs):
    from compressor.teachers.builtin import train_tokenizer

    return train_tokenizer(docs, 320)


def _metaspace(docs):
    """A SentencePiece-style tokenizer (Gemma's conventions: ▁ for spaces, BOS added, byte fallback)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    tok.decoder = decoders.Sequence([decoders.Metaspace(prepend_scheme="never"), decoders.ByteFallback()])
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>", *bytes_], show_progress=False
    )
    tok.train_from_iterator(docs, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def _rest(tokenizer, ids) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False).lstrip()


def test_alignment_points_at_the_same_text_across_conventions():
    docs = TEXTS * 20
    student, teacher = _byte_level(docs), _metaspace(docs)
    stream = []
    for text in TEXTS:
        stream += student(text).input_ids + [student.eos_token_id]
    ids = torch.tensor([stream[:48], stream[20:68]])
    view = Aligner(student, teacher, teacher.bos_token_id)(ids)
    aligned = view.positions >= 0
    assert aligned.float().mean() > 0.4
    for b in range(len(ids)):
        assert view.input_ids[b, 0] == teacher.bos_token_id
        for i in aligned[b].nonzero().flatten().tolist():
            j = int(view.positions[b, i])
            # what is left to predict from there is the same text in both (up to where the row ends)
            s_rest = _rest(student, ids[b, i + 1 :].tolist())
            t_rest = _rest(teacher, view.input_ids[b, j + 1 :][view.attention_mask[b, j + 1 :] > 0].tolist())
            assert s_rest == t_rest, (i, j, s_rest[:20], t_rest[:20])
    # the student's EOS (a document's end) is aligned with the teacher's separator before the next
    eos_at = (ids[0] == student.eos_token_id).nonzero().flatten()
    assert (view.positions[0, eos_at[:-1]] >= 0).all()


def test_one_tokenizer_aligns_every_position():
    tok = _byte_level(TEXTS * 20)
    ids = torch.tensor([tok(TEXTS[2]).input_ids])  # ASCII: every token starts a character
    view = Aligner(tok, tok, None)(ids)
    assert torch.equal(view.input_ids, ids)
    n = ids.shape[1]
    assert n > 10 and view.positions[0, :-1].tolist() == list(range(n - 1))  # the last predicts past the row
    emoji = torch.tensor([tok(TEXTS[1]).input_ids])  # the fox's 4 bytes are byte tokens here
    unaligned = (Aligner(tok, tok, None)(emoji).positions[0, :-1] < 0).sum()
    assert 1 <= unaligned <= 3  # only the positions whose next token starts inside the character
    vmap = vocabulary_map(tok, len(tok), tok, len(tok))
    mapped = (vmap >= 0).nonzero().flatten()
    assert torch.equal(vmap[mapped], mapped) and len(mapped) > 150  # not the 128 bytes past ASCII, alone


def test_same_tokenizer_tells_vocabularies_of_one_size_apart():
    a, b = _byte_level(TEXTS * 20), _byte_level([t.upper() for t in TEXTS] * 20)
    assert len(a) == len(b)  # what validate compares (the vocabulary's size) cannot tell them apart
    assert same_tokenizer(a, _byte_level(TEXTS * 20)) and not same_tokenizer(a, b)


# --- a run whose teacher has its own tokenizer ---------------------------------------------------

BASE = {  # another tokenizer (a BPE of 384 tokens) and model; its quality does not matter here
    "source": "builtin:tiny-stdlib",
    "build": {**TINY_BUILD, "vocab_size": 384, "train": {**TINY_BUILD["train"], "steps": 20, "checkpoint_every": 20}},
}
CROSSED = {"loss": {"temperature": 2.0, "alpha": 0.5}, "steps": 4, "batch_size": 4, "checkpoint_every": 2}


def _crossed(*stages, **extra) -> dict:
    return {
        "name": "crossed",
        "seed": 0,
        "teacher": copy.deepcopy(TINY_TEACHER),
        "base": copy.deepcopy(BASE),
        "data": {"seq_len": 64},
        "stages": list(stages),
        "eval": {**copy.deepcopy(FAST_EVAL), "latency": {"enabled": False}},
        "pick": {"metric": "stdlib_mc/acc", "retain": 0.5},
        **extra,
    }


@pytest.mark.parametrize(
    "change, where",
    [
        ({"pick": {"metric": "heldout_ppl", "retain": 0.9}}, "pick.metric"),
        ({"stages": [{"distill": {**CROSSED, "student": {"num_layers": 1}}}]}, "stages[0].distill.loss"),
        ({"stages": [{"distill": {"student": {"from": "teacher"}, "cross_tokenizer": {}}}]}, "student.from"),
        ({"stages": [{"recover": {"hidden": {"layer_map": {0: 0}}, "loss": {"alpha": 0}}}]}, "recover.hidden"),
    ],
)
def test_a_teacher_with_its_own_tokenizer_refuses_what_reads_it_token_by_token(write_recipe, change, where):
    raw = _crossed({"distill": {**CROSSED, "cross_tokenizer": {}}}) | change
    why = "teacher's vocabulary (512) is not the base's (384)"
    with pytest.raises(UserError, match=f"{re.escape(where)}.*{re.escape(why)}"):
        load_recipe(write_recipe(raw))


@pytest.mark.parametrize(
    "knobs, message",
    [
        ({"loss": {"divergence": "reverse_kl"}}, "leave loss.divergence"),
        ({"loss": {"top_k": 8}}, "leave loss.top_k out"),
        ({"teacher_cache": {"k": 32}}, "teacher_cache.k \\(32\\) differs from cross_tokenizer.top_k \\(64\\)"),
        ({"teacher_cache": {"k": 64, "tail_samples": 8}}, "teacher_cache.tail_samples \\(8\\): the cross-tokenizer"),
        ({"teacher": "input"}, "teacher: input is the stage's own input"),
        ({"sequences": {"prompts": 2}}, "written as text by a distill stage"),
    ],
)
def test_cross_tokenizer_settings_it_cannot_serve(write_recipe, knobs, message):
    stage = {"recover": {"cross_tokenizer": {}, **knobs}}
    with pytest.raises(UserError, match=message):
        load_recipe(write_recipe(_crossed(stage)))


def test_distill_across_tokenizers_live_and_from_the_cache(write_recipe, tmp_path):
    from compressor.compare import compare, plan
    from compressor.picks import Floor, choose

    crossing = {**CROSSED, "student": {"num_layers": 1}, "cross_tokenizer": {"loss": "mapped", "top_k": 16}}
    stages = [
        {"name": "live", "distill": crossing},
        {"name": "cached", "distill": {**crossing, "teacher_cache": {"k": 16}}},
        {"name": "hidden", "distill": {**crossing, "hidden": {"layer_map": {0: 1}}}},  # at aligned positions
        # the student's own samples, re-tokenized for the teacher; the teacher's text answers as data
        {
            "name": "sampled",
            "distill": {**crossing, "on_policy": {"fraction": 1.0, "new_tokens": 8, "prompt_tokens": 8}},
        },
        {"name": "answers", "distill": {**crossing, "sequences": {"prompts": 4, "prompt_tokens": 8, "new_tokens": 12}}},
    ]
    orderings = {s["name"]: [s["name"]] for s in stages}
    pick = {"metric": "heldout_bpb", "retain": 0.01}  # bits per byte of the text: the teacher's compare
    raw = _crossed(*stages, orderings=orderings, pick=pick)
    record = compare(plan([str(write_recipe(raw))]), tmp_path / "out")
    rows = {s["ordering"]: s for s in record["stages"] if s["kind"] == "distill"}
    teacher = next(s for s in record["stages"] if s["kind"] == "teacher")
    assert "heldout_ppl" not in teacher["metrics"] and "teacher_kl" not in teacher["metrics"]
    assert "stdlib_mc/acc" in teacher["metrics"]["accuracy"]  # lm-eval's scores compare across tokenizers
    # the held-out text in either tokenizer: the teacher's bits per byte beside the students', a floor on it
    assert 0 < teacher["metrics"]["heldout_bpb"] < min(r["metrics"]["heldout_bpb"] for r in rows.values())
    assert len(choose(record["stages"], Floor(**pick))["eligible"]) == 1 + len(rows)
    for row in rows.values():
        assert "teacher_kl" not in row["metrics"] and row["metrics"]["heldout_ppl"] > 0
    info = rows["live"]["info"]["cross_tokenizer"]
    assert info["loss"] == "mapped" and info["aligned_first_batch"] > 0.5 and info["mapped_teacher_tokens"] > 100
    cache = rows["cached"]["info"]["teacher_cache"]
    assert cache["captured_rows"] == cache["rows"] > 0 and cache["tail_samples"] == 0  # one bucket across
    # the live step reads the teacher's top-k as the cache stores it: the same training
    assert rows["live"]["info"]["final_loss"] == pytest.approx(rows["cached"]["info"]["final_loss"], rel=1e-4)
    assert rows["hidden"]["info"]["final_loss"] != rows["live"]["info"]["final_loss"]
    assert rows["answers"]["info"]["teacher_answers"] == 4
    for name in ("sampled", "answers"):
        assert rows[name]["info"]["final_loss"] > 0 and rows[name]["metrics"]["heldout_ppl"] > 0
    report = (tmp_path / "out" / "live" / "report.md").read_text()
    assert "tokenizer of its own" in report
