import pytest
import torch
from conftest import save_with_tokenizer, tiny_llama
from pydantic import ValidationError

from compressor import UserError
from compressor.models import evenly_spaced, fresh_model, keep_layers, load_pretrained
from compressor.teachers import TeacherSpec, load_teacher


def _layer_outputs(model, ids):
    return model(input_ids=ids, output_hidden_states=True).hidden_states


def test_keep_layers_is_the_same_computation_and_generates_with_a_cache(tmp_path):
    model = tiny_llama(layers=4)
    student = keep_layers(model, [0, 2])
    assert student.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]
    assert model.config.num_hidden_layers == 4  # the input is untouched
    ids = torch.randint(0, 512, (2, 12))
    # by hand: embeddings -> layer 0 -> layer 2 -> norm -> head
    with torch.no_grad():
        h = model.model.embed_tokens(ids)
        pos = torch.arange(12).unsqueeze(0)
        rope = model.model.rotary_emb(h, position_ids=pos)
        mask = torch.full((12, 12), float("-inf")).triu(1)[None, None]
        for i in (0, 2):
            h = model.model.layers[i](h, attention_mask=mask, position_embeddings=rope, position_ids=pos)
        want = model.lm_head(model.model.norm(h))
        got = student(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    save_with_tokenizer(student, tmp_path)
    reloaded = load_pretrained(str(tmp_path), torch.device("cpu"), dtype="auto").model
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, got, rtol=0, atol=0)
        cached = reloaded.generate(ids[:1, :5], max_new_tokens=6, do_sample=False, pad_token_id=0)
        # greedy decoding with the KV cache equals argmax over full forwards
        seq = ids[:1, :5]
        for _ in range(6):
            nxt = reloaded(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(cached, seq)


def test_keep_layers_refuses_bad_indices():
    with pytest.raises(UserError, match=r"\[0, 2\]"):
        keep_layers(tiny_llama(layers=3), [0, 3])


def test_evenly_spaced_keeps_first_and_last():
    assert evenly_spaced(12, 4) == [0, 4, 7, 11]
    assert evenly_spaced(4, 1) == [0]
    assert evenly_spaced(4, 4) == [0, 1, 2, 3]


def test_fresh_model_is_narrower_and_seeded():
    base = tiny_llama(hidden=64, heads=4, kv_heads=2)
    a = fresh_model(base, {"hidden_size": 32, "intermediate_size": 64}, seed=1)
    b = fresh_model(base, {"hidden_size": 32, "intermediate_size": 64}, seed=1)
    assert a.config.hidden_size == 32 and a.config.head_dim == 8
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    with pytest.raises(UserError, match="no field"):
        fresh_model(base, {"hidden_sise": 32}, seed=0)


def test_hf_local_folder_teacher_loads_and_is_identified_by_content(tmp_path):
    save_with_tokenizer(tiny_llama(), tmp_path)
    spec = TeacherSpec.model_validate(f"hf:{tmp_path}")
    first = spec.identity()
    loaded = load_teacher(spec, torch.device("cpu"))
    assert loaded.folder == tmp_path and loaded.model.config.num_hidden_layers == 3
    assert spec.shape()["num_hidden_layers"] == 3
    tiny_llama(seed=5).save_pretrained(tmp_path)
    assert TeacherSpec.model_validate(f"hf:{tmp_path}").identity() != first


def test_teacher_spec_refuses_what_cannot_load(tmp_path):
    with pytest.raises(ValidationError, match="no model folder"):
        TeacherSpec.model_validate(f"hf:{tmp_path}")
    with pytest.raises(ValidationError, match="only applies to builtin"):
        TeacherSpec.model_validate({"source": f"hf:{tmp_path}", "build": {}})
    # a hub id is accepted at validation (the hub is the user's); loading it here fails cleanly
    spec = TeacherSpec.model_validate("hf:someone/some-model")
    with pytest.raises(UserError, match="someone/some-model: not in the local Hugging Face cache"):
        load_teacher(spec, torch.device("cpu"))
