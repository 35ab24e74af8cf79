"""Every supported decoder family, on tiny random models built from their configs: exact surgery,
llama.cpp computing what torch computes, exported integers equal to ours, reloads, refusals."""

import importlib.util

import numpy as np
import pytest
import torch
from conftest import llama_cpp_logits, recipe

from compressor.cli import main
from compressor.families import FAMILIES, family_of
from compressor.models import keep_layers, load_pretrained
from compressor.slicing import keep_heads, keep_hidden, keep_mlp_channels

CPU = torch.device("cpu")
TEXT = "def main(argv):\n    parser = argparse.ArgumentParser()  # ok\n    return 0 if x else 1\n" * 2
COMMON = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    tie_word_embeddings=True,
    eos_token_id=0,
    pad_token_id=0,
    bos_token_id=None,
)
# what sets each family apart, exercised: Llama with attention biases (permuted with their rows),
# Mistral with a window wider than any test sequence, Gemma with a head_dim that is not
# hidden / heads, a window shorter than the test sequences, a pattern that is not its default
# and two rope bases
CONFIGS = {
    "llama": dict(model_type="llama", attention_bias=True),
    "mistral": dict(model_type="mistral", sliding_window=128),
    "qwen2": dict(model_type="qwen2"),
    "qwen3": dict(model_type="qwen3", tie_word_embeddings=False),
    "gemma3_text": dict(
        model_type="gemma3_text",
        head_dim=32,
        query_pre_attn_scalar=32,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
    ),
    "phi3": dict(model_type="phi3"),
}
TYPES = list(CONFIGS)


def tiny(model_type: str, seed: int = 0, **overrides):
    """A random model of the family whose outputs depend on every weight: unit-scale
    activations, norms and biases away from their initial 1 / 0."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {**COMMON, **CONFIGS[model_type], **overrides}
    config = AutoConfig.for_model(**fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 1.0 / p.shape[1] ** 0.5 if "embed" not in name else 0.3)
            elif name.endswith("bias"):
                p.normal_(0, 0.5)
            else:  # a norm: Gemma stores an offset from 1, the others the scale itself
                p.normal_(1.0 - family_of(model).norm_offset, 0.2)
    return model


@pytest.fixture
def folder_of(tmp_path, tiny_teacher_folder):
    """A model saved as an HF folder with the tiny built-in teacher's byte-level tokenizer."""
    from transformers import AutoTokenizer

    def save(model, name="model"):
        out = tmp_path / name
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(tiny_teacher_folder).save_pretrained(out)
        return out

    return save


