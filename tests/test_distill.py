"""The three distillation knobs from a recipe: what is matched, how, and where data comes from."""

import copy
import json

import pytest
import torch
from conftest import distill_recipe, tiny_llama

from compressor.cli import main
from compressor.data import Sequences, continue_prompts, teacher_sequences
from compressor.kd import HiddenMatch, Knobs, OnPolicy, kd_step, projections
from compressor.pipeline import Session, run
from compressor.recipe import load_recipe
from compressor.storage import Store


def _with(**distill_fields):
    recipe = distill_recipe("knobs", steps=4)
    recipe["stages"][0]["distill"].update(distill_fields)
    return recipe


@pytest.mark.parametrize(
    "fields,words",
    [
        ({"loss": {"divergence": "jsd", "beta": 1.5}}, ["loss.beta", "less than or equal to 1"]),
        ({"loss": {"temperature": -1}}, ["loss.temperature", "greater than 0"]),
        ({"on_policy": {"fraction": 0.5}}, ["on_policy.new_tokens", "missing"]),
        ({"on_policy": {"fraction": 0.5, "new_tokens": 8}, "loss": {"alpha": 0}}, ["needs a divergence"]),
        ({"hidden": {"layer_map": {3: 0}}}, ["student layer 3 does not exist", "has 1"]),
        ({"hidden": {"layer_map": {0: 9}}}, ["teacher layer 9 does not exist", "has 2"]),
        ({"hidden": {"layer_map": {}}}, ["hidden.layer_map"]),
        ({"sequences": {"method": "nucleus"}}, ["sequences.method", "greedy"]),
        ({"loss": {"top_k": 0}}, ["loss.top_k"]),
    ],
)
def test_nonsense_combinations_are_refused_at_validation(fields, words, write_recipe, capsys, tmp_path):
    code = main(["validate", str(write_recipe(_with(**fields)))])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    for word in words:
        assert word in err, err


def test_continue_prompts_labels_cover_generated_tokens_up_to_eos():
    model = tiny_llama(seed=2)
    model.generation_config.eos_token_id = 7
    prompts = torch.randint(8, 512, (6, 5))
    torch.manual_seed(0)
    rows = continue_prompts(model, prompts, 12, {"do_sample": True, "temperature": 3.0, "top_k": 0})
    ids, labels = rows["input_ids"], rows["labels"]
    assert ids.shape == labels.shape == (6, 17)
    assert torch.equal(ids[:, :5], prompts)
    assert (labels[:, :4] == -100).all()
    for row_ids, row_labels in zip(ids, labels):
        generated = row_ids[5:].tolist()
        n = generated.index(7) + 1 if 7 in generated else 12
        assert row_labels[4 : 4 + n].tolist() == generated[:n]
        assert (row_labels[4 + n :] == -100).all()


def test_teacher_sequences_are_generated_once_and_keyed_by_settings(tmp_path):
    teacher = tiny_llama(seed=3)
    blocks = torch.randint(0, 512, (20, 24))
    cfg = Sequences(prompts=5, prompt_tokens=4, new_tokens=6, method="greedy", batch_size=2)
    first = teacher_sequences(teacher, blocks, cfg, seed=0, cache=tmp_path, cache_key="k")
    assert first["input_ids"].shape == (5, 10)
    # cached: a different teacher under the same key returns the stored sequences
    again = teacher_sequences(tiny_llama(seed=9), blocks, cfg, seed=0, cache=tmp_path, cache_key="k")
    assert torch.equal(first["input_ids"], again["input_ids"])
    # greedy = argmax continuation of the prompt
    with torch.no_grad():
        step = teacher(input_ids=first["input_ids"][:, :4]).logits[:, -1].argmax(-1)
    assert torch.equal(first["input_ids"][:, 4], step)
    sampled = teacher_sequences(
        teacher, blocks, cfg.model_copy(update={"method": "sample"}), seed=0, cache=tmp_path, cache_key="k"
    )
    beam = teacher_sequences(
        teacher, blocks, cfg.model_copy(update={"method": "beam"}), seed=0, cache=tmp_path, cache_key="k"
    )
    assert not torch.equal(sampled["input_ids"], first["input_ids"])
    assert beam["input_ids"].shape == (5, 10)


