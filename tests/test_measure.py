"""Measurement: sizes, latency fields, fidelity, and lm-eval scoring of our tasks checked by
hand against the model's own log-likelihoods."""

import math

import torch
from conftest import save_with_tokenizer, tiny_llama

from compressor.measure import LatencySpec, bytes_per_decoded_token, fidelity, latency, size
from compressor.tasks import generated_data_dir, stdlib_mc_rows


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


def test_latency_reports_every_field():
    model = tiny_llama()
    spec = LatencySpec(prompt_tokens=8, new_tokens=4, batch_sizes=[1, 3], repeats=2, warmup=0)
    out = latency(model, torch.arange(20), spec, pad_token_id=0)
    for key in (
        "prefill_ms",
        "decode_ms_per_token",
        "tokens_per_s",
        "peak_mem_bytes",
        "roofline_ms_per_token",
        "bandwidth_gb_s",
    ):
        assert out[key] > 0, key
    assert out["tokens_per_s_batch"] == 3 and set(out["tokens_per_s_by_batch"]) == {"1", "3"}
    assert out["decode_ms_range"][0] <= out["decode_ms_per_token"] <= out["decode_ms_range"][1]


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