IDS = torch.randint(1, 512, (2, 24), generator=torch.Generator().manual_seed(0))


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _reload(model, folder_of, name="reloaded"):
    reloaded = load_pretrained(str(folder_of(model, name)), CPU, dtype="auto").model
    assert torch.equal(_logits(reloaded), _logits(model))
    with torch.no_grad():
        out = reloaded.generate(IDS[:1, :4], max_new_tokens=5, do_sample=False, pad_token_id=0)
        seq = IDS[:1, :4]
        for _ in range(5):
            seq = torch.cat([seq, reloaded(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)  # the KV cache of the pruned shapes agrees with full recomputation
    return reloaded


def test_every_family_is_registered_with_its_llama_cpp_tensor_names():
    import gguf

    assert {f.name for f in FAMILIES.values()} == {"llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3"}
    for family in FAMILIES.values():
        arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == family.gguf_arch)
        known = {gguf.TENSOR_NAMES[t].format(bid=0) for t in gguf.MODEL_TENSORS[arch]}
        for short in family.gguf_tensors().values():
            assert f"blk.0.{short}" in known, (family.name, short)


@pytest.mark.parametrize("model_type", TYPES)
def test_slicing_mlp_channels_and_heads_equals_zeroing_them(model_type, folder_of):
    model, reference = tiny(model_type), tiny(model_type)
    hd = model.config.head_dim
    keep = [torch.tensor([0, 5, 9, 50, 95, 64]) for _ in range(3)]
    keep_mlp_channels(model, keep)
    keep_kv, keep_q = [torch.tensor([1])] * 3, [torch.tensor([2, 3])] * 3  # KV group 1 with its query heads
    keep_heads(model, keep_kv, keep_q)
    family = family_of(reference)
    with torch.no_grad():
        for layer, k in zip(reference.model.layers, keep):
            drop = torch.ones(96, dtype=torch.bool)
            drop[k] = False
            layer.get_submodule(family.down_proj).weight[:, drop] = 0  # the channel writes nothing
            layer.get_submodule(family.o_proj).weight[:, : 2 * hd] = 0  # query heads 0, 1: nothing either
    # equal up to fp32 summation order (sliced matmuls sum fewer, differently blocked terms; logits ~10)
    torch.testing.assert_close(_logits(model), _logits(reference), rtol=1e-4, atol=1e-4)
    cfg = model.config
    assert (cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (6, 2, 1, hd)
    _reload(model, folder_of)


@pytest.mark.parametrize("model_type", TYPES)
def test_hidden_channels_and_layers_reload_exactly(model_type, folder_of):
    model = tiny(model_type)
    before = _logits(model)
    keep_hidden(model, torch.arange(0, 64, 2))
    assert model.config.hidden_size == 32 and model.get_input_embeddings().weight.shape == (512, 32)
    _reload(model, folder_of, "hidden")
    student = keep_layers(tiny(model_type), [0, 2])
    if model_type == "gemma3_text":  # the kept layers keep their own attention kinds
        assert student.config.layer_types == ["sliding_attention", "sliding_attention"]
    _reload(student, folder_of, "layers")
    assert not torch.equal(before, _logits(model))


def test_gemma_hidden_pruning_keeps_the_embedding_scale_and_the_tied_logits():
    model = tiny("gemma3_text")
    keep_hidden(model, torch.arange(64))  # every channel kept: only the bookkeeping can change
    torch.testing.assert_close(_logits(model), _logits(tiny("gemma3_text")), rtol=0, atol=0)
    model = tiny("gemma3_text")
    emb = model.get_input_embeddings()
    keep_hidden(model, torch.arange(0, 64, 2))
    assert float(emb.embed_scale) == pytest.approx(32**0.5)  # what a reload derives from the config


def _kl(ours, theirs):
    p, q = ours.log_softmax(-1), theirs.log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


@pytest.mark.parametrize("model_type", TYPES)
def test_an_f32_gguf_of_every_family_gives_torchs_logits_in_llama_cpp(model_type, folder_of, tmp_path):
    pytest.importorskip("llama_cpp")
    from compressor.exporters.gguf import write_gguf

    folder = folder_of(tiny(model_type))
    loaded = load_pretrained(str(folder), CPU, dtype="auto")
    path = write_gguf(
        loaded.model, loaded.tokenizer, folder, tmp_path / "m.gguf", {"weights": "f32", "embeddings": "f32"}, "m"
    )
    ids = loaded.tokenizer(TEXT).input_ids
    assert len(ids) > 2 * 8  # longer than Gemma's test window: its sliding layers matter
    with torch.no_grad():
        ours = loaded.model(torch.tensor([ids])).logits[0]
    theirs = llama_cpp_logits(path, ids)
    # the same function: llama.cpp keeps keys and values in f16 (its default KV cache), which
    # alone moves these logits by ~1e-3 (KL < 1e-6 measured); a wrong norm offset, rotary
    # layout, window, rope base or bias moves KL by orders of magnitude more (0.01 to 10)
    assert _kl(ours, theirs) < 1e-5, model_type
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


@pytest.mark.parametrize("model_type", TYPES)
def test_a_gguf_written_a_layer_at_a_time_is_the_loaded_models_file(model_type, folder_of, tmp_path):
    from compressor.exporters.gguf import write_artifact, write_gguf

    folder = folder_of(tiny(model_type))
    loaded = load_pretrained(str(folder), CPU, dtype="auto")
    for n, options in enumerate(({}, {"weights": "f32", "embeddings": "q8_0"})):
        whole = write_gguf(loaded.model, loaded.tokenizer, folder, tmp_path / f"whole-{n}.gguf", options, "m")
        streamed = write_artifact(folder, tmp_path / f"streamed-{n}.gguf", options, "m")
        assert whole.read_bytes() == streamed.read_bytes(), options


def _q8_0_codes(tensor) -> np.ndarray:
    """The int8 codes of a Q8_0 tensor, [rows, cols] (blocks: fp16 scale, then 32 codes)."""
    raw = np.array(tensor.data).view(np.uint8).reshape(-1, 34)[:, 2:].view(np.int8)
    return raw.reshape(int(tensor.shape[1]), -1)


@pytest.mark.parametrize("model_type", TYPES)
def test_quantized_exports_hold_our_codes_and_run_in_llama_cpp(model_type, folder_of, tmp_path):
    pytest.importorskip("llama_cpp")
    import gguf

    from compressor.exporters.gguf import rotary_rows, write_gguf
    from compressor.gptq_model import run_gptq
    from compressor.quantized import Scheme, integer_weight, requantize, rtn_codes, torchao_config
    from compressor.stages.quantize import Config

    model = tiny(model_type)
    blocks = torch.randint(1, 512, (8, 32), generator=torch.Generator().manual_seed(3))
    cfg8 = Scheme(bits=8, group_size=32)
    q8 = requantize(tiny(model_type), tmp_path / "f8", torchao_config(cfg8), CPU, rtn_codes(model, cfg8))
    cfg4 = Config(method="gptq", bits=4, group_size=32, calibration={"samples": 8})
    q4 = requantize(model, tmp_path / "f4", torchao_config(cfg4), CPU, run_gptq(model, cfg4, blocks, CPU))
    family = family_of(model)
    for name, quantized in (("q8", q8), ("q4", q4)):
        folder = folder_of(quantized, name)
        reloaded = load_pretrained(str(folder), CPU, dtype="auto")
        assert torch.equal(_logits(reloaded.model), _logits(quantized))  # the artifact reloads exactly
        path = write_gguf(reloaded.model, reloaded.tokenizer, folder, tmp_path / f"{name}.gguf", {}, name)
        tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
        for i, layer in enumerate(reloaded.model.model.layers):
            for hf, short in family.gguf_linears.items():
                codes, _, bits = integer_weight(layer.get_submodule(hf))
                tensor = tensors[f"blk.{i}.{short}.weight"]
                assert tensor.tensor_type.name == ("Q8_0" if bits == 8 else "Q4_0")
                if bits == 8:
                    heads = {"attn_q": 4, "attn_k": 2}.get(short) if family.gguf_interleaved_rotary else None
                    want = codes[rotary_rows(codes.shape[0], heads)] if heads else codes
                    assert np.array_equal(_q8_0_codes(tensor), want.numpy()), (model_type, short)
        ids = reloaded.tokenizer(TEXT).input_ids
        with torch.no_grad():
            ours = reloaded.model(torch.tensor([ids])).logits[0]
        # llama.cpp rounds activations to 8-bit blocks in its quantized dot products; torch does not
        # (KL ≤ 1.3e-3 measured on these models)
        assert _kl(ours, llama_cpp_logits(path, ids)) < 5e-3, (model_type, name)


def _family_recipe(teacher: str, *stages, runtimes=("torch", "llama.cpp")) -> dict:
    r = recipe(*stages)
    r["teacher"] = teacher
    r["eval"].update(tasks=[], latency={"enabled": False}, runtimes=list(runtimes))
    return r


@pytest.mark.parametrize("model_type", TYPES)
def test_every_family_runs_prune_and_gptq_and_is_measured_in_both_runtimes(
    model_type, folder_of, tmp_path, write_recipe
):
    pytest.importorskip("llama_cpp")
    from compressor.pipeline import run
    from compressor.recipe import load_recipe

    folder = folder_of(tiny(model_type))
    stages = (
        {"prune": {"targets": {"mlp": 0.25}, "multiple_of": 32, "method": "activation", "calibration": {"samples": 4}}},
        {"quantize": {"method": "gptq", "bits": 4, "group_size": 32, "calibration": {"samples": 8}}},
    )
    record = run(load_recipe(write_recipe(_family_recipe(f"hf:{folder}", *stages))), tmp_path / "run")
    rows = {(s["name"], s["runtime"]): s["metrics"] for s in record["stages"]}
    assert len(rows) == 6
    teacher = rows[("teacher", "llama.cpp")]
    assert teacher["teacher_kl"] < 1e-4 and teacher["top1_agreement"] > 0.98, (model_type, teacher)
    assert rows[("quantize", "llama.cpp")]["kernel"].startswith("llama.cpp Q4_0")
    ratio = rows[("quantize", "llama.cpp")]["heldout_ppl"] / rows[("quantize", "torch")]["heldout_ppl"]
    assert abs(ratio - 1) < 0.02, (model_type, ratio)
    # every export of the quantized stage: GGUF and GPTQ written, compressed-tensors loaded back in
    # transformers (biases of quantized Linears kept: Qwen2's)
    for fmt in ("gguf", "gptq", "compressed-tensors", "hf"):
        assert main(["export", str(tmp_path / "run"), "--format", fmt, "--out", str(tmp_path / fmt)]) == 0, fmt
    if importlib.util.find_spec("compressed_tensors") is not None:
        from transformers import AutoModelForCausalLM

        artifact = load_pretrained(record["stages"][-2]["artifact"], CPU, dtype="auto").model
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "compressed-tensors", dtype=torch.float32)
        ours, theirs = _logits(artifact), _logits(loaded)
        assert _kl(ours[0], theirs[0]) < 1e-3, model_type  # the same integers; scales, biases, norms in fp16


def _foreign(tmp_path, kind: str):
    """A tiny model of a type no family covers, saved as an HF folder."""
    from transformers import AutoConfig

    fields = {
        "gpt2": dict(n_embd=32, n_layer=1, n_head=2, vocab_size=64),
        "falcon": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64),
        "mixtral": dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=64,
            num_local_experts=2,
        ),
        "t5": dict(d_model=32, d_ff=64, num_layers=1, num_heads=2, vocab_size=64, d_kv=16),
    }[kind]
    folder = tmp_path / kind
    AutoConfig.for_model(kind, **fields).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind", ["gpt2", "falcon", "mixtral", "t5"])
