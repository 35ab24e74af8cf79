"""Measurement: sizes, latency fields, fidelity, and lm-eval scoring of our tasks checked by
hand against the model's own log-likelihoods."""

import math
import time

import pytest
import torch
from conftest import save_with_tokenizer, tiny_llama

from compressor.evaldata import generated_data_dir, stdlib_mc_rows
from compressor.latency import LatencySpec, Timed, TorchRunner, bytes_per_decoded_token, faster, time_models
from compressor.measure import fidelity, size


def test_size_counts_tied_weights_once_and_reads_the_disk(tmp_path):
    model = tiny_llama(tie=True)
    save_with_tokenizer(model, tmp_path)
    got = size(model, tmp_path)
    assert got["params"] == sum(p.numel() for p in model.parameters())
    assert got["params"] < sum(p.numel() for p in model.state_dict().values())  # lm_head shares the embedding
    assert abs(got["bits_per_param"] - 32) < 0.2


def test_bytes_per_token_counts_an_untied_embedding_row_not_the_table():
    tied, untied = tiny_llama(tie=True), tiny_llama(tie=False)
    emb = untied.get_input_embeddings().weight
    weights = sum(p.numel() * 4 for p in untied.parameters())
    assert bytes_per_decoded_token(untied, 0) == weights - emb.numel() * 4
    assert bytes_per_decoded_token(tied, 0) == sum(p.numel() * 4 for p in tied.parameters())


def test_models_timed_in_interleaved_rounds_report_every_field():
    models = {"a": tiny_llama(seed=0), "b": tiny_llama(seed=1, layers=1)}
    spec = LatencySpec(prompt_tokens=8, new_tokens=4, batch_sizes=[1, 3], repeats=3, warmup=0)
    timed = [Timed(k, k, lambda m=m: TorchRunner(m, 0)) for k, m in models.items()]
    out = time_models(timed, torch.arange(20), spec, torch.device("cpu"))
    for figures in out["models"].values():
        for key in ("prefill_ms", "decode_ms_per_token", "tokens_per_s", "peak_mem_bytes", "roofline_ms_per_token"):
            assert figures[key] > 0, key
        assert figures["tokens_per_s_batch"] == 3 and set(figures["tokens_per_s_by_batch"]) == {"1", "3"}
        assert len(figures["decode_ms_samples"]) == 3 and figures["rounds"] == 3
        assert figures["decode_ms_per_token"] == min(figures["decode_ms_samples"])  # the estimator: the minimum
        assert figures["decode_ms_range"] == [min(figures["decode_ms_samples"]), max(figures["decode_ms_samples"])]
    session = out["session"]
    assert session["rounds"] == 3 and session["models"] == 2 and len(session["load_average_before"]) == 3


def test_decode_time_is_clocked_inside_generate_not_left_over_from_a_slow_prefill(monkeypatch):
    # a burst of load during the separately timed prefill once made decode = generate - prefill negative
    slow = TorchRunner.prefill

    def stalled(self, ids):
        time.sleep(0.3)
        slow(self, ids)

    monkeypatch.setattr(TorchRunner, "prefill", stalled)
    spec = LatencySpec(prompt_tokens=8, new_tokens=4, batch_sizes=[1], repeats=2, warmup=0)
    timed = [Timed("a", "a", lambda: TorchRunner(tiny_llama(), 0))]
    out = time_models(timed, torch.arange(20), spec, torch.device("cpu"))
    figures = out["models"]["a"]
    assert figures["prefill_ms"] >= 300
    assert 0 < figures["decode_ms_per_token"] < 300


def test_a_win_needs_every_round_and_more_than_the_spread():
    assert faster([1.0, 1.1, 1.0], [2.0, 2.1, 2.2])  # faster in every round, far beyond the spread
    assert not faster([1.0, 2.5, 1.0], [2.0, 2.1, 2.2])  # slower in one round: a tie
    assert not faster([1.0, 1.0, 1.0], [1.01, 1.01, 1.01])  # every round, but by less than 2%
    assert not faster([1.0, 1.5, 1.9], [1.6, 1.7, 2.0])  # every round, but within its own spread (50%)


