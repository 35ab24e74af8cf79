"""GGUF's weight types as grids: our bytes are llama.cpp's layout (gguf-py's numpy dequantize of
them equals our values bit for bit), we read llama.cpp's own bytes back exactly, the scale search
uses the importance it is given, and llama.cpp's fallback rule for rows K types do not tile."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from compressor.ggml import TYPES, fields, ggml_type, pack, quantize, type_for_row, unpack  # noqa: E402
from compressor.ggml.fit import codes  # noqa: E402


def weights(rows=48, n=512, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g) * torch.rand(rows, 1, generator=g) * 0.1
    x[0] = 0  # an all-zero row
    x[1, :40] = 0  # zero blocks inside a row
    x[2] *= 1e-4  # tiny weights (fp16 scales near their smallest normals)
    x[3, 7] = 3.0  # an outlier
    x[4] = x[4].abs()  # all positive (mins matter)
    x[5] = -x[5].abs()
    return x


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


@pytest.mark.parametrize("name", list(TYPES))
def test_our_bytes_dequantize_in_gguf_to_our_values_bit_for_bit(name):
    x = weights()
    blocks = quantize(TYPES[name], x)
    data = pack(blocks)
    assert data.shape == (x.shape[0], x.shape[1] // TYPES[name].block * TYPES[name].bytes)
    theirs = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[name]).reshape(x.shape)
    assert np.array_equal(bits(blocks.dequantize().numpy()), bits(theirs))
    again = unpack(name, data, tuple(x.shape))
    assert np.array_equal(pack(again), data)
    assert torch.equal(again.dequantize(), blocks.dequantize())


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_llama_cpps_own_bytes_read_back_exactly(name):
    """gguf-py quantizes these five as ggml-quants.c's reference does: their bytes, unpacked by us,
    give gguf's values and pack back to the same bytes."""
    x = weights(seed=1).numpy()
    kind = gguf.GGMLQuantizationType[name]
    data = gguf.quants.quantize(x, kind)
    blocks = unpack(name, data, x.shape)
    assert np.array_equal(pack(blocks), data)
    assert np.array_equal(bits(blocks.dequantize().numpy()), bits(gguf.quants.dequantize(data, kind)))


def rel_error(x, y, w=None):
    w = torch.ones_like(x) if w is None else w
    return float((w * (x - y) ** 2).sum() / (w * x**2).sum())


def test_more_bits_less_error_and_our_search_beats_plain_round_to_nearest():
    x = weights(seed=2)[6:]
    ladder = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0"]
    errors = [rel_error(x, quantize(TYPES[n], x).dequantize()) for n in ladder]
    assert errors == sorted(errors, reverse=True), dict(zip(ladder, errors))
    for name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        kind = gguf.GGMLQuantizationType[name]
        plain = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(x.numpy(), kind), kind))
        assert rel_error(x, quantize(TYPES[name], x).dequantize()) < rel_error(x, plain), name


@pytest.mark.parametrize("name", ["Q4_K", "IQ4_XS", "Q3_K", "Q4_0"])
def test_the_scale_search_spends_precision_where_the_importance_is(name):
    x = weights(seed=3)[6:]
    importance = torch.ones(x.shape[1])
    importance[::4] = 50.0  # every fourth input column matters 50x (a few hot channels)
    w = importance[None, :].expand_as(x)
    plain = quantize(TYPES[name], x).dequantize()
    weighted = quantize(TYPES[name], x, importance).dequantize()
    assert rel_error(x, weighted, w) < rel_error(x, plain, w)


# llama.cpp's weight of an imatrix entry, per type (ggml-quants.c, 0.3.36's tree): qw · sqrt(σ² + x²)
# with σ² = gain · mean x² over a span (Q4_0/Q4_1/Q5_0/Q5_1: the row; Q2_K: 256; Q3_K/Q4_K/Q5_K/IQ4_XS:
# 2× over 256; IQ4_NL: 2× over its 32), Q6_K the imatrix alone
LLAMA_SIGMA = {"Q4_0": (None, 1), "Q5_1": (None, 1), "Q2_K": (256, 1), "Q3_K": (256, 2), "Q4_K": (256, 2),
               "Q5_K": (256, 2), "IQ4_XS": (256, 2), "IQ4_NL": (32, 2), "Q6_K": (None, 0)}  # fmt: skip


