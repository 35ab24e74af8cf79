"""Quantization: the shared grid, GPTQ against its formula, every method and QAT from a recipe,
honest sizes, and exported folders that load with plain transformers."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAST_EVAL, recipe, tiny_llama

from compressor.cli import main
from compressor.measure import fidelity
from compressor.models import load_pretrained
from compressor.pipeline import Session, run
from compressor.quant import IntGrid, fake_quant, gptq, scales, to_grid
from compressor.quantized import kernel, quantized_linears, stored_bytes
from compressor.recipe import load_recipe
from compressor.storage import Store

CPU = torch.device("cpu")


def test_grid_is_symmetric_per_group_and_fake_quant_is_straight_through():
    w = torch.randn(6, 128, generator=torch.Generator().manual_seed(0), requires_grad=True)
    s = scales(w, 4, 64)
    assert s.shape == (6, 2)
    groups = w.detach().reshape(6, 2, 64)
    extreme = groups.gather(-1, groups.abs().argmax(-1, keepdim=True)).squeeze(-1)
    torch.testing.assert_close(s, extreme / -8)  # the largest weight of each group sits on code -8
    q = to_grid(w.detach(), s, 4)
    assert q.min() >= -8 and q.max() <= 7 and torch.equal(q, q.round())
    assert ((q == -8).sum(-1) >= 1).all()
    out = fake_quant(w, 4, 64)
    torch.testing.assert_close(out.detach(), q * s.repeat_interleave(64, dim=1))
    out.sum().backward()
    torch.testing.assert_close(w.grad, torch.ones_like(w))  # straight-through
    torch.testing.assert_close(scales(w, 8, None), w.detach().abs().amax(-1, keepdim=True) / 127)


@pytest.mark.parametrize("bits", [4, 8])
def test_round_to_nearest_writes_the_bytes_llama_cpps_own_quantizer_writes(bits):
    """Our RTN grid is Q4_0's / Q8_0's: the same weights give the same GGUF blocks, byte for byte."""
    gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'compressor[gguf]')")
    from compressor.exporters.gguf import q4_0_blocks, q8_0_blocks

    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(2)) * torch.rand(48, 1) * 0.1
    s = scales(w, bits, 32)
    ours = (q4_0_blocks if bits == 4 else q8_0_blocks)(to_grid(w, s, bits), s)
    kind = gguf.GGMLQuantizationType.Q4_0 if bits == 4 else gguf.GGMLQuantizationType.Q8_0
    theirs = gguf.quants.quantize(w.numpy(), kind)
    assert ours.tobytes() == theirs.tobytes()


def test_gptq_with_identity_hessian_is_round_to_nearest():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    codes, s = gptq(w, torch.eye(64), IntGrid(4, 32), act_order=False, damp=0.01)
    torch.testing.assert_close(codes, to_grid(w, scales(w, 4, 32), 4))
    torch.testing.assert_close(s, scales(w, 4, 32))


def test_value_hessians_are_the_attention_outputs_error_of_a_value_perturbation():
    """tr(ΔW_g H_g ΔW_gᵀ) summed over KV heads is exactly how far attention's output moves when
    v_proj moves by ΔW: the value projection is fitted to what the attention makes of it."""
    from compressor.quant import ValueHessians

    model = tiny_llama(layers=1, heads=4, kv_heads=2)
    model.set_attn_implementation("eager")
    attention = model.model.layers[0].self_attn
    ids = torch.randint(0, 512, (3, 24), generator=torch.Generator().manual_seed(3))
    mixed = []
    attention.o_proj.register_forward_pre_hook(lambda _m, args: mixed.append(args[0].detach().clone()))
    hessians = ValueHessians(attention, attention.v_proj, 2)
    with torch.no_grad():
        model(input_ids=ids)
        h = hessians.close()
        delta = 0.01 * torch.randn_like(attention.v_proj.weight)
        attention.v_proj.weight += delta
        model(input_ids=ids)
    moved = ((mixed[1] - mixed[0]) ** 2).sum()
    n = ids.numel() * 2  # query rows per KV head: tokens x query heads sharing it
    predicted = sum(torch.trace(d @ hh @ d.T) for d, hh in zip(delta.chunk(2), h)) * n / 2
    torch.testing.assert_close(predicted, moved, rtol=1e-4, atol=0)


def test_gptq_quantizes_every_linear_and_gives_the_model_back_its_attention():
    from compressor.gptq_model import run_gptq
    from compressor.stages.quantize import Config

    model = tiny_llama(layers=2)
    before = model.config._attn_implementation
    cfg = Config(method="gptq", bits=4, group_size=32, calibration={"samples": 4, "batch_size": 2})
    codes = run_gptq(model, cfg, torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(4)), CPU)
    assert model.config._attn_implementation == before  # calibration ran eager, the model did not stay so
    assert set(codes) == set(quantized_linears(model, lm_head=False))
    value, s = codes["model.layers.0.self_attn.v_proj"]
    assert value.min() >= -8 and value.max() <= 7 and s.shape == (value.shape[0], value.shape[1] // 32)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_the_layer_output_error(act_order):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(32, 128, generator=g)
    x = torch.randn(512, 128, generator=g) @ torch.randn(128, 128, generator=g)  # correlated inputs
    h = 2 * x.T @ x / len(x)
    codes, s = gptq(w, h, IntGrid(4, 32), act_order=act_order, damp=0.01)
    gptq_w = codes * s.repeat_interleave(32, dim=1)
    rtn_w = fake_quant(w, 4, 32)
    err = lambda q: ((x @ (w - q).T) ** 2).mean().item()  # noqa: E731
    assert err(gptq_w) < 0.8 * err(rtn_w)


def _recipe(stage: dict) -> dict:
    return recipe(stage, name="q")


QAT = {"steps": 6, "batch_size": 4, "lr": 1.0e-3, "loss": {"divergence": "forward_kl", "alpha": 0.5}}
METHODS = {
    "rtn-int4-g32": ({"quantize": {"method": "rtn", "bits": 4, "group_size": 32}}, "torchao int4 weights"),
    "gptq-int4-actorder": (
        {"quantize": {"method": "gptq", "bits": 4, "group_size": 64, "act_order": True, "calibration": {"samples": 8}}},
        "torchao int4 weights",
    ),
    "rtn-int8-dynamic": (
        {"quantize": {"method": "rtn", "bits": 8, "group_size": None, "activations": "int8"}},
        "torchao int8 weights, int8 dynamic activations",
    ),
    "bnb-nf4": ({"quantize": {"method": "bnb", "bits": 4, "format": "nf4"}}, "bitsandbytes nf4"),
    "bnb-int8": ({"quantize": {"method": "bnb", "bits": 8, "group_size": None}}, "bitsandbytes LLM.int8"),
    "qat-int4": ({"qat": {**QAT, "bits": 4, "group_size": 32}}, "torchao int4 weights"),
}


def _quick(stage: dict) -> dict:
    """A recipe that measures size and held-out fidelity only: no lm-eval, no timing."""
    quick = _recipe(stage)
    quick["eval"].update(tasks=[], latency={"enabled": False})
    return quick


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_runs_from_a_recipe(name, tmp_path, write_recipe, tiny_teacher_folder):
    stage, kind = METHODS[name]
    record = run(load_recipe(write_recipe(_quick(stage))), tmp_path / "run")
    teacher, quantized = record["stages"]
    m = quantized["metrics"]
    assert m["kernel"].startswith(kind), m["kernel"]
    assert m["params"] == teacher["metrics"]["params"]
    assert m["bytes"] < teacher["metrics"]["bytes"] and m["bits_per_param"] < 32
    assert m["heldout_ppl"] < 1.5 * teacher["metrics"]["heldout_ppl"]


def test_a_gptq_export_loads_in_plain_transformers_exactly_as_measured(tmp_path, write_recipe, tiny_teacher_folder):
    stage, _ = METHODS["gptq-int4-actorder"]
    record = run(load_recipe(write_recipe(_recipe(stage))), tmp_path / "run")
    quantized = record["stages"][1]
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "export")]) == 0
    card = (tmp_path / "export" / "README.md").read_text()
    assert "## Recipe" in card and quantized["name"] in card
    assert f"torchao=={record['versions']['torchao']}" in card  # the exact packages that load it
    assert not list((tmp_path / "export").glob("*.bin")) and list((tmp_path / "export").glob("*.safetensors"))
    assert all(f.stat().st_mode & 0o044 == 0o044 for f in (tmp_path / "export").iterdir())  # readable by all
    # the export is the artifact, byte for byte ...
    artifact = Path(quantized["artifact"])
    for f in artifact.glob("*.safetensors"):
        assert (tmp_path / "export" / f.name).read_bytes() == f.read_bytes(), f.name
    # ... and a fresh interpreter that never imports compressor computes with it exactly what one
    # loading the artifact computes. Both run in inference mode: on a CPU with AVX512-BF16,
    # bitsandbytes repacks 4-bit weights on the first forward without autograd and computes in
    # bf16 from then on, so logits taken with and without grad differ by ~1e-2 there.
    ids = [[5, 9, 33, 2, 17, 80, 4, 4]]
    exported, loaded = (_fresh_logits(folder, ids) for folder in (tmp_path / "export", artifact))
    torch.testing.assert_close(exported, loaded, rtol=0, atol=0)
    # and it is the model that was measured: its held-out perplexity, recomputed from the export
    export = load_pretrained(str(tmp_path / "export"), CPU, dtype="auto").model
    heldout = Session(load_recipe(write_recipe(_recipe(stage))), Store()).heldout()
    ppl = fidelity(export, None, heldout[: FAST_EVAL["fidelity"]["samples"]], 4)["heldout_ppl"]
    assert ppl == pytest.approx(quantized["metrics"]["heldout_ppl"], rel=1e-6)


def _unpack_gptq(f, name: str, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q - zero [out, in], scale [out, in]) of one Linear of a GPTQ "v1" checkpoint, read the way
    AutoGPTQ's format documents it: codes packed 32/bits to an int32 along the input rows, zero
    points along the outputs, stored minus one."""
    qweight, qzeros, scale, g_idx = (f.get_tensor(f"{name}.{t}") for t in ("qweight", "qzeros", "scales", "g_idx"))
    k, mask = 32 // bits, 2**bits - 1
    shifts = torch.arange(k) * bits
    q = ((qweight.long().unsqueeze(1) >> shifts.view(1, k, 1)) & mask).reshape(-1, qweight.shape[1])
    z = ((qzeros.long().unsqueeze(2) >> shifts.view(1, 1, k)) & mask).reshape(qzeros.shape[0], -1) + 1
    g = g_idx.long()
    return (q - z[g]).t(), scale.float()[g].t()