def test_fidelity_of_a_model_to_itself_and_to_another():
    a, b = tiny_llama(seed=0), tiny_llama(seed=1)
    blocks = torch.randint(0, 512, (3, 10))
    same = fidelity(a, a, blocks, batch_size=2)
    assert abs(same["teacher_kl"]) < 1e-6 and same["top1_agreement"] == 1.0
    other = fidelity(b, a, blocks, batch_size=2)
    assert other["teacher_kl"] > 0.01 and other["top1_agreement"] < 1
    # perplexity by hand
    with torch.no_grad():
        logp = a(input_ids=blocks).logits[:, :-1].log_softmax(-1)
    nll = -logp.gather(-1, blocks[:, 1:, None]).mean().item()
    assert math.isclose(same["heldout_ppl"], math.exp(nll), rel_tol=1e-5)


def test_bits_per_byte_count_the_scored_tokens_text(tmp_path):
    from transformers import AutoTokenizer

    model = tiny_llama(seed=0)
    tokenizer = AutoTokenizer.from_pretrained(save_with_tokenizer(model, tmp_path / "m"))
    blocks = torch.randint(0, 512, (3, 10))
    blocks[1, 4] = 0  # the end-of-text token: its loss counts, it spells no text
    out = fidelity(model, None, blocks, batch_size=2, tokenizer=tokenizer)
    # by hand: the word-level tokens t<i>, space-separated, every row's first token unscored
    text_bytes = sum(len(" ".join(f"t{i}" for i in row[1:] if i != 0)) for row in blocks.tolist())
    nats = math.log(out["heldout_ppl"]) * out["heldout_tokens"]
    assert out["heldout_tokens"] == 27
    assert math.isclose(out["heldout_bpb"], nats / math.log(2) / text_bytes, rel_tol=1e-9)
    assert "heldout_bpb" not in fidelity(model, None, blocks, batch_size=2)  # no tokenizer, no bytes


def test_stdlib_mc_data_is_deterministic_minimal_pairs():
    rows = stdlib_mc_rows(n_items=50)
    assert rows == stdlib_mc_rows(n_items=50)
    for row in rows:
        assert len(row["choices"]) == 4 and len(set(row["choices"])) == 4 and 0 <= row["label"] < 4
        true = row["choices"][row["label"]]
        for choice in row["choices"]:  # every distractor is the true line's words, reordered
            assert sorted(choice.split()) == sorted(true.split())
    assert len({r["label"] for r in rows}) == 4
    assert (generated_data_dir() / "stdlib_mc.jsonl").is_file()


def test_our_bounded_loglikelihoods_equal_lm_evals_own(tmp_path):
    """scoring.loglikelihoods replaces HFLM._loglikelihood_tokens: same inputs (left truncation,
    right padding, longest first), same (log-likelihood, is greedy) per request."""
    from lm_eval.models.huggingface import HFLM

    from compressor.scoring import loglikelihoods

    model = tiny_llama(seed=4)
    save_with_tokenizer(model, tmp_path)
    from transformers import AutoTokenizer

    lm = HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(tmp_path), batch_size=3, max_length=12)
    g = torch.Generator().manual_seed(0)
    requests = []
    for n_ctx, n_cont in ((3, 1), (5, 2), (10, 4), (1, 1), (14, 3), (7, 12)):  # some longer than 12: truncated
        ctx, cont = torch.randint(1, 512, (n_ctx,), generator=g).tolist(), torch.randint(1, 512, (n_cont,), generator=g)
        requests.append(((None, None), ctx, cont.tolist()))
    with torch.no_grad():
        theirs = HFLM._loglikelihood_tokens(lm, requests, disable_tqdm=True)
    ours = loglikelihoods(model, [(c, t) for _, c, t in requests], max_length=12, batch_size=3)
    for (a, greedy_a), (b, greedy_b) in zip(ours, theirs):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-4) and greedy_a == greedy_b