@pytest.mark.parametrize("name", list(LLAMA_SIGMA))
def test_an_importance_is_weighed_per_type_as_llama_cpp_weighs_an_imatrix(name):
    from compressor.ggml.fit import element_weights

    x = weights(seed=5)[6:]
    imp = torch.rand(x.shape[1], generator=torch.Generator().manual_seed(5)) + 0.5
    span, gain = LLAMA_SIGMA[name]
    expected = torch.empty_like(x)
    for r in range(x.shape[0]):
        for j in range(0, x.shape[1], span or x.shape[1]):
            xb = x[r, j : j + (span or x.shape[1])]
            sigma2 = gain * float((xb * xb).sum()) / xb.numel()
            qw = imp[j : j + xb.numel()]
            expected[r, j : j + xb.numel()] = qw * torch.sqrt(sigma2 + xb * xb) if gain else qw
    assert torch.allclose(element_weights(TYPES[name], x, imp), expected, rtol=1e-5)


def test_codes_are_rounded_against_the_scales_as_stored():
    """Every code is the nearest level to its weight under the stored (fp16, integer) scales."""
    t = TYPES["Q4_K"]
    x = weights(seed=4)
    blocks = fields(t, x)
    scale, bias = blocks.scale_bias()
    q = codes(t, x, scale, bias)
    values = t.level_tensor()
    s, b = scale.repeat_interleave(t.sub, 1), bias.repeat_interleave(t.sub, 1)
    candidates = s[..., None] * values + b[..., None]  # every level's value at each weight
    best = (candidates - x[..., None]).abs().amin(-1)
    chosen = (candidates.gather(-1, q.long()[..., None]).squeeze(-1) - x).abs()
    assert torch.allclose(chosen, best, atol=1e-6)


def test_llama_cpps_fallback_for_rows_a_256_block_does_not_tile():
    assert type_for_row("Q4_K", 1536).name == "Q4_K"
    assert type_for_row("Q4_K", 576).name == "Q5_0"  # SmolLM2's width
    assert type_for_row("Q5_K", 576).name == "Q5_1"
    assert type_for_row("Q6_K", 576).name == "Q8_0"
    assert type_for_row("IQ4_XS", 640).name == "IQ4_NL"  # Gemma 3 270M's width
    assert type_for_row("Q2_K", 576).name == "Q4_0"
    assert type_for_row("q3_k", 576).name == "Q4_0"
    assert type_for_row("Q4_0", 48) is None
    with pytest.raises(ValueError, match="types: Q8_0"):
        ggml_type("Q4_K_M")


# --- a model on GGUF types, through GPTQ, the artifact, the exporter and llama.cpp ---------------

CPU = torch.device("cpu")
TEXT = "def main(argv):\n    parser = argparse.ArgumentParser()  # ok\n    return 0 if x else 1\n"


@pytest.fixture
def wide_folder(tmp_path, tiny_teacher_folder):
    """A random Llama 256 wide (K types tile its rows) with the tiny teacher's tokenizer."""
    from conftest import tiny_llama
    from transformers import AutoTokenizer

    def save(model, name):
        out = tmp_path / name
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(tiny_teacher_folder).save_pretrained(out)
        return out

    model = tiny_llama(hidden=256, layers=2, heads=4, kv_heads=2, inter=512, vocab=512)
    seeded = torch.Generator().manual_seed(0)  # the same model whichever tests ran (or skipped) before
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 1.0 / p.shape[1] ** 0.5 if "embed" not in name else 0.3, generator=seeded)
    return model, save


