"""Measurement: sizes, latency fields, fidelity, and lm-eval scoring of our tasks checked by
hand against the model's own log-likelihoods."""

import json
import math

import pytest
import torch
from conftest import save_with_tokenizer, tiny_llama

from compressor.measure import LatencySpec, bytes_per_decoded_token, fidelity, latency, size
from compressor.models import load_pretrained
from compressor.tasks import evaluate, generated_data_dir, local_task_names, materialize, stdlib_mc_rows


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


@pytest.fixture(scope="module")
def scored_model(tmp_path_factory):
    folder = save_with_tokenizer(tiny_llama(seed=3), tmp_path_factory.mktemp("m"))
    return load_pretrained(str(folder), torch.device("cpu"))


def _loglik(model, tokenizer, context: str, continuation: str) -> float:
    ctx = tokenizer(context, add_special_tokens=False).input_ids
    cont = tokenizer(continuation, add_special_tokens=False).input_ids
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
    return sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))


def test_a_user_task_folder_with_relative_data_scores_like_a_hand_computation(tmp_path, scored_model):
    """The documented no-Python step: a YAML beside a JSONL file; acc checked by hand."""
    (tmp_path / "mine.jsonl").write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"q": "t1 t2", "choices": ["t3", "t4 t5"], "label": 0},
                {"q": "t6", "choices": ["t7", "t8", "t9"], "label": 2},
                {"q": "t10 t11 t12", "choices": ["t13", "t14"], "label": 1},
            ]
        )
        + "\n"
    )
    (tmp_path / "mine.yaml").write_text(
        "task: my_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: mine.jsonl\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: choices\n"
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n"
    )
    assert "my_mc" in local_task_names((tmp_path,))
    got = evaluate(scored_model.model, scored_model.tokenizer, ["my_mc"], task_dirs=(tmp_path,), batch_size=2)
    rows = [json.loads(line) for line in (tmp_path / "mine.jsonl").read_text().splitlines()]
    correct = 0
    for row in rows:
        scores = [_loglik(scored_model.model, scored_model.tokenizer, row["q"], " " + c) for c in row["choices"]]
        correct += int(max(range(len(scores)), key=scores.__getitem__) == row["label"])
    assert got["my_mc/acc"] == pytest.approx(correct / len(rows))
    materialized = materialize((tmp_path,))
    text = next(materialized.rglob("mine.yaml")).read_text()
    assert str(tmp_path / "mine.jsonl") in text  # the relative path was made absolute