def test_hidden_matching_learns_a_projection_when_widths_differ():
    teacher = tiny_llama(hidden=64, heads=4, kv_heads=2, seed=4)
    student = tiny_llama(hidden=32, heads=4, kv_heads=2, layers=2, seed=5)
    cfg = Knobs(loss={"alpha": 0.5}, hidden=HiddenMatch(layer_map={0: 1, 1: 2}, loss="cosine", weight=2.0))
    proj = projections(cfg, student, teacher, seed=0)
    assert set(proj) == {"0", "1"} and proj["0"].weight.shape == (64, 32)
    step = kd_step(teacher, cfg, 0, proj)
    loss, logs = step(student, {"input_ids": torch.randint(0, 512, (2, 10))}, 0)
    loss.backward()
    assert "hidden" in logs and 0 < logs["hidden"] < 2
    assert proj["0"].weight.grad is not None and proj["0"].weight.grad.abs().sum() > 0
    # the same widths need no projection; mse compares the states themselves
    same = Knobs(hidden=HiddenMatch(layer_map={0: 0}))
    assert projections(same, tiny_llama(), teacher, seed=0) is None


def test_on_policy_fraction_decides_per_step_and_uses_the_students_samples():
    teacher, student = tiny_llama(seed=6), tiny_llama(seed=7, layers=1)
    batch = {"input_ids": torch.randint(0, 512, (2, 12))}
    always = kd_step(teacher, Knobs(on_policy=OnPolicy(fraction=1.0, new_tokens=5, prompt_tokens=4)), 0, None)
    never = kd_step(teacher, Knobs(on_policy=OnPolicy(fraction=0.0, new_tokens=5, prompt_tokens=4)), 0, None)
    assert all(always(student, batch, i)[1].get("on_policy") == 1.0 for i in range(3))
    assert not any("on_policy" in never(student, batch, i)[1] for i in range(3))
    half = kd_step(teacher, Knobs(on_policy=OnPolicy(fraction=0.5, new_tokens=2, prompt_tokens=4)), 0, None)
    picks = [("on_policy" in half(student, batch, i)[1]) for i in range(40)]
    assert 10 < sum(picks) < 30
    assert picks == [("on_policy" in half(student, batch, i)[1]) for i in range(40)]  # a function of the step


def test_every_knob_from_a_recipe_end_to_end(tmp_path, write_recipe, tiny_teacher_folder):
    recipe = _with(
        student={"from": "teacher", "config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}},
        loss={"divergence": "jsd", "beta": 0.3, "temperature": 1.5, "alpha": 0.8, "top_k": 32, "chunk_tokens": 50},
        hidden={"layer_map": {0: 1}, "loss": "mse", "weight": 0.5},
        sequences={"prompts": 8, "prompt_tokens": 8, "new_tokens": 16, "method": "sample", "batch_size": 4},
        on_policy={"fraction": 0.5, "new_tokens": 8, "prompt_tokens": 8},
    )
    recipe["stages"][0]["distill"]["batch_size"] = 2
    record = run(load_recipe(write_recipe(recipe)), tmp_path / "out")
    stage = record["stages"][1]
    assert stage["info"]["teacher_sequences"] == 8
    assert stage["metrics"]["params"] < record["stages"][0]["metrics"]["params"]
    assert stage["metrics"]["teacher_kl"] > 0
    # the same recipe read again is the same artifact; with another divergence, another one
    other = copy.deepcopy(recipe)
    other["stages"][0]["distill"]["loss"]["divergence"] = "tvd"
    same = Session(load_recipe(write_recipe(recipe, "same.yaml")), Store(tmp_path / "store")).keys
    changed = Session(load_recipe(write_recipe(other, "other.yaml")), Store(tmp_path / "store")).keys
    assert same == [stage["key"]] and changed != same
    assert json.loads((tmp_path / "out" / "run.json").read_text())["stages"][1]["key"] == stage["key"]
