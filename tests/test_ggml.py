"""GGUF's weight types as grids: our bytes are llama.cpp's layout (gguf-py's numpy dequantize of
them equals our values bit for bit), we read llama.cpp's own bytes back exactly, the scale search
uses the importance it is given, and llama.cpp's fallback rule for rows K types do not tile."""

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
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 1.0 / p.shape[1] ** 0.5 if "embed" not in name else 0.3)
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
    found = run_gptq(model, Config(method="gptq", type=name, calibration={"samples": 8}), blocks, CPU)
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

    model, save = wide_folder
    r = recipe({"quantize": {"method": "rtn", "type": "q4_k", "importance": True, "calibration": {"samples": 4}}})
    r["teacher"] = f"hf:{save(model, 'teacher')}"
    r["eval"].update(tasks=[], latency={"enabled": False}, runtimes=["torch", "llama.cpp"])
    record = run(load_recipe(write_recipe(r)), tmp_path / "run")
    torch_row, gguf_row = record["stages"][2], record["stages"][3]
    assert torch_row["info"]["gguf_types"] == {"Q4_K": 14} and "gguf_fallback" not in torch_row["info"]
    assert "GGUF Q4_K blocks" in torch_row["metrics"]["kernel"]
    assert gguf_row["runtime"] == "llama.cpp" and gguf_row["metrics"]["teacher_kl"] < 0.05
    out = tmp_path / "gguf"
    assert main(["export", str(tmp_path / "run"), "--format", "gguf", "--out", str(out)]) == 0
    exported = next(out.glob("*.gguf"))
    assert gguf_row["metrics"]["bytes"] == exported.stat().st_size  # the measured file is the exported one
    reader = gguf.GGUFReader(exported)
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