@pytest.mark.parametrize("name", list(TYPES))
def test_gptq_on_every_type_is_what_the_gguf_file_holds_and_llama_cpp_runs(name, wide_folder, tmp_path):
    pytest.importorskip("llama_cpp")
    from conftest import llama_cpp_logits

    from compressor.exporters.gguf import rotary_rows, write_gguf
    from compressor.gptq_model import run_gptq
    from compressor.models import load_pretrained
    from compressor.quantized import GGML_FILE, write_ggml
    from compressor.stages.quantize import Config

    model, save = wide_folder
    blocks = torch.randint(1, 512, (8, 32), generator=torch.Generator().manual_seed(3))
    cfg = Config(method="gptq", type=name, calibration={"samples": 8})
    types = {n: name for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    found = run_gptq(model, cfg, blocks, CPU, types=types)
    assert {b.type.name for b in found.values()} == {name}
    folder = save(model, name)
    write_ggml(folder / GGML_FILE, found)
    loaded = load_pretrained(str(folder), CPU, dtype="auto")
    path = write_gguf(loaded.model, loaded.tokenizer, folder, tmp_path / f"{name}.gguf", {}, name)
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    for i, layer in enumerate(loaded.model.model.layers):
        checked = {"self_attn.q_proj": "attn_q", "self_attn.v_proj": "attn_v", "mlp.down_proj": "ffn_down"}
        for hf, short in checked.items():
            tensor = tensors[f"blk.{i}.{short}.weight"]
            assert tensor.tensor_type.name == name
            stored = gguf.quants.dequantize(np.array(tensor.data), tensor.tensor_type)
            want = layer.get_submodule(hf).weight.detach()
            want = want[rotary_rows(want.shape[0], 4)] if short == "attn_q" else want
            assert np.array_equal(bits(stored), bits(want.numpy())), (name, short)  # the artifact is the file
    ids = loaded.tokenizer(TEXT).input_ids
    with torch.no_grad():
        ours = loaded.model(torch.tensor([ids])).logits[0].log_softmax(-1)
    theirs = llama_cpp_logits(path, ids).log_softmax(-1)
    # the same weights; llama.cpp rounds activations to 8-bit blocks in its quantized products
    assert (ours.exp() * (ours - theirs)).sum(-1).mean() < 5e-3, name


def test_a_recipe_on_a_gguf_type_is_measured_in_both_runtimes_and_exports_its_blocks(
    wide_folder, tmp_path, write_recipe
):
    pytest.importorskip("llama_cpp")
    from conftest import recipe

    from compressor.cli import main
    from compressor.pipeline import run
    from compressor.recipe import load_recipe
    from compressor.storage import Store

    model, save = wide_folder
    r = recipe({"quantize": {"method": "rtn", "type": "q4_k", "importance": True, "calibration": {"samples": 4}}})
    r["teacher"] = f"hf:{save(model, 'teacher')}"
    r["eval"].update(tasks=[], latency={"enabled": False}, runtimes=["torch", "llama.cpp"])
    record = run(load_recipe(write_recipe(r)), tmp_path / "run")
    torch_row, gguf_row = record["stages"][2], record["stages"][3]
    assert torch_row["info"]["gguf_types"] == {"Q4_K": 14} and "gguf_fallback" not in torch_row["info"]
    assert "GGUF Q4_K blocks" in torch_row["metrics"]["kernel"]
    # llama.cpp runs the same weights torch measures (a wrong block layout gives KL far above 1); a random
    # model's Q4_K KL is ~0.05 on its own (below 0.05 in the working checkout, 0.0552 in a fresh clone), so
    # the bound leaves room and the two runtimes are held to each other instead
    kl_torch, kl_llama = torch_row["metrics"]["teacher_kl"], gguf_row["metrics"]["teacher_kl"]
    assert gguf_row["runtime"] == "llama.cpp" and kl_llama < 0.1 and abs(kl_llama - kl_torch) < 0.1 * kl_torch
    out = tmp_path / "gguf"
    assert main(["export", str(tmp_path / "run"), "--format", "gguf", "--out", str(out)]) == 0
    exported = next(out.glob("*.gguf"))
    # the measured file is the exported one: the same tensors byte for byte, the same metadata but its name
    # (the runtime's copy is named by the artifact's key, the export by the stage's)
    (measured,) = (Store().root / "deployed").glob(f"{torch_row['key']}-*/model.gguf")
    assert gguf_row["metrics"]["bytes"] == measured.stat().st_size
    reader, theirs = gguf.GGUFReader(exported), gguf.GGUFReader(measured)
    assert [(t.name, t.tensor_type, bytes(t.data)) for t in reader.tensors] == [
        (t.name, t.tensor_type, bytes(t.data)) for t in theirs.tensors
    ]
    fields = lambda r: {k: f.contents() for k, f in r.fields.items() if k not in ("general.name", "GGUF.kv_count")}  # noqa: E731
    assert fields(reader) == fields(theirs)
    assert {t.tensor_type.name for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) == 2} == {"Q4_K"}