@pytest.mark.parametrize("name, bits", [("gptq-int4-actorder", 4), ("qat-int4", 4), ("rtn-int8", 8)])
def test_a_gptq_checkpoint_holds_the_stage_integers_packed(name, bits, tmp_path, write_recipe, tiny_teacher_folder):
    from safetensors import safe_open

    from compressor.quantized import integer_weight

    stage = METHODS[name][0] if name in METHODS else {"quantize": {"method": "rtn", "bits": 8, "group_size": None}}
    record = run(load_recipe(write_recipe(_quick(stage))), tmp_path / "run")
    out = tmp_path / "gptq"
    assert main(["export", str(tmp_path / "run"), "--format", "gptq", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    group = {"gptq-int4-actorder": 64, "qat-int4": 32, "rtn-int8": -1}[name]
    assert config | {"meta": None} == {
        "quant_method": "gptq", "bits": bits, "group_size": group, "sym": True, "desc_act": False,
        "checkpoint_format": "gptq", "true_sequential": True, "pack_dtype": "int32", "meta": None,
    }  # fmt: skip
    artifact = load_pretrained(record["stages"][1]["artifact"], CPU, dtype="auto").model
    linears = {n: m for n, m in artifact.named_modules() if n.endswith("_proj")}
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if k.endswith("_proj.weight")]  # no float copy beside the codes
        for n, m in linears.items():
            codes, scales, _ = integer_weight(m)
            centred, scale = _unpack_gptq(f, n, bits)
            assert torch.equal(centred, codes.long()), n  # the stage's integers, exactly
            want = scales.repeat_interleave(codes.shape[1] // scales.shape[1], 1)
            torch.testing.assert_close(scale, want.half().float(), rtol=0, atol=0)  # fp16 scales, the only change
            # per weight: the code, plus an fp16 scale and a packed zero point per group; g_idx (one
            # int32 per input column, 32/out bits: 0.06 on a 576-wide model) is left out
            per_group = codes.shape[1] // scales.shape[1]
            stored_bits = 8 * sum(f.get_tensor(f"{n}.{t}").nbytes for t in ("qweight", "qzeros", "scales"))
            assert stored_bits == codes.numel() * (bits + (16 + bits) / per_group), n


def test_gptq_export_refuses_what_has_no_gptq_form(tmp_path, write_recipe, tiny_teacher_folder, capsys):
    run(load_recipe(write_recipe(_quick(METHODS["rtn-int8-dynamic"][0]))), tmp_path / "w8a8")
    run(load_recipe(write_recipe(_quick({"prune": {"targets": {"mlp": 0.5}}}), "f.yaml")), tmp_path / "float")
    capsys.readouterr()
    for folder, words in (("w8a8", "GPTQ checkpoints are weight-only"), ("float", "holds our integer grid")):
        assert main(["export", str(tmp_path / folder), "--format", "gptq", "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "x").exists()


def test_a_gptq_export_loads_through_optimum_and_gptqmodel(tmp_path, write_recipe, tiny_teacher_folder):
    """The maintained loader of the format (transformers -> optimum -> GPTQModel) computes what
    our artifact computes. Both packages are optional: `bench/gptqmodel_cpu.py` builds them in a
    venv of their own and runs this check on SmolLM2."""
    pytest.importorskip("gptqmodel", reason="gptqmodel is not installed (bench/gptqmodel_cpu.py builds it)")
    pytest.importorskip("optimum", reason="optimum is not installed")
    from transformers import AutoModelForCausalLM

    record = run(load_recipe(write_recipe(_quick(METHODS["qat-int4"][0]))), tmp_path / "run")
    assert main(["export", str(tmp_path / "run"), "--format", "gptq", "--out", str(tmp_path / "gptq")]) == 0
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "gptq", dtype=torch.float16, device_map="cpu")
    ours = load_pretrained(record["stages"][1]["artifact"], CPU, dtype="auto").model
    ids = torch.tensor([[5, 9, 33, 2, 17, 80, 4, 4]])
    with torch.inference_mode():
        a, b = ours(ids).logits, theirs(ids).logits.float()
    assert (a - b).abs().max() < 0.05 and torch.equal(a.argmax(-1), b.argmax(-1))


def _fresh_logits(folder: Path, ids: list[list[int]]) -> torch.Tensor:
    code = (
        "import json, sys, torch; from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(folder)!r})\n"
        "assert 'compressor' not in sys.modules\n"
        f"with torch.inference_mode(): print(json.dumps(m(torch.tensor({ids})).logits.tolist()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return torch.tensor(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("bits, group, acts", [(4, 32, "none"), (8, None, "int8")])
def test_qat_converts_to_exactly_what_it_trained_with(bits, group, acts, tmp_path):
    """The fake-quantized forward QAT trains with and the stored model it converts to agree."""
    from torch.nn.utils import parametrize

    from compressor.quant import FakeQuant, fake_quant_activations
    from compressor.quantized import requantize, rtn_codes, torchao_config
    from compressor.stages.quantize import Config

    model = tiny_llama(hidden=128, inter=256, layers=2, seed=3)
    cfg = Config(method="rtn", bits=bits, group_size=group, activations=acts)
    stored = requantize(copy.deepcopy(model), tmp_path / "f", torchao_config(cfg), CPU, rtn_codes(model, cfg))
    for m in quantized_linears(model, lm_head=False).values():
        parametrize.register_parametrization(m, "weight", FakeQuant(bits, group))
        if acts == "int8":
            m.register_forward_pre_hook(lambda _m, args: (fake_quant_activations(args[0]),))
    ids = torch.tensor([[3, 7, 11, 200, 5, 9]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, stored(ids).logits, rtol=1e-5, atol=1e-5)


def test_qat_from_gptq_starts_where_gptq_ends(tmp_path, write_recipe, tiny_teacher_folder):
    """`init: gptq`: with a learning rate too small to move a weight, QAT stores GPTQ's integers."""
    from compressor.quantized import integer_weight

    gptq_stage = METHODS["gptq-int4-actorder"][0]
    still = {**QAT, "steps": 1, "lr": 1.0e-12, "bits": 4, "group_size": 64}
    qat_stage = {"qat": {**still, "init": "gptq", "calibration": gptq_stage["quantize"]["calibration"]}}
    runs = [
        run(load_recipe(write_recipe(_quick(st), f"{i}.yaml")), tmp_path / str(i))
        for i, st in enumerate((gptq_stage, qat_stage))
    ]
    (_, ptq), (_, qat) = (r["stages"] for r in runs)
    assert qat["info"]["init_scales_kept"] > 0.9
    ptq_model, qat_model = (load_pretrained(r["artifact"], CPU, dtype="auto").model for r in (ptq, qat))
    qat_linears = dict(qat_model.named_modules())
    same = total = 0
    for name, m in ptq_model.named_modules():
        if name.endswith("_proj"):
            a, b = integer_weight(m)[0], integer_weight(qat_linears[name])[0]
            same, total = same + int((a == b).sum()), total + a.numel()
    assert same / total > 0.97  # all but the groups whose largest code GPTQ moved off -8
    assert qat["metrics"]["heldout_ppl"] == pytest.approx(ptq["metrics"]["heldout_ppl"], rel=0.02)


def test_sizes_count_integer_storage_not_the_logical_float_shape(tmp_path):
    from compressor.quantized import requantize, rtn_codes, torchao_config
    from compressor.stages.quantize import Config

    model = tiny_llama(hidden=128, inter=256, layers=2)
    cfg = Config(method="rtn", bits=4, group_size=64)
    q = requantize(copy.deepcopy(model), tmp_path / "f", torchao_config(cfg), CPU, rtn_codes(model, cfg))
    w = q.model.layers[0].mlp.up_proj.weight
    assert stored_bytes(w) == 256 * 128 + 256 * 2 * (4 + 1)  # int8 codes + fp32 scale and int8 zero per group
    assert "torchao int4 weights, dequantized to fp32 ×14" in kernel(q) and "dense float32 ×1" in kernel(q)


@pytest.mark.parametrize(
    "stages, words",
    [
        ([{"quantize": {"method": "rtn", "bits": 4, "group_size": 48}}], "group_size 48 must divide"),
        ([{"quantize": {"method": "rtn", "bits": 3}}], "bits"),
        ([{"quantize": {"method": "gptq", "backend": "bitsandbytes"}}], "backend bitsandbytes does not run gptq"),
        ([{"quantize": {"method": "bnb", "activations": "int8"}}], "bnb quantizes weights only"),
        ([{"quantize": {"method": "rtn", "lm_head": True}}], "tied to the embeddings"),
        ([{"quantize": {"method": "gptq", "damp": 1.5}}], "damp"),
        ([{"qat": {"steps": 2, "calibration": {"samples": 8}}}], "only init: gptq calibrates"),
        (
            [{"quantize": {"method": "rtn"}}, {"prune": {"targets": {"mlp": 0.5}}}],
            "stages[1].prune: cannot follow stages[0].quantize",
        ),
        ([{"quantize": {"method": "rtn"}}, {"qat": {"steps": 2}}], "stages[1].qat: cannot follow"),
    ],
)
def test_bad_quantization_is_refused_at_validation(stages, words, write_recipe, capsys, tiny_teacher_folder):
    recipe = _recipe(stages[0])
    recipe["stages"] = stages
    assert main(["validate", str(write_recipe(recipe))]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1, err


def test_export_refuses_an_unknown_stage_and_a_missing_run(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "no run.json" in capsys.readouterr().err
    (tmp_path / "run.json").write_text(json.dumps({"stages": [{"name": "teacher", "artifact": str(tmp_path)}]}))
    assert main(["export", str(tmp_path), "--stage", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "no stage 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.gpu
@pytest.mark.parametrize(
    "stage",
    [
        {"quantize": {"method": "bnb", "bits": 4, "format": "nf4"}},
        {"quantize": {"method": "gptq", "bits": 4, "group_size": 32, "calibration": {"samples": 8}}},
        {"qat": {**QAT, "bits": 4, "group_size": 32, "precision": "bf16"}},
    ],
)
def test_quantization_on_cuda(stage, tmp_path, write_recipe, tiny_teacher_folder):
    if stage.get("quantize", {}).get("method") == "bnb":
        pytest.importorskip("bitsandbytes", reason="the gpu extra (bitsandbytes) is not installed")
    recipe = _recipe(stage)
    recipe["device"] = "cuda"
    record = run(load_recipe(write_recipe(recipe)), tmp_path / "run")
    teacher, quantized = record["stages"]
    assert record["device"].startswith("cuda")
    assert quantized["metrics"]["bytes"] < teacher["metrics"]["bytes"]
    assert quantized["metrics"]["heldout_ppl"] < 1.5 * teacher["metrics"]["heldout_ppl"]


def _gptq_a_column_at_a_time(w, hessian, grid, act_order: bool, damp: float):
    """GPTQ as the paper states it: every column's error reaches all later columns at once."""
    w, h = w.clone(), hessian.clone()
    importance = torch.diag(h).clone()
    static = act_order or grid.span is None
    if static:
        grid.start(w, 0, importance)
    order = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(w.shape[1])
    w, h = w[:, order], h[order][:, order]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(w.shape[1])
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    for i, j in enumerate(order.tolist()):
        if not static and j % grid.span == 0:
            grid.start(w[:, j : j + grid.span], j, importance[j : j + grid.span])
        col = w[:, i]
        err = (col - grid.column(j, col)) / hinv[i, i]
        w[:, i + 1 :] -= err[:, None] * hinv[i, i + 1 :][None, :]
    return grid.result()


@pytest.mark.parametrize("kind", [None, "Q4_0", "Q4_K", "Q6_K"])
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_in_lazy_batches_makes_the_column_at_a_time_integers(kind, act_order):
    """768 columns: six lazy blocks of 128, and K types' 256-column spans that cross them."""
    from compressor.ggml import type_for_row
    from compressor.ggml.grid import GgmlGrid

    g = torch.Generator().manual_seed(0)
    rows, n = 32, 768
    w = torch.randn(rows, n, generator=g) * 0.02
    x = torch.randn(1024, n, generator=g) * torch.rand(n, generator=g) * 3
    h = x.T @ x / 1024
    make = (lambda: IntGrid(4, 32)) if kind is None else (lambda: GgmlGrid(type_for_row(kind, n), rows, n))
    fast, slow = gptq(w, h, make(), act_order, 0.01), _gptq_a_column_at_a_time(w, h, make(), act_order, 0.01)

    def error(found):
        q = found[0] if kind is None else found.q
        values = q * found[1].repeat_interleave(32, dim=1) if kind is None else found.dequantize()
        d = values - w
        return q, float(torch.einsum("ri,ij,rj->", d, h, d))

    (q_fast, e_fast), (q_slow, e_slow) = error(fast), error(slow)
    assert (q_fast == q_slow).float().mean() > 0.99  # the same sums in another order: a few ties round apart
    assert abs(e_fast / e_slow - 1) < 0.005


def test_linears_reading_one_tensor_share_one_hessian():
    """q and k read the same normed hidden states, gate and up the same MLP input: one Hessian
    each pair, found on the first batch, equal to the one each would have made alone."""
    from compressor.quant import Hessians

    model = tiny_llama()
    layer = model.model.layers[0]
    mods = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear) and n != "self_attn.v_proj"}
    shared, alone = Hessians(mods), {n: Hessians({n: m}) for n, m in mods.items()}
    with torch.no_grad():
        for seed in range(3):  # batches of different sizes
            model(torch.randint(0, 512, (seed + 1, 16), generator=torch.Generator().manual_seed(seed)))
    found = shared.close()
    assert found["self_attn.k_proj"] is found["self_attn.q_proj"] and found["mlp.up_proj"] is found["mlp.gate_proj"]
    assert found["self_attn.o_proj"] is not found["self_attn.q_proj"]
    for name, hessians in alone.items():
        assert torch.equal(found[name], hessians.close()[name]), name
