"""The peak-memory estimate behind the up-front refusal: its parameter count is the model's, and
a recipe whose estimate exceeds the machine is refused in one line, exit 2, before any work."""

from __future__ import annotations

import pytest
from conftest import distill_recipe, recipe, tiny_llama
from test_families import TYPES, tiny

from compressor import UserError, memory
from compressor.cli import main
from compressor.models import count_params, shape_of
from compressor.recipe import load_recipe


@pytest.mark.parametrize("tie", [True, False])
def test_the_parameter_count_is_the_models(tie):
    model = tiny_llama(tie=tie)
    assert memory.parameters(shape_of(model.config.to_dict())) == count_params(model)


@pytest.mark.parametrize("model_type", TYPES)
def test_every_family_is_counted_within_a_percent(model_type):
    model = tiny(model_type)  # biases (Qwen 2) and per-head norms (Qwen 3, Gemma 3) are not counted
    counted = memory.parameters(shape_of(model.config.to_dict()))
    assert abs(counted / count_params(model) - 1) < 0.01


def test_training_grows_with_the_batch_and_names_its_fixes():
    shape = shape_of(tiny_llama(hidden=256, layers=4, vocab=8000).config.to_dict())
    run = type("Run", (), {"seq_len": 256, "teacher_dtype": "auto"})
    cfg = load_recipe_stage(distill_recipe()).config
    small, fixes = memory.for_training(cfg.model_copy(update={"batch_size": 1}), shape, shape, run)
    big, _ = memory.for_training(cfg.model_copy(update={"batch_size": 64}), shape, shape, run)
    assert big["activations"] == 64 * small["activations"] and big["teacher"] == small["teacher"]
    assert fixes[0] == "teacher.dtype: bfloat16"


def test_a_launch_splits_the_batch_fsdp_the_models_and_both_share_the_machine(monkeypatch):
    shape = shape_of(tiny_llama(hidden=256, layers=4, vocab=8000).config.to_dict())
    run = type("Run", (), {"seq_len": 256, "teacher_dtype": "auto"})
    cfg = load_recipe_stage(distill_recipe()).config.model_copy(update={"batch_size": 8})
    one, _ = memory.for_training(cfg, shape, shape, run)
    monkeypatch.setenv("WORLD_SIZE", "2")
    ddp, _ = memory.for_training(cfg, shape, shape, run)
    assert ddp["activations (x2 processes)"] == one["activations"]  # half the batch each, twice
    assert ddp["student, gradients, Adam (x2 processes)"] == 2 * one["student, gradients, Adam"]
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    fsdp, _ = memory.for_training(cfg, shape, shape, run)
    p = memory.parameters(shape)
    assert fsdp["student, gradients, Adam (x2 processes)"] == 2 * (16 * p // 2)  # a half in each
    assert fsdp["teacher (x2 processes)"] == 2 * (4 * p // 2)
    # loading student + teacher whole (8p) is below a half of the training state (10p) ...
    assert fsdp["models whole until sharded (x2 processes)"] == 0
    assert sum(fsdp.values()) < sum(ddp.values())
    monkeypatch.setenv("WORLD_SIZE", "4")  # ... but not a quarter (5p): loading is then the peak
    four, _ = memory.for_training(cfg, shape, shape, run)
    assert four["models whole until sharded (x4 processes)"] == 4 * (8 * p - 20 * p // 4)


def load_recipe_stage(raw: dict):
    import tempfile
    from pathlib import Path

    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.yaml"
        path.write_text(yaml.safe_dump(raw))
        return load_recipe(path, check_tasks=False).stages[0]


def test_a_stage_that_cannot_fit_is_refused_naming_it_and_what_would_fit(write_recipe, monkeypatch, tmp_path, capsys):
    path = write_recipe(distill_recipe())
    load_recipe(path, check_tasks=False)  # fits this machine
    fixed = memory.RUNTIME + memory.RUN  # what any run holds
    monkeypatch.setattr(memory, "machine_bytes", lambda: fixed + (1 << 20))  # 1 MiB beyond
    with pytest.raises(UserError) as err:
        load_recipe(path, check_tasks=False)
    message = str(err.value)
    assert message.startswith(f"{path}: teacher: measuring it needs about")
    assert message.endswith("try eval: {layerwise: true, latency: {enabled: false}}")
    monkeypatch.setattr(memory, "machine_bytes", lambda: fixed + (3 << 20))  # the teacher fits, training not
    with pytest.raises(UserError) as err:
        load_recipe(path, check_tasks=False)
    message = str(err.value)
    assert message.startswith(f"{path}: stages[0].distill: the stage needs about") and "\n" not in message
    has = f"this machine has {(fixed >> 20) + 3} MiB"
    assert f"{has}; try teacher.dtype: bfloat16 or batch_size: 2 with grad_accum: 2" in message
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out)]) == 2 and not out.exists()
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {message}"]


def test_gptq_names_its_calibration(write_recipe, monkeypatch):
    stage = {"quantize": {"method": "gptq", "bits": 4, "group_size": 32, "calibration": {"samples": 64}}}
    path = write_recipe(recipe(stage))
    monkeypatch.setattr(memory, "machine_bytes", lambda: memory.RUNTIME + memory.RUN + (3 << 20))
    with pytest.raises(
        UserError, match=r"stages\[0\]\.quantize: .* try calibration.samples: 32 or calibration.batch_size: 2"
    ):
        load_recipe(path, check_tasks=False)


def test_a_cuda_recipe_is_not_held_to_this_machines_memory(write_recipe, monkeypatch):
    monkeypatch.setattr(memory, "machine_bytes", lambda: 1)
    monkeypatch.setattr("compressor.recipe._has_cuda", lambda: True)
    load_recipe(write_recipe(distill_recipe()), check_tasks=False)  # device auto: the GPU's memory is not modelled


def test_measuring_layer_by_layer_holds_a_layer_and_the_tables():
    shape = {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 24}
    shape |= {"num_attention_heads": 16, "num_key_value_heads": 16, "tie_word_embeddings": False}
    whole = memory.measuring(shape, 4, 512)
    streamed = memory.measuring(shape, 4, 512, layerwise=True)
    assert streamed["one decoder layer"] == 2 * 4 * memory.layer_parameters(shape)  # and its checkpoint's pages
    assert streamed["embeddings, head"] == 4 * (2 * 32000 * 2048 + 2048)
    assert whole["activations"] == streamed["activations"] and sum(streamed.values()) < sum(whole.values()) / 3


@pytest.mark.parametrize(
    "settings",
    [
        {"quantize": {"method": "gptq", "mix": "Q4_K_M"}},
        {"quantize": {"method": "rtn", "mix": "Q4_K_M"}},
        {"prune": {"targets": {"mlp": 0.5}, "method": "activation"}},
    ],
)
def test_a_7b_layer_by_layer_fits_where_the_whole_model_does_not(settings):
    from types import SimpleNamespace

    shape = {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28}
    shape |= {"num_attention_heads": 28, "num_key_value_heads": 4, "tie_word_embeddings": False}
    run = SimpleNamespace(seq_len=512, teacher_dtype="auto")
    stage = load_recipe_stage(recipe(settings))
    after = stage.impl.check(stage.config, shape, shape)
    whole, fixes = stage.impl.memory(stage.config, shape, after, shape, run)
    layered = stage.impl.memory(stage.config.model_copy(update={"layerwise": True}), shape, after, shape, run)[0]
    assert sum(whole.values()) > 24 * memory.GIB and "layerwise: true" in fixes
    assert sum(layered.values()) < 8 * memory.GIB, layered  # gptq: 7.0 GiB, the down projection's Hessian