def test_rows_k_types_do_not_tile_fall_back_and_a_clash_or_misfit_is_one_line(tmp_path, write_recipe, capsys):
    from conftest import recipe

    from compressor.cli import main

    clash = recipe({"quantize": {"method": "gptq", "type": "Q4_K", "bits": 4}})
    assert main(["validate", str(write_recipe(clash, "a.yaml"))]) == 2
    assert "stages[0].quantize: bits: type Q4_K is the whole grid; leave bits out" in capsys.readouterr().err
    wrong = recipe({"quantize": {"method": "rtn", "type": "Q4_K_M"}})
    assert main(["validate", str(write_recipe(wrong, "b.yaml"))]) == 2
    assert "GGUF type 'Q4_K_M' is not one we write" in capsys.readouterr().err
    gptq_importance = recipe({"quantize": {"method": "gptq", "type": "Q4_0", "importance": True}})
    assert main(["validate", str(write_recipe(gptq_importance, "c.yaml"))]) == 2
    assert "gptq always weighs by its Hessian" in capsys.readouterr().err
    qat_clash = recipe({"qat": {"mix": "Q4_K_M", "group_size": 32, "steps": 2}})
    assert main(["validate", str(write_recipe(qat_clash, "d.yaml"))]) == 2
    assert "stages[0].qat: group_size: mix Q4_K_M is the whole grid; leave group_size out" in capsys.readouterr().err
    qat_type = recipe({"qat": {"type": "Q4_0", "steps": 2, "calibration": {"samples": 4}}})
    assert main(["validate", str(write_recipe(qat_type, "e.yaml"))]) == 0  # rtn on a type calibrates its importance


def test_llama_cpps_mix_rules_on_smollm2_and_gemma_shapes():
    from compressor.ggml.mixes import preset_types, use_more_bits
    from compressor.ggml.model import shape_tensors

    smol = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9}
    smol |= {"num_key_value_heads": 3, "head_dim": 64, "tie_word_embeddings": True}
    types = preset_types("Q4_K_M", shape_tensors(smol), smol, imatrix=True)
    assert types["token_embd"] == "Q8_0"  # tied: the output's rule, and 576 does not tile Q4_K's blocks
    assert types["blk.0.attn_q"] == "Q5_0" and types["blk.0.ffn_down"] == "Q6_K"  # fallback; first eighth
    assert [types[f"blk.{i}.attn_v"] for i in (0, 3, 4, 5)] == ["Q8_0", "Q5_0", "Q5_0", "Q8_0"]  # Q6_K falls back
    assert [use_more_bits(i, 30) for i in range(8)] == [True, True, True, False, False, True, False, False]
    gemma = {"hidden_size": 640, "intermediate_size": 2048, "num_hidden_layers": 18, "num_attention_heads": 4}
    gemma |= {"num_key_value_heads": 1, "head_dim": 256, "tie_word_embeddings": True}
    q2 = preset_types("Q2_K", shape_tensors(gemma), gemma, imatrix=True)
    assert q2["blk.5.attn_v"] == "Q5_0" and q2["blk.5.ffn_down"] == "Q3_K"  # n_gqa 4: Q4_K, falls back
    assert q2["blk.5.attn_output"] == "Q3_K" and q2["token_embd"] == "Q8_0"
    iq4 = preset_types("IQ4_XS", shape_tensors(gemma), gemma, imatrix=False)
    assert iq4["blk.0.ffn_down"] == "Q5_K" and iq4["blk.9.ffn_down"] == "IQ4_XS" and iq4["blk.0.attn_q"] == "IQ4_NL"