def test_an_architecture_no_family_covers_is_refused_before_any_work(kind, tmp_path, write_recipe, capsys):
    out = tmp_path / "out"
    r = _family_recipe(f"hf:{_foreign(tmp_path, kind)}", {"prune": {"targets": {"mlp": 0.5}}}, runtimes=("torch",))
    assert main(["run", str(write_recipe(r)), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"model_type {kind!r}" in err[0] and "qwen3, gemma3" in err[0], err
    assert not out.exists()


@pytest.mark.parametrize(
    "model_type, stage, runtimes, words",
    [
        # Gemma 3 270M's 4 query heads share 1 KV head: whole groups cannot go
        ("gemma3_text", {"prune": {"targets": {"heads": 0.5}}}, ("torch",), "no smaller head count fits"),
        # llama.cpp's qwen2 and phi3 graphs need heads x head_dim = hidden
        ("qwen2", {"prune": {"targets": {"heads": 0.5}}}, ("torch", "llama.cpp"), "heads × head_dim = hidden_size"),
        ("phi3", {"prune": {"targets": {"heads": 0.5}}}, ("torch", "llama.cpp"), "heads × head_dim = hidden_size"),
    ],
)
def test_a_stage_a_family_cannot_take_is_refused_at_validate_naming_the_field(
    model_type, stage, runtimes, words, folder_of, write_recipe, capsys
):
    overrides = {"num_key_value_heads": 1} if model_type == "gemma3_text" else {}
    folder = folder_of(tiny(model_type, **overrides))
    path = write_recipe(_family_recipe(f"hf:{folder}", stage, runtimes=runtimes))
    capsys.readouterr()
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stages[0].prune" in err[0] and words in err[0], err


def test_mistral_beyond_its_window_in_llama_cpp_is_refused(folder_of, write_recipe, capsys):
    folder = folder_of(tiny("mistral", sliding_window=32))
    path = write_recipe(_family_recipe(f"hf:{folder}", {"prune": {"targets": {"mlp": 0.5}}}))
    capsys.readouterr()
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "eval.runtimes" in err and "window of 32 tokens" in err, err


def test_a_bos_family_starts_every_block_and_scored_window_with_bos(folder_of):
    from compressor.data import bos_blocks
    from compressor.scoring import loglikelihoods

    stream = torch.tensor([7, 1, 2, 3, 7, 4, 5, 6, 8, 9, 10])  # 7 is BOS, starting each document
    blocks = bos_blocks(stream, 4, bos=7)
    assert blocks.tolist() == [[7, 1, 2, 3], [7, 4, 5, 6], [7, 8, 9, 10]]
    model = tiny("gemma3_text")
    ctx, cont = list(range(20, 40)), [41, 42]
    # a window cut from the left gets BOS in front, and is then the same as scoring it by hand
    ((got, _),) = loglikelihoods(model, [(ctx, cont)], max_length=8, batch_size=1, bos=7)
    ids = torch.tensor([[7, *(ctx + cont)[-8:-1]]])
    logp = _logits(model, ids)[0].log_softmax(-1)
    want = logp[-2, 41] + logp[-1, 42]
    assert got == pytest.approx(float(want), abs=1e-4)


def test_scoring_holds_a_bounded_slice_of_logits_and_equals_whole_logits(monkeypatch):
    from compressor import scoring
    from compressor.measure import fidelity

    model, teacher = tiny("qwen3"), tiny("qwen3", seed=1)
    monkeypatch.setattr(scoring, "CHUNK_BYTES", 4 * 512 * 8)  # 8 positions of a 512-token vocabulary
    widest = []
    for m in (model, teacher):
        head = m.get_output_embeddings()
        head.register_forward_hook(lambda _m, args, out: widest.append(args[0].shape[0]))
    got = fidelity(model, teacher, IDS, batch_size=2)
    assert max(widest) == 8
    lp, tp = _logits(model)[:, :-1].log_softmax(-1), _logits(teacher)[:, :-1].log_softmax(-1)
    nll = -lp.gather(-1, IDS[:, 1:, None]).mean()
    assert got["heldout_ppl"] == pytest.approx(float(nll.exp()), rel=1e-5)
    assert got["teacher_kl"] == pytest.approx(float((tp.exp() * (tp - lp)).sum(-1).mean()), rel=1e-4)
    assert got["top1_agreement"] == pytest.approx(float((tp.argmax(-1) == lp.argmax(-1)).float().mean()))
