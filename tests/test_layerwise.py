"""Layer-by-layer GPTQ: the model's parameters stay on the meta device and each decoder layer is
read from the checkpoint, quantized, written and dropped; the integers and the written weights
are the whole-model path's, bit for bit, in every family."""

from types import SimpleNamespace

import pytest
import torch
from test_families import TYPES, tiny

from compressor.data import Calibration
from compressor.gptq_model import DAMP, run_gptq
from compressor.layerwise import Checkpoint, Streamed, skeleton

CPU = torch.device("cpu")


def settings(lm_head: bool = False):
    calibration = Calibration(samples=6, batch_size=4)  # a last batch shorter than the others
    return SimpleNamespace(bits=4, group_size=32, lm_head=lm_head, act_order=True, damp=DAMP, calibration=calibration)


def both_ways(model, tmp_path, cfg, types=None, shard: str | None = None):
    source, out = tmp_path / "source", tmp_path / "out"
    model.save_pretrained(source, **({"max_shard_size": shard} if shard else {}))
    blocks = torch.randint(1, model.config.vocab_size, (6, 24), generator=torch.Generator().manual_seed(0))
    meta = skeleton(source)
    assert all(p.device.type == "meta" for p in meta.parameters())
    stream = Streamed(meta, Checkpoint(source), out, CPU)
    assert run_gptq(meta, cfg, blocks, CPU, types, stream=stream) == {}  # the integers went to disk
    stream.finish()
    streamed = stream.codes()
    assert all(p.device.type == "meta" for p in meta.parameters())  # nothing stayed loaded
    whole = run_gptq(model, cfg, blocks, CPU, types)
    return whole, streamed, out


def same(a, b) -> bool:
    if isinstance(a, tuple):
        return all(torch.equal(x, y) for x, y in zip(a, b))
    fields = ("q", "d", "dmin", "sc", "mn")
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in fields if getattr(a, f) is not None)


@pytest.mark.parametrize("model_type", TYPES)
def test_the_integers_and_weights_are_the_whole_models(model_type, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny(model_type)
    whole, streamed, out = both_ways(model, tmp_path, settings(lm_head=not model.config.tie_word_embeddings))
    assert whole.keys() == streamed.keys() and all(same(whole[k], streamed[k]) for k in whole)
    written = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    expected = model.state_dict()  # the whole path left the dequantized weights in the model
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[k], expected[k]) for k in expected)


def test_gguf_types_from_a_sharded_checkpoint(tmp_path):
    model = tiny("llama")
    types = {n: "Q4_0" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n}
    whole, streamed, out = both_ways(model, tmp_path, settings(), types, shard="100KB")
    assert (
        len(set(Checkpoint(tmp_path / "source").files.values())) > 1 and (out / "model.safetensors.index.json").exists()
    )
    assert whole.keys() == streamed.keys() == types.keys() and all(same(whole[k], streamed[k]) for k in whole)


def _layerwise_run(tmp_path, stages: list, layerwise: bool, name: str):
    """A run of `stages`, the last one a layer at a time or not; its last row."""
    import yaml
    from conftest import FAST_EVAL, TINY_TEACHER

    from compressor.pipeline import run
    from compressor.recipe import load_recipe

    *before, last = stages
    ((kind, settings),) = last.items()
    last = {kind: {**settings, "layerwise": layerwise}}
    raw = {"name": name, "seed": 0, "teacher": TINY_TEACHER, "data": {"seq_len": 64}, "stages": [*before, last]}
    raw["eval"] = {**FAST_EVAL, "latency": {"enabled": False}}
    path = tmp_path / f"{name}-{layerwise}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return run(load_recipe(path), tmp_path / f"{name}-{layerwise}")["stages"][-1]


DISTILL = {"distill": {"student": {"num_layers": 1}, "steps": 2, "batch_size": 4}}


@pytest.mark.parametrize(
    "stages",
    [
        [{"quantize": {"method": "gptq", "mix": "Q4_K_M", "calibration": {"samples": 8}}}],  # from the teacher
        [DISTILL, {"quantize": {"method": "rtn", "type": "Q4_0"}}],  # from the previous artifact
    ],
    ids=["gptq-mix-first", "rtn-type-after-distill"],
)
def test_a_layerwise_quantize_stage_writes_the_whole_paths_artifact(stages, tmp_path, tiny_teacher_folder):
    from pathlib import Path

    from safetensors.torch import load_file

    from compressor.exporters import export
    from compressor.exporters.gguf import write_gguf
    from compressor.models import load_pretrained
    from compressor.quantized import read_ggml

    whole, layered = (_layerwise_run(tmp_path, stages, on, "q") for on in (False, True))
    assert whole["key"] != layered["key"]
    a, b = Path(whole["artifact"]), Path(layered["artifact"])
    assert (b / "model.safetensors.index.json").is_file() and (b / "ggml").is_dir()  # written a layer at a time
    blocks_a, blocks_b = read_ggml(a), read_ggml(b)
    assert blocks_a.keys() == blocks_b.keys() and all(same(blocks_a[k], blocks_b[k]) for k in blocks_a)
    weights_a = load_file(a / "model.safetensors")
    weights_b = Checkpoint(b).read(list(weights_a))
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert whole["info"] == layered["info"] and whole["metrics"]["accuracy"] == layered["metrics"]["accuracy"]
    for key in ("params", "heldout_ppl", "teacher_kl", "top1_agreement", "kernel"):
        assert whole["metrics"][key] == layered["metrics"][key], key
    folders = [export(tmp_path / f"q-{on}", tmp_path / f"gguf-{on}", "quantize", "gguf") for on in (False, True)]
    files = [next(folder.glob("*.gguf")).read_bytes() for folder in folders]
    assert files[0] == files[1]
    loaded = load_pretrained(str(b), CPU, dtype="auto")  # the export read it a layer at a time: as loaded whole
    written = write_gguf(loaded.model, loaded.tokenizer, b, tmp_path / "loaded.gguf", {}, "quantize")
    assert written.read_bytes() == files[1]