def test_a_mix_quantizes_the_embedding_too_and_the_file_holds_every_block(wide_folder, tmp_path, write_recipe):
    pytest.importorskip("llama_cpp")
    from conftest import recipe

    from compressor.cli import main
    from compressor.pipeline import run
    from compressor.recipe import load_recipe

    model, save = wide_folder
    r = recipe({"quantize": {"method": "gptq", "mix": "Q4_K_M", "calibration": {"samples": 4}}})
    r["teacher"] = f"hf:{save(model, 'teacher')}"
    r["eval"].update(tasks=[], latency={"enabled": False}, runtimes=["torch", "llama.cpp"])
    record = run(load_recipe(write_recipe(r)), tmp_path / "run")
    info = record["stages"][2]["info"]
    # of 2 layers the last gets more bits in attn_v and ffn_down; the tied embedding takes the output's Q6_K
    assert info["gguf_allocation"]["attn_v"] == info["gguf_allocation"]["ffn_down"] == {"Q4_K": 1, "Q6_K": 1}
    assert info["gguf_allocation"]["token_embd"] == {"Q6_K": 1} and info["gguf_allocation"]["attn_q"] == {"Q4_K": 2}
    in_torch, in_llama = record["stages"][2]["metrics"], record["stages"][3]["metrics"]
    assert abs(in_llama["teacher_kl"] - in_torch["teacher_kl"]) < 0.1 * in_torch["teacher_kl"]  # the same weights
    out = tmp_path / "gguf"
    assert main(["export", str(tmp_path / "run"), "--format", "gguf", "--out", str(out)]) == 0
    reader = gguf.GGUFReader(next(out.glob("*.gguf")))
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert embd.tensor_type.name == "Q6_K"
    from compressor.models import load_pretrained

    loaded = load_pretrained(record["stages"][2]["artifact"], CPU, dtype="auto")
    stored = gguf.quants.dequantize(np.array(embd.data), embd.tensor_type)
    assert np.array_equal(bits(stored), bits(loaded.model.get_input_embeddings().weight.detach().numpy()))
    with pytest.raises(Exception, match="type and mix"):
        load_recipe(write_recipe(recipe({"quantize": {"method": "gptq", "mix": "Q4_K_M", "type": "Q4_K"}}), "x.yaml"))


@pytest.mark.parametrize("tie", [True, False])
def test_the_importance_pass_measures_the_heads_input_without_running_the_head(tie):
    """Every Linear's mean squared input, the head's included, as hooks on a whole forward see
    them; the head itself never runs (a 262k vocabulary's logits are ~2 GB a batch)."""
    from conftest import tiny_llama

    from compressor.ggml.model import activation_importance
    from compressor.quant import Importance

    model = tiny_llama(hidden=64, layers=2, tie=tie)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert "lm_head" in linears
    blocks = torch.randint(0, 512, (6, 32), generator=torch.Generator().manual_seed(0))
    hooks = Importance(linears)
    with torch.no_grad():
        for batch in blocks.split(4):
            model(input_ids=batch, use_cache=False)
    expected = hooks.close()

    def refuse(*_):
        raise AssertionError("the head ran")

    handle = model.get_output_embeddings().register_forward_hook(refuse)
    found = activation_importance(model, linears, blocks, 4)
    handle.remove()
    assert found.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(found[name], expected[name], rtol=1e-5, atol=1e-7)


def test_the_budget_buys_the_largest_error_drop_per_byte_and_refuses_what_cannot_fit():
    from compressor.ggml.budget import allocate

    sizes = {"a": {"Q2_K": 10, "Q4_K": 20, "Q8_0": 40}, "b": {"Q2_K": 10, "Q4_K": 20, "Q8_0": 40}}
    errors = {"a": {"Q2_K": 100.0, "Q4_K": 10.0, "Q8_0": 1.0}, "b": {"Q2_K": 5.0, "Q4_K": 1.0, "Q8_0": 0.1}}
    assert allocate(errors, sizes, 20) == {"a": "Q2_K", "b": "Q2_K"}
    assert allocate(errors, sizes, 30) == {"a": "Q4_K", "b": "Q2_K"}  # a's drop per byte is 9, b's 0.4
    assert allocate(errors, sizes, 80) == {"a": "Q8_0", "b": "Q8_0"}
    with pytest.raises(ValueError, match="smallest mix is 20 bytes"):
        allocate(errors, sizes, 19)


def test_a_byte_budget_picks_types_per_matrix_and_meets_it(wide_folder, tmp_path, write_recipe, capsys):
    from conftest import recipe

    from compressor.cli import main
    from compressor.pipeline import run
    from compressor.recipe import load_recipe

    model, save = wide_folder
    teacher = f"hf:{save(model, 'teacher')}"
    r = recipe({"quantize": {"method": "rtn", "target_bits": 4.5, "calibration": {"samples": 4}}}, teacher=teacher)
    r["eval"].update(tasks=[], latency={"enabled": False})
    record = run(load_recipe(write_recipe(r)), tmp_path / "run")
    info = record["stages"][1]["info"]
    assert 4.0 < info["gguf_bits_per_weight"] <= 4.5
    assert len(info["gguf_types"]) > 1  # a mix, not one type
    small = recipe({"quantize": {"method": "gptq", "target_bits": 2.2}}, teacher=teacher)
    assert main(["validate", str(write_recipe(small, "small.yaml"))]) == 2
    assert "no mix of GGUF types is that small for this model; the smallest is 2.62" in capsys.readouterr().err


