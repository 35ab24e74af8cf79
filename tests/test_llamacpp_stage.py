"""llama.cpp's own quantizer as a stage, and its importance-matrix file written from our calibration.

The format checks run anywhere (gguf's reader); the stage runs llama-quantize and skips where
llama.cpp's tools are not built (`python -m compressor.llamacpp_tools`; CI builds none)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
CPU = torch.device("cpu")


def needs_tool(tool: str):
    from compressor.llamacpp_tools import missing_tool

    why = missing_tool(tool)
    if why:
        pytest.skip(why)


def test_our_imatrix_file_holds_llama_imatrixs_fields_and_reads_back(tmp_path):
    from conftest import tiny_llama

    from compressor.ggml.imatrix import read_imatrix, write_imatrix
    from compressor.ggml.model import activation_importance, tensors

    model = tiny_llama(hidden=64, layers=2)
    listed = tensors(model)
    modules = dict(model.named_modules())
    linears = {n: modules[n] for n, _, layer, _ in listed if layer is not None}
    blocks = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(0))
    importance = activation_importance(model, linears, blocks, 2)
    path = write_imatrix(tmp_path / "imatrix.gguf", importance, blocks.numel(), listed, 32, "test")
    reader = gguf.GGUFReader(path)
    fields = {k: reader.fields[k].contents() for k in ("general.type", "imatrix.chunk_count", "imatrix.chunk_size")}
    assert fields == {"general.type": "imatrix", "imatrix.chunk_count": 6, "imatrix.chunk_size": 32}
    names = [t.name for t in reader.tensors]
    assert names[:2] == ["blk.0.attn_k.weight.in_sum2", "blk.0.attn_k.weight.counts"]  # sorted, as llama-imatrix
    assert len(names) == 2 * 7 * 2 and all(t.tensor_type.name == "F32" for t in reader.tensors)
    back = read_imatrix(path)
    for name, role, layer, _ in listed:
        if layer is not None:
            torch.testing.assert_close(back[f"blk.{layer}.{role}.weight"], importance[name].float(), rtol=1e-5, atol=0)


def test_llama_imatrix_and_ours_agree_on_the_same_tokens(tmp_path, tiny_teacher_folder):
    """llama-imatrix on a text and our pass on the same token ids: the same tensors, the same statistics."""
    needs_tool("llama-imatrix")
    from compressor.exporters.gguf import write_gguf
    from compressor.ggml.imatrix import read_imatrix, write_imatrix
    from compressor.ggml.model import activation_importance, tensors
    from compressor.llamacpp_tools import run_tool
    from compressor.models import load_pretrained

    loaded = load_pretrained(str(tiny_teacher_folder), CPU, dtype="auto")
    model, tokenizer = loaded.model.float(), loaded.tokenizer
    f32 = write_gguf(model, tokenizer, tiny_teacher_folder, tmp_path / "f32.gguf", {"weights": "f32"}, "t")
    text = " ".join(f"def f{i}(x):\n    return x * {i} + len(str(x))\n" for i in range(400))
    (tmp_path / "text.txt").write_text(text)
    theirs = tmp_path / "theirs.gguf"
    run_tool("llama-imatrix", "-m", str(f32), "-f", str(tmp_path / "text.txt"), "-o", str(theirs), "-c", "64")
    ids = torch.tensor(tokenizer(text).input_ids)
    chunks = read_imatrix(theirs)  # llama-imatrix scores whole chunks of -c tokens from the start
    n = int(gguf.GGUFReader(theirs).fields["imatrix.chunk_count"].contents())
    blocks = ids[: n * 64].view(n, 64)
    listed = tensors(model)
    modules = dict(model.named_modules())
    linears = {name: modules[name] for name, _, layer, _ in listed if layer is not None}
    ours = read_imatrix(write_imatrix(tmp_path / "ours.gguf", activation_importance(model, linears, blocks, 4),
                                      blocks.numel(), listed, 64, "t"))  # fmt: skip
    assert ours.keys() == chunks.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], chunks[key], rtol=2e-2, atol=1e-4)


@pytest.fixture
def llamacpp_run(tmp_path, write_recipe, tiny_teacher_folder):
    needs_tool("llama-quantize")
    pytest.importorskip("llama_cpp")
    from conftest import recipe

    from compressor.pipeline import run
    from compressor.recipe import load_recipe

    def go(name: str, stage: dict) -> dict:
        r = recipe({"llamacpp": stage}, teacher=f"hf:{tiny_teacher_folder}")
        r["eval"].update(tasks=[], latency={"enabled": False}, runtimes=["torch", "llama.cpp"])
        record = run(load_recipe(write_recipe(r, f"{name}.yaml")), tmp_path / name)
        torch_row, llama_row = (s for s in record["stages"] if s["name"] == "llamacpp")
        return torch_row, llama_row

    return go


def test_llama_cpps_quantizer_as_a_stage_is_measured_on_its_own_file(llamacpp_run, tmp_path, tiny_teacher_folder):
    from compressor.exporters.gguf import read_blocks, write_gguf
    from compressor.llamacpp_tools import run_tool
    from compressor.models import load_pretrained
    from compressor.quantized import read_ggml

    plain, in_llama = llamacpp_run("plain", {"type": "Q4_0", "imatrix": False})
    assert plain["info"]["gguf_types"] == {"Q4_0": 14, "Q8_0": 1}  # the tied embedding is the output: Q8_0
    assert plain["info"]["llamacpp"]["imatrix"] is False
    kl = plain["metrics"]["teacher_kl"]
    assert in_llama["runtime"] == "llama.cpp" and abs(in_llama["metrics"]["teacher_kl"] - kl) < 0.1 * kl + 1e-4
    # the blocks are llama-quantize's own: quantize the teacher's F32 file here and compare
    teacher = load_pretrained(str(tiny_teacher_folder), CPU, dtype="auto")
    f32 = write_gguf(teacher.model.float(), teacher.tokenizer, tiny_teacher_folder, tmp_path / "f32.gguf",
                     {"weights": "f32", "embeddings": "f32"}, "t")  # fmt: skip
    direct = tmp_path / "direct.gguf"
    run_tool("llama-quantize", str(f32), str(direct), "Q4_0", "2")
    artifact = load_pretrained(plain["artifact"], CPU, dtype="auto")
    theirs, stored = read_blocks(artifact.model, direct), read_ggml(plain["artifact"])
    assert theirs.keys() == {k.removesuffix(".weight") for k in stored}
    for name, blocks in theirs.items():
        mine = stored[f"{name}.weight"]
        assert torch.equal(blocks.q, mine.q) and torch.equal(blocks.d, mine.d), name
        weight = artifact.model.get_submodule(name).weight.detach()
        assert torch.equal(blocks.dequantize(), weight), name  # the artifact computes with the file's values


def test_the_imatrix_reaches_llama_quantize_and_bad_settings_are_one_line(llamacpp_run, write_recipe, capsys):
    from conftest import recipe

    from compressor.cli import main
    from compressor.quantized import read_ggml

    weighted, _ = llamacpp_run("weighted", {"type": "Q4_K_M", "calibration": {"samples": 8}})
    plain, _ = llamacpp_run("plain", {"type": "Q4_K_M", "imatrix": False})
    assert weighted["info"]["calibration_samples"] == 8 and weighted["info"]["llamacpp"]["imatrix"] is True
    a, b = read_ggml(weighted["artifact"]), read_ggml(plain["artifact"])
    assert any(not torch.equal(a[k].q, b[k].q) for k in a)  # the importance changed llama.cpp's choices
    for bad, why in (
        ({"type": "IQ2_XXS"}, "llama-quantize's types we read back are"),
        ({"type": "Q4_0", "imatrix": False, "calibration": {"samples": 4}}, "only an imatrix calibrates"),
    ):
        assert main(["validate", str(write_recipe(recipe({"llamacpp": bad}), "bad.yaml"))]) == 2
        assert why in capsys.readouterr().err
    assert np.isfinite(weighted["metrics"]["teacher_kl"])