@pytest.mark.parametrize(
    "settings, refusal",
    [
        ({"method": "gptq", "bits": 4}, "layerwise: writes GGUF types"),
        ({"method": "bnb", "bits": 4}, "layerwise: writes GGUF types"),
        ({"method": "rtn", "target_bits": 4.5}, "layerwise: target_bits ranks every matrix"),
        ({"method": "rtn", "type": "Q4_0", "importance": True}, "layerwise: importance weighs"),
        ({"targets": {"mlp": 0.5}, "method": "taylor"}, "layerwise: taylor needs every layer's gradients"),
    ],
)
def test_what_cannot_run_a_layer_at_a_time_is_refused(settings, refusal, write_recipe, capsys):
    from conftest import recipe

    from compressor.cli import main

    kind = "prune" if "targets" in settings else "quantize"
    path = write_recipe(recipe({kind: {**settings, "layerwise": True}}))
    assert main(["validate", str(path)]) == 2
    assert refusal in capsys.readouterr().err


PRUNINGS = [
    ({"layers": 0.34, "mlp": 0.5, "heads": 0.5}, "activation", "groups"),
    ({"hidden": 0.25, "heads": 0.5}, "magnitude", "within"),
]


@pytest.mark.parametrize("model_type", TYPES)
def test_a_layerwise_prune_cuts_the_whole_models_weights(model_type, tmp_path):
    """Importance from the streamed model and each layer cut alone: the same kept structures,
    weights, config and report as pruning the model loaded whole."""
    import copy

    from test_prune import _ctx
    from transformers import AutoModelForCausalLM

    from compressor.stages import prune as prune_stage

    model = tiny(model_type)
    source = tmp_path / "source"
    model.save_pretrained(source, max_shard_size="100KB")
    blocks = torch.randint(1, model.config.vocab_size, (6, 24), generator=torch.Generator().manual_seed(0))
    for n, (targets, method, gqa) in enumerate(PRUNINGS):
        contexts = []
        for layerwise in (False, True):
            calibration = {"samples": 6, "batch_size": 4}
            cfg = prune_stage.Config(
                targets=targets, method=method, gqa=gqa, layerwise=layerwise, calibration=calibration
            )
            contexts.append(_ctx(cfg, tmp_path / f"scratch-{n}-{layerwise}", blocks=blocks, source=source))
        whole = prune_stage.prune(copy.deepcopy(model), contexts[0])
        folder = prune_stage.prune(skeleton(source), contexts[1])
        assert (folder / "model.safetensors.index.json").is_file()
        written = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        configs = [{k: v for k, v in m.config.to_dict().items() if k != "_name_or_path"} for m in (whole, written)]
        assert contexts[0].info == contexts[1].info and configs[0] == configs[1]
        expected, got = whole.state_dict(), written.state_dict()
        assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected), targets
        with torch.no_grad():
            assert torch.equal(written(blocks).logits, whole(blocks).logits)


@pytest.mark.parametrize(
    "stages",
    [
        [{"prune": {"targets": {"layers": 0.5, "mlp": 0.5}, "method": "activation", "calibration": {"samples": 4}}}],
        [DISTILL, {"prune": {"targets": {"heads": 0.5}, "method": "magnitude"}}],
    ],
    ids=["activation-first", "magnitude-after-distill"],
)
def test_a_layerwise_prune_stage_writes_the_whole_paths_artifact(stages, tmp_path, tiny_teacher_folder):
    from pathlib import Path

    from safetensors.torch import load_file

    whole, layered = (_layerwise_run(tmp_path, stages, on, "p") for on in (False, True))
    a, b = Path(whole["artifact"]), Path(layered["artifact"])
    assert (b / "model.safetensors.index.json").is_file()  # written a layer at a time
    weights_a = load_file(a / "model.safetensors")
    weights_b = Checkpoint(b).read(list(weights_a))
    assert weights_a.keys() == Checkpoint(b).files.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert whole["info"] == layered["info"] and whole["metrics"]["accuracy"] == layered["metrics"]["accuracy"]
    for key in ("params", "heldout_ppl", "teacher_kl", "top1_agreement"):
        assert whole["metrics"][key] == layered["metrics"][key], key