def test_qat_on_a_gguf_type_trains_through_the_files_values_from_its_start(wide_folder, tmp_path, write_recipe):
    """QAT keeps the starting quantization's stored fields, ends closer to the teacher than that
    start, and its file is its artifact: llama.cpp measures what torch measures."""
    pytest.importorskip("llama_cpp")
    from conftest import recipe

    from compressor.cli import main
    from compressor.pipeline import run
    from compressor.quantized import read_ggml
    from compressor.recipe import load_recipe

    model, save = wide_folder
    teacher = f"hf:{save(model, 'teacher')}"
    calibration = {"samples": 8}
    start = {"quantize": {"method": "rtn", "type": "Q4_K", "importance": True, "calibration": calibration}}
    loss = {"divergence": "forward_kl", "alpha": 1.0, "temperature": 1.0}
    qat = {"qat": {"type": "Q4_K", "calibration": calibration, "steps": 64, "batch_size": 4, "lr": 3e-4, "loss": loss}}
    records = []
    for i, stage in enumerate((start, qat)):
        r = recipe(stage, teacher=teacher)
        r["eval"].update(tasks=[], latency={"enabled": False}, runtimes=["torch", "llama.cpp"])
        records.append(run(load_recipe(write_recipe(r, f"{i}.yaml")), tmp_path / str(i)))
    ptq, trained, in_llama = (
        next(s for s in records[i]["stages"] if s["name"] == name and s["runtime"] == runtime)
        for i, name, runtime in ((0, "quantize", "torch"), (1, "qat", "torch"), (1, "qat", "llama.cpp"))
    )
    assert trained["info"]["fake_quantized"] == 14 and trained["info"]["gguf_types"] == {"Q4_K": 14}
    assert trained["metrics"]["teacher_kl"] < 0.97 * ptq["metrics"]["teacher_kl"]
    kl = trained["metrics"]["teacher_kl"]
    assert in_llama["runtime"] == "llama.cpp" and abs(in_llama["metrics"]["teacher_kl"] - kl) < 0.1 * kl
    before, after = read_ggml(ptq["artifact"]), read_ggml(trained["artifact"])
    moved = 0
    for name, b in after.items():  # the fields are the start's; only the codes moved
        assert torch.equal(b.d, before[name].d) and torch.equal(b.sc, before[name].sc), name
        assert torch.equal(b.mn, before[name].mn), name
        moved += int((b.q != before[name].q).sum())
    assert moved > 0
    out = tmp_path / "gguf"
    assert main(["export", str(tmp_path / "1"), "--format", "gguf", "--out", str(out)]) == 0
    from compressor.models import load_pretrained

    loaded = load_pretrained(trained["artifact"], CPU, dtype="auto")
    tensor = next(t for t in gguf.GGUFReader(next(out.glob("*.gguf"))).tensors if t.name == "blk.1.ffn_down.weight")
    stored = gguf.quants.dequantize(np.array(tensor.data), tensor.tensor_type)
    want = loaded.model.model.layers[1].mlp.down_proj.weight.detach().numpy()
    assert np.array_equal(bits(stored), bits(want))


def test_reading_a_gguf_file_back_undoes_the_rotary_row_order(wide_folder, tmp_path):
    """read_blocks (how the llamacpp stage reads llama-quantize's file) is write_gguf's inverse."""
    from compressor.exporters.gguf import read_blocks, write_gguf
    from compressor.ggml.model import quantize_model, tensors
    from compressor.models import load_pretrained
    from compressor.quantized import GGML_FILE, write_ggml

    model, save = wide_folder
    types = {name: "Q4_K" for name, *_ in tensors(model)}  # the tied embedding too
    settings = SimpleNamespace(importance=False)
    found = quantize_model(model, types, "rtn", lambda: None, settings)
    folder = save(model, "q4k")
    write_ggml(folder / GGML_FILE, found)
    loaded = load_pretrained(str(folder), CPU, dtype="auto")
    path = write_gguf(loaded.model, loaded.tokenizer, folder, tmp_path / "q4k.gguf", {}, "q4k")
    back = read_blocks(loaded.model, path)
    assert back.keys() == found.keys()
    for name, blocks in found.items():
        for field in ("q", "d", "dmin", "sc", "mn"):
            assert torch.equal(getattr(back[name], field), getattr(blocks, field)), (name, field)
